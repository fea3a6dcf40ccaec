"""Batched speculative decoding: the rows of a batch advance together, each with its own accepted length per step.

The layout is one dense KV cache per model cache, batch-major, with a valid length per row: row ``b``'s committed
entries are slots ``[0, L_b)``, slots past it are junk that no query sees. A step appends the ``N + 1`` step tokens of
every row at ``[W, W + N + 1)`` (``W`` the cache's width), with per-row position ids ``L_b + depth`` and a
``(B, 1, N + 1, W + N + 1)`` mask = row ``b``'s valid prefix ``[0, L_b)`` beside the tree's ancestors. Acceptance
runs for every row at once (greedy: one host sync per step), then each row's kept step slots move to
``[L_b, L_b + k_b)`` (one indexed copy for the whole batch) and the cache is cut to ``max_b(L_b + k_b)``, so a
step's cost does not grow with the junk. A row that ends (EOS, ``max_new_tokens``) leaves the batch: its rows are
dropped from every cache and from the drafting context, so finished rows cost nothing (``finished="masked"`` keeps
them as no-ops instead, the alternative the batch benchmark measures). Prompts are packed
right-padded whatever padding they came with (the pads are masked; position ids count each row's own tokens).

Every row equals what it would be alone: with temperature 0, its tokens are ``generate(do_sample=False)``'s for that
row (the same argmax chain; masked slots add exact zeros to attention); with sampling, each row's tokens follow the
target distribution exactly (the single-row rejection rule, row by row, on the batch's probabilities).

Drafting: a model may define ``spec_head_topk_rows(ctx, js, k)`` (every alive row's heads at once, ``(B, S, k)``;
``ctx["rows"]`` names the prompts the alive rows are); otherwise each row's ``spec_propose`` runs on its slice of the context. Models with drafting state of their own
(``spec_accept``: the sequential transformer modules) are not batched: the engine runs them row by row.
"""
from __future__ import annotations

import torch

from .decoding import _path_to, _sample_accept, target_probs
from .trees import Tree


def supports(model) -> bool:
    """Whether the batched step loop serves ``model`` (no per-row drafting state of its own)."""
    accept = getattr(model, "spec_accept", None)
    seq = getattr(model, "_seq_modules", None)
    return accept is None or (seq is not None and not seq())


def _select(x, idx: torch.Tensor, B: int):
    """Rows ``idx`` of every batch-major tensor in a drafting context (tensors, lists of them; others unchanged)."""
    if isinstance(x, torch.Tensor):
        return x.index_select(0, idx) if x.dim() and x.shape[0] == B else x
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return type(x)(_select(t, idx, B) for t in x)
    return x


def _row_ctx(ctx: dict | None, idx: torch.Tensor, B: int) -> dict | None:
    if ctx is None:                                                         # a model without drafts (PlainLM)
        return None
    return {k: (v if k == "caches" else _select(v, idx, B)) for k, v in ctx.items()}


def _leave(caches, ctx, stay: list[int], n: int, dev):
    """Only rows ``stay`` (of ``n``) go on: the others leave every cache and the drafting context. Returns the new
    context and the kept rows' index."""
    idx = torch.tensor(stay, device=dev)
    for cache in caches:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
    return _row_ctx(ctx, idx, n), idx


def _compact_rows(caches, L: list[int], W: int, keeps: list[list[int]]) -> int:
    """Move each row's kept step slots ``W + keep`` to ``[L_b, L_b + k_b)`` and cut every layer to the new width."""
    b_idx, src, dst = [], [], []
    for b, (l, keep) in enumerate(zip(L, keeps)):
        for m, k in enumerate(keep):
            if W + k != l + m:
                b_idx.append(b), src.append(W + k), dst.append(l + m)
    width = max(l + len(k) for l, k in zip(L, keeps))
    dev = caches[0].layers[0].keys.device
    if b_idx:
        b_idx, src, dst = (torch.tensor(v, device=dev) for v in (b_idx, src, dst))
    for cache in caches:
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                if len(b_idx):
                    t[b_idx, :, dst] = t[b_idx, :, src]                     # gathered first: slots may overlap
            layer.keys, layer.values = layer.keys[..., :width, :], layer.values[..., :width, :]
    return width


def _greedy_best_rows(tree: Tree, tt, cand: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Per row, the deepest node whose whole path matches the model's argmax (0: none): ``(B,)``."""
    hit = cand == pred[:, tt.parents]                                       # (B, N)
    if tree.is_chain:
        return hit.long().cumprod(1).sum(1)
    ok = ((~hit).float() @ tt.path_matrix.T) == 0                            # (B, N) every node on the path matches
    return torch.where(ok.any(1), torch.where(ok, tt.depths, 0).argmax(1) + 1, 0)


def _propose(model, ctx, js, x0s, tree, B):
    topk = getattr(model, "spec_head_topk_rows", None)
    top = topk(ctx, js, tree.max_topk) if topk is not None else None       # (B, S, k) or None (not batchable)
    if top is not None:
        tt = tree.on(top.device)
        return top[:, tt.depths - 1, tt.last_idx]
    dev = js.device
    return torch.stack([model.spec_propose(_row_ctx(ctx, torch.tensor([i], device=dev), B), int(js[i]), x0s[i], tree)
                        for i in range(B)])


@torch.inference_mode()
def generate_rows(model, rows, max_new_tokens, temperature, top_p, tree, eos, n_pos, gen, stats,
                  finished: str = "drop") -> list[list[int]]:
    """Decode the prompts ``rows`` (1-D tensors on the model's device) together; returns each row's new tokens.
    ``finished``: rows that end leave the batch (``"drop"``) or stay in it as masked no-ops (``"masked"``: computed
    and drafted for, nothing kept; the alternative ``make bench-batch`` measures)."""
    if finished not in ("drop", "masked"):
        raise ValueError(f"finished must be 'drop' or 'masked', got {finished!r}")
    masked = finished == "masked"
    dev, B = rows[0].device, len(rows)
    stats.setdefault("row_steps", 0)
    L = [int(r.numel()) for r in rows]
    W = max(L)
    ids = torch.zeros(B, W, dtype=torch.long, device=dev)
    for b, r in enumerate(rows):
        ids[b, : L[b]] = r
    ar = torch.arange(W, device=dev)
    lens = torch.tensor(L, device=dev)
    mask = (ar[:, None] >= ar[None, :])[None] & (ar[None, None, :] < lens[:, None, None])   # causal over own tokens
    caches = model.spec_new_cache()
    logits, ctx = model.spec_forward(ids, caches, ar.expand(B, W), mask[:, None])  # prefill
    stats["forward_passes"] += 1
    greedy = temperature == 0
    last = logits[torch.arange(B, device=dev), lens - 1]
    x0 = (last.argmax(-1) if greedy else
          torch.multinomial(target_probs(last, temperature, top_p), 1, generator=gen)[:, 0]).tolist()
    js = lens - 1                                                            # step-local position of x0's state
    alive, outs, width, done = list(range(B)), [[] for _ in range(B)], W, [False] * B
    while True:
        stay = []
        for i, b in enumerate(alive):
            if not done[b]:
                outs[b].append(x0[i])
                done[b] = x0[i] in eos or len(outs[b]) >= max_new_tokens
            if masked or not done[b]:
                stay.append(i)
        if all(done[alive[i]] for i in stay):
            break
        if len(stay) < len(alive):                                           # finished rows leave the batch
            ctx, idx = _leave(caches, ctx, stay, len(alive), dev)
            alive, L, x0, js = [alive[i] for i in stay], [L[i] for i in stay], [x0[i] for i in stay], js[idx]
        n = len(alive)
        t = tree.truncate(min(max(max_new_tokens - len(outs[b]) for b in alive if not done[b]), n_pos - max(L) - 1))
        tt = t.on(dev)
        Lt = torch.tensor(L, device=dev)
        prefix = torch.arange(width, device=dev)[None] < Lt[:, None]         # (n, W) each row's committed slots
        x0t = torch.tensor(x0, device=dev)[:, None]
        if len(t):
            ctx["rows"] = alive                                              # which prompts these rows are
            cand = _propose(model, ctx, js, x0, t, n)                        # (n, N)
            step = torch.cat([x0t, cand], 1)
        else:
            cand, step = None, x0t
        pos = Lt[:, None] + tt.steps_pos[None]
        mask = torch.cat([prefix[:, None, :].expand(-1, len(t) + 1, -1), tt.ancestors[None].expand(n, -1, -1)], 2)
        logits, ctx = model.spec_forward(step, caches, pos, mask[:, None])   # (n, N+1, V)
        stats["forward_passes"] += 1
        stats["row_steps"] = stats.get("row_steps", 0) + n
        if greedy:
            pred = logits.argmax(-1)                                         # (n, N+1)
            if len(t):   # the step's one host sync: every row's accepted node, drafts and argmaxes together
                host = torch.cat([_greedy_best_rows(t, tt, cand, pred)[:, None], cand, pred], 1).tolist()
                paths = [_path_to(t, h[0]) for h in host]
                cands, preds = [h[1: 1 + len(t)] for h in host], [h[1 + len(t):] for h in host]
            else:
                paths, cands, preds = [[] for _ in range(n)], [[]] * n, pred.tolist()
            x_next = [p[path[-1] if path else 0] for p, path in zip(preds, paths)]
        else:
            probs = target_probs(logits, temperature, top_p)
            if len(t):
                acc = [_sample_accept(t, cand[i], probs[i], gen) for i in range(n)]
                paths, x_next = [a[0] for a in acc], [a[1] for a in acc]
                cands = cand.tolist()
            else:
                paths, cands = [[] for _ in range(n)], [[]] * n
                x_next = torch.multinomial(probs[:, 0], 1, generator=gen)[:, 0].tolist()
        stay, keeps = [], []
        for i, b in enumerate(alive):
            if not done[b]:
                for d in range(t.depth):
                    stats["head_tries"][d] += 1
                    stats["head_hits"][d] += int(d < len(paths[i]))
                for node in paths[i]:
                    outs[b].append(int(cands[i][node - 1]))
                    if outs[b][-1] in eos or len(outs[b]) >= max_new_tokens:
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
            ctx, _ = _leave(caches, ctx, stay, n, dev)
        L = [L[i] for i in stay]
        width = _compact_rows(caches, L, width, keeps)
        alive = [alive[i] for i in stay]
        L = [l + len(k) for l, k in zip(L, keeps)]
        js = torch.tensor([k[-1] if k else 0 for k in keeps], device=dev)
        x0 = [x_next[i] for i in stay]
    return outs
