"""Multi-token prediction GPT-2: a GPT2LMHeadModel with n-1 extra heads predicting tokens t+2..t+n.

Head designs (``head_type``):
  linear          Linear (identity-initialised) + LayerNorm, then the shared LM head (or its own unembedding)
  mlp             residual GELU MLP (output zero-initialised) + LayerNorm, then the unembedding
  transformer     one GPT-2 block per head (Meta), initialised from the trunk's last block, own LayerNorm
  shared_lm_head  Medusa-style residual SiLU block, then the model's own ln_f and lm_head (no new unembedding)
Modes:
  sequential                 DeepSeek-V3: head k sees M [RMSNorm(h_{k-1}); RMSNorm(Emb(t_{i+k}))]; with
                             transformer heads these are DeepSeek-V3's MTP modules, each with its own KV cache
                             when drafting (``multitoken.sequential``)
  share_weights_across_steps FastMTP: one head applied recursively, h_k = head(h_{k-1})
  num_trunk_layers           heads branch off after this many blocks (default: after the last)
Layouts (``layout``):
  default   the above: next-token logits from the whole stack, extra heads on top
  thesis    the thesis' own layout (see ``multitoken.thesis``): the next-token path is the first ``n_layer`` blocks
            (trunk = ``n_layer - 1`` blocks, head 1 = the last), heads 2..n are transformer blocks on the trunk's
            output, all heads share ``ln_f`` and the tied unembedding; build it with ``thesis.thesis_mtp_config``
  ``thesis_padding_only_mask`` (thesis layout only) reproduces the thesis' causal leak as a diagnostic: full-sequence
  forwards call the blocks with a padding-only mask, which under SDPA lets every position see the future.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from . import fastpath, sequential
from .heads import (WEIGHTINGS, EyeLinear, HeadsMixin, MultiTokenOutput, ResBlock, ZeroLinear, init_special, loss_weights,
                    shifted_ce, warmup_factor)

HEAD_TYPES = ("linear", "mlp", "transformer", "shared_lm_head")


@strict
class MTPConfig(GPT2Config):
    """GPT-2 config plus the multi-token fields; invalid combinations fail here, at config time."""

    model_type = "multitoken_gpt2"
    num_predict_tokens: int = 1
    head_type: str = "linear"
    sequential: bool = False
    share_weights_across_steps: bool = False
    num_trunk_layers: int | None = None
    head_own_unembedding: bool = False
    loss_weighting: str = "uniform"
    loss_beta: float = 0.8
    loss_lambda: float = 1.0
    loss_normalize: bool = False
    mtp_warmup_steps: int = 0
    memory_efficient_loss: bool = True
    layout: str = "default"
    thesis_padding_only_mask: bool = False

    def validate_architecture(self):
        super().validate_architecture()
        if self.num_predict_tokens < 1:
            raise ValueError(f"num_predict_tokens must be >= 1, got {self.num_predict_tokens}")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head_type {self.head_type!r}; choose one of {HEAD_TYPES}")
        if self.loss_weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {self.loss_weighting!r}; choose one of {WEIGHTINGS}")
        if self.num_trunk_layers is not None and not 1 <= self.num_trunk_layers <= self.n_layer:
            raise ValueError(f"num_trunk_layers={self.num_trunk_layers} leaves no trunk or exceeds n_layer={self.n_layer}")
        if self.layout not in ("default", "thesis"):
            raise ValueError(f"unknown layout {self.layout!r}: 'default' or 'thesis'")
        if self.layout == "thesis" and not (
                self.head_type == "transformer" and self.num_trunk_layers == self.n_layer - 1 and not self.sequential
                and not self.share_weights_across_steps and not self.head_own_unembedding):
            raise ValueError("layout='thesis' is the thesis' block split: transformer heads on a trunk of n_layer - 1 "
                             "blocks, no sequential/shared heads, no own unembeddings; build it with "
                             "multitoken.thesis.thesis_mtp_config(...)")
        if self.thesis_padding_only_mask and self.layout != "thesis":
            raise ValueError("thesis_padding_only_mask reproduces the causal leak of the thesis' MTP forward (its "
                             "blocks called with a padding-only mask); it applies to layout='thesis' only")


def token_embeddings_ahead(wte, input_ids, k, h_prev):
    """Emb(t_{i+k}) for a sequential head k: teacher-forced from ``(B, T)`` input ids in training (zeros past the
    end), or the embedding of one drafted token (a 1-element tensor) at decoding time."""
    if input_ids.dim() == 2:
        emb = wte(input_ids[:, k:])                                       # (B, T-k, d)
        return F.pad(emb, (0, 0, 0, h_prev.shape[1] - emb.shape[1]))
    return wte(input_ids).view(1, 1, -1).expand_as(h_prev)


class HeadLayerNorm(nn.LayerNorm):
    """A head's final norm, initialised from the trunk's ln_f."""


class HeadBlock(GPT2Block):
    """A transformer head (Meta), initialised as a copy of the trunk's last block."""


class MTPHead(nn.Module):
    """The body of one extra head; ``norm`` turns its state into unembedding input."""

    def __init__(self, config: MTPConfig):
        super().__init__()
        d, self.kind = config.n_embd, config.head_type
        if self.kind == "linear":
            self.proj = EyeLinear(d, d)
        elif self.kind == "mlp":
            self.fc, self.out = nn.Linear(d, 4 * d), ZeroLinear(4 * d, d)
        elif self.kind == "transformer":
            self.block = HeadBlock(config, layer_idx=0)  # each application gets its own cache, so index 0
        else:
            self.res = ResBlock(d)
        shared_norm = self.kind == "shared_lm_head" or config.layout == "thesis"  # the thesis shares ln_f
        self.ln = None if shared_norm else HeadLayerNorm(d, eps=config.layer_norm_epsilon)
        if config.sequential:
            self.norm_h, self.norm_e = nn.RMSNorm(d), nn.RMSNorm(d)
            self.combine = EyeLinear(2 * d, d, bias=False)  # DeepSeek-V3's M, initialised to [I, 0]: passes h through

    def forward(self, x, cache=None, mask=None):  # (B, T, d) -> (B, T, d)
        if self.kind == "linear":
            return self.proj(x)
        if self.kind == "mlp":
            return x + self.out(F.gelu(self.fc(x)))
        if self.kind == "transformer":
            if cache is not None and fastpath.supported(self.block):
                return fastpath.block(self.block, x, cache, 0, mask)
            return self.block(x, past_key_values=cache, attention_mask=mask, use_cache=cache is not None)
        return self.res(x)


class MultiTokenGPT2(HeadsMixin, GPT2LMHeadModel):
    """GPT-2 whose extra heads predict t+2..t+n; ``generate()`` is plain GPT-2, the heads only add losses/drafts."""

    config_class = MTPConfig

    def __init__(self, config: MTPConfig):
        super().__init__(config)
        self.num_heads = config.num_predict_tokens - 1
        n_bodies = min(self.num_heads, 1 if config.share_weights_across_steps else self.num_heads)
        self.mtp_heads = nn.ModuleList([MTPHead(config) for _ in range(n_bodies)])
        self.mtp_unembed = nn.ModuleList(
            [nn.Linear(config.n_embd, config.vocab_size, bias=False) for _ in range(n_bodies)]
            if config.head_own_unembedding and config.head_type != "shared_lm_head" else [])
        self.memory_efficient_loss = config.memory_efficient_loss
        self.weight_scale = 1.0  # auxiliary-loss warm-up factor, set by the trainer callback
        self._trunk_cut = config.num_trunk_layers if config.num_trunk_layers not in (None, config.n_layer) else None
        self._captured = None
        self._leak_mask = None  # the padding-only mask of a leaky (thesis_padding_only_mask) forward, for its heads
        if self._trunk_cut is not None:
            self.transformer.h[self._trunk_cut - 1].register_forward_hook(self._capture)
        self.post_init()
        if config.thesis_padding_only_mask and config._attn_implementation != "sdpa":
            raise ValueError("thesis_padding_only_mask reproduces the thesis' leak under SDPA attention (a padding-only "
                             "mask turns SDPA's causal masking off); this model uses "
                             f"{config._attn_implementation!r} attention")

    def _capture(self, module, args, output):
        self._captured = output

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_special(module)
        if isinstance(module, HeadLayerNorm):
            init.copy_(module.weight, self.transformer.ln_f.weight)
            init.copy_(module.bias, self.transformer.ln_f.bias)
        if isinstance(module, HeadBlock):
            for (_, p), (_, q) in zip(module.named_parameters(), self.transformer.h[-1].named_parameters()):
                init.copy_(p, q)
        if isinstance(module, nn.Linear) and any(module is m for m in getattr(self, "mtp_unembed", [])):
            init.copy_(module.weight, self.lm_head.weight)

    @torch.no_grad()
    def init_heads_from_trunk(self):
        """After loading a plain GPT-2 checkpoint: copy the last block into transformer heads, ln_f into head norms
        and the LM head into own unembeddings (from_pretrained initialises missing weights before loading)."""
        for head in self.mtp_heads:
            if head.kind == "transformer":
                head.block.load_state_dict(self.transformer.h[-1].state_dict())
            if head.ln is not None:
                head.ln.load_state_dict(self.transformer.ln_f.state_dict())
        for un in self.mtp_unembed:
            un.weight.copy_(self.lm_head.weight)
        return self

    def freeze_backbone(self):
        """Train the heads only (MEDUSA-1's recipe applied to MTP heads): the trunk, ln_f and LM head stop
        requiring grad, so the next-token distribution stays the base model's exactly."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith(("mtp_heads.", "mtp_unembed.")))
        return self

    # -- head interface used by HeadsMixin ----------------------------------------------------------------------
    def _body(self, k):
        return self.mtp_heads[0 if len(self.mtp_heads) == 1 else k - 1]

    def _head_step(self, k, h_prev, h0, input_ids, cache=None, mask=None, token_emb=None):
        """Head k's state. Sequential heads read Emb(t_{i+k}): teacher-forced from ``input_ids``, or ``token_emb``
        given row by row (the drafting of :mod:`multitoken.sequential`)."""
        body, cfg = self._body(k), self.config
        if cfg.sequential:
            emb = token_emb if token_emb is not None else token_embeddings_ahead(self.transformer.wte, input_ids, k,
                                                                                 h_prev)
            x = torch.cat([body.norm_h(h_prev), body.norm_e(emb)], -1)
            x = body.combine(x) if self.training else fastpath.linear(body.combine, x)
        else:
            x = h_prev if cfg.share_weights_across_steps else h0
        if body.kind == "transformer" and mask is None and self._leak_mask is not None and cache is None:
            mask = self._leak_mask                                       # the thesis' leak: padding-only mask
        elif body.kind == "transformer" and mask is None and x.shape[1] > 1:  # causal, after whatever is cached
            mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=None, past_key_values=cache,
                                      position_ids=None)
        return body(x, cache, mask)

    def _head_logits(self, k, h):
        body = self._body(k)
        x = body.ln(h) if body.ln is not None else self.transformer.ln_f(h)
        un = self.mtp_unembed[0 if len(self.mtp_unembed) == 1 else k - 1] if len(self.mtp_unembed) else self.lm_head
        return un(x) if self.training else fastpath.linear(un, x)

    def loss_weights(self):
        c = self.config
        w = loss_weights(c.loss_weighting, c.num_predict_tokens, c.loss_beta, c.loss_lambda, c.loss_normalize)
        return [w[0]] + [x * self.weight_scale for x in w[1:]]

    def set_training_step(self, step: int):
        self.weight_scale = warmup_factor(step, self.config.mtp_warmup_steps)

    # -- forward ------------------------------------------------------------------------------------------------
    def _leaky_trunk(self, input_ids, attention_mask):
        """The thesis' calling pattern: each GPT2Block called directly with a padding-only additive mask. Under SDPA
        that mask switches causal masking off, so position t sees every later token (the leak)."""
        tr = self.transformer
        B, T = input_ids.shape
        h = tr.drop(tr.wte(input_ids) + tr.wpe(torch.arange(T, device=input_ids.device)).unsqueeze(0))
        att = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self._leak_mask = (1.0 - att[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min   # (B, 1, 1, T)
        for blk in tr.h:
            h = blk(h, attention_mask=self._leak_mask)
        return type("Out", (), {"last_hidden_state": tr.ln_f(h), "past_key_values": None})()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None, labels=None,
                use_cache=None, output_head_logits=False, logits_to_keep=0, **kwargs):
        self._leak_mask = None
        if self.config.thesis_padding_only_mask and past_key_values is None and position_ids is None:
            out = self._leaky_trunk(input_ids, attention_mask)   # full-sequence forwards only: training, perplexity,
        else:                                                    # the thesis' no-cache loops
            out = self.transformer(input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state                                     # (B, T, d)
        h0 = self._captured if self._trunk_cut is not None else hidden
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
        return MultiTokenOutput(loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, mtp_step_losses=step_losses,
                                mtp_step_accuracy=step_acc, logits=logits, head_logits=head_logits,
                                past_key_values=out.past_key_values)

    # -- decoding hooks (transformer heads keep one KV cache per head application) ------------------------------
    def _seq_modules(self) -> bool:
        """Sequential transformer modules (DeepSeek-V3 / FastMTP): own KV caches, drafted by multitoken.sequential."""
        return self.config.sequential and self.config.head_type == "transformer"

    def spec_new_cache(self):
        if self._seq_modules():
            return sequential.ModuleCaches(self.num_heads)
        n = 1 + (self.num_heads if self.config.head_type == "transformer" else 0)
        return [DynamicCache() for _ in range(n)]

    def spec_forward(self, input_ids, caches, position_ids=None, attention_mask=None):
        h0, hidden = self._trunk(input_ids, caches[0], position_ids, attention_mask)
        ctx = {"h0": h0, "ids": input_ids, "caches": caches}
        if self.config.head_type == "transformer" and not self.config.sequential:
            states = [h0]
            for k in range(1, self.num_heads + 1):
                states.append(self._head_step(k, states[-1], h0, None, cache=caches[k], mask=attention_mask))
            ctx["states"] = states
        return fastpath.linear(self.lm_head, hidden), ctx

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
            norm = st(h.ln.weight for h in heads).unsqueeze(1), st(h.ln.bias for h in heads).unsqueeze(1)
            unembed = st(u.weight.mT for u in un) if len(un) else self.lm_head.weight.mT   # (S, d, V) or (d, V)
            return body, norm, unembed
        return self._cached_stack([*heads.parameters(), *un.parameters(), self.lm_head.weight], build)

    def spec_head_logits(self, ctx, j: int):
        """Every head's logits at step-local position j, ``(S, V)``, in batched matmuls (position-wise heads)."""
        body, (ln_w, ln_b), unembed = self._stacked_heads()
        x = ctx["h0"][0, j].expand(self.num_heads, 1, -1)                       # (S, 1, d)
        if self.config.head_type == "mlp":
            w1, b1, w2, b2 = body
            x = x + torch.baddbmm(b2, F.gelu(torch.baddbmm(b1, x, w1)), w2)
        else:
            x = torch.baddbmm(body[1], x, body[0])
        x = F.layer_norm(x, x.shape[-1:], eps=self.config.layer_norm_epsilon) * ln_w + ln_b
        return torch.matmul(x, unembed)[:, 0]                                    # (S, V)

    def spec_head_topk(self, ctx, j, k):
        if "states" in ctx:
            return torch.stack([self._head_logits(s, ctx["states"][s][:, j])[0].topk(k).indices
                                for s in range(1, self.num_heads + 1)])
        if self._batchable():
            return self.spec_head_logits(ctx, j).topk(k, -1).indices
        return super().spec_head_topk(ctx, j, k)

    def spec_accept(self, ctx, keep, x_next):
        """The engine's note that step positions ``keep`` (None: the whole prefill) are committed, ``x_next`` next."""
        if self._seq_modules():
            sequential.accept(ctx["caches"], ctx, keep, x_next)

    def spec_propose(self, ctx, j, x0, tree):
        if self._seq_modules():
            return sequential.propose(self, ctx["caches"], tree)
        if not self.config.sequential:
            return HeadsMixin.spec_propose(self, ctx, j, x0, tree)
        # Sequential heads draft autoregressively: head d sees the state of the parent node and the parent's token.
        h0 = ctx["h0"][:, j: j + 1]
        tokens = torch.empty(len(tree.paths), dtype=torch.long, device=h0.device)
        state = {(): (h0, torch.tensor(x0, device=h0.device))}
        for i, path in enumerate(tree.paths):
            h_par, tok_par = state[path[:-1]]
            h = self._head_step(len(path), h_par, h0, tok_par.view(1))
            tokens[i] = self._head_logits(len(path), h)[0, -1].topk(path[-1] + 1).indices[-1]
            state[path] = (h, tokens[i])
        return tokens


class MTPWrapper(HeadsMixin, nn.Module):
    """Multi-token heads (position-wise types) on any Hugging Face causal LM; see :func:`wrap_model_with_mtp`."""

    def __init__(self, model, config: MTPConfig):
        super().__init__()
        if config.head_type == "transformer":
            raise ValueError("wrap_model_with_mtp supports position-wise heads (linear, mlp, shared_lm_head): a "
                             "transformer head (Meta's, or a DeepSeek-V3 module) must be the base family's own decoder "
                             "layer, with its positional encoding (e.g. Llama's rotary embeddings) and cache layout; "
                             "MultiTokenGPT2 builds transformer heads for GPT-2")
        self.model, self.config = model, config
        self.num_heads = config.num_predict_tokens - 1
        self.memory_efficient_loss = config.memory_efficient_loss
        n_bodies = min(self.num_heads, 1 if config.share_weights_across_steps else self.num_heads)
        self.mtp_heads = nn.ModuleList([MTPHead(config) for _ in range(n_bodies)])
        for m in self.mtp_heads.modules():
            init_special(m)
        self.lm_head = model.get_output_embeddings()
        self.mtp_unembed = []

    _body = MultiTokenGPT2._body

    def _head_step(self, k, h_prev, h0, input_ids, cache=None, mask=None):
        body = self._body(k)
        if self.config.sequential:
            emb = token_embeddings_ahead(self.model.get_input_embeddings(), input_ids, k, h_prev)
            x = body.combine(torch.cat([body.norm_h(h_prev), body.norm_e(emb)], -1))
        else:
            x = h_prev if self.config.share_weights_across_steps else h0
        return body(x)

    def _head_logits(self, k, h):
        body = self._body(k)
        return self.lm_head(body.ln(h) if body.ln is not None else h)

    def _trunk(self, input_ids, cache, position_ids=None, attention_mask=None):
        out = self.model.base_model(input_ids, past_key_values=cache, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=cache is not None)
        return out.last_hidden_state, out.last_hidden_state

    spec_propose = MultiTokenGPT2.spec_propose

    def _seq_modules(self) -> bool:
        return False  # transformer heads are refused above

    def forward(self, input_ids, attention_mask=None, labels=None, output_head_logits=False, **kw):
        h0, hidden = self._trunk(input_ids, None, attention_mask=attention_mask)
        logits = self.lm_head(hidden)
        loss = lm_loss = mtp_loss = sl = sa = None
        if labels is not None:
            c = self.config
            w = loss_weights(c.loss_weighting, c.num_predict_tokens, c.loss_beta, c.loss_lambda, c.loss_normalize)
            lm_loss, lm_acc = shifted_ce(logits, labels, 1)
            mtp_loss, hl, ha = self.heads_loss(h0, input_ids, labels, w[1:])
            loss = w[0] * lm_loss + mtp_loss
            sl, sa = torch.cat([lm_loss.detach().view(1).cpu(), hl]), torch.cat([lm_acc.view(1).cpu(), ha])
        head_logits = self.all_head_logits(h0, input_ids) if output_head_logits else None
        return MultiTokenOutput(loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, mtp_step_losses=sl,
                                mtp_step_accuracy=sa, logits=logits, head_logits=head_logits)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)


def wrap_model_with_mtp(model, config: MTPConfig | dict | None = None, **overrides) -> MTPWrapper:
    """Add multi-token heads to any HF causal LM (Llama, GPT-2, ...). ``config`` holds the MTP fields."""
    fields = dict(config.to_dict() if isinstance(config, MTPConfig) else (config or {}), **overrides)
    keep = {k: v for k, v in fields.items() if k in MTPConfig.__dataclass_fields__ and k not in GPT2Config.__dataclass_fields__}
    base = model.config
    mcfg = MTPConfig(n_embd=base.hidden_size, vocab_size=base.vocab_size, n_head=1,
                     layer_norm_epsilon=getattr(base, "layer_norm_epsilon", getattr(base, "rms_norm_eps", 1e-5)), **keep)
    return MTPWrapper(model, mcfg)
