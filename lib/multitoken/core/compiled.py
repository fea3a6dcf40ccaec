"""The decoding step compiled: the backbone's cached forward of T new tokens as one inductor graph over a KV cache of
fixed capacity, its weights frozen into the graph so that inductor packs them for its own CPU GEMM kernels.

Why: a step multiplies a few rows by every weight, and PyTorch's eager kernels for a few rows stream the weights far
below the machine's read bandwidth, so a step of several tokens costs well over a one-token step. Inductor with
``freezing`` and ``max_autotune`` (its C++ GEMM template, chosen per shape by timing it against the ATen kernel)
streams them near the bandwidth for a few rows (measurements: docs/BENCHMARKS.md, docs/LOG.md).

How: compilation needs fixed shapes and fixed addresses, so the engine decodes into a :class:`StepCache` (one
buffer of ``capacity`` slots per layer, allocated once and reused by every decode of the same shape) and pads each
step to a rung of :data:`LADDER` (1, 3, 5, 9, 17, 33 tokens: a chain of 2 or 4 drafts, trees of 8, 16, 32 nodes);
the padding nodes see only the committed prefix and themselves and nobody keeps them. Attention reads all
``capacity`` slots under the engine's mask (slots past a row's committed length are masked). One graph is compiled
per (weights, batch, capacity, rung, cut) and kept for the process, and on disk by inductor's FX graph cache
(``TORCHINDUCTOR_CACHE_DIR``; :func:`persistent`), keyed by a digest of the weights too, so that a later process
loads it instead of compiling it again; the unembedding is compiled alone per row count (:func:`unembed`).
Compilation takes about two minutes per graph of SmolLM2 on 2 cores (a quarter of that when loaded from disk):
:func:`precompile` does it up front, and benchmarks report its time apart from decoding's. On CUDA the same graphs
are compiled with CUDA graphs (``mode="reduce-overhead"``) instead of frozen weights.

Frozen weights are a copy: a model whose weights change after compilation (training after an evaluation) would
decode with stale ones, so every decode first looks its graphs up by a digest of its weights and compiles anew
where they differ. A model that cannot be compiled (no C++ compiler, an unsupported op) raises at the first call, naming
the cause; ``fast=True`` decodes without compilation.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
import types

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass
from transformers.cache_utils import Cache, StaticLayer

LADDER = (1, 3, 5, 9, 17, 33)   # step sizes compiled: 1 + 2^k new tokens (the root and its drafts)
CAPACITY_STEP = 512             # cache capacities are multiples of this, so decodes of similar lengths share graphs


def rung(tokens: int) -> int | None:
    """The smallest compiled step size that holds ``tokens`` new tokens (None: larger than the ladder)."""
    return next((r for r in LADDER if r >= tokens), None)


def capacity_for(tokens: int) -> int:
    """The cache capacity for a decode that may hold ``tokens`` slots at once (prompt, new tokens, the last step)."""
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


class StepLayer(StaticLayer):
    """A layer's keys and values in ``capacity`` preallocated slots; each update writes its T new tokens at slots
    ``[at, at + T)``, ``at`` being the engine's write position, shared by every layer of the cache (a 0-d tensor the
    engine sets between steps, so a compiled graph reads it rather than baking it in), and returns all slots."""

    def __init__(self, max_cache_len: int, at: torch.Tensor):
        super().__init__(max_cache_len)
        self.at = at

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = torch.arange(key_states.shape[-2], device=key_states.device) + self.at
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        return self.keys, self.values

    def get_seq_length(self):
        return self.at

    def get_mask_sizes(self, query_length: int):
        return self.max_cache_len, 0


class StepCache(Cache):
    """The engine's cache for compiled steps: :class:`StepLayer`\\ s of ``capacity`` slots, written at ``at``.
    ``length`` is the engine's committed width (slots ``[0, length)`` hold every row's prefix, junk past a row's own
    length is masked); ``set_length`` moves the write position there."""

    def __init__(self, capacity: int, device):
        self.capacity = capacity
        self.at = torch.zeros((), dtype=torch.long, device=device)
        Cache.__init__(self, layer_class_to_replicate=lambda: StepLayer(capacity, self.at))
        self.length, self.compiled, self.owner = 0, False, None   # compiled: steps run the owner's graphs

    def set_length(self, width: int) -> None:
        if width > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} slots; a step needs {width}")
        self.length = width
        self.at.fill_(width)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


COMPILE_S = [0.0]   # seconds this process spent compiling steps (a benchmark reports it apart from decoding)


def _own_code(fn, name: str):
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs per code object, guarded by the closure:
    every closure of one function would share one list (checked in turn at each call, eight at most before it falls
    back to eager without a word); a graph per code object is found at once."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _params_stamp(module) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


def _options(device) -> dict:
    """``torch.compile``'s arguments: CUDA graphs on CUDA; nothing on the CPU, whose settings :func:`_compiling`
    sets around each call (passed as ``options``, ``freezing`` did not reach the compiler)."""
    return dict(mode="reduce-overhead") if torch.device(device).type == "cuda" else {}


AUTOTUNE = [True]   # False: ATen's kernels without timing the C++ template (quicker to compile, slower to run)


class WeightsKey(CustomGraphPass):
    """A post-grad pass that changes nothing and whose ``uuid`` is a digest of the weights a graph freezes: inductor's
    FX graph cache puts a custom pass's uuid in its key, and keys frozen weights by shape and dtype only, so without it
    models of equal shapes and different weights would share a cached graph with the first one's packed weights."""

    def __init__(self, digest: str):
        self.digest = digest

    def __call__(self, graph) -> None:
        pass

    def uuid(self) -> str:
        return self.digest


def _compiling(device, weights: str):
    """Inductor's settings while a CPU graph compiles: weights frozen into the graph (so they can be packed), each
    product's kernel chosen by timing inductor's C++ GEMM template against ATen's (:data:`AUTOTUNE`), and the digest
    of the weights (``weights``, :func:`fingerprint`) in the cache key of every graph kept on disk."""
    if torch.device(device).type == "cuda":
        return contextlib.nullcontext()
    persistent()
    return torch._inductor.config.patch(freezing=True, max_autotune=AUTOTUNE[0], max_autotune_gemm_backends="CPP,ATEN",
                                        post_grad_custom_post_pass=WeightsKey(weights))


PERSISTENT = [None]   # whether inductor's FX graph cache may keep frozen graphs on disk (None: not yet asked)
_HOOKS = ("CacheabilityValidator.check_tensor", "FxGraphCachePickler._reduce_tensor")   # in torch._inductor.codecache


def persistent() -> bool:
    """Lets inductor's FX graph cache keep the compiled steps on disk (in ``TORCHINDUCTOR_CACHE_DIR``), so that a
    later process loads a step's graph instead of compiling it again. Once per process; True if it could.

    Inductor caches frozen graphs, the frozen weights keyed by shape and dtype and taken from the running model on
    load (the weights' digest is in the key too, :class:`WeightsKey`), but it refuses a graph holding oneDNN-packed
    weights (``torch._mkldnn`` tensors cannot be pickled), and freezing packs every linear weight that way before the
    lookup. Such a tensor is a frozen weight like the others, so here it is keyed the same way: by shape and dtype. The
    two private hooks this takes are wrapped here alone; where either is missing (another PyTorch), nothing changes
    and every process compiles its steps anew (correct, only slower)."""
    if PERSISTENT[0] is None:
        PERSISTENT[0] = False
        try:
            from torch._inductor import codecache
            from torch._inductor.freezing_utils import is_frozen_param
            (validator, check_name), (pickler, reduce_name) = [h.split(".") for h in _HOOKS]
            validator, pickler = getattr(codecache, validator), getattr(codecache, pickler)
            check, reduce = getattr(validator, check_name), getattr(pickler, reduce_name)
        except (ImportError, AttributeError):
            return False

        def check_tensor(t):
            if not (t.is_mkldnn and is_frozen_param(t)):
                check(t)

        def reduce_tensor(self, t):
            if t.is_mkldnn and is_frozen_param(t):
                return _same, (("mkldnn", tuple(t.shape), str(t.dtype), str(t.device)),)
            return reduce(self, t)
        setattr(validator, check_name, staticmethod(check_tensor))
        setattr(pickler, reduce_name, reduce_tensor)
        PERSISTENT[0] = True
    return PERSISTENT[0]


def _same(x):
    return x


def fingerprint(module) -> str:
    """A digest of ``module``'s parameters (names, shapes, dtypes and bytes), kept on it until a parameter changes:
    models whose weights are equal (MEDUSA-1 and the MTP modules read NTP's frozen backbone) share compiled graphs."""
    stamp = _params_stamp(module)
    kept = module.__dict__.get("_multitoken_fingerprint")
    if kept is None or kept[0] != stamp:
        h = hashlib.blake2b(digest_size=16)
        for name, p in module.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{p.device}".encode())
            h.update(p.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
        kept = module.__dict__["_multitoken_fingerprint"] = (stamp, h.hexdigest())
    return kept[1]


class _Compiled:
    """The compiled graphs of one set of weights: per (batch, capacity, rung, cut) a compiled trunk and the cache it
    writes. The graphs read the weights of the backbone they were compiled from, frozen: a model with equal weights
    (same :func:`fingerprint`) uses them as they are."""

    def __init__(self, backbone, digest: str):
        self.backbone, self.digest, self.graphs, self.caches = backbone, digest, {}, {}
        self.owner_stamp = _params_stamp(backbone.lm.base_model)   # the graphs may read the owner's tensors

    def cache(self, batch: int, capacity: int, device) -> StepCache:
        """The cache this decode writes (one per batch size and capacity, reused by every decode): it names these
        graphs, so a step finds them without checking the weights again (they cannot change within a decode)."""
        key = (batch, capacity)
        if key not in self.caches:
            self.caches[key] = StepCache(capacity, device)
            self.caches[key].owner = self
        return self.caches[key]

    def graph(self, cache: StepCache, tokens: int, cut):
        key = (id(cache), tokens, cut)
        if key not in self.graphs:
            bb = self.backbone

            def trunk(input_ids, position_ids, mask):
                return bb.trunk(input_ids, cache, position_ids, mask=mask, cut=cut, eager=True)[:2]
            self.graphs[key] = [torch.compile(_own_code(trunk, f"trunk_{len(self.graphs)}"), dynamic=False,
                                              **_options(cache.at.device)), False]
        return self.graphs[key]


_STATES: dict = {}   # fingerprint of the weights -> their compiled graphs, for the process


def compiled_of(backbone) -> _Compiled:
    """The compiled graphs of ``backbone``'s trunk weights (transformers' ``base_model``: embeddings, decoder layers,
    final norm; by :func:`fingerprint`): a model whose weights changed since its graphs were compiled gets others
    (frozen weights are copies), compiled anew at their first steps."""
    base = backbone.lm.base_model
    key = (fingerprint(base), str(next(base.parameters()).device))
    state = _STATES.get(key)
    if state is None or _params_stamp(state.backbone.lm.base_model) != state.owner_stamp:   # its owner trained since
        state = _STATES[key] = _Compiled(backbone, key[0])
    return state


def trunk(backbone, input_ids, cache: StepCache, position_ids, mask, cut):
    """The compiled trunk for this step's shape: ``(state after layer cut, final normed state)``. The step must
    already be padded to a rung; the first call of a shape compiles it (its seconds add to :data:`COMPILE_S`). The
    graphs are those of the cache's owner (:meth:`_Compiled.cache`, chosen by the weights at the decode's start,
    so the weights' versions are not digested again at every step)."""
    state = getattr(cache, "owner", None) or compiled_of(backbone)
    entry = state.graph(cache, input_ids.shape[1], cut)
    t = time.perf_counter()
    with _compiling(input_ids.device, state.digest):   # every call: a recompilation (a failed guard) keeps them
        out = entry[0](input_ids, position_ids, mask)
    if not entry[1]:
        entry[1] = True
        COMPILE_S[0] += time.perf_counter() - t
    return out


_UNEMBED: dict = {}   # (fingerprint, rows, dtype, device) -> compiled product


def unembed(module, x):
    """``module`` (an ``nn.Linear``, the unembedding) on ``x``, compiled per row count with its weight frozen (shared
    by modules of equal weights)."""
    x2 = x.reshape(-1, x.shape[-1])
    key = (fingerprint(module), x2.shape[0], x.dtype, x.device)
    fn, owner, stamp = _UNEMBED.get(key, (None, None, None))
    if fn is not None and _params_stamp(owner) != stamp:                # its owner was trained since
        fn = None
    new = fn is None
    if new:
        fn = torch.compile(_own_code(lambda h: F.linear(h, module.weight, module.bias), f"unembed_{len(_UNEMBED)}"),
                           dynamic=False, **_options(x.device))
        _UNEMBED[key] = (fn, module, _params_stamp(module))
    t = time.perf_counter()
    with _compiling(x.device, key[0]):
        out = fn(x2)
    if new:
        COMPILE_S[0] += time.perf_counter() - t
    return out.reshape(*x.shape[:-1], -1)
