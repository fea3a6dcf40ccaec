"""One adapter per model family: the only place that knows a family's module names and calling conventions.

Heads, Medusa, the thesis' layout, the decoding engine, self-distillation and the pipeline ask a ``Backbone`` for what
they need and never reach into ``model.transformer.h`` or ``model.model.layers`` themselves:

  embed_tokens, layers, norm, unembed   the token embedding, the decoder layers, the final norm, the LM head
  embed(ids, position_ids)              input states (GPT-2 adds its learned positions here; Llama adds nothing)
  positions(h, position_ids)            what a decoder layer needs to know where its tokens sit (Llama: RoPE cos/sin)
  layer(block, h, pos, cache, mask)     one decoder layer, with the mask its attention implementation expects
  trunk(ids, cache, position_ids, mask, cut)   the whole stack: (state after layer ``cut``, final normed state)
  new_cache(), context_size, hidden_size, new_layer(src), new_norm(), norm_stacked(x, w, b)

A third family (Qwen, Mistral) is one more class here and a line in ``FAMILIES``.

Masks. The engine speaks one language: ``None`` (causal over the new tokens, everything cached visible) or a bool
``(B, 1, T, past + T)`` mask, True = may attend. SDPA (and ``invariant``, below) takes the bool mask as it is; eager
attention *adds* its mask to the scores, so a bool mask there would mask nothing: ``attn_mask`` turns it into
0 / -inf (and builds the causal part eager attention does not have). Any other implementation is refused clearly.

Invariant attention. A query's attention output must not depend on how many tokens share its step, or bf16
speculation drifts from bf16 greedy decoding: SDPA's kernels reduce over keys in blocks laid out by slot and step
shape (a 5-token bf16 step differs from 5 one-token steps by up to 0.03 in a random model's states). ``invariant``
(registered with transformers' ``AttentionInterface``) gathers each query's visible keys in position order, exactly
the keys a one-token step at that position sees, and computes the queries with the same number of visible keys in
one product of that shape: the same arithmetic whatever the step holds. ``invariant_attention(model)`` switches a
model to it for the duration of a decoding.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, DynamicCache, GPT2LMHeadModel, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from . import compiled, fastpath

ATTENTION = ("sdpa", "eager", "invariant")


def _invariant_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    """Attention whose output for a query depends only on the keys it sees, in position order (module docstring).
    ``query`` (B, H, Q, D); ``key``/``value`` (B, Hkv, S, D) with the step's keys appended; ``attention_mask``: None
    (causal, the step's tokens after everything cached) or bool (B, 1, Q, S). Returns (B, Q, H, D) and no weights.
    A prefill (nothing cached, S == Q) runs SDPA: every decoding of the same prompts computes it identically."""
    B, H, Q, D = query.shape
    S, groups = key.shape[2], H // key.shape[1]
    scale = scaling if scaling is not None else D ** -0.5
    if S == Q:
        if groups > 1:
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        o = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                           is_causal=attention_mask is None and Q > 1, scale=scale)
        return o.transpose(1, 2).contiguous(), None
    if attention_mask is None:
        attention_mask = torch.ones(Q, S, dtype=torch.bool, device=query.device).tril(S - Q)[None, None].expand(B, 1, Q, S)
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0                        # an additive mask: 0 where visible
    vis = attention_mask[:, 0]                                      # (B, Q, S)
    counts = vis.sum(-1).tolist()
    out = query.new_empty(B, Q, H, D)
    by_count: dict = {}
    for b in range(B):
        for i in range(Q):
            by_count.setdefault(counts[b][i], []).append((b, i))
    slots = torch.arange(S, device=query.device)
    for n, members in by_count.items():
        bs = torch.tensor([b for b, _ in members], device=query.device)
        qs = torch.tensor([i for _, i in members], device=query.device)
        # the visible slots of each query, in slot order = position order (cache first, then its tree ancestors)
        idx = slots.masked_select(vis[bs, qs]).view(len(members), n) if n else slots[:0].expand(len(members), 0)
        k = key[bs[:, None], :, idx].transpose(1, 2).float()         # (G, Hkv, n, D)
        v = value[bs[:, None], :, idx].transpose(1, 2).float()
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        q = query[bs, :, qs].float().unsqueeze(2)                    # (G, H, 1, D)
        w = (q @ k.transpose(-1, -2) * scale).softmax(-1)
        out[bs, qs] = (w @ v)[:, :, 0].to(query.dtype)
    return out, None


AttentionInterface.register("invariant", _invariant_attention)


@contextlib.contextmanager
def invariant_attention(model):
    """``model`` (a causal LM of a known family, or a face or wrapper of one) attends with ``invariant`` inside
    (module docstring); its implementation before is restored on exit."""
    cfg = backbone_of(model).config
    before = cfg._attn_implementation
    if before not in ATTENTION:
        raise ValueError(f"attention implementation {before!r}: invariant attention replaces {ATTENTION[:2]}")
    cfg._attn_implementation = "invariant"
    try:
        yield
    finally:
        cfg._attn_implementation = before


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views into a buffer that doubles when full: appending costs the
    new tokens, not a copy of the whole cache (``DynamicLayer`` concatenates at every update, quadratic over a
    generation). ``keys`` / ``values`` stay ordinary tensors of the cached length; a caller that shortens them by
    slicing (the engine's compaction, the MTP modules' cropping) keeps the buffer, since the slice starts where it
    does; one that assigns another tensor makes the next update copy it into a fresh buffer."""

    MIN_CAPACITY = 64

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        buf = getattr(self, "_buf", None)
        L, n = self.keys.shape[-2] if self.keys.dim() > 1 else 0, key_states.shape[-2]
        mine = (buf is not None and L and self.keys.data_ptr() == buf[0].data_ptr()
                and self.keys.stride() == buf[0].stride() and self.keys.shape[:-2] == buf[0].shape[:-2])
        old = buf[0].shape[-2] if buf is not None else 0
        if buf is None or (L and not mine) or L + n > old:
            # doubles only when the cache outgrows its buffer; a reassigned cache (rows leaving a batch) that still
            # fits keeps the capacity it had, else each reassignment would double it
            cap = max(L + n, 2 * old if L + n > old else old, self.MIN_CAPACITY)
            new = tuple(t.new_empty((*t.shape[:-2], cap, t.shape[-1])) for t in (key_states, value_states))
            if L:
                new[0][..., :L, :], new[1][..., :L, :] = self.keys, self.values
            self._buf = buf = new
        buf[0][..., L: L + n, :], buf[1][..., L: L + n, :] = key_states, value_states
        self.keys, self.values = buf[0][..., : L + n, :], buf[1][..., : L + n, :]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of :class:`GrowingLayer`\ s (the engine's cache: O(new tokens) appends, in-place compaction)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


class Backbone:
    """What every family shares; subclasses name the modules and the positional inputs."""

    family = "?"
    lm_class: type = nn.Module
    head_layer_class: type = nn.Module      # a decoder layer used as a transformer head (initialised from the last)
    head_norm_class: type = nn.Module       # a head's final norm (initialised from the model's)
    layer_prefix = ""                       # state-dict prefix of the decoder layers, e.g. "model.layers."

    def __init__(self, lm):
        self.lm, self.config = lm, lm.config

    # -- modules ----------------------------------------------------------------------------------------------------
    embed_tokens = layers = norm = None

    @property
    def unembed(self) -> nn.Linear:
        return self.lm.lm_head

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- masks and caches -------------------------------------------------------------------------------------------
    def attn_mask(self, mask, q_len: int, past: int, dtype, device):
        """The mask this model's attention implementation expects for ``q_len`` new tokens after ``past`` cached ones.
        ``mask``: None (causal) or bool ``(B, 1, q_len, past + q_len)``; a float mask (additive) passes unchanged."""
        impl = self.config._attn_implementation
        if impl not in ATTENTION:
            raise ValueError(f"attention implementation {impl!r}: the workbook builds masks for {ATTENTION}; load the "
                             "model with attn_implementation='sdpa' (or 'eager')")
        if mask is None:
            if q_len == 1 or (impl == "sdpa" and past == 0):
                return None                  # one query sees everything cached; SDPA's is_causal covers the rest
            mask = torch.ones(q_len, past + q_len, dtype=torch.bool, device=device).tril(past)[None, None]
        if impl == "eager" and mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask

    @staticmethod
    def new_cache() -> DynamicCache:
        return GrowingCache()

    @staticmethod
    def _past(cache, layer_idx: int = 0) -> int:
        return cache.get_seq_length(layer_idx) if cache is not None else 0

    def _position_ids(self, h, position_ids, cache):
        if position_ids is not None:
            return position_ids
        past = self._past(cache)
        return torch.arange(past, past + h.shape[1], device=h.device).unsqueeze(0)

    # -- the forward --------------------------------------------------------------------------------------------------
    def embed(self, input_ids, position_ids=None, cache=None):
        return self.embed_tokens(input_ids)

    def positions(self, h, position_ids=None, cache=None):
        return None

    def layer(self, block, h, pos=None, cache=None, mask=None):
        raise NotImplementedError

    def trunk(self, input_ids, cache=None, position_ids=None, mask=None, cut: int | None = None,
              attention_mask=None, eager: bool = False, **kw):
        """(state after layer ``cut`` (the final normed state when None), final normed state, cache).

        With a cache (the decoding loop) or an explicit 4D ``mask`` (the thesis' padding-only mask) the decoder
        layers are called one by one here; otherwise transformers' own forward runs (training, perplexity,
        ``generate``), with ``attention_mask`` the usual 2D padding mask. A step into a compiled
        :class:`~multitoken.core.compiled.StepCache` of a compiled size runs the compiled graph (``eager``: not)."""
        if cache is None and mask is None:
            return self._hf_trunk(input_ids, attention_mask, position_ids, cut, **kw)
        if not eager and getattr(cache, "compiled", False) and compiled.rung(input_ids.shape[1]) == input_ids.shape[1]:
            return (*compiled.trunk(self, input_ids, cache, position_ids, mask, cut), cache)
        position_ids = self._position_ids(input_ids, position_ids, cache)
        h = self.embed(input_ids, position_ids)
        pos = self.positions(h, position_ids)
        h_cut = None
        for i, blk in enumerate(self.layers):
            h = self.layer(blk, h, pos, cache, mask)
            if cut is not None and i == cut - 1:
                h_cut = h
        out = self.norm(h)
        return (h_cut if h_cut is not None else out), out, cache

    def _hf_trunk(self, input_ids, attention_mask, position_ids, cut, past_key_values=None, use_cache=None, **kw):
        captured = {}
        hook = (self.layers[cut - 1].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
                if cut is not None else None)
        try:
            out = self.lm.base_model(input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                                     position_ids=position_ids, use_cache=use_cache, **kw)
        finally:
            if hook is not None:
                hook.remove()
        hidden = out.last_hidden_state
        return captured.get("h", hidden), hidden, out.past_key_values

    # -- fresh modules for heads ------------------------------------------------------------------------------------
    def new_layer(self, src: int = -1):
        """A decoder layer for a transformer head: the family's own layer class, a copy of layer ``src``'s weights,
        addressing layer 0 of a cache of its own."""
        raise NotImplementedError

    def new_norm(self):
        raise NotImplementedError

    def norm_stacked(self, x, weight, bias):
        """The head norm applied to heads stacked along dim 0 (``weight``/``bias`` stacked the same way)."""
        raise NotImplementedError

    @property
    def context_size(self) -> int:
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def norm_eps(self) -> float:
        raise NotImplementedError


# --- GPT-2 -------------------------------------------------------------------------------------------------------

class GPT2HeadBlock(GPT2Block):
    """A transformer head on GPT-2 (Meta's), initialised as a copy of the trunk's last block."""


class GPT2HeadNorm(nn.LayerNorm):
    """A GPT-2 head's final norm, initialised from the trunk's ln_f."""


class GPT2Backbone(Backbone):
    """GPT-2: learned positions added to the embeddings, Conv1D projections, LayerNorm, ``transformer.h``.

    Cached inference (the decoding loop) runs a lean forward (``lean_block``): the same modules and weights in the
    same order with the same kernels, without transformers' per-call machinery (output capturing, mask building,
    cache dispatch, hooks), about a third of a verification step on the 4.3M toy (``cProfile``). Its matrix products
    take the faster layout on this CPU (``fastpath.matmul``). Tests check it equals transformers' forward."""

    family = "gpt2"
    lm_class = GPT2LMHeadModel
    head_layer_class = GPT2HeadBlock
    head_norm_class = GPT2HeadNorm
    layer_prefix = "transformer.h."

    def __init__(self, lm):
        super().__init__(lm)
        self.tr = lm.transformer

    embed_tokens = property(lambda self: self.tr.wte)
    layers = property(lambda self: self.tr.h)
    norm = property(lambda self: self.tr.ln_f)
    context_size = property(lambda self: self.config.n_positions)
    hidden_size = property(lambda self: self.config.n_embd)
    norm_eps = property(lambda self: self.config.layer_norm_epsilon)

    def embed(self, input_ids, position_ids=None, cache=None):
        position_ids = self._position_ids(input_ids, position_ids, cache)
        return self.tr.drop(self.tr.wte(input_ids) + self.tr.wpe(position_ids))

    def lean_ok(self, block) -> bool:
        """The lean forward reproduces a block exactly in eval mode under SDPA (or invariant attention) without
        cross-attention."""
        c = block.attn.config
        return not block.training and not c.add_cross_attention and c._attn_implementation in ("sdpa", "invariant")

    def layer(self, block, h, pos=None, cache=None, mask=None):
        if cache is not None and self.lean_ok(block):
            return lean_block(block, h, cache, block.attn.layer_idx, mask)
        mask = self.attn_mask(mask, h.shape[1], self._past(cache, block.attn.layer_idx), h.dtype, h.device)
        return block(h, past_key_values=cache, attention_mask=mask, use_cache=cache is not None)

    def new_layer(self, src: int = -1):
        blk = GPT2HeadBlock(self.config, layer_idx=0)
        blk.load_state_dict(self.layers[src].state_dict())
        return blk.to(self.tr.wte.weight.device, self.tr.wte.weight.dtype)

    def new_norm(self):
        return GPT2HeadNorm(self.hidden_size, eps=self.norm_eps)

    def norm_stacked(self, x, weight, bias):
        return F.layer_norm(x, x.shape[-1:], eps=self.norm_eps) * weight + bias


def lean_block(blk, h, cache, layer_idx: int, mask):
    """One GPT2Block on ``h`` (B, T, d); keys/values appended to ``cache`` layer ``layer_idx``.

    ``mask``: None (causal over the new tokens, all of the cache visible), a (B, 1, T, past+T) bool mask, or an
    additive float mask (SDPA accepts either)."""
    attn, (B, T, D) = blk.attn, h.shape
    q, k, v = fastpath.conv1d(attn.c_attn, blk.ln_1(h)).split(D, 2)
    q, k, v = (t.view(B, T, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    if cache is not None:
        k, v = cache.update(k, v, layer_idx)
    if attn.config._attn_implementation == "invariant":
        o = _invariant_attention(attn, q, k, v, mask, scaling=attn.scaling)[0]           # (B, T, H, hd)
    else:
        causal = mask is None and T > 1
        if causal and k.shape[2] > T:  # new tokens after a cached prefix: SDPA's is_causal would align to the top-left
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=h.device).tril(k.shape[2] - T)
            causal = False
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=attn.scaling).transpose(1, 2)
    h = h + fastpath.conv1d(attn.c_proj, o.reshape(B, T, D))
    mlp = blk.mlp
    return h + fastpath.conv1d(mlp.c_proj, mlp.act(fastpath.conv1d(mlp.c_fc, blk.ln_2(h))))


# --- Llama (SmolLM2, Llama 2/3, TinyLlama, ...) -------------------------------------------------------------------

class LlamaHeadLayer(LlamaDecoderLayer):
    """A transformer head on a Llama: a decoder layer (RoPE, GQA, SwiGLU), initialised from the last one."""


class LlamaHeadNorm(LlamaRMSNorm):
    """A Llama head's final RMSNorm, initialised from the model's."""


class LlamaBackbone(Backbone):
    """Llama: no learned positions (each attention rotates queries and keys by RoPE at its tokens' positions),
    RMSNorm, SwiGLU, grouped key-value heads, ``model.layers``.

    Cached inference calls transformers' decoder layers directly (skipping ``LlamaModel``'s mask building and output
    machinery); no hand-written lean layer: ``make bench`` measured HF's per-layer overhead as small next to reading
    the weights at this size (docs/BENCHMARKS.md: step costs)."""

    family = "llama"
    lm_class = LlamaForCausalLM
    head_layer_class = LlamaHeadLayer
    head_norm_class = LlamaHeadNorm
    layer_prefix = "model.layers."

    def __init__(self, lm):
        super().__init__(lm)
        self.m = lm.model

    embed_tokens = property(lambda self: self.m.embed_tokens)
    layers = property(lambda self: self.m.layers)
    norm = property(lambda self: self.m.norm)
    context_size = property(lambda self: self.config.max_position_embeddings)
    norm_eps = property(lambda self: self.config.rms_norm_eps)

    def positions(self, h, position_ids=None, cache=None):
        return self.m.rotary_emb(h, self._position_ids(h, position_ids, cache))        # (cos, sin), (1, T, head_dim)

    def layer(self, block, h, pos=None, cache=None, mask=None):
        # the cache's length only where needed: a compiled step (positions and mask given) must not read it
        past = self._past(cache, block.self_attn.layer_idx) if pos is None or mask is None else None
        if pos is None:
            pos = self.positions(h, torch.arange(past, past + h.shape[1], device=h.device).unsqueeze(0))
        mask = self.attn_mask(mask, h.shape[1], past, h.dtype, h.device)
        return block(h, attention_mask=mask, past_key_values=cache, use_cache=cache is not None,
                     position_embeddings=pos)

    def new_layer(self, src: int = -1):
        layer = LlamaHeadLayer(self.config, layer_idx=0)
        layer.load_state_dict(self.layers[src].state_dict())
        w = self.embed_tokens.weight
        return layer.to(w.device, w.dtype)

    def new_norm(self):
        return LlamaHeadNorm(self.hidden_size, eps=self.norm_eps)

    def norm_stacked(self, x, weight, bias):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return weight * x.to(dtype)                                                     # as LlamaRMSNorm


FAMILIES = {"gpt2": GPT2Backbone, "llama": LlamaBackbone}


def family_of(model_or_config) -> str:
    """The family of a model or config: 'gpt2' or 'llama' (faces such as MultiTokenGPT2 count as their family)."""
    if isinstance(model_or_config, nn.Module):
        for name, cls in FAMILIES.items():
            if isinstance(model_or_config, cls.lm_class):
                return name
        what = type(model_or_config).__name__
    else:
        mt = getattr(model_or_config, "model_type", None)
        for name in FAMILIES:
            if mt == name or (mt or "").endswith("_" + name):
                return name
        what = f"model_type {mt!r}"
    raise ValueError(f"no backbone adapter for {what}: the workbook has adapters for {sorted(FAMILIES)} "
                     "(multitoken.backbones.FAMILIES); a new family is one class there")


def backbone_of(model) -> Backbone:
    """The adapter of ``model``: a causal LM of a known family (or a face of one), or a wrapper exposing
    ``backbone`` or ``model`` (the engine's ``PlainLM``, test doubles). Cached on the model."""
    if isinstance(model, tuple(c.lm_class for c in FAMILIES.values())):
        cached = model.__dict__.get("_backbone")
        if cached is None:
            cached = model.__dict__["_backbone"] = FAMILIES[family_of(model)](model)
        return cached
    if isinstance(getattr(model, "backbone", None), Backbone):
        return model.backbone
    if getattr(model, "model", None) is not None:
        return backbone_of(model.model)
    family_of(model)  # raises: no adapter for this model
