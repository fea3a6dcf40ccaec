"""Candidate trees for speculative decoding.

A tree is a set of nodes, each a path of top-k indices, one per head: ``(0,)`` is head 1's best token,
``(0, 1)`` is head 2's second-best token placed after it. The root (the token the model itself just chose) is
implicit. Every prefix of a node's path is itself a node, so each node has a parent.
"""
from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

CPU = torch.device("cpu")

# Medusa's greedy-built sparse tree for Vicuna-7B (63 nodes, depth <= 4), in the order it was grown, so that any
# prefix of this list is a valid smaller tree.
MEDUSA_63 = [(0,), (0, 0), (1,), (0, 1), (0, 0, 0), (1, 0), (2,), (0, 2), (0, 0, 1), (0, 3), (3,), (0, 1, 0), (2, 0),
             (4,), (0, 0, 2), (0, 4), (1, 1), (1, 0, 0), (0, 0, 0, 0), (5,), (0, 0, 3), (0, 5), (0, 2, 0), (3, 0),
             (0, 1, 1), (0, 6), (6,), (0, 7), (0, 0, 4), (4, 0), (1, 2), (0, 8), (7,), (0, 3, 0), (0, 0, 0, 1),
             (0, 0, 5), (2, 1), (0, 0, 6), (1, 0, 1), (0, 0, 1, 0), (2, 0, 0), (5, 0), (0, 9), (0, 1, 2), (8,),
             (0, 4, 0), (0, 2, 1), (1, 3), (0, 0, 7), (0, 0, 0, 2), (0, 0, 8), (1, 1, 0), (0, 1, 0, 0), (6, 0), (9,),
             (0, 1, 3), (0, 0, 0, 3), (1, 0, 2), (0, 5, 0), (3, 1), (0, 0, 2, 0), (7, 0), (1, 4)]


@dataclass(frozen=True)
class Tree:
    """Nodes sorted by depth; tensors precomputed for the step loop (index 0 of the step is the root).

    ``grown``: the nodes in the order they were given when that order grew the tree (every node after its parent:
    the order a greedy builder added them, most likely first), else in depth order; ``first(m)`` keeps the first m.

    The tensor fields live on the CPU (made there explicitly, whatever torch's default device); ``on(device)``
    gives the same tensors on the model's device, cached per device.
    """

    paths: tuple
    name: str = "tree"
    parents: list = field(init=False, repr=False)      # step-local index of each node's parent (0 = root)
    depths_t: torch.Tensor = field(init=False, repr=False)
    last_idx_t: torch.Tensor = field(init=False, repr=False)
    ancestors: torch.Tensor = field(init=False, repr=False)  # (N+1, N+1) bool: row i may attend to column j
    children: list = field(init=False, repr=False)     # step-local indices of each node's children (0 = root)
    is_chain: bool = field(init=False, repr=False)

    def __post_init__(self):
        given = tuple(dict.fromkeys(tuple(p) for p in self.paths))
        paths = tuple(sorted(given, key=lambda p: (len(p), p)))
        index = {p: i + 1 for i, p in enumerate(paths)}
        for p in paths:
            if len(p) == 0 or any(i < 0 for i in p):
                raise ValueError(f"invalid tree node {p}: paths are non-empty tuples of top-k indices >= 0")
            if len(p) > 1 and p[:-1] not in index:
                raise ValueError(f"tree node {p} has no parent {p[:-1]} in the tree")
        n = len(paths) + 1
        anc = torch.eye(n, dtype=torch.bool, device=CPU)
        anc[:, 0] = True
        parents = [0] + [index.get(p[:-1], 0) for p in paths]
        for i in range(1, n):
            anc[i] |= anc[parents[i]]
        object.__setattr__(self, "paths", paths)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "depths_t", torch.tensor([len(p) for p in paths], dtype=torch.long, device=CPU))
        object.__setattr__(self, "last_idx_t", torch.tensor([p[-1] for p in paths], dtype=torch.long, device=CPU))
        object.__setattr__(self, "ancestors", anc)
        children = [[] for _ in range(n)]
        for i in range(1, n):
            children[parents[i]].append(i)
        object.__setattr__(self, "children", children)
        object.__setattr__(self, "is_chain", all(p == (0,) * len(p) for p in paths))
        seen: set = set()
        for p in given:                                   # a growth order: each node after its parent
            if len(p) > 1 and p[:-1] not in seen:
                given = paths
                break
            seen.add(p)
        self.__dict__["grown"] = given

    def __len__(self):
        return len(self.paths)

    def on(self, device) -> SimpleNamespace:
        """The step loop's tensors on ``device`` (cached): depths, last_idx, ancestors, and
        ``steps_pos``, the position offsets of the step's tokens (root 0, then each node's depth)."""
        device = torch.device(device)
        cache = self.__dict__.setdefault("_on", {})
        if device not in cache:
            cache[device] = SimpleNamespace(**{k: getattr(self, f).to(device) for k, f in (
                ("depths", "depths_t"), ("last_idx", "last_idx_t"), ("ancestors", "ancestors"))})
            cache[device].steps_pos = torch.cat([torch.zeros(1, dtype=torch.long, device=device), cache[device].depths])
        return cache[device]

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def max_topk(self) -> int:
        return 1 + max((p[-1] for p in self.paths), default=0)

    def truncate(self, depth: int) -> "Tree":
        """The same tree without nodes deeper than ``depth`` (cached per depth)."""
        if depth >= self.depth:
            return self
        cache = self.__dict__.setdefault("_trunc", {})
        if depth not in cache:
            cache[depth] = Tree(tuple(p for p in self.grown if len(p) <= depth), name=self.name)
        return cache[depth]

    def first(self, m: int) -> "Tree":
        """The tree of the first ``m`` nodes in growth order (cached per m; the whole tree when m >= its size)."""
        if m >= len(self):
            return self
        cache = self.__dict__.setdefault("_first", {})
        if m not in cache:
            cache[m] = Tree(self.grown[: max(m, 0)], name=self.name)
        return cache[m]


@functools.lru_cache(maxsize=None)
def chain(depth: int) -> Tree:
    """Top-1 of each of the first ``depth`` heads: plain self-speculative decoding (one Tree per depth, shared)."""
    return Tree(tuple((0,) * d for d in range(1, depth + 1)), name=f"chain{depth}")


def medusa_tree(num_nodes: int = 63, num_heads: int | None = None) -> Tree:
    """The first ``num_nodes`` nodes of Medusa's sparse tree (deeper nodes dropped if the model has fewer heads)."""
    paths = [p for p in MEDUSA_63 if num_heads is None or len(p) <= num_heads][:num_nodes]
    return Tree(tuple(paths), name=f"medusa{len(paths)}")


def fitted_tree(head_topk_accuracy, budget: int) -> Tree:
    """Greedy tree under a node budget from measured accuracies: ``acc[d][k]`` = P(head d+1's top-(k+1) token is
    the right one). Adds the node with the highest product of accuracies along its path, as Medusa does."""
    acc = [list(map(float, row)) for row in head_topk_accuracy]
    heap, paths = [(-acc[0][k], (k,)) for k in range(len(acc[0]))], []
    heapq.heapify(heap)
    while heap and len(paths) < budget:
        neg, path = heapq.heappop(heap)
        paths.append(path)
        if len(path) < len(acc):
            for k in range(len(acc[len(path)])):
                heapq.heappush(heap, (neg * acc[len(path)][k], path + (k,)))
    return Tree(tuple(paths), name=f"fitted{len(paths)}")


def parse_tree(spec, num_heads: int) -> Tree:
    """``None``/"chain" (all heads), "chain:N", "medusa[:N]", "none", a list of paths, or a Tree."""
    if isinstance(spec, Tree):
        tree = spec
    elif spec is None or spec == "chain":
        tree = chain(num_heads)
    elif spec == "none":
        tree = Tree(())
    elif isinstance(spec, str) and spec.startswith("chain:"):
        tree = chain(int(spec.split(":")[1]))
    elif isinstance(spec, str) and spec.startswith("medusa"):
        n = int(spec.split(":")[1]) if ":" in spec else 63
        tree = medusa_tree(n, num_heads)
    elif isinstance(spec, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in spec):
        tree = Tree(tuple(tuple(p) for p in spec))
    else:
        raise ValueError(f"unknown tree spec {spec!r}: use None, 'chain', 'chain:N', 'medusa[:N]', 'none', "
                         "a list of index paths, or a Tree")
    if tree.depth > num_heads:
        raise ValueError(f"tree of depth {tree.depth} is deeper than the model's {num_heads} heads")
    return tree
