"""The other MTP systems' own interfaces, on the workbook's models (their usage examples: ``docs/OTHER_SYSTEMS.md``).
This module imports the core and the engine, never the reverse: the names it gives the core's classes
(``model.mtp_decoder``, ``model.speculative_generate`` and the thesis' ``enhanced_speculative_generate``) are attached
here, when ``multitoken`` is imported.

- an **MTP accelerator** module: ``MTPTrainer(model, tokenizer, mtp_sequence_length=4)`` puts heads on a plain causal
  LM (``trainer.model``) and ``train_step(batch, optimizer) -> float`` runs one MTP step;
  ``SpeculativeDecoder(model, tokenizer, draft_steps=4).generate(input_ids, max_length=100)`` returns exactly what
  greedy ``model.generate(input_ids, max_length=100)`` does, decoded with the heads; its ``PerformanceTracker`` calls
  work on :class:`multitoken.evaluation.PerformanceTracker`;
- **OLMo-core**'s ``MTPConfig`` field names (``mtp_head_type``, ``loss_weight_decay``, ``mtp_loss_weight``,
  ``speculation_lookahead``, ``speculation_temperature``; see ``models.foreign_fields``), ``outputs.mtp_step_losses``,
  ``model.mtp_decoder.generate(...) -> (generated, stats)`` and ``get_mtp_weight``;
- **nanochat**'s ``use_mtp`` / ``mtp_n_tokens`` / ``mtp_weight`` as profile fields (:func:`nanochat_fields`) with its
  weights 1, 0.5, 0.25, ... and its "effective data" arithmetic (:func:`effective_data`).

Two readings had to be chosen and are stated where they act: ``num_predict_tokens`` / ``mtp_sequence_length`` /
``mtp_n_tokens`` count the next token (Meta's n: n=4 is t+1..t+4, three extra heads, as nanochat's "1.75x effective
data for 3 tokens" = 1 + 0.5 + 0.25 requires), so OLMo-core's K-step weights with K=4 belong to
``num_predict_tokens=5``; and ``draft_steps`` / ``speculation_lookahead`` larger than the model's heads use every head.
"""
from __future__ import annotations

import torch

from ..core.heads import HeadsMixin, warmup_factor
from ..core.models import MultiTokenMixin
from ..core.models import heads_of as _heads_of
from ..decoding import speculative_generate

def heads_of(model):
    """``model`` itself if it has drafting heads, else the model ``wrap_model_with_mtp`` / ``MTPTrainer`` built on it;
    a plain model that was never given heads gets an error saying how to add them."""
    found = _heads_of(model)
    if found is not None:
        return found
    raise ValueError(f"{type(model).__name__} has no multi-token heads to draft with: train some first, e.g. "
                     "trainer = multitoken.MTPTrainer(model, tokenizer, mtp_sequence_length=4) (then "
                     "trainer.train_step(batch, optimizer)), or model = multitoken.wrap_model_with_mtp(model, "
                     "num_predict_tokens=4); for heads on a frozen model, multitoken.wrap_model_with_medusa(model)")


class MTPTrainer:
    """The MTP accelerator's trainer: heads on ``model`` (through ``wrap_model_with_mtp``; the result, sharing the
    model's parameters, is ``self.model``), one optimizer step per ``train_step``."""

    def __init__(self, model, tokenizer=None, mtp_sequence_length: int = 4, **mtp_fields):
        from ..core.models import wrap_model_with_mtp

        self.tokenizer = tokenizer
        self.model = wrap_model_with_mtp(model, num_predict_tokens=mtp_sequence_length, **mtp_fields)

    def train_step(self, batch, optimizer) -> float:
        """One step on ``batch`` (a dict with ``input_ids`` and optionally ``attention_mask`` / ``labels``, or an
        ids tensor); returns the loss. The optimizer may have been built over ``self.model``'s parameters or over the
        base model's (made before the heads existed): the heads' parameters it lacks are added to it as a group with
        its defaults, so they train either way."""
        have = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [p for p in self.model.parameters() if p.requires_grad and id(p) not in have]
        if missing:
            optimizer.add_param_group({"params": missing})
        self.model.train()
        out = self.model(**causal_lm_batch(batch, self.model))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(out.loss.detach())


def causal_lm_batch(batch, model) -> dict:
    """A training batch on the model's device; labels default to the ids with padding masked."""
    dev = next(model.parameters()).device
    b = dict(batch) if isinstance(batch, dict) else {"input_ids": batch}
    b = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
    if "labels" not in b:
        labels = b["input_ids"].clone()
        if "attention_mask" in b:
            labels[b["attention_mask"] == 0] = -100
        b["labels"] = labels
    return b


class SpeculativeDecoder:
    """The MTP accelerator's decoder: greedy ``generate`` with the model's heads drafting ``draft_steps`` tokens
    (at most one per head) and the model verifying them; the output is exactly plain greedy decoding's (a draft
    that disagrees with the model is replaced by the model's own token: the accelerator's "fall back to regular
    generation on mismatches", done exactly). ``last_stats`` keeps the engine's statistics of the last call."""

    def __init__(self, model, tokenizer=None, draft_steps: int = 4):
        if draft_steps < 1:
            raise ValueError(f"draft_steps must be >= 1, got {draft_steps}")
        self.model, self.tokenizer, self.draft_steps = heads_of(model), tokenizer, draft_steps
        self.last_stats = None

    def generate(self, input_ids, max_length: int | None = None, max_new_tokens: int | None = None,
                 attention_mask=None):
        if max_new_tokens is None:
            if max_length is None:
                raise ValueError("give max_length (prompt included, as generate's) or max_new_tokens")
            max_new_tokens = max_length - input_ids.shape[1]
            if max_new_tokens < 1:
                raise ValueError(f"max_length={max_length} leaves no room after a {input_ids.shape[1]}-token prompt")
        depth = min(self.draft_steps, self.model.num_heads)
        seqs, self.last_stats = speculative_generate(self.model, input_ids, max_new_tokens, tree=f"chain:{depth}",
                                                     attention_mask=attention_mask)
        return seqs


class MTPDecoder:
    """OLMo-core's ``model.mtp_decoder``: ``generate(input_ids, max_new_tokens, temperature, top_p)`` ->
    ``(generated, stats)``, lossless (greedy at temperature 0, exact speculative sampling above). ``stats["speedup"]``
    is measured, not estimated: tokens/s of this call against a second run of the same model and settings through the
    engine without drafts, right after it (``stats["speedup_vs"]`` says so); ``stats["avg_acceptance_rate"]`` is the
    fraction of drafted tokens the model accepted."""

    def __init__(self, model):
        self.model = model

    def generate(self, input_ids, max_new_tokens: int = 100, temperature: float | None = None, top_p: float = 1.0,
                 lookahead: int | None = None, generator=None):
        cfg, n_heads = self.model.config, self.model.num_heads
        temperature = cfg.speculation_temperature if temperature is None else temperature
        k = min(lookahead or cfg.speculation_lookahead or n_heads, n_heads)
        kw = dict(temperature=temperature, top_p=top_p, generator=generator)
        seqs, st = speculative_generate(self.model, input_ids, max_new_tokens, tree=f"chain:{k}", **kw)
        _, plain = speculative_generate(self.model, input_ids, max_new_tokens, tree="none", **kw)
        tries = sum(st["head_tries"])
        st.update(lookahead=k, speedup=st["tokens_per_s"] / plain["tokens_per_s"],
                  speedup_vs="the engine without drafts, same model and settings, run right after",
                  avg_acceptance_rate=sum(st["head_hits"]) / tries if tries else 0.0)
        return seqs, st


def get_mtp_weight(step: int, warmup_steps: int = 1000, target_weight: float = 0.5) -> float:
    """OLMo-core's warm-up: the MTP loss weight ramps linearly to ``target_weight`` over ``warmup_steps`` (the same
    ramp as the workbook's ``mtp_warmup_steps``)."""
    return target_weight * warmup_factor(step, warmup_steps)


def nanochat_weights(n_tokens: int, mtp_weight: float = 1.0) -> list[float]:
    """nanochat's loss weights for t+1..t+n: 1, then ``mtp_weight`` x 0.5, 0.25, ... (total = primary +
    mtp_weight x auxiliary)."""
    return [1.0] + [mtp_weight * 0.5 ** k for k in range(1, n_tokens)]


def effective_data(n_tokens: int) -> float:
    """nanochat's "effective data": the sum of its per-offset weights 1 + 0.5 + 0.25 + ... (1.75 for 3 tokens)."""
    return sum(nanochat_weights(n_tokens))


def nanochat_fields(use_mtp: bool, mtp_n_tokens: int = 3, mtp_weight: float = 0.2) -> dict:
    """nanochat's ``[training]`` fields as the workbook's profile fields: n = ``mtp_n_tokens`` (the next token
    included), weighting ``primary_aux`` with beta 0.5 and lambda = ``mtp_weight`` x 0.5, which is nanochat's
    1, w·0.5, w·0.25, ... (``use_mtp: false``: n = 1, the MTP variant is plain next-token training)."""
    if not use_mtp:
        return dict(mtp_n=1)
    if mtp_n_tokens < 1:
        raise ValueError(f"mtp_n_tokens must be >= 1, got {mtp_n_tokens}")
    return dict(mtp_n=mtp_n_tokens, mtp_weighting="primary_aux", mtp_beta=0.5, mtp_lambda=mtp_weight * 0.5)


# -- names on the workbook's models: OLMo-core's ``model.mtp_decoder``, the engine as a model method, the thesis' name --
def _speculative_generate(self, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, tree=None,
                          attention_mask=None, **kw):
    """Lossless speculative decoding with this model's heads; see :func:`multitoken.decoding.speculative_generate`."""
    return speculative_generate(self, input_ids, max_new_tokens, temperature=temperature, top_p=top_p, tree=tree,
                                attention_mask=attention_mask, **kw)


HeadsMixin.speculative_generate = _speculative_generate
HeadsMixin.enhanced_speculative_generate = _speculative_generate           # the thesis' name
MultiTokenMixin.mtp_decoder = property(MTPDecoder, doc="OLMo-core's decoder: ``model.mtp_decoder.generate(input_ids, "
                                       "max_new_tokens, temperature, top_p)`` -> ``(generated, stats)``.")
