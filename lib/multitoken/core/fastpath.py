"""Matrix products for the decoding loop: the fastest of three weight layouts for a product of a few rows, on this CPU.

A decoding step multiplies a handful of rows (the root and the drafts) by every weight. Three ways to compute it:
``row`` (``x @ W``, what a model's forward does), ``transposed`` (``(W_nk @ x.T).T`` with a contiguous transposed
copy of the weight: MKL's row-major product of 2-16 rows cost about as much as that many one-row products on the
2-core AMD EPYC here, the transposed one about half) and ``packed`` (the weight prepacked for the CPU's kernels:
oneDNN's blocked bf16 layout, MKL's packed fp32 GEMM). Each shape is timed once per process, every way this CPU
offers (``_layout``), rather than assumed; ``make bench`` writes the timings (``layout_timings``) and the choices.
Used at decoding time by GPT-2's lean forward (``backbones.lean_block``), by every head's unembedding, and by every
``nn.Linear`` of a model inside ``decoding`` (the engine's step). Packed and transposed copies live on the parameter
and follow it: a weight that changes is repacked at its next product. ``cpu_bf16_fast`` says whether bf16 products
are native on this CPU (the profiles' bf16 settings fall back to fp32 where they are not).
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import compiled


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


LAYOUTS = ("row", "transposed", "packed")
_LAYOUT: dict = {}  # (rows, in, out, dtype) -> one of LAYOUTS, timed once per process on the CPU


def _pack(w_nk, rows: int):
    """``w_nk`` (N, K) prepacked for this CPU's kernels, or None where this build or CPU has none: bf16 in oneDNN's
    blocked layout (serves any number of rows; needs AVX-512 BF16 / AMX or AVX-NE-CONVERT), fp32 in MKL's packed
    GEMM layout (serves exactly ``rows`` rows). The only place that calls PyTorch's private packing ops (what
    inductor's ``freezing`` calls); any failure (the op missing, an unsupported CPU) means "no packed layout"."""
    try:
        if w_nk.dtype == torch.bfloat16:
            return torch.ops.mkldnn._reorder_linear_weight(w_nk, rows)
        if w_nk.dtype == torch.float32 and torch._C.has_mkl:
            return torch.ops.mkl._mkl_reorder_linear_weight(w_nk, rows)
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return None


def _packed_product(x2, w_nk, packed, b, rows: int):
    if w_nk.dtype == torch.bfloat16:
        return torch.ops.mkldnn._linear_pointwise(x2, packed, b, "none", [], "")
    return torch.ops.mkl._mkl_linear(x2, packed, w_nk, b, rows)


def _packed(w, w_nk, rows: int):
    """The packed copy of parameter ``w`` for ``rows`` rows, cached on it until it changes (an optimizer step or
    ``load_state_dict`` bumps its version: the next product repacks, so training after an evaluation never reads
    stale weights). None where :func:`_pack` has no packed layout."""
    stamp = (w.data_ptr(), w._version)
    stamped = w.__dict__.get("_fastpath_packed")
    if stamped is None or stamped[0] != stamp:                  # changed weights: every stale copy is dropped
        stamped = w.__dict__["_fastpath_packed"] = (stamp, {})
    key = rows if w.dtype == torch.float32 else 0
    if key not in stamped[1]:
        stamped[1][key] = _pack(w_nk, rows)
    return stamped[1][key]


def _layout_seconds(m: int, k: int, n: int, dtype=torch.float32, reps: int = 10) -> dict:
    """Best-of-3 seconds for ``reps`` products of ``m`` random rows with a (``k``, ``n``) weight on the CPU, per
    layout this CPU offers: ``row`` (``x @ W``), ``transposed`` (``(W_nk @ x.T).T``), ``packed`` (:func:`_pack`;
    in fp32 for one row only, since MKL's packed copy serves one row count and every copy costs the weight's size)."""
    cpu = torch.device("cpu")
    x, w = torch.randn(m, k, dtype=dtype, device=cpu), torch.randn(k, n, dtype=dtype, device=cpu)
    wt, b = w.t().contiguous(), torch.zeros(n, dtype=dtype, device=cpu)
    with torch.no_grad():
        out = dict(row=_time(lambda: torch.addmm(b, x, w), reps),
                   transposed=_time(lambda: torch.addmm(b[:, None], wt, x.t()).t().contiguous(), reps))
        packed = _pack(wt, m) if dtype != torch.float32 or m == 1 else None   # fp32 packs: one copy per row count,
        if packed is not None:                                                 # so one-row products (greedy) only
            out["packed"] = _time(lambda: _packed_product(x, wt, packed, b, m), reps)
    return out


def _layout(m: int, k: int, n: int, dtype) -> str:
    """The fastest layout for ``m`` rows of a (``k``, ``n``) product on this CPU, timed once per shape (every layout
    it offers) rather than assumed. Profiling the step loop showed MKL's row-major product of 2-16 rows costing as
    much as that many single-row products on the 2-core AMD EPYC here, the transposed product about half; bf16
    products on prepacked weights beat unpacked ones 1.5x on an AVX-512 BF16 machine; other CPUs differ."""
    key = (m, k, n, dtype)
    if key not in _LAYOUT:
        secs = _layout_seconds(m, k, n, dtype)
        _LAYOUT[key] = min(secs, key=secs.get)
    return _LAYOUT[key]


def layout_timings(shapes, rows=(1, 2, 4, 5, 8, 16), reps: int = 200, dtype=torch.float32) -> list[dict]:
    """Microseconds per product in each layout this CPU offers for each ``(in, out)`` shape and row count: the
    measurement behind :func:`_layout` (``make bench`` writes it to ``results/matmul_layouts.json``)."""
    out = []
    for k, n in shapes:
        for m in rows:
            secs = _layout_seconds(m, k, n, dtype, reps=reps)
            out.append(dict(in_features=k, out_features=n, rows=m, dtype=str(dtype).replace("torch.", ""),
                            **{f"{name}_us": s / reps * 1e6 for name, s in secs.items()}))
    return out


def layout_choices() -> list[dict]:
    """The layout this process chose per shape (timed once each): what a benchmark ran with, recorded beside its
    results (``results/matmul_layout_choices.json``); :func:`use_layout_choices` replays them in another process."""
    return [dict(rows=m, in_features=k, out_features=n, dtype=str(dt).replace("torch.", ""), layout=lay)
            for (m, k, n, dt), lay in sorted(_LAYOUT.items(), key=str)]


def use_layout_choices(choices: list[dict]) -> None:
    """Take recorded choices instead of timing: the same layouts, so the same rounding, in a new process (a layout
    this CPU lacks falls back to the row-major product when used)."""
    for c in choices:
        lay = c.get("layout") or ("transposed" if c.get("transposed") else "row")     # files written before packing
        _LAYOUT[(c["rows"], c["in_features"], c["out_features"], getattr(torch, c["dtype"]))] = lay


def _weight_nk(w):
    """A (K, N) weight's contiguous (N, K) copy, cached on the parameter until it changes."""
    cached = getattr(w, "_fastpath_nk", None)
    stamp = (w.data_ptr(), w._version)
    if cached is None or cached[0] != stamp:
        cached = (stamp, w.detach().t().contiguous())
        w._fastpath_nk = cached
    return cached[1]


MAX_ROWS = 32  # products of more rows (a prompt's prefill) take the usual layout


def matmul(x, w, b=None, w_is_kn: bool = True):
    """``x @ W + b`` for ``x`` (..., K) and a weight stored (K, N) (Conv1D) or, with ``w_is_kn=False``, (N, K)
    (``nn.Linear``). Up to :data:`MAX_ROWS` rows on the CPU without autograd take the fastest layout for their shape
    (:func:`_layout`; inside ``decoding(invariant=True)`` every product is row-major); more rows,
    a product that records gradients, one inside ``decoding(fast=False)`` and every GPU product take the usual one."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = w.shape[1] if w_is_kn else w.shape[0]
    lay = "row"
    # inside a compiled step inductor picks its own kernels (asked first: the graph then reads no flag of this module)
    if (not torch.compiler.is_compiling() and x.device.type == "cpu" and not _EAGER
            and not (torch.is_grad_enabled() and w.requires_grad)):
        if _INVARIANT:
            lay = "row"                                    # the one layout measured row-count-invariant (docstring)
        elif m <= MAX_ROWS:
            lay = _layout(m, k, n, x.dtype)
    if lay != "row":
        w_nk = _weight_nk(w) if w_is_kn else w
        packed = _packed(w, w_nk, m) if lay == "packed" else None
        if packed is not None:
            out = _packed_product(x2, w_nk, packed, b, m)
            return out.reshape(*x.shape[:-1], n)
        if lay == "transposed":
            out = (torch.mm(w_nk, x2.t()) if b is None else torch.addmm(b[:, None], w_nk, x2.t())).t()
            return out.reshape(*x.shape[:-1], n)
    if w_is_kn:
        out = torch.mm(x2, w) if b is None else torch.addmm(b, x2, w)
    else:
        out = F.linear(x2, w, b)
    return out.reshape(*x.shape[:-1], n)


def linear(module, x):
    """An ``nn.Linear`` (e.g. the LM head) through :func:`matmul`; the unembedding of a compiled decoding
    (``decoding(compiled=...)``), for a step's row count, through its compiled product."""
    if _COMPILED and id(module) in _COMPILED[-1] and not torch.compiler.is_compiling():
        rows = x.numel() // x.shape[-1]
        if compiled.rung(rows) == rows:
            return compiled.unembed(module, x)
    return matmul(x, module.weight, module.bias, w_is_kn=False)


_EAGER: list = []      # non-empty while every product takes the row-major layout (``decoding(fast=False)``)
_COMPILED: list = []   # the ids of the modules whose products are compiled (``decoding(compiled=...)``), innermost last
_INVARIANT: list = []  # non-empty while every product takes the row-major layout (``decoding(invariant=True)``)


@contextlib.contextmanager
def decoding(*models, fast: bool = True, invariant: bool = False, compiled: tuple = (), skip: tuple = ()):
    """The decoding engine's products. With ``fast``, every ``nn.Linear`` of ``models`` on the CPU computes through
    :func:`matmul` (the fastest layout for its row count, outside autograd), so a family whose decoder layers are
    transformers' own (Llama) gets the same products as one whose layers the workbook writes (GPT-2's lean forward).
    Without, every product, the workbook's own included, takes the row-major layout: the eager step a benchmark
    compares with. ``invariant``: every product takes the row-major layout whatever its row count, so a row's
    result does not depend on how many rows share the product where that kernel is batch-invariant (bf16 on the CPUs
    measured; fp32's MKL products are not). The transposed bf16 product is not: on SmolLM2 a one-row and a five-row
    product of the same MLP input differed. ``compiled``: modules (the unembedding) whose products of a compiled
    step's row count are compiled (``core.compiled.unembed``); ``skip``: modules whose products are left as they are
    (a compiled trunk's: its graphs must see the same modules at every call). Restored on exit; nests."""
    skipped = {id(m) for s in skip for m in s.modules()}
    mods = [m for model in models for m in model.modules()
            if type(m) is nn.Linear and m.weight.device.type == "cpu" and "forward" not in m.__dict__
            and id(m) not in skipped] if fast else []
    for m in mods:   # one partial per module, kept: a compiled step's guards see the same forward every decoding
        m.forward = m.__dict__.setdefault("_fastpath_forward", functools.partial(linear, m))
    flags = [f for f, on in ((_EAGER, not fast), (_INVARIANT, invariant)) if on]
    for f in flags:
        f.append(True)
    if compiled:
        _COMPILED.append({id(m) for m in compiled})
        flags.append(_COMPILED)
    try:
        yield
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)
        for f in flags:
            f.pop()


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
