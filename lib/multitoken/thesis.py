"""The thesis' OWN designs, kept apart from the workbook's corrected ones and named as what they are.

Garipov (2025), code in ``Goldenwert/thesis_iml``; what it claims and what its code does: ``docs/THESIS.md``.

- ``thesis_mtp_config`` / ``from_lm`` (``from_gpt2``, its own words): its MTP layout, on any decoder stack. A model of
  ``L`` layers becomes a trunk of ``L - (n - 1)`` layers; head 1 (the next token) is the next layer, heads 2..n the
  remaining layers, the last one reused when there are fewer layers than heads, all in parallel on the trunk's output,
  sharing the final norm and the tied unembedding; the loss is the mean of the n heads' losses. Its next-token path is
  ``L - n + 2`` layers (10 of 12 for GPT-2 with n = 4, 28 of 30 for SmolLM2). In the workbook this is the family's
  MTP face (``MultiTokenGPT2``, ``MultiTokenLlama``) with ``layout="thesis"``: causal, and lossless in the engine.
- ``thesis_padding_only_mask=True`` (a config switch): its forward's causal leak, as a diagnostic.
- ``ThesisCollator``: its labels (pad = EOS, and padding is scored; the prompt is masked).
- ``thesis_mtp_generate`` / ``thesis_medusa_generate``: its decoding loops (no KV cache; the MTP loop keeps the longest
  prefix that head 1 confirms, at least one token, ignores EOS and can overshoot; the Medusa loop verifies a
  5x5x3x3x2 tree of branches *without the prompt as context* with typical acceptance). Neither is lossless in general.
- ``protocol``: its timing (3 fixed prompts x 5 runs x 100 new tokens after one 20-token warm-up; Table 1's speedup
  is the ratio of mean time per call, §5.1 reports tokens/s).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from . import stats as S
from .core.backbones import backbone_of, family_of
from .decoding import model_device
from .evaluation import timed
from .core.models import MTP_FACES, _base_fields, build_face

BRANCHING = (5, 5, 3, 3, 2)           # its Medusa tree: top-k per head
TYPICAL = dict(threshold=0.2, epsilon=1e-4)


def thesis_mtp_config(base, num_predict_tokens: int = 4, leak: bool = False, **fields):
    """The thesis' layout for a model of ``L`` decoder layers and n = ``num_predict_tokens`` heads, as the MTP
    config of the model's family (``base``: a config, or a GPT-2 config's dict)."""
    if isinstance(base, dict):
        base = GPT2Config(**{k: v for k, v in base.items() if k not in ("model_type", "architectures")})
    cls = MTP_FACES[family_of(base)].config_class
    L, n = base.num_hidden_layers, num_predict_tokens
    if not 2 <= n <= L:
        raise ValueError(f"the thesis' layout splits the model's {L} layers into a trunk and {n} heads, head 1 being "
                         f"layer L-n+1: num_predict_tokens must be between 2 and the number of layers ({L})")
    b = _base_fields(base)
    for k in ("n_layer", "num_hidden_layers"):
        b.pop(k, None)
    return cls(**{**b, **fields}, num_hidden_layers=L - n + 2, num_trunk_layers=L - n + 1, num_predict_tokens=n,
               head_type="transformer", loss_weighting="uniform", loss_normalize=True, layout="thesis",
               thesis_padding_only_mask=leak)


@torch.no_grad()
def from_lm(base, num_predict_tokens: int = 4, leak: bool = False, **fields):
    """The thesis' MTP model from any causal LM with a backbone adapter (a model, a hub name such as ``"gpt2"``, a
    local directory, or a name :mod:`multitoken.pretrained` installs): layers ``0..L-n+1`` form the next-token path,
    the remaining layers (the last one repeated) become heads 2..n, all sharing the final norm and unembedding."""
    if isinstance(base, (str, Path)):
        from .core.pretrained import load_model

        base = load_model(str(base))
    bb = backbone_of(base)
    L, n = bb.num_layers, num_predict_tokens
    cfg = thesis_mtp_config(base.config, n, leak=leak, **fields)
    keep = L - n + 2
    dropped = tuple(f"{bb.layer_prefix}{i}." for i in range(keep, L))
    sd = {k: v for k, v in base.state_dict().items() if not k.startswith(dropped)}
    face, missing = build_face(base, MTP_FACES, config=cfg, state_dict=sd)
    assert all(k.startswith("mtp_heads.") for k in missing), missing
    T = cfg.num_trunk_layers
    for k, head in enumerate(face.mtp_heads, 1):           # head k+1 (t+k+1) = layer T+k, or the last one again
        head.block.load_state_dict(bb.layers[min(T + k, L - 1)].state_dict())
    return face


def from_gpt2(base, num_predict_tokens: int = 4, leak: bool = False, **fields):
    """The thesis' MTP model from a plain GPT-2 (its own words: a model, ``"gpt2"``, or a local directory)."""
    if not isinstance(base, (str, Path, GPT2LMHeadModel)):
        raise ValueError(f"from_gpt2 takes a GPT-2; {type(base).__name__} is another family: use thesis.from_lm")
    return from_lm(base, num_predict_tokens, leak, **fields)


class ThesisCollator:
    """The thesis' batches: right-padded with EOS, labels = the ids with only the prompt masked, so the padding EOS
    tokens are scored (its collator did this; the workbook's own masks padding)."""

    def __init__(self, eos_token_id: int):
        self.eos = eos_token_id

    def __call__(self, features):
        cpu = torch.device("cpu")
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.eos, dtype=torch.long, device=cpu)
        mask = torch.zeros((len(features), width), dtype=torch.long, device=cpu)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"], device=cpu)
            mask[i, :n] = 1
        labels = ids.clone()
        for i, f in enumerate(features):
            labels[i, : f["prompt_len"]] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _check_room(model, ids, max_new_tokens, extra):
    n_pos = backbone_of(model).context_size
    if ids.shape[1] + max_new_tokens + extra > n_pos:
        raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) + {extra} (the loop's "
                         f"overshoot) overflows the context ({n_pos})")


@torch.inference_mode()
def thesis_mtp_generate(model, input_ids, max_new_tokens: int = 100):
    """The thesis' ``enhanced_speculative_generate`` (batch 1). Each cycle: a full forward (no cache) gives every
    head's argmax at the last position as candidates; a second full forward over the sequence + candidates[:-1]
    checks them with head 1; the longest matching prefix is kept, at least one token. Runs until at least
    ``max_new_tokens`` are generated (so up to n - 1 more), and ignores EOS."""
    ids = input_ids.to(model_device(model))[:1]
    n = model.num_heads + 1
    _check_room(model, ids, max_new_tokens, n - 1)
    new = cycles = 0
    while new < max_new_tokens:
        out = model(ids, output_head_logits=True)
        cand = torch.stack([out.logits[0, -1].argmax()] +
                           [model.head_token_ids(h[0, -1].argmax()) for h in out.head_logits])                # (n,)
        check = model(torch.cat([ids, cand[None, :-1]], 1)).logits[0, -n:].argmax(-1)                       # (n,)
        k = max(1, int((check == cand).long().cumprod(0).sum()))
        ids = torch.cat([ids, cand[None, :k]], 1)
        new, cycles = new + k, cycles + 1
    return ids, {"new_tokens": new, "forward_passes": 2 * cycles, "cycles": cycles,
                 "tokens_per_cycle": new / max(cycles, 1)}


@torch.inference_mode()
def thesis_medusa_generate(model, input_ids, max_new_tokens: int = 100, branching=BRANCHING,
                           threshold: float = TYPICAL["threshold"], epsilon: float = TYPICAL["epsilon"],
                           eos_token_id: int | None = None):
    """The thesis' ``generate_text_with_medusa`` (greedy, batch 1). Each step: a full forward (no cache); the
    backbone's argmax, then the top-``branching[i]`` tokens of head i, every combination a branch (5x5x3x3x2 = 450
    for 5 heads); the backbone runs on the branches alone, *without the prompt*; typical acceptance keeps token i of
    a branch while p(token | branch[:i]) >= max(epsilon, threshold * exp(-entropy)); the branch that keeps most
    is appended (its first token always). Stops at ``max_new_tokens`` (cut there) or when the last token is EOS."""
    ids = input_ids.to(model_device(model))[:1]
    plen = ids.shape[1]
    _check_room(model, ids, max_new_tokens, 0)
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    branching = tuple(branching)[: model.num_heads]
    steps = 0
    while ids.shape[1] < plen + max_new_tokens:
        out = model(ids, output_head_logits=True)
        x0 = out.logits[0, -1].argmax().view(1)
        tops = [model.head_token_ids(h[0, -1].topk(k).indices) for h, k in zip(out.head_logits, branching)]
        branches = torch.stack([torch.cat([x0, torch.stack(c)]) for c in itertools.product(*tops)])  # (B, 1+D)
        logp = F.log_softmax(model(branches).logits.float(), -1)                                     # (B, 1+D, V)
        entropy = -(logp.exp() * logp).sum(-1)
        p_tok = logp[:, :-1].gather(-1, branches[:, 1:, None]).squeeze(-1).exp()                      # (B, D)
        ok = p_tok >= torch.clamp(threshold * torch.exp(-entropy[:, :-1]), min=epsilon)
        kept = 1 + ok.long().cumprod(1).sum(1)
        best = int(kept.argmax())                                     # the first branch that keeps the most
        ids = torch.cat([ids, branches[best, : int(kept[best])][None]], 1)[:, : plen + max_new_tokens]
        steps += 1
        if int(ids[0, -1]) == eos:
            break
    new = ids.shape[1] - plen
    return ids, {"new_tokens": new, "forward_passes": 2 * steps, "cycles": steps, "tokens_per_cycle": new / steps}


# --- the thesis' timing protocol -----------------------------------------------------------------------------------

def protocol(methods: list, prompts: list, runs: int = 5, new_tokens: int = 100, warmup_tokens: int = 20,
             baseline: str = "ntp_generate", seed: int = 0) -> list[dict]:
    """Time ``methods`` (:class:`multitoken.evaluation.Method` records) the thesis' way: one
    warm-up call of ``warmup_tokens`` each, then every prompt ``runs`` times with ``new_tokens``, the methods in a
    fresh random order at every (run, prompt) (a fixed order favours whoever runs after its own model). Two speedups
    against ``baseline``: Table 1's ratio of mean time per call, and the ratio of tokens/s (they differ when a method
    emits more or fewer tokens per call); each with a 95% bootstrap interval over *prompts*, a prompt's runs resampled
    together (its runs are repeated measurements of one unit, not independent ones)."""
    import random

    methods = {m.name: m for m in methods}
    for m in methods.values():
        m(prompts[0].view(1, -1), warmup_tokens)
    order = random.Random(seed)
    per = {name: [[0.0, 0, 0] for _ in prompts] for name in methods}   # per prompt: seconds, tokens, calls
    for run in range(runs):
        for i, p in enumerate(prompts):
            for name in order.sample(list(methods), len(methods)):
                m = methods[name]
                seq, _, dt = timed(lambda ids: m(ids, new_tokens), p.view(1, -1), m.device)
                cell = per[name][i]
                cell[0], cell[1], cell[2] = cell[0] + dt, cell[1] + seq.shape[1] - p.numel(), cell[2] + 1
    base_t, base_n = ([c[k] for c in per[baseline]] for k in (0, 1))
    rows = []
    for name, cells in per.items():
        t, n, calls = [c[0] for c in cells], [c[1] for c in cells], sum(c[2] for c in cells)
        by_time = S.bootstrap(lambda a, b: b.sum() / a.sum(), t, base_t)
        by_tps = S.speedup_ci(n, t, base_n, base_t)
        rows.append({"method": name, "calls": calls, "prompts": len(prompts), "runs": runs,
                     "mean_s_per_call": sum(t) / calls, "tokens_per_call": sum(n) / calls,
                     "tokens_per_s": sum(n) / sum(t), "interval_over": "prompts (runs nested)",
                     "speedup_time_ratio": by_time.value, "speedup_time_lo": by_time.lo, "speedup_time_hi": by_time.hi,
                     "speedup_tps": by_tps.value, "speedup_tps_lo": by_tps.lo, "speedup_tps_hi": by_tps.hi})
    return rows
