"""A lean GPT-2 forward for the decoding loop.

Profiling the step loop (``cProfile`` on ``speculative_generate``, cpu profile, 4 x 256 GPT-2) showed that about a
third of a verification forward is transformers' per-call machinery (output capturing, mask building, cache
dispatch, module hooks) rather than arithmetic. This runs the *same modules and weights* in the same order, with
the same kernels (``addmm`` as in ``Conv1D``, SDPA), and stores keys/values through the HF ``Cache`` API, so its
outputs equal ``GPT2Model``'s (tests check it). It is used only for inference with SDPA attention; training, eager
attention and other architectures go through transformers.
"""
from __future__ import annotations

import time

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


_TRANSPOSED_FASTER: dict = {}  # (rows, in, out, dtype) -> bool, timed once per process on the CPU


def _time(f, reps=10) -> float:
    f()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            f()
        best = min(best, time.perf_counter() - t)
    return best


def _layout_seconds(m: int, k: int, n: int, dtype=torch.float32, reps: int = 10) -> tuple[float, float]:
    """Best-of-3 seconds for ``reps`` products of ``m`` random rows with a (``k``, ``n``) weight on the CPU:
    (row-major ``x @ W``, transposed ``(W_nk @ x.T).T``)."""
    cpu = torch.device("cpu")
    x, w = torch.randn(m, k, dtype=dtype, device=cpu), torch.randn(k, n, dtype=dtype, device=cpu)
    wt, b = w.t().contiguous(), torch.zeros(n, dtype=dtype, device=cpu)
    with torch.no_grad():
        return (_time(lambda: torch.addmm(b, x, w), reps),
                _time(lambda: torch.addmm(b[:, None], wt, x.t()).t().contiguous(), reps))


def _transposed_faster(m: int, k: int, n: int, dtype) -> bool:
    """Whether ``(W_nk @ x.T).T`` beats ``x @ W_kn`` for ``m`` rows on this CPU. Profiling the step loop showed
    MKL's row-major product of 2-16 rows (a verification step, a module's rows) costing as much as that many
    single-row products on the 2-core AMD EPYC here, while the transposed product of the same numbers took about
    half; other CPUs may differ, so each shape is timed once (both ways) rather than assumed."""
    key = (m, k, n, dtype)
    if key not in _TRANSPOSED_FASTER:
        row_major, transposed = _layout_seconds(m, k, n, dtype)
        _TRANSPOSED_FASTER[key] = transposed < row_major
    return _TRANSPOSED_FASTER[key]


def layout_timings(shapes, rows=(1, 2, 4, 5, 8, 16), reps: int = 200) -> list[dict]:
    """Microseconds per product in both layouts for each ``(in, out)`` shape and row count, on the CPU: the
    measurement behind :func:`_transposed_faster` (``make bench`` writes it to ``results/matmul_layouts.json``)."""
    out = []
    for k, n in shapes:
        for m in rows:
            row_major, transposed = _layout_seconds(m, k, n, reps=reps)
            out.append(dict(in_features=k, out_features=n, rows=m, row_major_us=row_major / reps * 1e6,
                            transposed_us=transposed / reps * 1e6))
    return out


def _weight_nk(w):
    """A (K, N) weight's contiguous (N, K) copy, cached on the parameter until it changes."""
    cached = getattr(w, "_fastpath_nk", None)
    if cached is None or cached[0] != w._version:
        cached = (w._version, w.detach().t().contiguous())
        w._fastpath_nk = cached
    return cached[1]


def matmul(x, w, b=None, w_is_kn: bool = True):
    """``x @ W + b`` for ``x`` (..., K) and a weight stored (K, N) (Conv1D) or, with ``w_is_kn=False``, (N, K)
    (``nn.Linear``). Several rows on the CPU take the faster of the two layouts (:func:`_transposed_faster`);
    one row (plain decoding) and every GPU product take the usual one."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = w.shape[1] if w_is_kn else w.shape[0]
    if x.device.type == "cpu" and 1 < m <= 32 and _transposed_faster(m, k, n, x.dtype):
        w_nk = _weight_nk(w) if w_is_kn else w
        out = (torch.mm(w_nk, x2.t()) if b is None else torch.addmm(b[:, None], w_nk, x2.t())).t()
    elif w_is_kn:
        out = torch.mm(x2, w) if b is None else torch.addmm(b, x2, w)
    else:
        out = F.linear(x2, w, b)
    return out.reshape(*x.shape[:-1], n)


def linear(module, x):
    """An ``nn.Linear`` (e.g. the LM head) through :func:`matmul`."""
    return matmul(x, module.weight, module.bias, w_is_kn=False)


def _linear(conv, x):  # transformers' Conv1D: x @ W + b with W (in, out)
    return matmul(x, conv.weight, conv.bias)


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
