"""A lean GPT-2 forward for the decoding loop.

Profiling the step loop (``cProfile`` on ``speculative_generate``, cpu profile, 4 x 256 GPT-2) showed that about a
third of a verification forward is transformers' per-call machinery (output capturing, mask building, cache
dispatch, module hooks) rather than arithmetic. This runs the *same modules and weights* in the same order, with
the same kernels (``addmm`` as in ``Conv1D``, SDPA), and stores keys/values through the HF ``Cache`` API, so its
outputs equal ``GPT2Model``'s (tests check it). It is used only for inference with SDPA attention; training, eager
attention and other architectures go through transformers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.gpt2.modeling_gpt2 import GPT2Block, GPT2Model


def supported(module) -> bool:
    """True for a GPT2Model or GPT2Block this path reproduces exactly (SDPA, no cross-attention, eval mode)."""
    if isinstance(module, GPT2Model):
        c = module.config
    elif isinstance(module, GPT2Block):
        c = module.attn.config
    else:
        return False
    return not module.training and not c.add_cross_attention and c._attn_implementation == "sdpa"


def _linear(conv, x):  # transformers' Conv1D: x @ W + b with W (in, out)
    return torch.addmm(conv.bias, x.view(-1, x.shape[-1]), conv.weight).view(*x.shape[:-1], -1)


def block(blk, h, cache, layer_idx: int, mask):
    """One GPT2Block on ``h`` (B, T, d); keys/values appended to ``cache`` layer ``layer_idx``.

    ``mask``: None (causal over the new tokens, all of the cache visible) or a (B, 1, T, past+T) bool mask.
    """
    attn, (B, T, D) = blk.attn, h.shape
    q, k, v = _linear(attn.c_attn, blk.ln_1(h)).split(D, 2)
    q, k, v = (t.view(B, T, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    if cache is not None:
        k, v = cache.update(k, v, layer_idx)
    causal = mask is None and T > 1
    if causal and k.shape[2] > T:  # new tokens after a cached prefix: SDPA's is_causal would align to the top-left
        mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=h.device).tril(k.shape[2] - T)
        causal = False
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=attn.scaling)
    h = h + _linear(attn.c_proj, o.transpose(1, 2).reshape(B, T, D))
    mlp = blk.mlp
    return h + _linear(mlp.c_proj, mlp.act(_linear(mlp.c_fc, blk.ln_2(h))))


def trunk(transformer, input_ids, cache, position_ids=None, mask=None, cut: int | None = None):
    """GPT2Model forward: returns (hidden after block ``cut`` (the last if None), final hidden after ln_f)."""
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    h = transformer.wte(input_ids) + transformer.wpe(position_ids)
    h_cut = None
    for i, blk in enumerate(transformer.h):
        h = block(blk, h, cache, i, mask)
        if cut is not None and i == cut - 1:
            h_cut = h
    out = transformer.ln_f(h)
    return (h_cut if h_cut is not None else out), out
