"""Multi-token prediction on any causal LM: n-1 extra heads predicting tokens t+2..t+n.

The heads talk to the model only through its backbone adapter (:mod:`multitoken.backbones`), so one class body
(``MultiTokenMixin``) serves every family; ``MultiTokenGPT2`` (the thesis' name) and ``MultiTokenLlama`` are its
faces, subclasses of the family's ``*ForCausalLM`` (``generate()`` is the plain model's; ``save_pretrained`` /
``from_pretrained`` / ``AutoModelForCausalLM`` work). ``wrap_model_with_mtp(model, ...)`` puts heads on any model
of a known family, sharing its parameters.

Head designs (``head_type``):
  linear          Linear (identity-initialised) + the head norm, then the shared LM head (or its own unembedding)
  mlp             residual GELU MLP (output zero-initialised) + the head norm, then the unembedding
  transformer     one decoder layer of the base family per head (Meta; RoPE on a Llama), initialised from the last
  shared_lm_head  Medusa-style residual SiLU block, then the model's own final norm and LM head (no new unembedding)
Modes:
  sequential                 DeepSeek-V3: head k sees M [RMSNorm(h_{k-1}); RMSNorm(Emb(t_{i+k}))]; with
                             transformer heads these are DeepSeek-V3's MTP modules, each with its own KV cache
                             when drafting (``multitoken.decoding.modules``)
  share_weights_across_steps FastMTP: one head applied recursively, h_k = head(h_{k-1})
  num_trunk_layers           heads branch off after this many layers (default: after the last)
Layouts (``layout``):
  default   the above: next-token logits from the whole stack, extra heads on top
  thesis    the thesis' own layout (see ``multitoken.thesis``): the next-token path is the first ``L`` layers
            (trunk = ``L - 1`` layers, head 1 = the last), heads 2..n are decoder layers on the trunk's output,
            all heads share the final norm and the tied unembedding; build it with ``thesis.from_lm``
  ``thesis_padding_only_mask`` (thesis layout only) reproduces the thesis' causal leak as a diagnostic: full-sequence
  forwards call the layers with a padding-only mask, which under SDPA lets every position see the future.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers import initialization as init

from . import fastpath
from .backbones import backbone_of, family_of
from .heads import (WEIGHTINGS, EyeLinear, Features, HeadsMixin, MultiTokenOutput, ResBlock, ZeroLinear, init_special,
                    loss_weights, named_step_losses, shifted_ce, warmup_factor)

HEAD_TYPES = ("linear", "mlp", "transformer", "shared_lm_head")


@dataclass(kw_only=True)
class MTPFields:
    """The multi-token fields every family's config adds; invalid combinations fail here, at config time."""

    num_predict_tokens: int = 1
    head_type: str = "linear"
    sequential: bool = False
    share_weights_across_steps: bool = False
    num_trunk_layers: int | None = None
    head_own_unembedding: bool = False
    mtp_draft_vocab: int = 0    # K > 0: the heads predict over K tokens (``draft_ids``), rows of the shared LM head
    loss_weighting: str = "uniform"
    loss_beta: float = 0.8
    loss_lambda: float = 1.0
    loss_normalize: bool = False
    mtp_warmup_steps: int = 0
    memory_efficient_loss: bool = True
    layout: str = "default"
    thesis_padding_only_mask: bool = False
    speculation_lookahead: int | None = None    # drafts per step for ``mtp_decoder`` (OLMo-core's name; None: all)
    speculation_temperature: float = 0.0         # ``mtp_decoder``'s default temperature (OLMo-core's name)

    def __post_init__(self, **kwargs):
        super().__post_init__(**foreign_fields(self, kwargs))

    def validate_architecture(self):
        super().validate_architecture()
        L = self.num_hidden_layers
        if self.num_predict_tokens < 1:
            raise ValueError(f"num_predict_tokens must be >= 1, got {self.num_predict_tokens}")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head_type {self.head_type!r}; choose one of {HEAD_TYPES}")
        if self.loss_weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {self.loss_weighting!r}; choose one of {WEIGHTINGS}")
        if self.num_trunk_layers is not None and not 1 <= self.num_trunk_layers < L:
            raise ValueError(f"num_trunk_layers={self.num_trunk_layers}: the heads branch off after 1..{L - 1} of the "
                             f"model's {L} layers (None: after the last)")
        if not 0 <= self.mtp_draft_vocab <= self.vocab_size:
            raise ValueError(f"mtp_draft_vocab must be in [0, vocab_size={self.vocab_size}] (0: the whole "
                             f"vocabulary), got {self.mtp_draft_vocab}")
        if self.mtp_draft_vocab and self.head_own_unembedding:
            raise ValueError("mtp_draft_vocab selects rows of the shared LM head: it needs head_own_unembedding=False")
        if self.layout not in ("default", "thesis"):
            raise ValueError(f"unknown layout {self.layout!r}: 'default' or 'thesis'")
        if self.layout == "thesis" and not (
                self.head_type == "transformer" and self.num_trunk_layers == L - 1 and not self.sequential
                and not self.share_weights_across_steps and not self.head_own_unembedding):
            raise ValueError("layout='thesis' is the thesis' layer split: transformer heads on a trunk of L - 1 "
                             "layers, no sequential/shared heads, no own unembeddings; build it with "
                             "multitoken.thesis.from_lm(...)")
        if self.thesis_padding_only_mask and self.layout != "thesis":
            raise ValueError("thesis_padding_only_mask reproduces the causal leak of the thesis' MTP forward (its "
                             "layers called with a padding-only mask); it applies to layout='thesis' only")


@strict
class MTPConfig(MTPFields, GPT2Config):
    model_type = "multitoken_gpt2"


@strict
class MTPLlamaConfig(MTPFields, LlamaConfig):
    model_type = "multitoken_llama"


MTP_FIELD_NAMES = tuple(MTPFields.__dataclass_fields__)
# OLMo-core's MTPConfig names for the same things (its loss: L_main + mtp_loss_weight * sum_k alpha_k CE_k)
OLMO_NAMES = {"mtp_head_type": "head_type", "loss_weight_decay": "loss_beta", "mtp_loss_weight": "loss_lambda"}
REFUSED = {"acceptance_threshold": "the workbook accepts a draft only where it is the token the model itself picks "
                                   "(greedy) or passes exact rejection sampling, so decoding stays lossless: there is "
                                   "no threshold to set"}


def foreign_fields(cfg, kwargs: dict) -> dict:
    """Apply OLMo-core's field names to ``cfg`` (``loss_weight_decay`` / ``mtp_loss_weight`` select its weighting),
    refuse what the workbook does not do, and stop typos of an MTP field (``hed_type``) with the nearest valid name;
    the other keyword arguments (the base config's own) pass on."""
    import difflib

    rest, known = {}, [*MTP_FIELD_NAMES, *OLMO_NAMES, *REFUSED]
    for k, v in kwargs.items():
        if k in OLMO_NAMES:
            setattr(cfg, OLMO_NAMES[k], v)
            if k != "mtp_head_type":
                cfg.loss_weighting = "olmo"
        elif k in REFUSED:
            raise ValueError(f"{k}: {REFUSED[k]}")
        elif (near := difflib.get_close_matches(k, known, n=1, cutoff=0.75)) or k.startswith(
                ("mtp_", "loss_", "speculation_", "num_predict")):
            raise ValueError(f"unknown MTP field {k!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                              f"; the fields are {sorted(known)}"))
        else:
            rest[k] = v
    return rest


def token_embeddings_ahead(embed, input_ids, k, h_prev):
    """Emb(t_{i+k}) for a sequential head k: teacher-forced from ``(B, T)`` input ids in training (zeros past the
    end), or the embedding of one drafted token (a 1-element tensor) at decoding time."""
    if input_ids.dim() == 2:
        e = embed(input_ids[:, k:])                                       # (B, T-k, d)
        return F.pad(e, (0, 0, 0, h_prev.shape[1] - e.shape[1]))
    return embed(input_ids).view(1, 1, -1).expand_as(h_prev)


class MTPHead(nn.Module):
    """The body of one extra head; ``ln`` turns its state into unembedding input."""

    def __init__(self, config, backbone):
        super().__init__()
        d, self.kind = backbone.hidden_size, config.head_type
        if self.kind == "linear":
            self.proj = EyeLinear(d, d)
        elif self.kind == "mlp":
            self.fc, self.out = nn.Linear(d, 4 * d), ZeroLinear(4 * d, d)
        elif self.kind == "transformer":
            self.block = backbone.head_layer_class(config, layer_idx=0)  # each application: a cache of its own
        else:
            self.res = ResBlock(d)
        shared_norm = self.kind == "shared_lm_head" or config.layout == "thesis"  # the thesis shares the final norm
        self.ln = None if shared_norm else backbone.new_norm()
        if config.sequential:
            self.norm_h, self.norm_e = nn.RMSNorm(d), nn.RMSNorm(d)
            self.combine = EyeLinear(2 * d, d, bias=False)  # DeepSeek-V3's M, initialised to [I, 0]: passes h through

    def forward(self, x, backbone, pos=None, cache=None, mask=None):  # (B, T, d) -> (B, T, d)
        if self.kind == "linear":
            return self.proj(x)
        if self.kind == "mlp":
            return x + self.out(F.gelu(self.fc(x)))
        if self.kind == "transformer":
            return backbone.layer(self.block, x, pos, cache, mask)
        return self.res(x)


class MultiTokenMixin(HeadsMixin):
    """A causal LM whose extra heads predict t+2..t+n; mixed into a family's ``*ForCausalLM`` (the faces below)."""
    head_prefixes = ("mtp_heads.", "mtp_unembed.")

    def __init__(self, config):
        super().__init__(config)
        bb = self.backbone
        self.num_heads = config.num_predict_tokens - 1
        n_bodies = min(self.num_heads, 1 if config.share_weights_across_steps else self.num_heads)
        self.mtp_heads = nn.ModuleList([MTPHead(config, bb) for _ in range(n_bodies)])
        self.mtp_unembed = nn.ModuleList(
            [nn.Linear(bb.hidden_size, config.vocab_size, bias=False) for _ in range(n_bodies)]
            if config.head_own_unembedding and config.head_type != "shared_lm_head" else [])
        # the heads' token ids (rows of the shared LM head), saved with the model; None: the whole vocabulary
        self.register_buffer("draft_ids", torch.arange(config.mtp_draft_vocab) if config.mtp_draft_vocab else None)
        self.memory_efficient_loss = config.memory_efficient_loss
        self.weight_scale = 1.0  # auxiliary-loss warm-up factor, set by the trainer callback
        self._trunk_cut = config.num_trunk_layers
        self._leak_mask = None  # the padding-only mask of a leaky (thesis_padding_only_mask) forward, for its heads
        self.post_init()
        if config.thesis_padding_only_mask and config._attn_implementation != "sdpa":
            raise ValueError("thesis_padding_only_mask reproduces the thesis' leak under SDPA attention (a padding-only "
                             "mask turns SDPA's causal masking off); this model uses "
                             f"{config._attn_implementation!r} attention")

    @property
    def backbone(self):
        return backbone_of(self)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_special(module)
        bb = self.backbone
        if isinstance(module, bb.head_norm_class):
            for name, p in module.named_parameters():
                init.copy_(p, getattr(bb.norm, name))
        if isinstance(module, bb.head_layer_class):
            for (_, p), (_, q) in zip(module.named_parameters(), bb.layers[-1].named_parameters()):
                init.copy_(p, q)
        if isinstance(module, nn.Linear) and any(module is m for m in getattr(self, "mtp_unembed", [])):
            init.copy_(module.weight, self.lm_head.weight)

    @torch.no_grad()
    def init_heads_from_trunk(self):
        """After loading a plain checkpoint: copy the last layer into transformer heads, the final norm into head
        norms and the LM head into own unembeddings (from_pretrained initialises missing weights before loading)."""
        bb = self.backbone
        for head in self.mtp_heads:
            if head.kind == "transformer":
                head.block.load_state_dict(bb.layers[-1].state_dict())
            if head.ln is not None:
                head.ln.load_state_dict(bb.norm.state_dict())
        for un in self.mtp_unembed:
            un.weight.copy_(self.lm_head.weight)
        return self

    @torch.no_grad()
    def set_draft_vocab(self, ids):
        """Make ``ids`` (``config.mtp_draft_vocab`` distinct token ids; None without a draft vocabulary) the heads'
        vocabulary: their logits become those rows of the shared LM head, their loss and drafts cover only them."""
        self._store_draft_ids(ids, "mtp_draft_vocab")
        return self

    def _draft_unembed(self) -> torch.Tensor:
        """The LM head's rows of the draft vocabulary, ``(K, d)`` (kept while neither changes, outside training)."""
        w = self.lm_head.weight
        if self.training and w.requires_grad:
            return w[self.draft_ids]
        return self._cached_stack([w, self.draft_ids], lambda: w[self.draft_ids].detach(), "_draft_rows")

    def freeze_backbone(self):
        """Train the heads only (MEDUSA-1's recipe applied to MTP heads): the trunk, final norm and LM head stop
        requiring grad, so the next-token distribution stays the base model's exactly."""
        return super().freeze_backbone()

    # -- head interface used by HeadsMixin ----------------------------------------------------------------------
    def _body(self, k):
        return self.mtp_heads[0 if len(self.mtp_heads) == 1 else k - 1]

    def _head_step(self, k, h_prev, h0, input_ids, cache=None, mask=None, token_emb=None, pos=None):
        """Head k's state. Sequential heads read Emb(t_{i+k}): teacher-forced from ``input_ids``, or ``token_emb``
        given row by row (the drafting of :mod:`multitoken.decoding.modules`). ``pos``: the positional input of the rows
        (``backbone.positions``; None: consecutive after whatever ``cache`` holds)."""
        body, cfg, bb = self._body(k), self.config, self.backbone
        if cfg.sequential:
            emb = token_emb if token_emb is not None else token_embeddings_ahead(bb.embed_tokens, input_ids, k, h_prev)
            x = torch.cat([body.norm_h(h_prev), body.norm_e(emb)], -1)
            x = body.combine(x) if self.training else fastpath.linear(body.combine, x)
        else:
            x = h_prev if cfg.share_weights_across_steps else h0
        if body.kind == "transformer" and mask is None and self._leak_mask is not None and cache is None:
            mask = self._leak_mask                                       # the thesis' leak: padding-only mask
        return body(x, bb, pos, cache, mask)

    def _head_logits(self, k, h):
        body = self._body(k)
        x = body.ln(h) if body.ln is not None else self.backbone.norm(h)
        if self.draft_ids is not None:
            return F.linear(x, self._draft_unembed())
        un = self.mtp_unembed[0 if len(self.mtp_unembed) == 1 else k - 1] if len(self.mtp_unembed) else self.lm_head
        return un(x) if self.training else fastpath.linear(un, x)

    def loss_weights(self):
        c = self.config
        w = loss_weights(c.loss_weighting, c.num_predict_tokens, c.loss_beta, c.loss_lambda, c.loss_normalize)
        return [w[0]] + [x * self.weight_scale for x in w[1:]]

    def head_loss_weights(self) -> list[float]:
        return self.loss_weights()[1:]

    def set_training_step(self, step: int):
        self.weight_scale = warmup_factor(step, self.config.mtp_warmup_steps)

    # -- forward ------------------------------------------------------------------------------------------------
    def _padding_only_mask(self, input_ids, attention_mask):
        """The thesis' calling pattern: every layer gets a padding-only additive mask ``(B, 1, 1, T)``. Under SDPA
        that mask switches causal masking off, so position t sees every later token (the leak)."""
        dtype = self.backbone.embed_tokens.weight.dtype
        att = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return (1.0 - att[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None, labels=None,
                use_cache=None, output_head_logits=False, logits_to_keep=0, **kwargs):
        self._leak_mask, bb = None, self.backbone
        if self.config.thesis_padding_only_mask and past_key_values is None and position_ids is None:
            # full-sequence forwards only (training, perplexity, the thesis' no-cache loops)
            self._leak_mask = self._padding_only_mask(input_ids, attention_mask)
            h0, hidden, pkv = bb.trunk(input_ids, mask=self._leak_mask, cut=self._trunk_cut)
        else:
            h0, hidden, pkv = bb.trunk(input_ids, cut=self._trunk_cut, attention_mask=attention_mask,
                                       position_ids=position_ids, past_key_values=past_key_values,
                                       use_cache=use_cache, **kwargs)
        logits = self.lm_head(hidden if not logits_to_keep else hidden[:, -logits_to_keep:])  # (B, T, V)
        loss = lm_loss = mtp_loss = step_losses = step_acc = None
        if labels is not None:
            w = self.loss_weights()
            lm_loss, lm_acc = shifted_ce(logits, labels, 1)
            if self.num_heads:
                mtp_loss, hl, ha = self.heads_loss(h0, input_ids, labels, w[1:])
                step_losses = torch.cat([lm_loss.detach().float().view(1).cpu(), hl.cpu()])
                step_acc = torch.cat([lm_acc.float().view(1).cpu(), ha.cpu()])
                loss = w[0] * lm_loss + mtp_loss
            else:
                loss, step_losses, step_acc = lm_loss, lm_loss.detach().view(1).cpu(), lm_acc.view(1).cpu()
        head_logits = self.all_head_logits(h0, input_ids) if output_head_logits and self.num_heads else None
        return MultiTokenOutput(loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, step_losses=step_losses,
                                step_accuracy=step_acc, mtp_step_losses=named_step_losses(step_losses), logits=logits,
                                head_logits=head_logits, past_key_values=pkv)

    # -- decoding hooks (transformer heads keep one KV cache per head application) ------------------------------
    def _seq_modules(self) -> bool:
        """Sequential transformer modules (DeepSeek-V3 / FastMTP): their own KV caches, kept by the drafter
        ``multitoken.decoding.modules.Modules``."""
        return self.config.sequential and self.config.head_type == "transformer"

    def spec_new_cache(self):
        n = 1 + (self.num_heads if self.config.head_type == "transformer" and not self.config.sequential else 0)
        return [self.backbone.new_cache() for _ in range(n)]

    def spec_forward(self, input_ids, caches, position_ids=None, attention_mask=None):
        bb = self.backbone
        position_ids = bb._position_ids(input_ids, position_ids, caches[0])  # before the trunk's cache grows
        h0, hidden = self._trunk(input_ids, caches[0], position_ids, attention_mask)
        states = None
        if self.config.head_type == "transformer" and not self.config.sequential:
            states, pos = [h0], bb.positions(h0, position_ids)
            for k in range(1, self.num_heads + 1):
                states.append(self._head_step(k, states[-1], h0, None, cache=caches[k], mask=attention_mask, pos=pos))
        return fastpath.linear(self.lm_head, hidden), Features(h0, input_ids, states, caches)

    def _batchable(self) -> bool:
        """Independent position-wise heads (linear / mlp bodies on h0, each with its own norm) draft together."""
        c = self.config
        return c.head_type in ("linear", "mlp") and not c.sequential and not c.share_weights_across_steps

    def _stacked_heads(self):
        """The heads' weights stacked along a head dimension (cached until a parameter changes)."""
        heads, un = self.mtp_heads, self.mtp_unembed

        def build():
            st = lambda ws: torch.stack(list(ws))  # noqa: E731
            if self.config.head_type == "mlp":
                body = (st(h.fc.weight.mT for h in heads), st(h.fc.bias for h in heads).unsqueeze(1),
                        st(h.out.weight.mT for h in heads), st(h.out.bias for h in heads).unsqueeze(1))
            else:
                body = (st(h.proj.weight.mT for h in heads), st(h.proj.bias for h in heads).unsqueeze(1))
            has_bias = getattr(heads[0].ln, "bias", None) is not None
            norm = (st(h.ln.weight for h in heads).unsqueeze(1),
                    st(h.ln.bias for h in heads).unsqueeze(1) if has_bias else None)
            unembed = (st(u.weight.mT for u in un) if len(un) else          # (S, d, V), (d, V) or (d, K)
                       self.lm_head.weight.mT if self.draft_ids is None else self._draft_unembed().mT)
            return body, norm, unembed
        return self._cached_stack([*heads.parameters(), *un.parameters(), self.lm_head.weight,
                                   *([] if self.draft_ids is None else [self.draft_ids])], build)

    def spec_head_logits(self, ctx, j: int):
        """Every head's logits at step-local position j, ``(S, V)`` (over the draft vocabulary where the heads have
        one: ``head_token_ids`` maps), in batched matmuls (position-wise heads)."""
        return self._stacked_logits(ctx.h0[0, j: j + 1])[:, 0]

    def spec_head_topk_rows(self, ctx, js, k):
        """Top-k tokens of every head for each row ``b`` of a batch at its position ``js[b]``: ``(B, S, k)``
        (None where the heads draft one row at a time)."""
        rows = torch.arange(len(js), device=js.device)
        if ctx.states is not None:
            return self.head_token_ids(torch.stack([self._head_logits(s, ctx.states[s][rows, js][:, None])[:, 0].topk(
                k).indices for s in range(1, self.num_heads + 1)], 1))
        if self._batchable():
            return self.head_token_ids(self._stacked_logits(ctx.h0[rows, js]).topk(k, -1).indices.transpose(0, 1))
        return None

    def _stacked_logits(self, h):
        """Every head's logits on states ``h`` (B, d): ``(S, B, V)``."""
        body, (ln_w, ln_b), unembed = self._stacked_heads()
        x = h.expand(self.num_heads, -1, -1)                                     # (S, B, d)
        if self.config.head_type == "mlp":
            w1, b1, w2, b2 = body
            x = x + torch.baddbmm(b2, F.gelu(torch.baddbmm(b1, x, w1)), w2)
        else:
            x = torch.baddbmm(body[1], x, body[0])
        x = self.backbone.norm_stacked(x, ln_w, ln_b)
        if unembed.dim() == 3:                                                   # each head's own unembedding
            return fastpath.heads_unembed(x, unembed, [u.weight for u in self.mtp_unembed])
        return torch.matmul(x, unembed)                                          # (S, B, V)

    def spec_head_topk(self, ctx, j, k):
        if ctx.states is not None:
            return self.head_token_ids(torch.stack([self._head_logits(s, ctx.states[s][:, j])[0].topk(k).indices
                                                    for s in range(1, self.num_heads + 1)]))
        if self._batchable():
            return self.head_token_ids(self.spec_head_logits(ctx, j).topk(k, -1).indices)
        return super().spec_head_topk(ctx, j, k)

    def spec_propose(self, ctx, j, x0, tree):
        if self._seq_modules():
            raise ValueError("the MTP modules keep caches of their own: they draft through "
                             "multitoken.decoding.modules.Modules (drafter='heads' picks it)")
        if not self.config.sequential:
            return HeadsMixin.spec_propose(self, ctx, j, x0, tree)
        # Sequential heads draft autoregressively: head d sees the state of the parent node and the parent's token.
        h0 = ctx.h0[:, j: j + 1]
        tokens = torch.empty(len(tree.paths), dtype=torch.long, device=h0.device)
        state = {(): (h0, torch.tensor(x0, device=h0.device))}
        for i, path in enumerate(tree.paths):
            h_par, tok_par = state[path[:-1]]
            h = self._head_step(len(path), h_par, h0, tok_par.view(1))
            tokens[i] = self.head_token_ids(self._head_logits(len(path), h)[0, -1].topk(path[-1] + 1).indices[-1])
            state[path] = (h, tokens[i])
        return tokens


class MultiTokenGPT2(MultiTokenMixin, GPT2LMHeadModel):
    """GPT-2 whose extra heads predict t+2..t+n (the thesis' name); ``generate()`` is plain GPT-2."""

    config_class = MTPConfig


class MultiTokenLlama(MultiTokenMixin, LlamaForCausalLM):
    """A Llama (SmolLM2, ...) whose extra heads predict t+2..t+n; ``generate()`` is the plain Llama's."""

    config_class = MTPLlamaConfig


MTP_FACES = {"gpt2": MultiTokenGPT2, "llama": MultiTokenLlama}


def _base_fields(config) -> dict:
    """A base config's own fields, ready to build a face's config from (bookkeeping and quantization dropped)."""
    out = config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "quantization_config", "_name_or_path",
              *MTP_FIELD_NAMES):
        out.pop(k, None)
    return out


def build_face(model, faces: dict, config=None, state_dict=None, **fields):
    """``faces[family](config)`` holding ``model``'s weights plus freshly initialised heads, on the same device, dtype
    and attention implementation, with the same generation config. ``config`` defaults to ``model``'s plus ``fields``.
    Without ``state_dict`` the face *shares* ``model``'s parameters (an optimizer built over ``model.parameters()``
    trains the face's backbone too, and freezing the face freezes them); with one (e.g. a subset of the layers) it
    holds copies. Returns the face and the keys it did not find (the heads')."""
    cls = faces[family_of(model)]
    cfg = config if config is not None else cls.config_class(**_base_fields(model.config), **fields)
    cfg.architectures = [cls.__name__]
    cfg._attn_implementation = model.config._attn_implementation
    face = cls(cfg)
    share = state_dict is None
    sd = model.state_dict(keep_vars=True) if share else state_dict
    missing, unexpected = face.load_state_dict(sd, strict=False, assign=share)
    if unexpected:
        raise ValueError(f"{type(model).__name__}'s weights {unexpected[:4]}... have no place in {cls.__name__}")
    p = next(model.parameters())
    face.to(p.device, p.dtype)
    face.generation_config = copy.deepcopy(model.generation_config)
    return face, missing


def remember_heads(base, wrapped) -> None:
    """Note on ``base`` that ``wrapped`` holds heads for it (so a decoder given the base finds them): a plain
    attribute, not a submodule (``base``'s parameters and state dict are unchanged)."""
    base.__dict__["_multitoken_heads"] = wrapped


def heads_of(model):
    """``model`` itself if it has drafting heads, else the model ``wrap_model_with_mtp`` /
    ``wrap_model_with_medusa`` last built on it (None: neither)."""
    if getattr(model, "num_heads", 0) and hasattr(model, "spec_forward"):
        return model
    return getattr(model, "__dict__", {}).get("_multitoken_heads")


def wrap_model_with_mtp(model, config=None, draft_vocab=None, **overrides):
    """Multi-token heads on ``model`` (any causal LM with a backbone adapter: GPT-2, Llama). ``config``: an
    ``MTPConfig``-like object or a dict of MTP fields; keyword arguments override them. Every head design works on
    every family (transformer heads and sequential modules are the family's own decoder layer, initialised from the
    last one); the result shares ``model``'s parameters and its next-token logits equal ``model``'s until trained.
    ``draft_vocab``: token ids the heads predict over (rows of the shared LM head; default the whole vocabulary)."""
    if isinstance(config, (MTPConfig, MTPLlamaConfig)):
        config = {k: getattr(config, k) for k in MTP_FIELD_NAMES}
    fields = dict(config or {}, **overrides)
    if draft_vocab is not None:
        fields["mtp_draft_vocab"] = len(draft_vocab)
    unknown = sorted(set(fields) - set(MTP_FIELD_NAMES) - set(OLMO_NAMES) - set(REFUSED))
    if unknown:
        raise ValueError(f"unknown MTP field(s) {unknown}; the fields are {list(MTP_FIELD_NAMES)} (or OLMo-core's "
                         f"{list(OLMO_NAMES)})")
    face, missing = build_face(model, MTP_FACES, **fields)
    assert all(k.startswith(("mtp_heads.", "mtp_unembed.")) or k == "draft_ids" for k in missing), missing
    remember_heads(model, face)
    return face.init_heads_from_trunk().set_draft_vocab(draft_vocab)
