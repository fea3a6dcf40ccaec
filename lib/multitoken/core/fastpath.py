"""Matrix products for the decoding loop: the faster of two memory layouts for a product of a few rows, on this CPU.

A verification step multiplies a handful of rows (the root and the drafts) by every weight. Profiling the step loop
on the 2-core AMD EPYC here showed MKL's row-major product of 2-16 rows costing about as much as that many one-row
products, and the same product computed as ``(W_nk @ x.T).T`` with a contiguous transposed weight about half of
that. Each shape is timed once per process, both ways (``_transposed_faster``), rather than assumed; ``make bench``
writes the timings (``layout_timings``). Used by GPT-2's lean forward (``backbones.lean_block``) and by every head's
unembedding at decoding time. ``cpu_bf16_fast`` times the same way whether bf16 products are fast on this CPU
(the profiles' bf16 settings fall back to fp32 where they are not).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


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


_CPU_BF16_FAST: list = []  # the probe's answer, once per process


def cpu_bf16_fast() -> bool:
    """Whether this CPU has native bf16 products (AVX-512 BF16 or AMX), as PyTorch's CPU feature checks report them.
    Without them PyTorch emulates bf16: 64 x 576 @ 576 x 1536 took 90 ms in bf16 against 0.9 ms in fp32 on an
    AVX2-only AMD EPYC. Read from the CPU's flags, not timed: a timing taken while another job loads the cores once
    answered "fast" on that AVX2 machine, and the profile then trained in emulated bf16 at a crawl. Where PyTorch
    lacks the checks (they are private), the bf16/fp32 timing on one thread decides (:func:`_bf16_timed_fast`)."""
    if not _CPU_BF16_FAST:
        checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        fast = any(c() for c in checks) if all(checks) else _bf16_timed_fast()
        _CPU_BF16_FAST.append(bool(fast))
    return _CPU_BF16_FAST[0]


def _bf16_timed_fast() -> bool:
    """bf16 products at least half as fast as fp32 ones, timed warm on one thread (so a busy second core does not
    decide it)."""
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    x, w = torch.randn(64, 512, device=cpu), torch.randn(512, 512, device=cpu)
    xb, wb = x.bfloat16(), w.bfloat16()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            bf16, fp32 = _time(lambda: xb @ wb, reps=3), _time(lambda: x @ w, reps=3)
    finally:
        torch.set_num_threads(threads)
    return bf16 <= 2 * fp32


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


def layout_choices() -> list[dict]:
    """The layout this process chose per shape (timed once each): what a benchmark ran with, recorded beside its
    results (``results/matmul_layout_choices.json``); :func:`use_layout_choices` replays them in another process."""
    return [dict(rows=m, in_features=k, out_features=n, dtype=str(dt).replace("torch.", ""), transposed=t)
            for (m, k, n, dt), t in sorted(_TRANSPOSED_FASTER.items(), key=str)]


def use_layout_choices(choices: list[dict]) -> None:
    """Take recorded choices instead of timing: the same layouts, so the same float32 rounding, in a new process."""
    for c in choices:
        _TRANSPOSED_FASTER[(c["rows"], c["in_features"], c["out_features"], getattr(torch, c["dtype"]))] = \
            c["transposed"]


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


def conv1d(conv, x):
    """transformers' ``Conv1D`` (GPT-2's projections: ``x @ W + b`` with W stored (in, out)) through :func:`matmul`."""
    return matmul(x, conv.weight, conv.bias)


_PER_HEAD_FASTER: dict = {}  # (heads, rows, in, out, dtype) -> bool, timed once per process on the CPU


def heads_unembed(x, stacked, weights):
    """Every head's logits ``(S, B, V)`` from its states ``x`` (S, B, d): one batched product with the heads'
    unembeddings stacked ``(S, d, V)``, or one ``F.linear`` per head with its own ``(V, d)`` weight (``weights``),
    whichever is faster for this shape and dtype on the CPU, timed once on the real weights. Measured here on
    SmolLM2's 4 MEDUSA-1 heads (4 x 49,152 x 576): in bf16 per head 8.5 ms against the batched product's 18.4 ms at
    one row (16.1 against 23.1 at 16 rows: oneDNN's bf16 kernels serve ``linear``, not ``bmm``); in fp32 the other way
    (29.5 against 14.3). Drafts never change a greedy output, so the choice costs no exactness."""
    per_head = lambda: torch.stack([F.linear(x[s], w) for s, w in enumerate(weights)])   # noqa: E731
    if x.device.type != "cpu":
        return torch.bmm(x, stacked)
    key = (*x.shape, stacked.shape[-1], x.dtype)
    if key not in _PER_HEAD_FASTER:
        _PER_HEAD_FASTER[key] = _time(per_head, reps=2) < _time(lambda: torch.bmm(x, stacked), reps=2)
    return per_head() if _PER_HEAD_FASTER[key] else torch.bmm(x, stacked)
