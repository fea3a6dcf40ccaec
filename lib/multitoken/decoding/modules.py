"""Drafting with sequential transformer modules (DeepSeek-V3's MTP modules, FastMTP's shared module, EAGLE's layer):
the state the drafter ``multitoken.decoding.drafters.Modules`` keeps for one row (the modules' KV caches), out of the
model, and the drafting itself.

Module k (1-based) at position i reads ``M_k [RMSNorm(h_{k-1}(i)); RMSNorm(Emb(t_{i+k}))]``, runs its own transformer
block causally over the positions, and predicts t_{i+k+1}; ``h_0`` is the trunk's state. In training every input is
teacher-forced (one pass per module over the whole sequence). At decoding time each module keeps its own KV cache:

- committed text t_0..t_{L-1} sits in the trunk's cache and the model already chose x0 = t_L. Module k's position i
  needs the true token t_{i+k}, so its cache holds the true positions i <= L-k ("committed", kept);
- drafting runs the modules in order at the last position L-1: module k also feeds positions L-k+1..L-1 with the
  tokens drafted so far (d_1..d_{k-1}) and module k-1's state on them: "temporary" entries, cropped after the step.
  So a draft equals a fresh teacher-forced run over the accepted text followed by the drafts (tested);
- a tree drafts per depth: every node at depth k-1 that has children is one *branch* of module k (its path's
  tokens on the temporary positions); all branches of a depth go through the module in one call, with a mask that
  lets each see the cached prefix, the shared committed rows, and its own earlier rows only;
- after verification :func:`accept` records the accepted positions' trunk states and tokens (and the token the
  verifier appended); the next draft feeds them to module 1, whose outputs feed module 2, and so on. What module
  k+1 has not yet consumed of module k's committed states is kept in ``pending[k]``.
"""
from __future__ import annotations

import torch



class ModuleState:
    """The modules' decoding state for one row: their own KV caches and what each has consumed."""

    def __init__(self, num_modules: int, new_cache):
        self.modules = [new_cache() for _ in range(num_modules)]  # module k's cache at index k-1
        self.seen = [0] * num_modules            # c_k: committed positions 0..c_k-1 in module k's cache
        self.pending = [None] * (num_modules + 1)  # pending[0]: h0 at [c_1, L); pending[k]: h_k at [c_{k+1}, c_k)
        self.tokens = None                        # committed tokens t_0..t_{L-1}, then t_L (x0): (L+1,)


def accept(caches: ModuleState, ctx, keep, x_next: int):
    """The step-local positions ``keep`` of the last forward (all of it when None: the prefill) are now committed
    text, and ``x_next`` its next token."""
    h0, ids = ctx.h0, ctx.ids[0]
    if keep is not None and keep != list(range(len(keep))):
        idx = torch.tensor(keep, device=h0.device)
        h0, ids = h0.index_select(1, idx), ids.index_select(0, idx)
    elif keep is not None:
        h0, ids = h0[:, : len(keep)], ids[: len(keep)]
    nxt = ids.new_tensor([x_next])
    p = caches.pending
    p[0] = h0 if p[0] is None else torch.cat([p[0], h0], 1)
    caches.tokens = torch.cat([ids, nxt]) if caches.tokens is None else torch.cat([caches.tokens[:-1], ids, nxt])


def _plan(tree, device):
    """Per depth k: the parent paths that have children (module k's branches), each depth-k node's branch index and
    rank (tensors on ``device``), and the top-k needed; cached on the tree per device."""
    plans = tree.__dict__.setdefault("_seq_plan", {})
    if device not in plans:
        plan = []
        for k in range(1, tree.depth + 1):
            nodes = [p for p in tree.paths if len(p) == k]
            parents = sorted({p[:-1] for p in nodes})
            where = {q: b for b, q in enumerate(parents)}
            plan.append((parents, torch.tensor([where[p[:-1]] for p in nodes], device=device),
                         torch.tensor([p[-1] for p in nodes], device=device), 1 + max(p[-1] for p in nodes)))
        plans[device] = plan
    return plans[device]


def _mask(n_c: int, branches: int, r: int, past: int, device):
    """(1, 1, Q, past + Q) bool for ``n_c`` committed rows then ``branches`` blocks of ``r`` rows each: everything
    sees the cache; committed rows are causal among themselves; a branch row sees every committed row and its own
    branch's rows up to itself."""
    q = n_c + branches * r
    grp = torch.cat([torch.full((n_c,), -1, device=device),
                     torch.arange(branches, device=device).repeat_interleave(r)])
    ar = torch.arange(q, device=device)
    lower = ar[None, :] <= ar[:, None]
    gi, gj = grp[:, None], grp[None, :]
    new = ((gj < 0) & (lower | (gi >= 0))) | ((gi == gj) & (gj >= 0) & lower)
    return torch.cat([torch.ones(q, past, dtype=torch.bool, device=device), new], 1)[None, None]


def propose(model, caches: ModuleState, tree) -> torch.Tensor:
    """A token per tree node (in ``tree.paths`` order), drafted by modules 1..depth; module caches keep only the
    committed positions afterwards."""
    known = caches.tokens                                  # t_0..t_L
    L, dev = known.numel() - 1, known.device
    out = torch.empty(len(tree.paths), dtype=torch.long, device=dev)
    pend = caches.pending
    h_prev = pend[0]                                       # h_{k-1} at [c_k, lo_{k-1}): for k = 1, h0 at [c_1, L)
    prev_branch, prev_parents = None, [()]                 # module k-1's temporary rows per branch (B, r_{k-1}, d)
    node_at, offset, plan = {}, 0, _plan(tree, dev)
    for k, (parents, b_idx, rank, topk) in enumerate(plan, 1):
        c, lo = caches.seen[k - 1], max(0, L - k + 1)      # committed rows [c, lo), temporary rows [lo, L)
        n_c, r = lo - c, L - lo
        h_rows, t_rows, B = [h_prev[:, :n_c]], [known[c + k: lo + k]], len(parents)
        if r:  # per branch: h_{k-1} on [lo, L) = its committed part, then the parent branch's temporary rows
            shared = h_prev[:, n_c:].expand(B, -1, -1)
            h_b = shared if prev_branch is None else torch.cat(
                [shared, prev_branch[[prev_parents.index(q[:-1]) for q in parents]]], 1)
            n_known = max(0, L - lo - k + 1)               # tokens t_{i+k} <= t_L are known, the rest are drafts
            paths = [[out[node_at[q[:d]]] for d in range(1, len(q) + 1)] for q in parents]
            drafts = torch.stack([torch.stack(p) for p in paths])[:, len(paths[0]) - (r - n_known):]
            tok_b = torch.cat([known[lo + k: lo + k + n_known].expand(B, -1), drafts], 1)
            h_rows.append(h_b.reshape(1, -1, h_b.shape[-1]))
            t_rows.append(tok_b.reshape(-1))
        h_in, t_in = torch.cat(h_rows, 1), torch.cat(t_rows).view(1, -1)
        rows = torch.arange(c, lo, device=dev)
        if r:  # each branch's temporary rows sit at positions lo..L-1 again
            rows = torch.cat([rows, torch.arange(lo, L, device=dev).repeat(B)])
        cache = caches.modules[k - 1]
        h_out = model._head_step(k, h_in, None, None, cache=cache, mask=_mask(n_c, B, r, c, dev) if r else None,
                                 token_emb=model.get_input_embeddings()(t_in),
                                 pos=model.backbone.positions(h_in, rows.view(1, -1)))
        for layer in cache.layers:                          # drop the temporary rows
            layer.keys, layer.values = layer.keys[..., :lo, :], layer.values[..., :lo, :]
        caches.seen[k - 1] = lo
        pend[k - 1] = h_prev[:, n_c:]                      # h_{k-1} on [lo, lo_{k-1}): not yet read by module k
        h_prev = h_out[:, :n_c] if pend[k] is None else torch.cat([pend[k], h_out[:, :n_c]], 1)
        branch = h_out[:, n_c:].reshape(B, r, -1) if r else None
        last = branch[:, -1] if r else h_out[:, -1]
        top = model.head_token_ids(model._head_logits(k, last).topk(topk, -1).indices)    # (B, topk)
        n = b_idx.numel()
        out[offset: offset + n] = top[b_idx, rank]
        node_at.update((p, offset + i) for i, p in enumerate(tree.paths[offset: offset + n]))
        offset += n
        prev_branch, prev_parents = branch, parents
    pend[len(plan)] = h_prev                                # the deepest module ran: its committed states wait
    return out

