"""What MTP and Medusa heads share: loss weighting, the head-wise (memory-efficient) loss, and the
speculative-decoding hooks the decoding engine calls.

A model with extra heads implements three small methods (see ``HeadsMixin``):

- ``_head_step(k, h_prev, h0, input_ids)``   state of head k (1-based) at every position, ``(B, T, d)``;
- ``_head_logits(k, h_k)``                     its logits, ``(B, T, V)``; head k predicts the token at t+k+1
                                               (over a draft vocabulary of its own where ``head_token_ids`` maps);
- ``num_heads``                                the number of extra heads.

Parallel heads ignore ``h_prev``; chained heads (sequential / shared-recursive) use it (``h_prev = h0`` for k=1).
The decoding engine calls ``spec_new_cache``, ``spec_forward`` and its drafters ``spec_propose`` /
``spec_head_topk_rows`` (sequential transformer modules keep KV caches of their own, which their drafter holds:
``multitoken.decoding.modules``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from . import fastpath

WEIGHTINGS = ("uniform", "linear", "exponential", "primary_aux", "olmo")


def loss_weights(scheme: str, n: int, beta: float = 0.8, lam: float = 1.0, normalize: bool = False) -> list[float]:
    """Weights of the n per-offset losses, index 0 = next token (t+1), index k = t+k+1.

    uniform: 1 each (Meta's sum of losses); linear: (n-k)/n decay; exponential: beta**k;
    primary_aux: 1 for the next token, lam * beta**(k-1) for each auxiliary (DeepSeek-V3: lam 0.3, beta 1);
    olmo: 1 for the next token, lam * alpha_k for auxiliary k = 1..n-1 with alpha_k = beta**(k-1) / sum_j beta**(j-1)
    (OLMo-core's L = L_main + mtp_loss_weight * sum_k alpha_k CE_k). ``normalize`` divides by the sum.
    """
    if scheme not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {scheme!r}; choose one of {WEIGHTINGS}")
    if n < 1:
        raise ValueError(f"need at least one loss term, got n={n}")
    if scheme == "uniform":
        w = [1.0] * n
    elif scheme == "linear":
        w = [(n - k) / n for k in range(n)]
    elif scheme == "exponential":
        w = [beta ** k for k in range(n)]
    elif scheme == "primary_aux":
        w = [1.0] + [lam * beta ** (k - 1) for k in range(1, n)]
    else:
        total = sum(beta ** (j - 1) for j in range(1, n))
        w = [1.0] + [lam * beta ** (k - 1) / total for k in range(1, n)]
    if normalize:
        s = sum(w)
        w = [x / s for x in w]
    return w


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up of the auxiliary (multi-token) loss weights over ``warmup_steps`` optimizer steps."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, max(0, step) / warmup_steps)


def named_step_losses(step_losses: torch.Tensor | None) -> dict | None:
    """``{"step_1": ..., "step_K": ...}`` of the auxiliary heads from a step-loss tensor (index 0 = next token)."""
    return None if step_losses is None else {f"step_{k}": v for k, v in enumerate(step_losses.tolist()[1:], 1)}


OUT_OF_VOCAB = -1  # a target a head's draft vocabulary lacks: no loss term, and a miss in the accuracy


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor, offset: int):
    """Cross-entropy of logits at t against labels at t+offset; also the top-1 accuracy. ``-100`` is ignored;
    ``OUT_OF_VOCAB`` (a target outside a head's draft vocabulary) adds no loss and counts as a miss."""
    T = labels.shape[1]
    if T <= offset:
        z = logits.sum() * 0.0
        return z, z.detach()
    lg = logits[:, : T - offset].float()                     # (B, T-o, V)
    tg = labels[:, offset:]                                   # (B, T-o)
    loss = F.cross_entropy(lg.reshape(-1, lg.size(-1)), tg.masked_fill(tg == OUT_OF_VOCAB, -100).reshape(-1),
                           ignore_index=-100)
    with torch.no_grad():
        valid = tg != -100
        acc = ((lg.argmax(-1) == tg) & valid).sum() / valid.sum().clamp(min=1)
    if not torch.isfinite(loss):  # every target masked
        loss = lg.sum() * 0.0
    return loss, acc


class _RngState:
    """Saves/restores CPU (and CUDA) RNG so a recomputed head sees the same dropout masks."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class HeadwiseLoss(torch.autograd.Function):
    """Meta's memory-efficient multi-token loss.

    Forward runs each head's forward *and* backward alone (one vocabulary-sized logits tensor alive at a time),
    accumulating d(loss)/d(trunk output) and the heads' parameter gradients; backward hands them on, scaled by the
    incoming gradient (so gradient accumulation and loss scaling behave as with the straightforward loss).
    Chained heads are handled in reverse order, carrying d(loss)/d(h_k) back to head k.
    """

    @staticmethod
    def forward(ctx, model, weights, input_ids, labels, h0, *params):
        S = model.num_heads
        h0d = h0.detach()
        states, rng = [h0d], []
        with torch.no_grad():
            for k in range(1, S + 1):
                rng.append(_RngState())
                states.append(model._head_step(k, states[-1], h0d, input_ids))
        after = _RngState()  # where the RNG stands after every head ran once: restored at the end, so the next
        # step draws fresh dropout masks (restoring head k's state last would rewind it to after head 1)
        g_h0 = torch.zeros_like(h0d)
        grads = [None] * len(params)
        losses = torch.zeros(S, dtype=torch.float32, device=h0.device)
        accs = torch.zeros(S, dtype=torch.float32, device=h0.device)
        g_next = None
        with torch.enable_grad():
            for k in range(S, 0, -1):
                hp = states[k - 1].detach().requires_grad_(True)
                h0l = h0d.detach().requires_grad_(True)
                rng[k - 1].restore()
                hk = model._head_step(k, hp, h0l, input_ids)
                loss, acc = shifted_ce(model._head_logits(k, hk), labels, k + 1)
                obj = weights[k - 1] * loss
                if g_next is not None:
                    obj = obj + (hk * g_next).sum()
                gs = torch.autograd.grad(obj, [hp, h0l, *params], allow_unused=True)
                g_next = gs[0] if k > 1 else None
                if k == 1 and gs[0] is not None:
                    g_h0 += gs[0]
                if gs[1] is not None:
                    g_h0 += gs[1]
                for i, g in enumerate(gs[2:]):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
                losses[k - 1], accs[k - 1] = loss.detach().float(), acc.float()
        after.restore()
        ctx.save_for_backward(g_h0, *[g if g is not None else h0.new_empty(0) for g in grads])
        ctx.has = [g is not None for g in grads]
        total = sum(w * l for w, l in zip(weights, losses.tolist()))
        ctx.mark_non_differentiable(losses, accs)
        return h0.new_tensor(total, dtype=torch.float32), losses, accs

    @staticmethod
    def backward(ctx, g_total, _g_losses, _g_accs):
        g_h0, *grads = ctx.saved_tensors
        out = [g_total * g if has else None for g, has in zip(grads, ctx.has)]
        return (None, None, None, None, (g_total * g_h0).to(g_h0.dtype), *out)


@dataclass
class MultiTokenOutput(ModelOutput):
    """Like ``CausalLMOutputWithPast`` plus the per-head losses and accuracies: ``step_losses`` /
    ``step_accuracy`` as tensors (index 0 = next token, k = token t+k+1); ``mtp_step_losses`` as OLMo-core's monitoring
    loop reads them, ``{"step_k": float}`` for the auxiliary heads k = 1..K; ``mtp_loss`` = the weighted auxiliary
    total, so ``loss = lm weight * lm_loss + mtp_loss``."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    step_losses: torch.Tensor | None = None
    step_accuracy: torch.Tensor | None = None
    mtp_step_losses: dict | None = None
    logits: torch.Tensor | None = None
    head_logits: tuple | None = None
    past_key_values: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass(frozen=True)
class Features:
    """What a model's heads draft from after a cached forward: the trunk's hidden states ``h0`` (B, T, d) the heads
    read; for transformer heads, each head's states (``states[k]``, (B, T, d); ``states[0]`` is ``h0``); the forward's
    token ids (B, T); the model's caches."""

    h0: torch.Tensor
    ids: torch.Tensor | None = None
    states: list | None = None
    caches: object = None

    def rows(self, idx: torch.Tensor) -> "Features":
        """Rows ``idx`` of every batch-major tensor; the caches stay as they are."""
        pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
        return Features(pick(self.h0), pick(self.ids), None if self.states is None else [pick(s) for s in self.states],
                        self.caches)


class HeadsMixin:
    """Loss over the extra heads and the hooks used by :mod:`multitoken.decoding`."""

    num_heads: int = 0
    memory_efficient_loss: bool = True
    head_prefixes: tuple = ()      # names of the head parameters start with one of these; the rest is the backbone
    _trunk_cut: int | None = None  # heads branch off after this many layers (the MTP config's num_trunk_layers)

    def _trunk(self, input_ids, cache, position_ids=None, attention_mask=None):
        """(hidden state the heads read, final hidden after the final norm), through the backbone adapter; with a
        cache (the decoding loop) ``attention_mask`` is the engine's 4D bool mask or None (causal)."""
        h0, hidden, _ = self.backbone.trunk(input_ids, cache, position_ids, mask=attention_mask, cut=self._trunk_cut)
        return h0, hidden

    # -- training ---------------------------------------------------------------------------------------------------
    def is_head_parameter(self, name: str) -> bool:
        return name.startswith(self.head_prefixes)

    def freeze_backbone(self):
        """Train the heads only: every backbone parameter stops requiring grad."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_head_parameter(name))
        return self

    @torch.no_grad()
    def head_inputs(self, input_ids, attention_mask=None):
        """(the states the heads read at every position, the final normed states), as the training forward computes
        them. Under a frozen backbone they are constants: computed once, they serve every epoch of the heads
        (:func:`multitoken.training.train_heads_on_features`)."""
        h0, hidden, _ = self.backbone.trunk(input_ids, attention_mask=attention_mask, cut=self._trunk_cut)
        return h0, hidden

    def head_loss_weights(self) -> list[float]:
        """The weights of heads 1..S in the training loss (``heads_loss``)."""
        raise NotImplementedError

    def heads_loss(self, h0, input_ids, labels, weights):
        """(weighted sum, per-head losses, per-head top-1 accuracies) of heads 1..S."""
        labels = self.head_labels(labels)
        params = [p for p in self.parameters() if p.requires_grad]
        if self.memory_efficient_loss and torch.is_grad_enabled() and (h0.requires_grad or params):
            return HeadwiseLoss.apply(self, list(weights), input_ids, labels, h0, *params)
        states, total, losses, accs = [h0], 0.0, [], []
        for k in range(1, self.num_heads + 1):
            states.append(self._head_step(k, states[-1], h0, input_ids))
            loss, acc = shifted_ce(self._head_logits(k, states[-1]), labels, k + 1)
            total = total + weights[k - 1] * loss
            losses.append(loss.detach().float())
            accs.append(acc.float())
        return total, torch.stack(losses), torch.stack(accs)

    def head_labels(self, labels):
        """Token ids as indices of the heads' output: positions in their draft vocabulary (the ``draft_ids``
        buffer, sorted token ids) where they have one, ``OUT_OF_VOCAB`` for a token outside it."""
        ids = getattr(self, "draft_ids", None)
        if ids is None:
            return labels
        lut = torch.full((self.config.vocab_size,), OUT_OF_VOCAB, dtype=labels.dtype, device=labels.device)
        lut[ids.to(labels.device)] = torch.arange(ids.numel(), dtype=labels.dtype, device=labels.device)
        return torch.where(labels < 0, labels, lut[labels.clamp(min=0)])

    def head_token_ids(self, idx):
        """Indices of the heads' output (e.g. their top-k) as token ids."""
        ids = getattr(self, "draft_ids", None)
        return idx if ids is None else ids[idx]

    @torch.no_grad()
    def _store_draft_ids(self, ids, field: str):
        """Check ``ids`` (as many distinct token ids as the ``draft_ids`` buffer holds, which the config's ``field``
        sizes; None where the config has no draft vocabulary) and store them sorted; returns them (or None)."""
        if ids is None or self.draft_ids is None:
            if ids is not None or self.draft_ids is not None:
                raise ValueError(f"a draft vocabulary needs {field} > 0 in the config, and one with it")
            return None
        ids = torch.as_tensor(ids, device=self.draft_ids.device).sort().values
        if ids.shape != self.draft_ids.shape or ids.unique().numel() != ids.numel() or ids.min() < 0 or \
                ids.max() >= self.config.vocab_size:
            raise ValueError(f"a draft vocabulary is {self.draft_ids.numel()} distinct ids in [0, "
                             f"{self.config.vocab_size}); got shape {tuple(ids.shape)}")
        self.draft_ids.copy_(ids)
        return ids

    def all_head_logits(self, h0, input_ids):
        """Every head's logits at every position (teacher-forced for sequential heads), over the heads' output
        (``head_token_ids`` turns its indices into token ids)."""
        states, out = [h0], []
        for k in range(1, self.num_heads + 1):
            states.append(self._head_step(k, states[-1], h0, input_ids))
            out.append(self._head_logits(k, states[-1]))
        return tuple(out)

    # -- decoding hooks -------------------------------------------------------------------------------------------
    def _cached_stack(self, params, build, slot: str = "_stack"):
        """``build()`` (e.g. the heads' weights stacked for batched drafting), kept in ``slot`` and rebuilt only when
        one of ``params`` changes."""
        key = tuple((p.data_ptr(), p._version) for p in params)
        if getattr(self, slot + "_key", None) != key:
            setattr(self, slot, build())
            setattr(self, slot + "_key", key)
        return getattr(self, slot)

    def spec_new_cache(self):
        return [self.backbone.new_cache()]

    def spec_forward(self, input_ids, caches, position_ids=None, attention_mask=None):
        """One cached forward; returns next-token logits ``(B, T, V)`` and the :class:`Features` the heads draft
        from."""
        h0, hidden = self._trunk(input_ids, caches[0], position_ids, attention_mask)
        return fastpath.linear(self.lm_head, hidden), Features(h0)

    def spec_head_topk(self, ctx, j: int, k: int):
        """Top-k tokens of every head at step-local position j: ``(S, k)``."""
        h0 = ctx.h0[:, j: j + 1]
        rows, h = [], h0
        for s in range(1, self.num_heads + 1):
            h = self._head_step(s, h, h0, None)
            rows.append(self._head_logits(s, h)[0, -1].topk(k).indices)
        return self.head_token_ids(torch.stack(rows))

    def spec_propose(self, ctx, j: int, x0: int, tree):
        """Candidate token of every tree node (parallel heads: head d's top-(path[-1]) token at depth d)."""
        top = self.spec_head_topk(ctx, j, tree.max_topk)
        tt = tree.on(top.device)
        return top[tt.depths - 1, tt.last_idx]


class ZeroLinear(nn.Linear):
    """A Linear whose weight and bias start at zero (see ``init_special``)."""


class EyeLinear(nn.Linear):
    """A Linear that starts as the identity (or ``[I, 0]`` when wider than tall)."""


def init_special(module) -> None:
    """Initialise the marker modules; called from each model's ``_init_weights`` after the default init."""
    from transformers import initialization as init

    if isinstance(module, ZeroLinear):
        init.zeros_(module.weight)
        if module.bias is not None:
            init.zeros_(module.bias)
    if isinstance(module, EyeLinear):
        out_f, in_f = module.weight.shape
        init.copy_(module.weight, torch.eye(out_f, in_f, dtype=module.weight.dtype, device=module.weight.device))
        if module.bias is not None:
            init.zeros_(module.bias)


class ResBlock(nn.Module):
    """Medusa's residual block ``x + SiLU(W x + b)``; W is zero-initialised so a fresh block is the identity."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = ZeroLinear(d, d)
        self.act = nn.SiLU()

    def forward(self, x):  # (B, T, d)
        return x + self.act(self.linear(x))
