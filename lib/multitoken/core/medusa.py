"""MEDUSA-1: extra decoding heads on a frozen backbone (Cai et al., 2024), on any family with a backbone adapter.

Head i (0-based) = ``medusa_num_layers`` residual blocks ``x + SiLU(W x)`` (W zero-initialised, distinct weights per
layer) then its own unembedding initialised from the LM head; it reads the backbone's last hidden state at t and
predicts token t+i+2. With ``medusa_draft_vocab`` K > 0 a head's unembedding covers only K tokens (``draft_ids``,
the most frequent in its training targets; EAGLE-3's reduced draft vocabulary, FR-Spec's frequency-ranked one):
drafting and training multiply K rows instead of the whole vocabulary, and drafts stay drafts (the backbone verifies
every token, so outputs do not change). Head losses are weighted ``medusa_decay ** i`` (0.8 in the paper). With the
backbone frozen the model's next-token logits are exactly the base model's. ``MedusaGPT2`` (the thesis' name) and
``MedusaLlama`` are the faces of one class body; ``wrap_model_with_medusa(model, ...)`` puts heads on any model of a
known family.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers import initialization as init

from . import fastpath
from .backbones import backbone_of
from .heads import HeadsMixin, MultiTokenOutput, ResBlock, init_special, named_step_losses, shifted_ce
from .models import build_face, remember_heads


@dataclass(kw_only=True)
class MedusaFields:
    num_medusa_heads: int = 4
    medusa_num_layers: int = 1
    medusa_decay: float = 0.8
    medusa_draft_vocab: int = 0  # K > 0: the heads predict over K tokens (draft_ids), 0: over the whole vocabulary
    memory_efficient_loss: bool = True

    def validate_architecture(self):
        super().validate_architecture()
        if self.num_medusa_heads < 1:
            raise ValueError(f"num_medusa_heads must be >= 1, got {self.num_medusa_heads}")
        if self.medusa_num_layers < 1:
            raise ValueError(f"medusa_num_layers must be >= 1, got {self.medusa_num_layers}")
        if not 0 <= self.medusa_draft_vocab <= self.vocab_size:
            raise ValueError(f"medusa_draft_vocab must be in [0, vocab_size={self.vocab_size}] (0: the whole "
                             f"vocabulary), got {self.medusa_draft_vocab}")


@strict
class MedusaConfig(MedusaFields, GPT2Config):
    model_type = "medusa_gpt2"


@strict
class MedusaLlamaConfig(MedusaFields, LlamaConfig):
    model_type = "medusa_llama"


class MedusaUnembed(nn.Linear):
    """A head's own unembedding; initialised from the LM head (its rows of the draft vocabulary)."""


class MedusaHead(nn.Module):
    def __init__(self, config, d: int):
        super().__init__()
        self.blocks = nn.Sequential(*[ResBlock(d) for _ in range(config.medusa_num_layers)])  # distinct weights
        self.unembed = MedusaUnembed(d, config.medusa_draft_vocab or config.vocab_size, bias=False)


def frequent_tokens(labels, k: int, always=()) -> torch.Tensor:
    """The ``k`` most frequent token ids among ``labels`` (any iterable of id tensors; ``-100`` ignored), ties to
    the lower id, with the ids in ``always`` (e.g. EOS) included; fewer when fewer distinct tokens occur. Sorted."""
    flat = torch.cat([lab.reshape(-1).cpu() for lab in labels])
    flat = flat[flat >= 0]
    if not len(flat):
        raise ValueError("no labelled token to build a draft vocabulary from")
    counts = torch.bincount(flat, minlength=max(always, default=0) + 1)
    counts[list(always)] = counts.max() + 1
    order = torch.sort(-counts, stable=True).indices[: min(k, int((counts > 0).sum()))]
    return order.sort().values


class MedusaMixin(HeadsMixin):
    head_prefixes = ("medusa_heads.",)

    def __init__(self, config):
        super().__init__(config)
        self.num_heads = config.num_medusa_heads
        self.memory_efficient_loss = config.memory_efficient_loss
        d = self.backbone.hidden_size
        self.medusa_heads = nn.ModuleList([MedusaHead(config, d) for _ in range(config.num_medusa_heads)])
        # the heads' token ids, saved with the model; None: the whole vocabulary
        self.register_buffer("draft_ids", torch.arange(config.medusa_draft_vocab) if config.medusa_draft_vocab
                             else None)
        self.post_init()

    @property
    def backbone(self):
        return backbone_of(self)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_special(module)
        if isinstance(module, MedusaUnembed):
            w = self.lm_head.weight
            init.copy_(module.weight, w if self.draft_ids is None else w[self.draft_ids.to(w.device)])

    @torch.no_grad()
    def set_draft_vocab(self, ids):
        """Make ``ids`` (``config.medusa_draft_vocab`` distinct token ids; None without a draft vocabulary) the
        heads' vocabulary; each head's unembedding restarts as those rows of the LM head."""
        ids = self._store_draft_ids(ids, "medusa_draft_vocab")
        for head in self.medusa_heads:
            head.unembed.weight.copy_(self.lm_head.weight if ids is None else self.lm_head.weight[ids])

    @classmethod
    def from_base(cls, base, num_medusa_heads: int = 4, medusa_num_layers: int = 1, **kw):
        """Medusa heads on a base model of this face's family: a model object, a hub name or a local
        ``save_pretrained`` directory. The backbone is not frozen here (``freeze_backbone``)."""
        if isinstance(base, (str, Path)):
            from .pretrained import load_model

            base = load_model(str(base))
        face = wrap_model_with_medusa(base, num_medusa_heads, medusa_num_layers, freeze=False, **kw)
        if not isinstance(face, cls):
            raise ValueError(f"{cls.__name__} cannot hold a {type(base).__name__} (another family): use "
                             "wrap_model_with_medusa, which picks the family's face")
        return face

    @torch.no_grad()
    def head_inputs(self, input_ids, attention_mask=None):
        _, hidden, _ = self.backbone.trunk(input_ids, attention_mask=attention_mask)
        return hidden, hidden                                   # MEDUSA-1's heads read the final normed state

    def head_loss_weights(self) -> list[float]:
        return [self.config.medusa_decay ** i for i in range(self.num_heads)]

    def _head_step(self, k, h_prev, h0, input_ids, **_):
        return self.medusa_heads[k - 1].blocks(h0)

    def _head_logits(self, k, h):
        return self.medusa_heads[k - 1].unembed(h)

    def _stacked_heads(self):
        """Every head's weights stacked (cached until a parameter changes), so drafting is a few batched matmuls."""
        heads = self.medusa_heads

        def build():
            layers = [(torch.stack([h.blocks[i].linear.weight.mT for h in heads]),
                       torch.stack([h.blocks[i].linear.bias for h in heads]).unsqueeze(1))
                      for i in range(self.config.medusa_num_layers)]
            return layers, torch.stack([h.unembed.weight.mT for h in heads])
        return self._cached_stack(list(heads.parameters()), build)

    def spec_head_logits(self, ctx, j: int):
        """Every head's logits at step-local position j, ``(S, K)`` over the draft vocabulary (``K = V`` without
        one): all heads at once, in batched matmuls."""
        return self._stacked_logits(ctx.h0[0, j: j + 1])[:, 0]

    def _stacked_logits(self, h):
        """Every head's logits on states ``h`` (B, d): ``(S, B, V)``."""
        layers, unembed = self._stacked_heads()
        x = h.expand(self.num_heads, -1, -1)                                   # (S, B, d)
        for w, b in layers:
            x = x + F.silu(torch.baddbmm(b, x, w))
        return fastpath.heads_unembed(x, unembed, [h.unembed.weight for h in self.medusa_heads])

    def spec_head_topk(self, ctx, j: int, k: int):
        return self.head_token_ids(self.spec_head_logits(ctx, j).topk(k, -1).indices)        # (S, k)

    def spec_head_topk_rows(self, ctx, js, k):
        """Top-k tokens of every head for each row ``b`` of a batch at its position ``js[b]``: ``(B, S, k)``."""
        h = ctx.h0[torch.arange(len(js), device=js.device), js]
        return self.head_token_ids(self._stacked_logits(h).topk(k, -1).indices.transpose(0, 1))

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None, labels=None,
                use_cache=None, output_head_logits=False, logits_to_keep=0, **kwargs):
        _, hidden, pkv = self.backbone.trunk(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                             past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        logits = self.lm_head(hidden if not logits_to_keep else hidden[:, -logits_to_keep:])
        loss = lm_loss = step_losses = step_acc = None
        if labels is not None:
            lm_loss, lm_acc = shifted_ce(logits, labels, 1)
            loss, hl, ha = self.heads_loss(hidden, input_ids, labels, self.head_loss_weights())
            step_losses = torch.cat([lm_loss.detach().float().view(1).cpu(), hl.cpu()])
            step_acc = torch.cat([lm_acc.float().view(1).cpu(), ha.cpu()])
            if any(p.requires_grad for n, p in self.named_parameters() if not self.is_head_parameter(n)):
                loss = loss + lm_loss  # backbone trained too (Medusa-2-like); Medusa-1 keeps it frozen
        head_logits = self.all_head_logits(hidden, input_ids) if output_head_logits else None
        return MultiTokenOutput(loss=loss, lm_loss=lm_loss, mtp_loss=loss, step_losses=step_losses,
                                step_accuracy=step_acc, mtp_step_losses=named_step_losses(step_losses), logits=logits,
                                head_logits=head_logits, past_key_values=pkv)


class MedusaGPT2(MedusaMixin, GPT2LMHeadModel):
    config_class = MedusaConfig


class MedusaLlama(MedusaMixin, LlamaForCausalLM):
    config_class = MedusaLlamaConfig


MEDUSA_FACES = {"gpt2": MedusaGPT2, "llama": MedusaLlama}


def wrap_model_with_medusa(model, num_medusa_heads: int = 4, medusa_num_layers: int = 1, freeze: bool = True,
                           draft_vocab=None, **kw):
    """MEDUSA-1 heads on ``model`` (any causal LM with a backbone adapter), sharing its parameters. ``freeze``
    (MEDUSA-1): the backbone stops requiring grad, so next-token logits stay the base model's exactly.
    ``draft_vocab``: token ids the heads predict over (e.g. :func:`frequent_tokens` of their training targets;
    default the whole vocabulary)."""
    if draft_vocab is not None:
        kw["medusa_draft_vocab"] = len(draft_vocab)
    face, missing = build_face(model, MEDUSA_FACES, num_medusa_heads=num_medusa_heads,
                               medusa_num_layers=medusa_num_layers, **kw)
    assert all(k.startswith("medusa_heads.") or k == "draft_ids" for k in missing), missing
    remember_heads(model, face)
    with torch.no_grad():  # the heads' unembeddings start as the (now loaded) LM head's rows
        face.set_draft_vocab(draft_vocab)
    return face.freeze_backbone() if freeze else face
