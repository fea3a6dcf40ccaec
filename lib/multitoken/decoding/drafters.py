"""Drafters: what proposes the tokens a decoding step verifies.

A drafter has a ``name`` and ``propose(model, view) -> Draft``: for each row ``i`` still decoding (``view``, a
:class:`View`), a :class:`~multitoken.decoding.trees.Tree` of at most ``view.limits[i]`` levels and one token per
node, as a :class:`Draft` (the rows' trees and their tokens, padded to the largest tree). The engine verifies every proposal
with the model itself, so any drafter is lossless: it changes how many tokens a step keeps, never which. A drafter
that works one row at a time subclasses :class:`RowDrafter` and writes ``propose_row``.

- :class:`Heads`: the model's own heads under a fixed tree (MTP heads, MEDUSA-1 heads), every row's
  drafts in one batched call where the model offers ``spec_head_topk_rows``;
- :class:`Modules`: the sequential MTP modules' drafts, their caches kept here (one row's state: ``start`` /
  ``accept`` hooks);
- :class:`PromptLookup`: n-gram lookup in each row's own history, as transformers' ``prompt_lookup_num_tokens``;
- :class:`Hybrid`: per row, one tree holding the heads' tree and the lookup's chain, shared prefixes merged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import modules
from .trees import Tree, chain

NONE = Tree((), name="none")


@dataclass(frozen=True)
class View:
    """What a drafter sees at a step, for the ``n`` rows still decoding.

    ``ctx``: the last forward's drafting context (batch-major; what the model's heads read); ``js`` (n,): the
    step-local position in that forward of each row's chosen token; ``x0``: those tokens (each tree's root);
    ``histories``: each row's tokens so far (prompt, output, ``x0`` last; read-only); ``limits``: each row's tree
    may be at most this many levels deep (the tokens it has left); ``rows``: which rows of the batch these are."""

    ctx: dict | None
    js: torch.Tensor
    x0: list
    histories: list
    limits: list
    rows: list

    def row_ctx(self, i: int) -> dict | None:
        """Row ``i``'s slice of the drafting context."""
        n = len(self.x0)
        return self.ctx if n == 1 else select_rows(self.ctx, torch.tensor([i], device=self.js.device), n)


@dataclass(frozen=True)
class Draft:
    """One tree per row and their tokens ``(n, N)`` (row ``i``'s first ``len(trees[i])`` entries in the tree's node
    order; N = the largest tree's size; None when every tree is empty)."""

    trees: list
    tokens: torch.Tensor | None

    @staticmethod
    def of_rows(pairs, device) -> "Draft":
        """A draft from one ``(tree, tokens or None)`` per row."""
        trees = [t for t, _ in pairs]
        for t, cand in pairs:
            if len(t) and (cand is None or cand.shape != (len(t),)):
                raise ValueError(f"the drafter proposed {None if cand is None else tuple(cand.shape)} tokens for a "
                                 f"tree of {len(t)} nodes: one token per node")
        N = max((len(t) for t in trees), default=0)
        if N == 0:
            return Draft(trees, None)
        if len(pairs) == 1:
            return Draft(trees, pairs[0][1].view(1, -1))
        tokens = torch.zeros(len(pairs), N, dtype=torch.long, device=device)
        for i, (t, cand) in enumerate(pairs):
            if len(t):
                tokens[i, : len(t)] = cand
        return Draft(trees, tokens)


def select_rows(ctx, idx: torch.Tensor, n: int):
    """Rows ``idx`` of a drafting context of ``n`` rows: the core's ``Features`` (or anything with ``rows(idx)``)
    select their own; a dict from another model has every batch-major tensor (or list of them) selected, its
    ``caches`` and anything else kept as they are."""
    if hasattr(ctx, "rows"):
        return ctx.rows(idx)

    def pick(x):
        if isinstance(x, torch.Tensor):
            return x.index_select(0, idx) if x.dim() and x.shape[0] == n else x
        if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
            return type(x)(pick(t) for t in x)
        return x
    return None if ctx is None else {k: (v if k == "caches" else pick(v)) for k, v in ctx.items()}


def batchable(drafter) -> bool:
    """Whether the rows of a batch can decode together with ``drafter``: not when it keeps state of one row (it
    hears every step through ``accept``: the MTP modules' caches)."""
    return not hasattr(drafter, "accept")


def has_modules(model) -> bool:
    """Whether ``model`` drafts with sequential MTP modules (caches of their own: :class:`Modules`)."""
    seq = getattr(model, "_seq_modules", None)
    return bool(seq is not None and seq())


def _device(model) -> torch.device:
    """Where the model's parameters live: where a drafter makes its tokens."""
    return next(iter(model.parameters())).device


class RowDrafter:
    """A drafter that proposes for one row at a time: ``propose_row(model, ctx, j, x0, history, limit)`` returns
    ``(tree, tokens)`` or ``(empty tree, None)``, with ``ctx`` the row's own slice of the drafting context."""

    name = "row drafter"

    def propose_row(self, model, ctx, j: int, x0: int, history: list, limit: int):
        raise NotImplementedError

    def propose(self, model, view: View) -> Draft:
        js = view.js.tolist()
        return Draft.of_rows([self.propose_row(model, view.row_ctx(i), js[i], view.x0[i], view.histories[i],
                                               view.limits[i]) for i in range(len(view.x0))], _device(model))


class Heads:
    """The model's heads, drafting the nodes of ``tree`` (each row's cut to the levels it has left: nodes are in
    depth order, so a cut tree's tokens are the first of the whole tree's)."""

    def __init__(self, tree: Tree):
        self.tree, self.name = tree, tree.name

    def propose(self, model, view: View) -> Draft:
        t, n = self.tree.truncate(max(view.limits)), len(view.x0)
        trees = [t.truncate(limit) for limit in view.limits]
        if not len(t):
            return Draft(trees, None)
        topk = getattr(model, "spec_head_topk_rows", None)
        top = topk(view.ctx, view.js, t.max_topk) if topk is not None and n > 1 else None   # (n, S, k) or None
        if top is not None:
            tt = t.on(top.device)
            return Draft(trees, top[:, tt.depths - 1, tt.last_idx])
        js = view.js.tolist()
        return Draft(trees, torch.stack([model.spec_propose(view.row_ctx(i), js[i], view.x0[i], t)
                                         for i in range(n)]))


class PromptLookup(RowDrafter):
    """Draft the ``num_tokens`` tokens that followed the earliest earlier occurrence of the history's last n-gram,
    trying n = ``max_ngram`` down to 1 (transformers' prompt lookup decoding: GSM8K answers repeat the question's
    numbers and phrases)."""

    def __init__(self, num_tokens: int = 4, max_ngram: int = 3):
        if num_tokens < 1 or max_ngram < 1:
            raise ValueError(f"prompt lookup needs num_tokens >= 1 and max_ngram >= 1, got {num_tokens}, {max_ngram}")
        self.num_tokens, self.max_ngram = num_tokens, max_ngram
        self.name = f"lookup{num_tokens}"

    def lookup(self, history: list[int], limit: int | None = None) -> list[int]:
        """The continuation of the earliest match (``[]`` when none), at most ``limit`` tokens."""
        k = self.num_tokens if limit is None else min(self.num_tokens, limit)
        n_hist = len(history)
        for n in range(min(self.max_ngram, n_hist - 1), 0, -1):
            tail = history[n_hist - n:]
            for s in range(n_hist - n):              # windows ending before the tail itself
                if history[s: s + n] == tail:
                    return history[s + n: min(s + n + k, n_hist)]
        return []

    def propose_row(self, model, ctx, j, x0, history, limit):
        toks = self.lookup(history, limit) if limit > 0 else []
        if not toks:
            return NONE, None
        return chain(len(toks)), torch.tensor(toks, dtype=torch.long, device=_device(model))


class Hybrid:
    """Per row, the heads' tree and the lookup's chain in one tree: the chain follows the heads' nodes while their
    tokens agree and branches off where they part, so a step verifies both proposals at once and keeps the longer
    match.

    ``budget`` (None: no limit) caps a row's nodes: where the lookup proposes k tokens, the heads keep the first
    ``budget - k`` nodes of their tree in growth order (its most likely ones), so a step with a match costs no more
    than one without. The budget that pays is a property of the machine and the models: pick it on validation
    prompts (``scripts/drafter_tau.py``)."""

    def __init__(self, heads: Heads, lookup: PromptLookup, budget: int | None = None):
        if budget is not None and budget < 1:
            raise ValueError(f"a hybrid's node budget must be >= 1, got {budget}")
        self.heads, self.lookup, self.budget = heads, lookup, budget
        self.name = f"{heads.name}+{lookup.name}" + (f"@{budget}" if budget is not None else "")
        self._trees: dict = {}

    def merge(self, t: Tree, cand: torch.Tensor | None, toks: list[int]) -> tuple[Tree, list[int]]:
        """The heads' tree ``t`` (tokens ``cand``; cut to the budget left beside ``toks``) with the chain ``toks``
        merged in: the tree and its tokens."""
        token_of = dict(zip(t.paths, cand.tolist())) if len(t) else {}
        if self.budget is not None and len(t) + len(toks) > self.budget:
            toks = toks[: self.budget]
            t = t.first(self.budget - len(toks))
            token_of = {p: token_of[p] for p in t.paths}
        children: dict = {}
        for p in t.paths:
            children.setdefault(p[:-1], []).append(p)
        node = ()
        for tok in toks:
            nxt = next((c for c in children.get(node, []) if token_of[c] == tok), None)
            if nxt is None:                          # a new branch: the next free sibling index
                nxt = node + (1 + max((c[-1] for c in children.get(node, [])), default=-1),)
                children.setdefault(node, []).append(nxt)
                token_of[nxt] = tok
            node = nxt
        paths = tuple(token_of)
        tree = self._trees.get(paths)
        if tree is None:
            tree = self._trees[paths] = Tree(paths, name=self.name)
        return tree, [token_of[p] for p in tree.paths]

    def propose(self, model, view: View) -> Draft:
        heads = self.heads.propose(model, view)
        pairs, dev = [], _device(model)
        for i, (t, history) in enumerate(zip(heads.trees, view.histories)):
            cand = heads.tokens[i, : len(t)] if len(t) else None
            toks = self.lookup.lookup(history, view.limits[i]) if view.limits[i] > 0 else []
            if toks or (self.budget is not None and len(t) > self.budget):
                t, merged = self.merge(t, cand, toks)
                cand = torch.tensor(merged, dtype=torch.long, device=dev) if merged else None
            pairs.append((t, cand))
        return Draft.of_rows(pairs, dev)


class Modules(Heads):
    """The sequential MTP modules' drafts under ``tree``. Their caches follow one row's text, so this drafter keeps
    one row's state: the engine calls ``start`` before a row's prefill and ``accept`` after every step (and decodes
    such a model one row at a time)."""

    def start(self, model, rows: int) -> None:
        if rows != 1:
            raise ValueError(f"the MTP modules' drafter keeps one row's state; got {rows} rows")
        self.state = modules.ModuleState(model.num_heads, model.backbone.new_cache)

    def propose(self, model, view: View) -> Draft:
        t = self.tree.truncate(view.limits[0])
        return Draft([t], modules.propose(model, self.state, t).view(1, -1) if len(t) else None)

    def accept(self, ctx, keep, x_next: int) -> None:
        """The step positions ``keep`` (None: the whole prefill) are committed, ``x_next`` chosen next."""
        modules.accept(self.state, ctx, keep, x_next)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.state.modules for layer in c.layers
                   for t in (layer.keys, layer.values) if t is not None)


BUILT_IN = (Heads, PromptLookup, Hybrid)


def max_nodes(drafter) -> int | None:
    """The most nodes a built-in drafter proposes in one step (None: unknown, a drafter of one's own)."""
    if isinstance(drafter, Hybrid):
        return drafter.budget if drafter.budget is not None else len(drafter.heads.tree) + drafter.lookup.num_tokens
    if isinstance(drafter, PromptLookup):
        return drafter.num_tokens
    if isinstance(drafter, Heads):
        return len(drafter.tree)
    return None


def make(spec, tree: Tree, model=None) -> object:
    """A drafter from its name: ``"heads"`` (the model's heads under ``tree``; for MTP modules, which keep caches of
    their own, :class:`Modules`), ``"prompt_lookup[:K]"``,
    ``"hybrid[:K[:N]]"`` (the heads under ``tree`` and prompt lookup of K tokens, at most N nodes a row), or a drafter
    object as it is."""
    if not isinstance(spec, str):
        if not hasattr(spec, "propose"):
            raise ValueError(f"a drafter needs a propose(model, view) method: {spec!r}")
        return spec
    name, *nums = spec.split(":")
    known = {"heads": 0, "prompt_lookup": 1, "hybrid": 2}
    if name not in known or len(nums) > known[name] or not all(n.isdigit() for n in nums):
        raise ValueError(f"unknown drafter {spec!r}: heads, prompt_lookup[:K] or hybrid[:K[:N]]")
    lookup = PromptLookup(int(nums[0])) if nums else PromptLookup()
    if name == "heads":
        if has_modules(model):
            return Modules(tree)
        return Heads(tree)
    if name == "prompt_lookup":
        return lookup
    if has_modules(model):
        raise ValueError(f"{type(model).__name__}'s MTP modules keep caches of their own that follow their own tree: "
                         f"they draft alone, not in a hybrid ({spec!r})")
    return Hybrid(Heads(tree), lookup, int(nums[1]) if len(nums) > 1 else None)
