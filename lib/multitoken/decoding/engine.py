"""One decoding engine: KV-cached greedy, chain and tree speculation, lossless sampling, one step loop for a row
and a batch (a row is a batch of one).

Each step feeds every row's ``[x0, drafts...]`` through the model once: ``x0`` is the token the model already chose,
the drafts are the nodes of a tree a drafter proposed for that row (``multitoken.decoding.drafters``: the model's
heads, prompt lookup, both). Tree attention: each row sees its own committed prefix and, inside the step, each node only its
ancestors; position id = the row's committed length + depth. Greedy keeps, per row, the path from the root whose
tokens equal the model's own argmax at each parent, so the output is token-for-token what plain greedy decoding
returns. Sampling uses recursive rejection across siblings (drafts are deterministic, q(x) = 1), which keeps the
target distribution exactly. Then only the accepted path's KV entries are kept, moved in place.

The cache is one dense tensor per layer, batch-major, with a committed length per row: slots past it are junk that
no query sees. A row that ends (EOS, ``max_new_tokens``) leaves the batch. Rows whose trees differ (prompt lookup
finds a match in one row and not in another) are padded to the largest tree with nodes nobody keeps. A drafter with
state of one row (the sequential MTP modules' caches, ``multitoken.decoding.modules``) decodes one row at a time and
hears which step positions were kept through its ``accept``.

Every tensor of the step loop is made on the model's device (never torch's default device); the model's dtype is
whatever it was loaded in, and the sampling maths runs in float32.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from ..core import compiled, fastpath
from ..core.backbones import Backbone, backbone_of, invariant_attention
from . import drafters
from .trees import Tree, parse_tree


class SpecModel(Protocol):
    """What the engine asks of a model (MTP heads, Medusa heads, MTP modules, or ``PlainLM`` without heads).

    ``spec_forward`` runs ``input_ids`` (B, T) through the model on top of ``caches`` with the engine's
    ``position_ids`` (B, T) and 4D bool ``attention_mask`` (B, 1, T, S; None: causal) and returns next-token logits
    (B, T, V) and the drafting context its heads read (the core's ``Features``: batch-major, rows selected with
    ``rows(idx)``; None for a model without heads); ``spec_propose`` returns one token per node of ``tree`` for one
    row's context at the step-local position ``j`` whose chosen next token is ``x0``; ``spec_head_topk_rows``
    (optional) every row's heads' top-k at once."""

    num_heads: int
    backbone: Backbone

    def spec_new_cache(self) -> list: ...

    def spec_forward(self, input_ids, caches, position_ids=None, attention_mask=None) -> tuple: ...

    def spec_propose(self, ctx, j: int, x0: int, tree: Tree) -> torch.Tensor: ...


def target_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling distribution (..., V): softmax(logits / T) restricted to the top-p nucleus (as HF's TopP warper)."""
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits.softmax(-1)


class PlainLM:
    """Any HF causal LM of a known family without heads, for the engine (KV-cached greedy / sampling, no drafts)."""

    num_heads = 0

    def __init__(self, model):
        self.model, self.config, self.generation_config = model, model.config, model.generation_config

    @property
    def backbone(self):
        return backbone_of(self.model)

    def spec_new_cache(self):
        return [self.backbone.new_cache()]

    def spec_forward(self, input_ids, caches, position_ids=None, attention_mask=None):
        _, hidden, _ = self.backbone.trunk(input_ids, caches[0], position_ids, mask=attention_mask)
        return fastpath.linear(self.backbone.unembed, hidden), None

    @property
    def training(self):
        return self.model.training

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        self.model.eval()

    def train(self, mode=True):
        self.model.train(mode)


def _eos_set(model, eos_token_id):
    eos = eos_token_id if eos_token_id is not None else getattr(model.generation_config if hasattr(
        model, "generation_config") else model.model.generation_config, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


# generation settings `generate` would apply that this engine does not: (neutral value, applies only when sampling)
UNSUPPORTED = {"repetition_penalty": (1.0, False), "encoder_repetition_penalty": (1.0, False),
               "no_repeat_ngram_size": (0, False), "encoder_no_repeat_ngram_size": (0, False),
               "bad_words_ids": (None, False), "min_length": (0, False), "min_new_tokens": (0, False),
               "suppress_tokens": (None, False), "begin_suppress_tokens": (None, False),
               "forced_bos_token_id": (None, False), "forced_eos_token_id": (None, False), "sequence_bias": (None, False),
               "exponential_decay_length_penalty": (None, False), "guidance_scale": (1.0, False),
               "watermarking_config": (None, False), "stop_strings": (None, False), "num_beams": (1, False),
               "penalty_alpha": (None, False), "dola_layers": (None, False), "top_k": (0, True),
               "typical_p": (1.0, True), "epsilon_cutoff": (0.0, True), "eta_cutoff": (0.0, True), "min_p": (None, True)}


def check_generation_config(model, sampling: bool) -> None:
    """Refuse, naming it, any setting of the model's ``generation_config`` that ``generate`` would apply and this
    engine does not (a repetition penalty, an n-gram ban, a minimum length, suppressed tokens, top-k when sampling,
    ...): with one, the engine's output would differ from ``generate``'s without a word."""
    gc = getattr(model, "generation_config", None)
    bad = [f"{k}={getattr(gc, k)!r}" for k, (neutral, when_sampling) in UNSUPPORTED.items()
           if gc is not None and getattr(gc, k, None) not in (None, neutral) and (sampling or not when_sampling)]
    if bad:
        raise ValueError(f"the model's generation_config sets {', '.join(bad)}, which generate() applies and this "
                         "engine does not (its output would differ from generate's): unset it "
                         "(model.generation_config.<name> = None) or decode with generate()")


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters: where the engine makes every tensor (the CPU for a
    parameter-free model)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def sync(device) -> None:
    """Wait for queued CUDA work on ``device`` (timings are fenced with this); a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: argmax (``temperature == 0``) or softmax(logits / T) within the top-p nucleus,
    drawn with ``generator`` (on the model's device; None: torch's global one)."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def draw(self, logits: torch.Tensor) -> list[int]:
        """One token per row of ``logits`` (n, V)."""
        if self.greedy:
            return logits.argmax(-1).tolist()
        probs = target_probs(logits, self.temperature, self.top_p)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0].tolist()


@dataclass
class StepStats:
    """What a decode counted: model forwards (a batch's forward counts once), verification steps summed over rows,
    and per draft depth d how often a row's tree reached it and how often the accepted path did."""

    forward_passes: int = 0
    row_steps: int = 0
    head_tries: list = field(default_factory=list)
    head_hits: list = field(default_factory=list)
    kv_cache_bytes: int = 0

    def count(self, depth: int, accepted: int) -> None:
        while len(self.head_tries) < depth:
            self.head_tries.append(0)
            self.head_hits.append(0)
        for d in range(depth):
            self.head_tries[d] += 1
            self.head_hits[d] += int(d < accepted)


def _compact(caches, L: list[int], W: int, keeps: list[list[int]]) -> int:
    """Row ``b`` keeps its committed slots ``[0, L[b])`` and the step slots ``W + keeps[b]`` (``W``: the width the
    step was appended at), moved to ``[L[b], L[b] + k_b)`` in every layer of every cache, in place (one indexed copy
    for the whole batch; none when every row kept a prefix of its step right after its committed slots); every layer
    is then cut to ``max_b(L[b] + k_b)``, the new width, which is returned. A step so costs O(kept) whatever the
    cache's length."""
    b_idx, src, dst = [], [], []
    for b, (l, keep) in enumerate(zip(L, keeps)):
        for m, k in enumerate(keep):
            if W + k != l + m:
                b_idx.append(b), src.append(W + k), dst.append(l + m)
    width = max(l + len(k) for l, k in zip(L, keeps))
    if b_idx:
        dev = caches[0].layers[0].keys.device
        b_idx, src, dst = (torch.tensor(v, device=dev) for v in (b_idx, src, dst))
    for cache in caches:
        for layer in cache.layers:
            if len(b_idx):
                for t in (layer.keys, layer.values):
                    t[b_idx, :, dst] = t[b_idx, :, src]                     # gathered first: slots may overlap
            if not isinstance(cache, compiled.StepCache):                   # a fixed-capacity cache keeps its slots
                layer.keys, layer.values = layer.keys[..., :width, :], layer.values[..., :width, :]
        if isinstance(cache, compiled.StepCache):
            cache.set_length(width)
    return width


def _leave(caches, ctx, stay: list[int], n: int, dev):
    """Only rows ``stay`` (of ``n``) go on: the others leave every cache and the drafting context."""
    idx = torch.tensor(stay, device=dev)
    for cache in caches:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
    return drafters.select_rows(ctx, idx, n)


def _greedy_path(tree: Tree, cand: list[int], pred: list[int]) -> list[int]:
    """The accepted nodes (step-local indices, root excluded): from the root, the child whose token is the model's
    argmax at its parent, as long as there is one."""
    if tree.is_chain:                                                       # node i's parent is node i - 1
        k = 0
        while k < len(tree) and cand[k] == pred[k]:
            k += 1
        return list(range(1, k + 1))
    children, node, path = tree.children, 0, []
    while True:
        node = next((c for c in children[node] if cand[c - 1] == pred[node]), None)
        if node is None:
            return path
        path.append(node)


def _sample_accept(tree: Tree, cand: list[int], probs: torch.Tensor, gen):
    """Recursive rejection over siblings; returns (accepted node indices, next token)."""
    children, node, path = tree.children, 0, []
    while True:
        p = probs[node].clone()
        nxt = None
        for c in children[node]:
            tok = cand[c - 1]
            if torch.rand((), generator=gen, device=p.device) < p[tok] / p.sum():
                nxt = c
                break
            p[tok] = 0.0
        if nxt is None:
            return path, int(torch.multinomial(p / p.sum(), 1, generator=gen))
        path.append(nxt)
        node = nxt


def _checked(draft, n: int, vocab: int, limits: list[int]):
    """A draft of a drafter from outside the workbook, refused when it does not fit its trees, the vocabulary or the
    tokens left."""
    trees, tokens = draft.trees, draft.tokens
    if len(trees) != n:
        raise ValueError(f"the drafter proposed {len(trees)} trees for {n} rows: one per row")
    for i, t in enumerate(trees):
        if not len(t):
            continue
        if tokens is None or tokens.dim() != 2 or tokens.shape[0] != n or tokens.shape[1] < len(t):
            raise ValueError(f"the drafter proposed {None if tokens is None else tuple(tokens.shape)} tokens for "
                             f"{n} row(s) with a tree of {len(t)} nodes: one token per node")
        row = tokens[i, : len(t)]
        lo, hi = int(row.min()), int(row.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"the drafter proposed token {hi if hi >= vocab else lo} outside the model's "
                             f"vocabulary of {vocab}")
        if t.depth > limits[i]:
            raise ValueError(f"the drafter proposed a tree {t.depth} deep where {limits[i]} tokens are left")
    return draft


def _step_inputs(x0: list[int], draft, L: list[int], width: int, dev, pad_to: int = 0, capacity: int = 0):
    """The step's tokens ``(n, N + 1)``, position ids and 4D bool mask (None: plain causal) for rows of committed
    lengths ``L`` in a cache ``width`` wide. Rows whose trees are smaller than the largest are padded with nodes that
    see only the prefix and themselves (computed, never kept). A compiled step: ``pad_to`` nodes at least (the same
    padding), the mask always explicit and ``capacity`` slots wide (the slots past the step masked)."""
    trees, n = draft.trees, len(x0)
    N = max(len(t) for t in trees)
    x0t = torch.tensor(x0, device=dev)[:, None]
    Lt = torch.tensor(L, device=dev)[:, None]
    anc = None
    if N == 0:
        step, pos = x0t, Lt
    else:
        step = torch.cat([x0t, draft.tokens[:, :N]], 1)
        if all(t is trees[0] for t in trees):
            tt = trees[0].on(dev)
            pos, anc = Lt + tt.steps_pos, tt.ancestors.expand(n, -1, -1)
        else:
            steps_pos = torch.zeros(n, N + 1, dtype=torch.long, device=dev)
            anc = torch.eye(N + 1, dtype=torch.bool, device=dev).repeat(n, 1, 1)
            for i, t in enumerate(trees):
                tt = t.on(dev)
                steps_pos[i, : len(t) + 1], anc[i, : len(t) + 1, : len(t) + 1] = tt.steps_pos, tt.ancestors
            pos = Lt + steps_pos
    if pad_to > N:                                       # a compiled step's size: nodes that see only the prefix
        extra = pad_to - N                               # and themselves, and whose logits nobody reads
        own = anc if anc is not None else torch.ones(n, 1, 1, dtype=torch.bool, device=dev)
        anc = torch.eye(pad_to + 1, dtype=torch.bool, device=dev).repeat(n, 1, 1)
        anc[:, : N + 1, : N + 1] = own
        step, pos = torch.cat([step, x0t.expand(n, extra)], 1), torch.cat([pos, Lt.expand(n, extra)], 1)
        N = pad_to
    if min(L) == width and not capacity:                                     # no junk slots: the whole cache is seen
        mask = None if anc is None else torch.cat([anc.new_ones(n, N + 1, width), anc], 2)[:, None]
    else:
        prefix = torch.arange(width, device=dev)[None] < Lt                  # (n, W) each row's committed slots
        own = anc if anc is not None else prefix.new_ones(n, 1, 1)
        mask = torch.cat([prefix[:, None, :].expand(-1, N + 1, -1), own], 2)[:, None]
        if capacity:
            mask = F.pad(mask, (0, capacity - mask.shape[-1]), value=False)
    return step, pos, mask


@torch.inference_mode()
def _decode(model, rows, max_new_tokens, sampling: Sampling, drafter, eos, n_pos, stats: StepStats,
            finished: str = "drop", compiled_step: bool = False, fixed: int = 0) -> list[list[int]]:
    """Decode the prompts ``rows`` (1-D tensors on the model's device) together; returns each row's new tokens.

    Every row keeps its own committed length: slots past it are junk no query sees. A step appends each row's
    ``[x0, drafts...]`` at the cache's width, verifies all rows in one forward, accepts per row, and compacts each
    row's kept slots in place. A row that ends leaves the batch (``finished="drop"``) or stays as a masked no-op
    (``"masked"``: computed and drafted for, nothing kept). A drafter with state of one row (``accept``) decodes one
    row at a time and hears every accepted step. ``compiled_step``: the caches are fixed-capacity
    (``core.compiled.StepCache``, the trunk's kept for the next decode of the same shape), every mask explicit and as
    wide as they are, and each step padded to a compiled size (the padding's logits never read). ``fixed``: every
    step padded to that many tokens (an exact decoding's one shape, one row at a time; compiled or not)."""
    if finished not in ("drop", "masked"):
        raise ValueError(f"finished must be 'drop' or 'masked', got {finished!r}")
    masked, dev, B = finished == "masked", rows[0].device, len(rows)
    stateful = not drafters.batchable(drafter)
    if stateful and B > 1:
        raise ValueError(f"the {drafter.name} drafter keeps one row's state: it decodes one row at a time")
    if hasattr(drafter, "start"):
        drafter.start(model, B)
    foreign = not isinstance(drafter, drafters.BUILT_IN)
    L = [int(r.numel()) for r in rows]
    width, plen, hist = max(L), list(L), [r.tolist() for r in rows]
    caches, cap = model.spec_new_cache(), 0
    if compiled_step:
        cap = compiled.capacity_for(width + max_new_tokens + compiled.LADDER[-1])
        caches = [compiled.compiled_of(backbone_of(model)).cache(B, cap, dev)] + [
            compiled.StepCache(cap, dev) for _ in caches[1:]]
        for c in caches:
            c.compiled = False                                              # the prefill runs eagerly
            c.set_length(0)
    if min(L) == width and not cap:                                         # no padding: a plain causal prefill
        logits, ctx = model.spec_forward(torch.stack(rows), caches)
        last = logits[:, -1]
    else:                                                                   # right-padded, the pads masked
        ids = torch.zeros(B, width, dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            ids[b, : L[b]] = r
        ar, lens = torch.arange(width, device=dev), torch.tensor(L, device=dev)
        mask = (ar[:, None] >= ar[None, :])[None] & (ar[None, None, :] < lens[:, None, None])
        if cap:
            mask = F.pad(mask, (0, cap - width), value=False)
        logits, ctx = model.spec_forward(ids, caches, ar.expand(B, width), mask[:, None])
        last = logits[torch.arange(B, device=dev), lens - 1]
    if cap:
        for c in caches:
            c.set_length(width)
        caches[0].compiled = True
    stats.forward_passes += 1
    x0 = sampling.draw(last)
    if stateful:
        drafter.accept(ctx, None, x0[0])
    js = torch.tensor(L, device=dev) - 1                                     # step-local position of x0's state
    alive, done = list(range(B)), [False] * B
    while True:
        stay = []
        for i, b in enumerate(alive):
            if not done[b]:
                hist[b].append(x0[i])
                done[b] = x0[i] in eos or len(hist[b]) - plen[b] >= max_new_tokens
            if masked or not done[b]:
                stay.append(i)
        if all(done[alive[i]] for i in stay):
            break
        if len(stay) < len(alive):                                           # finished rows leave the batch
            idx_ctx = _leave(caches, ctx, stay, len(alive), dev)
            ctx, js = idx_ctx, js[torch.tensor(stay, device=dev)]
            alive, L, x0 = [alive[i] for i in stay], [L[i] for i in stay], [x0[i] for i in stay]
        n = len(alive)
        limits = [0 if done[b] else min(max_new_tokens - len(hist[b]) + plen[b], n_pos - l - 1)
                  for b, l in zip(alive, L)]                                 # the levels each row has left
        draft = drafter.propose(model, drafters.View(ctx, js, x0, [hist[b] for b in alive], limits, alive))
        if foreign:
            draft = _checked(draft, n, logits.shape[-1], limits)
        trees = draft.trees
        N = max(len(t) for t in trees)
        if fixed and N + 1 > fixed:
            raise ValueError(f"the drafter proposed {N} nodes where every step holds {fixed} tokens (step_tokens): "
                             f"pass a larger step_tokens or draft at most {fixed - 1}")
        size = fixed or (compiled.rung(N + 1) if cap else None)
        step, pos, mask = _step_inputs(x0, draft, L, width, dev, pad_to=size - 1 if size else 0, capacity=cap)
        if cap and width + step.shape[1] > cap:
            raise ValueError(f"a step of {step.shape[1]} tokens after {width} overflows the compiled decoding's cache "
                             f"of {cap} slots: a tree of at most {compiled.LADDER[-1] - 1} nodes")
        logits, ctx = model.spec_forward(step, caches, pos, mask)           # (n, N+1, V)
        logits = logits[:, : N + 1]                                         # a compiled step's padding: not read
        stats.forward_passes += 1
        stats.row_steps += n
        if sampling.greedy:
            pred = logits.argmax(-1)                                         # (n, N+1)
            if N:  # the step's one host sync: every row's drafts and argmaxes together
                host = torch.cat([draft.tokens[:, :N], pred], 1).tolist()
                cands, preds = [h[:N] for h in host], [h[N:] for h in host]
                paths = [_greedy_path(t, c, p) for t, c, p in zip(trees, cands, preds)]
            else:
                cands, preds, paths = [[]] * n, pred.tolist(), [[]] * n
            x_next = [p[path[-1] if path else 0] for p, path in zip(preds, paths)]
        elif N:
            probs = target_probs(logits, sampling.temperature, sampling.top_p)
            cands = draft.tokens[:, :N].tolist()
            acc = [_sample_accept(t, c, probs[i], sampling.generator) if len(t) else
                   ([], int(torch.multinomial(probs[i, 0], 1, generator=sampling.generator)))
                   for i, (t, c) in enumerate(zip(trees, cands))]
            paths, x_next = [a[0] for a in acc], [a[1] for a in acc]
        else:
            cands, paths, x_next = [[]] * n, [[]] * n, sampling.draw(logits[:, 0])
        stay, keeps = [], []
        for i, b in enumerate(alive):
            if not done[b]:
                stats.count(trees[i].depth, len(paths[i]))
                for node in paths[i]:
                    hist[b].append(cands[i][node - 1])
                    if hist[b][-1] in eos or len(hist[b]) - plen[b] >= max_new_tokens:
                        done[b] = True
                        break
                else:
                    stay.append(i)
                    keeps.append([0] + paths[i])
                    continue
            if masked:                                                       # a masked no-op: its cache stays as is
                stay.append(i)
                keeps.append([])
        if all(done[alive[i]] for i in stay):
            break
        if len(stay) < n:
            ctx = _leave(caches, ctx, stay, n, dev)
        L = [L[i] for i in stay]
        width = _compact(caches, L, width, keeps)
        if stateful:
            drafter.accept(ctx, keeps[0], x_next[0])
        alive = [alive[i] for i in stay]
        L = [l + len(k) for l, k in zip(L, keeps)]
        js = torch.tensor([k[-1] if k else 0 for k in keeps], device=dev)
        x0 = [x_next[i] for i in stay]
    own = drafter.cache_bytes() if hasattr(drafter, "cache_bytes") else 0    # a drafter's own caches (MTP modules)
    stats.kv_cache_bytes = max(stats.kv_cache_bytes, cache_bytes(caches) + own)
    return [h[p:] for h, p in zip(hist, plen)]


def cache_bytes(caches) -> int:
    """Bytes held by the model's KV caches (the trunk's and transformer heads'), as stored (grouped key-value heads,
    dtype)."""
    return sum(t.numel() * t.element_size() for c in caches for layer in c.layers
               for t in (layer.keys, layer.values) if t is not None)


def speculative_generate(model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, tree=None,
                         attention_mask=None, eos_token_id=None, pad_token_id=None, generator=None, batched=None,
                         drafter="heads", fast=True, exact=None, step_tokens=None):
    """Generate with drafts verified by the model (by default its heads'); returns ``(sequences, stats)``.

    With ``temperature=0`` the sequences equal ``model.generate(do_sample=False)`` token for token (EOS and
    ``max_new_tokens`` included), row by row whatever the batch's padding; with ``temperature>0`` every token follows
    softmax(logits/T) within the top-p nucleus exactly. ``tree``: None (chain over all heads), "chain:N",
    "medusa[:N]", "none", paths, or a Tree: what the heads draft. ``drafter``: ``"heads"``, ``"prompt_lookup[:K]"``
    (n-gram lookup in the row's own tokens, no heads needed), ``"hybrid[:K[:N]]"`` (both in one tree of at most N
    nodes) or an object with ``propose`` (``multitoken.decoding.drafters``; its proposals are checked). ``batched``:
    the rows advance together or one after the other; None: together for a batch of several rows where the drafter
    allows it (not one that keeps one row's state, as the MTP modules' does); ``"masked"``: together, finished rows
    kept in the batch as masked no-ops instead of leaving it (a measurement, not faster). ``fast``: every product of
    the step in the fastest weight layout this CPU offers for its shape (``core.fastpath.decoding``; False: the
    row-major products a plain forward computes, for comparison; ``"compiled"``: each step one compiled graph,
    its weights frozen and packed by inductor for this CPU's GEMM kernels, ``core.compiled``; one row at a time
    unless ``batched=True``, which keeps the batch's shape (finished rows stay as masked no-ops, one graph per batch
    size and step size); the first decode of each shape pays its compilation). ``exact``: every position computed
    with the same arithmetic whatever else shares its step (invariant attention, one product layout per weight), so
    speculation returns token for token what this engine's greedy decoding returns in bf16 too, where transformers'
    kernels round a 5-token step differently from 5 one-token steps; None: for 16-bit models on the CPU (fp32 ones
    stay on the batched kernels: their differences are far below a token's margin, and MKL's fp32 products are not
    batch-invariant). Kernels pick their algorithm by shape (oneDNN's bf16 products by row count on some CPUs,
    inductor per compiled graph), so an exact decoding of one row at a time also runs every step, greedy's included,
    in one shape: ``step_tokens`` tokens (default :data:`EXACT_STEP`), a position then computed alike whichever row
    of whichever step holds it. A batched decoding is not padded (its rows share each step's products, whose row
    count changes with the batch anyway): it equals the same rows decoded alone only where the kernels are invariant
    to the row count. On CUDA cuBLAS promises no invariance either: ``exact=True`` there gives the invariant
    attention and the one shape, not invariant products. ``step_tokens``: every step of a row decoded alone padded
    to this many tokens (compiled: a size of ``core.compiled.LADDER``; None: no padding, or :data:`EXACT_STEP` when
    exact); a drafter that proposes more than ``step_tokens - 1`` nodes raises.
    """
    if not hasattr(model, "spec_forward"):
        model = PlainLM(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, length) LongTensor")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dev = model_device(model)
    if generator is not None and generator.device != dev:
        raise ValueError(f"generator is on {generator.device} but the model on {dev}: "
                         f"use torch.Generator(device={str(dev)!r})")
    tree = parse_tree(tree, model.num_heads)
    drafter = drafters.make(drafter, tree, model)
    draft = getattr(model, "draft_ids", None)
    if draft is not None and tree.max_topk > draft.numel():
        raise ValueError(f"the tree drafts a head's top-{tree.max_topk} but the heads predict over a draft vocabulary "
                         f"of {draft.numel()} tokens: use a narrower tree or a larger medusa_draft_vocab")
    check_generation_config(model, sampling=temperature > 0)
    input_ids = input_ids.to(dev)
    if attention_mask is not None:
        attention_mask = attention_mask.to(dev)
    bb = backbone_of(model)
    n_pos, eos = bb.context_size, _eos_set(model, eos_token_id)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    rows = [r[m.bool()] if attention_mask is not None else r
            for r, m in zip(input_ids, attention_mask if attention_mask is not None else input_ids)]
    for r in rows:
        if r.numel() == 0:
            raise ValueError("empty prompt")
        if r.numel() > n_pos:
            raise ValueError(f"prompt of {r.numel()} tokens is longer than the context ({n_pos})")
        if r.numel() + max_new_tokens > n_pos:
            raise ValueError(f"prompt ({r.numel()}) + max_new_tokens ({max_new_tokens}) overflows the context ({n_pos})")
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    if fast == "compiled" and batched is True:
        batched = "masked"                   # a compiled batch keeps its shape: finished rows stay as masked no-ops
    if fast not in (True, False, "compiled"):
        raise ValueError(f"fast must be True, False or 'compiled', got {fast!r}")
    if batched is None:
        batched = len(rows) > 1 and drafters.batchable(drafter) and fast != "compiled"
    elif batched and not drafters.batchable(drafter):
        raise ValueError(f"the {drafter.name} drafter keeps one row's state (the MTP modules' caches): it decodes "
                         "row by row (batched=False)")
    sampling, stats = Sampling(temperature, top_p, generator), StepStats(head_tries=[0] * tree.depth,
                                                                          head_hits=[0] * tree.depth)
    was_training = getattr(model, "training", False)
    model.eval()
    sync(dev)
    t0 = time.perf_counter()
    nets = [m for m in (model, getattr(model, "model", None)) if isinstance(m, torch.nn.Module)][:1]
    compiled_step = fast == "compiled"
    exact, fixed = exactness(model, fast, exact, step_tokens)
    unembed, trunk = ((bb.unembed,), (bb.layers,)) if compiled_step else ((), ())
    try:
        with fastpath.decoding(*nets, fast=bool(fast), invariant=exact, compiled=unembed, skip=trunk), \
                (invariant_attention(model) if exact and not compiled_step else contextlib.nullcontext()):
            finished = "masked" if batched == "masked" else "drop"
            outs = (_decode(model, rows, max_new_tokens, sampling, drafter, eos, n_pos, stats, finished,
                            compiled_step=compiled_step) if batched
                    else [_decode(model, [r], max_new_tokens, sampling, drafter, eos, n_pos, stats,
                                  compiled_step=compiled_step, fixed=fixed)[0] for r in rows])
    finally:
        model.train(was_training)
    sync(dev)
    wall = time.perf_counter() - t0
    width = max(len(o) for o in outs)
    new = input_ids.new_full((len(outs), width), pad_token_id)
    for i, o in enumerate(outs):
        new[i, : len(o)] = input_ids.new_tensor(o)
    n_new = sum(len(o) for o in outs)
    stats = asdict(stats)
    stats.update(new_tokens=n_new, wall_time_s=wall, batched=batched,
                 mean_accepted_length=n_new / (len(rows) + stats["row_steps"]),   # tokens per forward a row saw
                 per_head_acceptance=[h / t if t else 0.0 for h, t in zip(stats["head_hits"], stats["head_tries"])],
                 tree=tree.name, tree_nodes=len(tree), drafter=getattr(drafter, "name", type(drafter).__name__),
                 tokens_per_s=n_new / wall if wall > 0 else 0.0)
    return torch.cat([input_ids, new], 1), stats


EXACT_STEP = 9   # an exact decoding's steps, one row at a time: the root and up to 8 drafts (chains, lookups, trees)


def exactness(model, fast, exact, step_tokens) -> tuple[bool, int]:
    """``(exact, fixed)`` for these arguments of :func:`speculative_generate`: whether positions are computed alike
    whatever shares their step (by default: a 16-bit model on the CPU), and the number of tokens every step of a row
    decoded alone is padded to (0: none; a compiled step then takes its own rung)."""
    dev = model_device(model)
    if exact is None:
        exact = dev.type == "cpu" and next(iter(model.parameters())).dtype in (torch.bfloat16, torch.float16)
    if step_tokens is None:
        return exact, EXACT_STEP if exact else 0
    if fast == "compiled" and compiled.rung(step_tokens) != step_tokens:
        raise ValueError(f"step_tokens must be one of the compiled step sizes {compiled.LADDER}, got {step_tokens}")
    if not isinstance(step_tokens, int) or step_tokens < 1:
        raise ValueError(f"step_tokens must be a positive number of tokens, got {step_tokens!r}")
    return exact, step_tokens


class _FixedChain(drafters.RowDrafter):
    """``k`` drafts every step (the root token repeated): steps of one size, whatever the model says."""

    def __init__(self, k: int):
        self.k, self.name = k, f"fixed{k}"

    def propose_row(self, model, ctx, j, x0, history, limit):
        k = min(self.k, limit)
        return (drafters.chain(k), torch.full((k,), x0, dtype=torch.long, device=drafters._device(model))) if k \
            else (drafters.NONE, None)


def precompile(model, prompt_len: int, max_new_tokens: int, largest: int = compiled.LADDER[-1], exact=None,
               step_tokens=None) -> float:
    """Compile, before anything is timed, every step a compiled decoding (``fast="compiled"``) of a prompt of
    ``prompt_len`` tokens and ``max_new_tokens`` new ones can take, up to ``largest`` tokens a step (every rung of
    ``core.compiled.LADDER`` up to it), or the one size every step of a decoding with these ``exact`` and
    ``step_tokens`` takes (:func:`speculative_generate`): one decode of a random prompt per size. Returns the seconds
    spent compiling (graphs compiled before, for this model's weights or equal ones, cost nothing)."""
    before, bb = compiled.COMPILE_S[0], backbone_of(model)
    exact, fixed = exactness(model, "compiled", exact, step_tokens)
    cap = compiled.capacity_for(prompt_len + max_new_tokens + compiled.LADDER[-1])   # as ``_decode`` sizes it
    key = (compiled.fingerprint(bb.lm.base_model), compiled.fingerprint(bb.unembed), cap,
           fixed or compiled.rung(largest), bool(fixed), getattr(model, "_trunk_cut", None),
           str(model_device(model)), next(model.parameters()).dtype)
    if key in _PRECOMPILED:
        return 0.0
    dev = model_device(model)
    vocab = bb.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
    for r in [fixed] if fixed else [r for r in compiled.LADDER if r <= compiled.rung(largest)]:
        kw = dict(tree="none") if r == 1 or fixed else dict(drafter=_FixedChain(r - 1))
        speculative_generate(model, ids, max_new_tokens, fast="compiled", eos_token_id=-1, exact=exact,
                             step_tokens=step_tokens, **kw)
    _PRECOMPILED.add(key)
    return compiled.COMPILE_S[0] - before


_PRECOMPILED: set = set()   # what precompile has compiled: (weights, unembedding, capacity, largest rung, cut, ...)


def greedy_generate(model, input_ids, max_new_tokens, **kw):
    """This engine without drafts: KV-cached greedy, one token per forward."""
    return speculative_generate(model, input_ids, max_new_tokens, tree="none", **kw)
