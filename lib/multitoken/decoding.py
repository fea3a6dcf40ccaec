"""One decoding engine for MTP and Medusa heads: KV-cached greedy, chain and tree speculation, lossless sampling.

Each step feeds ``[x0, drafts...]`` through the model once: ``x0`` is the token the model already chose, the drafts
are tree nodes proposed by a drafter (``multitoken.drafters``: the model's heads, prompt lookup, or both). Tree attention = causal over the cached prefix + each node sees only its
ancestors; position id = prefix length + depth. Greedy keeps the longest root-to-leaf path whose tokens equal the
model's own argmax at each parent, so the output is token-for-token what plain greedy decoding returns. Sampling
uses recursive rejection across siblings (drafts are deterministic, q(x) = 1), which keeps the target distribution
exactly. Then only the accepted path's KV entries are kept (cropped when contiguous, gathered otherwise), and a
model with drafting state of its own (sequential transformer modules, ``multitoken.sequential``) hears which positions
were accepted through its optional ``spec_accept`` hook.

A batch runs as one step loop (``multitoken.batched``: a dense cache with per-row lengths, each row its own accepted
length) or row by row (``batched=False``; models with drafting state of their own); each row exact either way.
Every tensor of the step loop is made on the model's device (never torch's default device); the model's dtype is
whatever it was loaded in, and the sampling maths runs in float32.
"""
from __future__ import annotations

import time
from typing import Protocol

import torch

from . import drafters, fastpath
from .backbones import Backbone, backbone_of
from .trees import Tree, parse_tree


class SpecModel(Protocol):
    """What the engine asks of a model (MTP heads, Medusa heads, MTP modules, or ``PlainLM`` without heads).

    ``spec_forward`` runs ``input_ids`` (1, T) through the model on top of ``caches`` with the engine's
    ``position_ids`` and 4D bool ``attention_mask`` (None: causal) and returns next-token logits (1, T, V) and a context
    the heads draft from; ``spec_propose`` returns one token per node of ``tree`` for the step-local position ``j``
    whose chosen next token is ``x0``; ``spec_accept`` (optional) hears which step positions were kept."""

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


def _compact(caches, L: int, keep: list[int]):
    """Keep the prefix (L entries) and the step-local positions ``keep`` in every layer of every cache, in place:
    the kept slots move to [L, L + k) and the rest is cut off, so a step costs O(k) whatever the cache's length (a
    ``torch.cat`` of the prefix would copy the whole cache at every step)."""
    k, idx = len(keep), None
    contiguous = keep == list(range(k))
    for cache in caches:
        for layer in cache.layers:
            if not contiguous:
                if idx is None:
                    idx = torch.tensor(keep, device=layer.keys.device) + L
                for t in (layer.keys, layer.values):
                    t[..., L: L + k, :] = t.index_select(-2, idx)        # gathered first: the slots may overlap
            layer.keys, layer.values = layer.keys[..., : L + k, :], layer.values[..., : L + k, :]


def _greedy_best(tree: Tree, tt, cand: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The deepest node whose whole path matches the model's argmax, as a 0-d tensor (0: none), so the step can
    read it with the rest in one host sync. ``tt`` is ``tree.on(device)``."""
    hit = cand == pred[tt.parents]                                          # (N,) node token == argmax at parent
    if tree.is_chain:                                                       # nodes 1..N in order: a prefix
        return hit.long().cumprod(0).sum()
    ok = (tt.path_matrix @ (~hit).float()) == 0                              # every node on the path matches
    return torch.where(ok.any(), torch.where(ok, tt.depths, 0).argmax() + 1, 0)


def _path_to(tree: Tree, node: int) -> list[int]:
    """The step-local indices of ``node``'s path from the root (1-based; ``[]`` for the root)."""
    if tree.is_chain:
        return list(range(1, node + 1))
    path = []
    while node:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


def _sample_accept(tree: Tree, cand: torch.Tensor, probs: torch.Tensor, gen):
    """Recursive rejection over siblings; returns (accepted node indices, next token)."""
    children = tree.__dict__.setdefault("_children", _children(tree))
    node, path = 0, []
    while True:
        p = probs[node].clone()
        nxt = None
        for c in children[node]:
            tok = int(cand[c - 1])
            if torch.rand((), generator=gen, device=p.device) < p[tok] / p.sum():
                nxt = c
                break
            p[tok] = 0.0
        if nxt is None:
            return path, int(torch.multinomial(p / p.sum(), 1, generator=gen))
        path.append(nxt)
        node = nxt


def _children(tree: Tree):
    ch = [[] for _ in range(len(tree) + 1)]
    for i, par in enumerate(tree.parents[1:], 1):
        ch[par].append(i)
    return ch


def _checked(t, cand, vocab: int):
    """A proposal of a drafter from outside the workbook, refused when it does not fit its tree or the vocabulary."""
    if len(t) and (cand is None or cand.shape != (len(t),)):
        raise ValueError(f"the drafter proposed {None if cand is None else tuple(cand.shape)} tokens for a tree of "
                         f"{len(t)} nodes: one token per node")
    if len(t) and (int(cand.min()) < 0 or int(cand.max()) >= vocab):
        raise ValueError(f"the drafter proposed token {int(cand.max()) if int(cand.max()) >= vocab else int(cand.min())}"
                         f" outside the model's vocabulary of {vocab}")
    return t, cand


@torch.inference_mode()
def _generate_row(model, ids, max_new_tokens, temperature, top_p, drafter, eos, n_pos, gen, stats):
    dev = ids.device
    caches = model.spec_new_cache()
    L = ids.numel()
    prompt = ids.tolist()
    own = isinstance(drafter, (drafters.Heads, drafters.PromptLookup, drafters.Hybrid))
    logits, ctx = model.spec_forward(ids.view(1, -1), caches)              # prefill
    stats["forward_passes"] += 1
    greedy = temperature == 0
    last = logits[0, -1]
    x0 = int(last.argmax()) if greedy else int(torch.multinomial(target_probs(last, temperature, top_p), 1,
                                                                  generator=gen))
    accept = getattr(model, "spec_accept", None)  # models with drafting state of their own (sequential modules)
    if accept is not None:
        accept(ctx, None, x0)
    j, out = L - 1, []
    while True:
        out.append(x0)
        if x0 in eos or len(out) >= max_new_tokens:
            break
        limit = min(max_new_tokens - len(out), n_pos - L - 1)
        t, cand = drafter.propose(model, ctx, j, x0, prompt + out, limit)    # a tree and a token per node
        if not own:
            t, cand = _checked(t, cand, logits.shape[-1])
        if t.depth > limit:
            raise ValueError(f"the drafter proposed a tree {t.depth} deep where {limit} tokens are left")
        tt = t.on(dev)
        if len(t):
            step = torch.cat([cand.new_tensor([x0]), cand]).view(1, -1)
            pos = (L + tt.steps_pos).view(1, -1)
            mask = torch.cat([torch.ones(len(t) + 1, L, dtype=torch.bool, device=dev), tt.ancestors], 1)[None, None]
        else:
            cand, mask = None, None
            step, pos = torch.tensor([[x0]], device=dev), torch.tensor([[L]], device=dev)
        logits, ctx = model.spec_forward(step, caches, pos, mask)           # (1, N+1, V)
        stats["forward_passes"] += 1
        if greedy:
            pred = logits[0].argmax(-1)                                      # (N+1,)
            if len(t):  # the step's one host sync: the accepted node, the drafts and the argmaxes together
                host = torch.cat([_greedy_best(t, tt, cand, pred).view(1), cand, pred]).tolist()
                path, cand, pred = _path_to(t, host[0]), host[1: 1 + len(t)], host[1 + len(t):]
            else:
                path, pred = [], pred.tolist()
            x_next = pred[path[-1] if path else 0]
        else:
            probs = target_probs(logits[0], temperature, top_p)
            path, x_next = _sample_accept(t, cand, probs, gen) if len(t) else (
                [], int(torch.multinomial(probs[0], 1, generator=gen)))
        for d in range(t.depth):
            if d == len(stats["head_tries"]):
                stats["head_tries"].append(0)
                stats["head_hits"].append(0)
            stats["head_tries"][d] += 1
            stats["head_hits"][d] += int(d < len(path))
        done = False
        for node in path:
            out.append(int(cand[node - 1]))                                  # a host list when greedy
            if out[-1] in eos or len(out) >= max_new_tokens:
                done = True
                break
        if done:
            break
        keep = [0] + path
        _compact(caches, L, keep)
        if accept is not None:
            accept(ctx, keep, x_next)
        L, j, x0 = L + len(keep), path[-1] if path else 0, x_next
    stats["kv_cache_bytes"] = max(stats.get("kv_cache_bytes", 0), cache_bytes(caches))
    return out


def cache_bytes(caches) -> int:
    """Bytes held by every KV cache of a decoding row: the trunk's, transformer heads' and MTP modules' own, as
    stored (grouped key-value heads, dtype)."""
    every = [*caches, *getattr(caches, "modules", [])]
    return sum(t.numel() * t.element_size() for c in every for layer in c.layers
               for t in (layer.keys, layer.values) if t is not None)


def speculative_generate(model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, tree=None,
                         attention_mask=None, eos_token_id=None, pad_token_id=None, generator=None, batched=None,
                         drafter="heads"):
    """Generate with drafts verified by the model (by default its heads'); returns ``(sequences, stats)``.

    With ``temperature=0`` the sequences equal ``model.generate(do_sample=False)`` token for token (EOS and
    ``max_new_tokens`` included), row by row whatever the batch's padding; with ``temperature>0`` every token follows
    softmax(logits/T) within the top-p nucleus exactly. ``tree``: None (chain over all heads), "chain:N",
    "medusa[:N]", "none", paths, or a Tree: what the heads draft. ``drafter``: ``"heads"``, ``"prompt_lookup[:K]"``
    (n-gram lookup in the row's own tokens, no heads needed), ``"hybrid[:K]"`` (both in one tree) or an object with
    ``propose`` (``multitoken.drafters``; its proposals are checked). ``batched``: the rows advance together
    (``multitoken.batched``; the heads' drafts only) or one after the other; None: together for a batch of several rows
    where the model and drafter allow it; ``"masked"``: together, finished rows kept in the batch as masked no-ops
    instead of leaving it (a measurement, not faster).
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
    drafter = drafters.make(drafter, tree)
    from . import batched as batched_mod

    if not isinstance(drafter, drafters.Heads) and not batched_mod.supports(model):
        raise ValueError(f"{type(model).__name__} keeps drafting state of its own (its MTP modules' caches follow "
                         f"the heads' tree): it drafts with its heads only, not with {drafter.name!r}")
    draft = getattr(model, "draft_ids", None)
    if draft is not None and tree.max_topk > draft.numel():
        raise ValueError(f"the tree drafts a head's top-{tree.max_topk} but the heads predict over a draft vocabulary "
                         f"of {draft.numel()} tokens: use a narrower tree or a larger medusa_draft_vocab")
    check_generation_config(model, sampling=temperature > 0)
    input_ids = input_ids.to(dev)
    if attention_mask is not None:
        attention_mask = attention_mask.to(dev)
    n_pos, eos = backbone_of(model).context_size, _eos_set(model, eos_token_id)
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
    stats = {"forward_passes": 0, "head_tries": [0] * tree.depth, "head_hits": [0] * tree.depth}
    was_training = getattr(model, "training", False)
    model.eval()
    sync(dev)
    t0 = time.perf_counter()
    heads_only = isinstance(drafter, drafters.Heads)
    if batched is None:
        batched = len(rows) > 1 and batched_mod.supports(model) and heads_only
    elif batched and not batched_mod.supports(model):
        raise ValueError(f"{type(model).__name__} keeps drafting state of its own (spec_accept): it decodes row by "
                         "row (batched=False)")
    elif batched and not heads_only:
        raise ValueError(f"the {drafter.name} drafter decodes row by row (batched=False)")
    try:
        if batched:
            outs = batched_mod.generate_rows(model, rows, max_new_tokens, temperature, top_p, tree, eos, n_pos,
                                             generator, stats, finished="masked" if batched == "masked" else "drop")
        else:
            outs = [_generate_row(model, r, max_new_tokens, temperature, top_p, drafter, eos, n_pos, generator, stats)
                    for r in rows]
    finally:
        model.train(was_training)
    sync(dev)
    wall = time.perf_counter() - t0
    width = max(len(o) for o in outs)
    new = input_ids.new_full((len(outs), width), pad_token_id)
    for i, o in enumerate(outs):
        new[i, : len(o)] = input_ids.new_tensor(o)
    n_new = sum(len(o) for o in outs)
    row_forwards = len(rows) + stats["row_steps"] if batched else stats["forward_passes"]  # forwards seen per row
    stats.update(new_tokens=n_new, wall_time_s=wall, mean_accepted_length=n_new / row_forwards, batched=batched,
                 per_head_acceptance=[h / t if t else 0.0 for h, t in zip(stats["head_hits"], stats["head_tries"])],
                 tree=tree.name, tree_nodes=len(tree), drafter=getattr(drafter, "name", type(drafter).__name__),
                 tokens_per_s=n_new / wall if wall > 0 else 0.0)
    return torch.cat([input_ids, new], 1), stats


def greedy_generate(model, input_ids, max_new_tokens, **kw):
    """This engine without drafts: KV-cached greedy, one token per forward."""
    return speculative_generate(model, input_ids, max_new_tokens, tree="none", **kw)
