"""Drafters: what proposes the tokens a decoding step verifies.

A drafter's ``propose(model, ctx, j, x0, history, limit)`` returns a :class:`~multitoken.trees.Tree` of at most
``limit`` levels and one token per node (a LongTensor on the model's device, in the tree's node order), or
``(empty tree, None)`` for no draft. ``ctx``, ``j`` and ``x0`` are what the model's heads draft from (the context of
the last forward, the step-local position of the chosen token, that token); ``history`` is the row's tokens so far
(prompt and output, ``x0`` last). The engine verifies every proposal with the model itself, so any drafter is
lossless: it changes how many tokens a step keeps, never which.

- :class:`Heads`: the model's own heads under a fixed tree (MTP heads, MEDUSA-1 heads, MTP modules);
- :class:`PromptLookup`: n-gram lookup in the row's own history, as transformers' ``prompt_lookup_num_tokens``;
- :class:`Hybrid`: one tree holding the heads' tree and the lookup's chain, shared prefixes merged.
"""
from __future__ import annotations

import torch

from .trees import Tree, chain

NONE = Tree((), name="none")


def _device(model) -> torch.device:
    """Where the model's parameters live: where a drafter makes its tokens."""
    return next(iter(model.parameters())).device


class Heads:
    """The model's heads, drafting the nodes of ``tree`` (cut to ``limit`` levels near the end of the budget)."""

    def __init__(self, tree: Tree):
        self.tree, self.name = tree, tree.name

    def propose(self, model, ctx, j, x0, history, limit):
        t = self.tree.truncate(limit)
        return (t, model.spec_propose(ctx, j, x0, t)) if len(t) else (NONE, None)


class PromptLookup:
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

    def propose(self, model, ctx, j, x0, history, limit):
        toks = self.lookup(history, limit) if limit > 0 else []
        if not toks:
            return NONE, None
        return chain(len(toks)), torch.tensor(toks, dtype=torch.long, device=_device(model))


class Hybrid:
    """The heads' tree and the lookup's chain in one tree: the chain follows the heads' nodes while their tokens
    agree and branches off where they part, so a step verifies both proposals at once and keeps the longer match."""

    def __init__(self, heads: Heads, lookup: PromptLookup):
        self.heads, self.lookup = heads, lookup
        self.name = f"{heads.name}+{lookup.name}"
        self._trees: dict = {}

    def propose(self, model, ctx, j, x0, history, limit):
        t, cand = self.heads.propose(model, ctx, j, x0, history, limit)
        toks = self.lookup.lookup(history, limit) if limit > 0 else []
        if not toks:
            return t, cand
        token_of = dict(zip(t.paths, cand.tolist())) if len(t) else {}
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
        return tree, torch.tensor([token_of[p] for p in tree.paths], dtype=torch.long, device=_device(model))


def make(spec, tree: Tree) -> object:
    """A drafter from its name: ``"heads"`` (the model's heads under ``tree``), ``"prompt_lookup[:K]"``,
    ``"hybrid[:K]"`` (the heads under ``tree`` and prompt lookup of K tokens), or a drafter object as it is."""
    if not isinstance(spec, str):
        if not hasattr(spec, "propose"):
            raise ValueError(f"a drafter needs a propose(model, ctx, j, x0, history, limit) method: {spec!r}")
        return spec
    name, _, k = spec.partition(":")
    if k and not k.isdigit():
        raise ValueError(f"unknown drafter {spec!r}: heads, prompt_lookup[:K] or hybrid[:K]")
    lookup = PromptLookup(int(k)) if k else PromptLookup()
    if name == "heads" and not k:
        return Heads(tree)
    if name == "prompt_lookup":
        return lookup
    if name == "hybrid":
        return Hybrid(Heads(tree), lookup)
    raise ValueError(f"unknown drafter {spec!r}: heads, prompt_lookup[:K] or hybrid[:K]")
