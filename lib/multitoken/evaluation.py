"""Evaluation: perplexity, MetaMath answer accuracy, BLEU, decoding speed, memory, and the thesis' tracker."""
from __future__ import annotations

import logging
import math
import re
import resource
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import pandas as pd
import sacrebleu
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import stats as S
from .core import compiled
from .core.backbones import backbone_of
from .decoding import drafters, model_device, precompile, speculative_generate, sync
from .decoding.engine import EXACT_STEP, exactness
from .decoding.trees import parse_tree

log = logging.getLogger(__name__)

ANSWER_RE = re.compile(r"(?:The answer is:?|####)\s*(.+)", re.IGNORECASE)
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")


def to_device(batch: dict, device) -> dict:
    """A loader's batch on the model's device."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --- quality -----------------------------------------------------------------------------------------------------

@contextmanager
def logits_where(model, keep):
    """Inside, the model's output embedding unembeds only the positions where ``keep`` (B, T) is True: its forward's
    logits come back as (K, V), K = keep.sum(), in row-major order, and the other positions (prompts, padding) cost no
    unembedding. One unembedding per forward (every family's plain forward makes exactly one)."""
    calls = []

    def select(_, args):
        (h,) = args
        if calls or h.shape[:2] != keep.shape:
            raise RuntimeError(f"logits_where: expected one unembedding of {tuple(keep.shape)} positions, got "
                               f"{'a second one' if calls else tuple(h.shape[:2])}")
        calls.append(1)
        return (h[keep],)

    handle = model.get_output_embeddings().register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def token_nll(model, dataloader, max_batches: int | None = None):
    """Per example: (summed next-token NLL over its response tokens, number of those tokens). Only the positions
    whose next token is scored are unembedded (``logits_where``): on GSM8K about 40% of a padded batch."""
    model.eval()
    dev = model_device(model)
    nll, ntok = [], []
    for i, batch in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        batch = to_device(batch, dev)
        tg = batch["labels"][:, 1:]
        keep = F.pad(tg != -100, (0, 1))                                       # position t predicts label t+1
        with logits_where(model, keep):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (K, V)
        ce = F.cross_entropy(logits.float(), tg[keep[:, :-1]], reduction="none")
        rows = keep.nonzero()[:, 0]
        nll += torch.zeros(len(tg), dtype=ce.dtype, device=dev).index_add_(0, rows, ce).tolist()
        ntok += keep.sum(1).tolist()
    return nll, ntok


def perplexity(model, dataloader, max_batches: int | None = None) -> float:
    """Token-weighted next-token perplexity on the response tokens (labels != -100)."""
    nll, ntok = token_nll(model, dataloader, max_batches)
    if sum(ntok) == 0:
        raise ValueError("no response tokens to score: every label is -100")
    return math.exp(sum(nll) / sum(ntok))


def extract_answer(text: str) -> str | None:
    """The final answer after 'The answer is:' (MetaMath) or '####' (GSM8K), normalised: commas, '$', trailing
    units and a final period dropped; negatives, decimals (10.50 -> 21/2, 10.00 -> 10), a/b and \\frac{a}{b}."""
    m = ANSWER_RE.search(text or "")
    if not m:
        return None
    s = m.group(1).strip().replace(",", "").replace("$", "")
    s = re.sub(r"\\d?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s)
    num = NUMBER_RE.search(s)
    if not num:
        return s.split("\n")[0].strip().rstrip(".") or None
    try:
        v = Fraction(num.group(0).replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return num.group(0)
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def answer_hits(predictions: list[str], references: list[str]) -> list[int]:
    """1 per problem whose extracted answer equals the reference's, else 0."""
    if not references:
        raise ValueError("no references to score")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [int(extract_answer(p) is not None and extract_answer(p) == extract_answer(r))
            for p, r in zip(predictions, references)]


def answer_accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions whose extracted answer equals the reference's."""
    hits = answer_hits(predictions, references)
    return sum(hits) / len(hits)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu) of generated responses against the reference responses."""
    return sacrebleu.corpus_bleu(predictions, [references]).score


# --- generation ----------------------------------------------------------------------------------------------------

def prompts_and_references(dataloader, limit: int | None = None):
    """(prompt ids, reference response ids) per example, recovered from a tokenized loader (labels mark the response)."""
    pairs = []
    for batch in dataloader:
        for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            ids, lab = ids[m.bool()], lab[m.bool()]
            start = int((lab != -100).nonzero()[0]) if (lab != -100).any() else len(ids)
            pairs.append((ids[:start], lab[start:]))
            if limit is not None and len(pairs) >= limit:
                return pairs
    return pairs


def fitting(prompts, n_positions: int, min_new_tokens: int = 1, what: str = "prompts") -> list[int]:
    """Indices of the prompts that leave room for ``min_new_tokens`` in the context; the others are counted in the
    log."""
    keep = [i for i, p in enumerate(prompts) if len(p) + min_new_tokens <= n_positions]
    if len(keep) < len(prompts):
        log.warning("%s: skipped %d of %d prompts too long for the context (%d tokens) plus %d new token(s)",
                    what, len(prompts) - len(keep), len(prompts), n_positions, min_new_tokens)
    return keep


def fit_prompts(prompts, n_positions: int, min_new_tokens: int = 1, what: str = "prompts"):
    """The prompts that leave room for ``min_new_tokens`` in the context, and how many were skipped (logged)."""
    keep = fitting(prompts, n_positions, min_new_tokens, what)
    return [prompts[i] for i in keep], len(prompts) - len(keep)


def generate_responses(model, tokenizer, prompts, max_new_tokens=256, tree=None, desc="generate", batch_size=1,
                       engine="hf"):
    """Greedy responses (decoded) for a list of prompt-id tensors: with ``batch_size`` 1 through the speculative
    engine (output == greedy, row by row); above 1 in left-padded batches of similar lengths through HF ``generate``
    (``engine="hf"``: greedy too, though padding changes the products' shapes, so a near-tie can round the other way)
    or through this engine's batched loop (``engine="speculative"``: the model's heads draft, and each row is what it
    would be alone). The caller drops prompts with no room left in the context (``fit_prompts``)."""
    if engine not in ("hf", "speculative"):
        raise ValueError(f"engine must be 'hf' or 'speculative', got {engine!r}")
    n_pos = backbone_of(model).context_size
    for p in prompts:
        if n_pos - len(p) < 1:
            raise ValueError(f"prompt of {len(p)} tokens leaves no room in the context ({n_pos}); use fit_prompts")
    if batch_size > 1:
        return _generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size, desc, engine, tree)
    texts, stats = [], []
    for p in tqdm(prompts, desc=desc, leave=False):
        room = min(max_new_tokens, n_pos - len(p))
        out, st = speculative_generate(model, p.view(1, -1), room, tree=tree if getattr(model, "num_heads", 0) else "none")
        texts.append(tokenizer.decode(out[0, len(p):], skip_special_tokens=True))
        stats.append(st)
    return texts, stats


@torch.inference_mode()
def _generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size, desc, engine="hf", tree=None):
    dev, n_pos = model_device(model), backbone_of(model).context_size
    pad = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))      # similar lengths: little padding
    texts, stats = [None] * len(prompts), []
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[s: s + batch_size]
        ids, mask = _left_padded([prompts[i] for i in idx], pad, dev)
        width = ids.shape[1]
        room = min(max_new_tokens, n_pos - width)
        if engine == "hf":
            out = model.generate(ids, attention_mask=mask, max_new_tokens=room, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        else:
            out, st = speculative_generate(model, ids, room, attention_mask=mask, pad_token_id=pad,
                                           eos_token_id=tokenizer.eos_token_id,
                                           tree=tree if getattr(model, "num_heads", 0) else "none")
            stats.append(st)
        for r, i in enumerate(idx):
            texts[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True)
    return texts, stats


# --- speed ---------------------------------------------------------------------------------------------------------

def timed(fn, ids, device):
    """``fn(ids)`` with its wall time, fenced by ``torch.cuda.synchronize()`` on CUDA: (sequences, stats, seconds)."""
    sync(device)
    t0 = time.perf_counter()
    seq, st = fn(ids)
    sync(device)
    return seq, st, time.perf_counter() - t0


@dataclass(frozen=True)
class Method:
    """A way to decode a prompt, as every timing of the workbook names it (the benchmark, the tree sweep, the thesis'
    protocol and loops, the ledger, the GPU check): ``name``; ``model``; ``how``: ``"engine"`` (this engine, with
    ``tree`` and ``drafter``), ``"hf"`` (HF ``generate``, greedy, with ``gen_kw`` such as
    ``prompt_lookup_num_tokens``) or a loop ``fn(model, ids, max_new_tokens) -> (sequences, stats)``; ``baseline``:
    the method its output and speed are compared with (HF greedy of the same model; None: itself).
    ``method(ids, max_new_tokens) -> (sequences, stats)`` runs it at batch 1 on the model's device and dtype."""

    name: str
    model: object
    how: object = "engine"
    tree: object = None
    drafter: str = "heads"
    baseline: str | None = None
    gen_kw: dict = field(default_factory=dict)
    fast: object = True
    exact: object = None
    step_tokens: object = None

    @staticmethod
    def engine(name, model, tree, drafter="heads", baseline=None, fast=True, exact=None, step_tokens=None) -> "Method":
        """This engine; ``fast``: its step (``speculative_generate``'s ``fast``: True, False or "compiled");
        ``exact`` and ``step_tokens``: as there (exact: None for 16-bit models on the CPU, every step in one shape)."""
        return Method(name, model, "engine", tree, drafter, baseline, fast=fast, exact=exact, step_tokens=step_tokens)

    def max_nodes(self) -> int | None:
        """The most nodes this engine method drafts in a step (None: not an engine method, or a drafter of one's
        own)."""
        if self.how != "engine":
            return None
        tree = parse_tree(self.tree, getattr(self.model, "num_heads", 0))
        return drafters.max_nodes(drafters.make(self.drafter, tree, self.model))

    @staticmethod
    def hf(name, model, baseline=None, **gen_kw) -> "Method":
        return Method(name, model, "hf", baseline=baseline, gen_kw=gen_kw)

    @staticmethod
    def hf_compiled(name, model, baseline=None, backend="inductor") -> "Method":
        """transformers' own recipe for a faster ``generate``: a static KV cache and the decoding step compiled by
        ``torch.compile`` (``CompileConfig``, shapes dynamic; on a CPU too). The first call compiles (the benchmark's
        warm-up, timed apart as ``warmup_s``)."""
        from transformers import CompileConfig

        cc = CompileConfig(mode="default", backend=backend, dynamic=True)   # one graph for every prompt length
        cc._compile_all_devices = True                   # transformers compiles on accelerators only unless told
        return Method(name, model, "hf", baseline=baseline, gen_kw=dict(cache_implementation="static",
                                                                        compile_config=cc))

    @staticmethod
    def loop(name, fn, model, baseline=None) -> "Method":
        return Method(name, model, fn, baseline=baseline)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def compared_with(self) -> str:
        return self.baseline or self.name

    def prepare(self, ids, max_new_tokens) -> float:
        """Compile what this method's decodes of such a prompt will run (a compiled engine step: every step size up
        to its largest step, the heads' tree and its root, prompt lookup's K drafts and the root, or
        :data:`PRECOMPILE_LARGEST` tokens for another drafter; an exact one: its one step size); the seconds it took
        (0: nothing to compile)."""
        if self.how != "engine" or self.fast != "compiled":
            return 0.0
        nodes = self.max_nodes()
        largest = nodes + 1 if nodes is not None else PRECOMPILE_LARGEST
        return precompile(self.model, ids.shape[1], max_new_tokens, largest, exact=self.exact,
                          step_tokens=self.step_tokens)

    def __call__(self, ids, max_new_tokens):
        if self.how == "engine":
            return speculative_generate(self.model, ids, max_new_tokens, tree=self.tree, drafter=self.drafter,
                                        fast=self.fast, exact=self.exact, step_tokens=self.step_tokens)
        if self.how == "hf":
            ids = ids.to(self.device)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.model.generation_config.pad_token_id,
                                      **self.gen_kw)
            return out, {"new_tokens": out.shape[1] - ids.shape[1], "forward_passes": None}
        return self.how(self.model, ids, max_new_tokens)


PRECOMPILE_LARGEST = 17   # a compiled engine method compiles steps of up to this many tokens before it is timed


def one_shape(methods: list[Method]) -> list[Method]:
    """``methods`` as they are, unless their engine methods decode exactly in one step shape (16-bit models on the
    CPU, ``exact`` left to its default): then each gets the same ``step_tokens``, the smallest that holds the
    largest step any of them drafts (at least ``EXACT_STEP``; a compiled size where one is compiled), so every output
    can be compared with the engine's greedy of that shape."""
    eng = [m for m in methods if m.how == "engine" and m.exact is None and m.step_tokens is None
           and exactness(m.model, m.fast, None, None)[0]]
    if not eng:
        return methods
    nodes = [m.max_nodes() for m in eng]
    step = max([EXACT_STEP] + [n + 1 if n is not None else compiled.LADDER[-1] for n in nodes])
    if any(m.fast == "compiled" for m in eng):
        step = compiled.rung(step) or compiled.LADDER[-1]
    ids = {id(m) for m in eng}
    return [replace(m, step_tokens=step) if id(m) in ids else m for m in methods]


def _identical_tokens(a: list, b: list) -> float:
    """Fraction of b's positions where a has the same token (the shorter side counts as a miss past its end)."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


@torch.inference_mode()
def benchmark_decoding(methods: list[Method], prompts: list, max_new_tokens: int, warmup: int = 2, repeats: int = 1,
                       desc="decoding benchmark", reference: str | None = "greedy_kv") -> tuple[list[dict], pd.DataFrame]:
    """Time every method on every prompt, interleaved, in a fresh random method order per prompt, so machine noise
    and order effects hit all alike. (With a fixed rotation, the same tree run right after another method of the same
    model timed ~12% faster than when it ran after another model, presumably from cache warmth.) CUDA work is
    fenced with ``torch.cuda.synchronize()`` around every timed call.

    ``methods``: :class:`Method` records, each compared with its ``baseline`` (HF greedy of the same model: speedup
    and identical_to_greedy), every one generating ``max_new_tokens`` per prompt. Speedups carry 95% bootstrap intervals
    over prompts, against the baseline and against ``reference`` (by default greedy_kv, this engine without drafts)
    when it is one of the methods, as ``speedup_vs_<reference>``; ``identical_to_greedy`` compares each method's
    sequences with its baseline's (HF ``generate``), ``identical_to_<reference>`` with the reference's where both decode
    the same model (None elsewhere): in bf16 the engine's speculation equals the engine's greedy exactly, while
    HF's bf16 kernels round otherwise.
    Returns (summary rows, per-prompt frame).
    """
    by_name = {m.name: m for m in methods}
    if len(by_name) != len(methods):
        raise ValueError(f"two methods share a name: {[m.name for m in methods]}")
    missing = sorted({m.compared_with for m in methods} - set(by_name))
    if missing:
        raise ValueError(f"baseline(s) {missing} are not among the methods")
    names = list(by_name)
    warm, compile_s = {}, {}
    for name in names:  # warm-up: compilation, layout timings and packing happen here, timed apart
        t0 = time.perf_counter()
        compile_s[name] = sum(by_name[name].prepare(p.view(1, -1), max_new_tokens) for p in prompts)
        for p in prompts[:warmup]:
            by_name[name](p.view(1, -1), max_new_tokens)
        warm[name] = time.perf_counter() - t0
    per = []
    for i, p in enumerate(tqdm(prompts, desc=desc)):
        ids = p.view(1, -1)
        order = random.Random(i).sample(names, len(names))
        for name in order:
            method = by_name[name]
            times = []
            for _ in range(repeats):
                c0 = compiled.COMPILE_S[0]
                seq, st, dt = timed(lambda x: method(x, max_new_tokens), ids, method.device)
                late = compiled.COMPILE_S[0] - c0                  # a step size first met here: compiled now,
                compile_s[name] += late                           # its seconds reported apart, not as decoding
                times.append(dt - late)
            new = seq.shape[1] - ids.shape[1]
            per.append({"method": name, "prompt": i, "new_tokens": new, "seconds": statistics.median(times),
                        "forward_passes": st.get("forward_passes"), "seq": seq[0, ids.shape[1]:].tolist(),
                        "per_head_acceptance": st.get("per_head_acceptance")})
    df = pd.DataFrame(per).sort_values(["method", "prompt"], kind="stable")
    rows = []
    for name in names:
        d = df[df.method == name]
        bname = by_name[name].compared_with
        base = df[df.method == bname]
        tps = d.new_tokens.sum() / d.seconds.sum()
        fp = d.forward_passes.dropna()
        tau = float(d.new_tokens.sum() / fp.sum()) if len(fp) == len(d) and fp.sum() else 1.0
        seqs, bseqs = d.seq.tolist(), base.seq.tolist()
        same = [a == b for a, b in zip(seqs, bseqs)]
        acc = [a for a in d.per_head_acceptance.dropna().tolist() if a]
        sp = S.speedup_ci(d.new_tokens, d.seconds, base.new_tokens, base.seconds)
        row = {"method": name, "baseline": bname, "prompts": len(d),
               "new_tokens": int(d.new_tokens.sum()), "tokens_per_s": round(tps, 1),
               "latency_s_per_seq": round(float(d.seconds.mean()), 4), "warmup_s": round(warm[name], 2),
               "compile_s": round(compile_s[name], 1),
               "speedup_vs_hf_greedy": round(sp.value, 3), "speedup_lo": round(sp.lo, 3), "speedup_hi": round(sp.hi, 3),
               "mean_accepted_length": round(tau, 3), "efficiency": round(sp.value / tau, 3),
               "identical_to_greedy": sum(same) / len(same),
               "identical_tokens": round(float(sum(map(_identical_tokens, seqs, bseqs)) / len(seqs)), 4),
               "per_head_acceptance": [round(x, 3) for x in (pd.DataFrame(acc).mean().tolist() if acc else [])]}
        if reference in by_name:
            ref = df[df.method == reference]
            kv = S.speedup_ci(d.new_tokens, d.seconds, ref.new_tokens, ref.seconds)
            same_ref = ([a == b for a, b in zip(seqs, ref.seq.tolist())]       # the same model's tokens only
                        if by_name[reference].compared_with == bname else [None])
            row.update({f"speedup_vs_{reference}": round(kv.value, 3), f"speedup_vs_{reference}_lo": round(kv.lo, 3),
                        f"speedup_vs_{reference}_hi": round(kv.hi, 3),
                        f"efficiency_vs_{reference}": round(kv.value / tau, 3),
                        f"identical_to_{reference}": None if None in same_ref else sum(same_ref) / len(same_ref)})
        rows.append(row)
    df["tokens_per_s"] = df.new_tokens / df.seconds
    return rows, df


def best_methods(rows: list[dict]) -> dict:
    """The benchmark row each variant is judged by: HF greedy for NTP; for MTP, MEDUSA-1 and the MTP modules the one
    of chain and tree chosen on the validation prompts (``selected``), or, in results from before that choice was
    recorded, the faster on the test prompts (``None`` where neither ran)."""
    b = {r["method"]: r for r in rows}

    def pick(v):
        cands = [b[m] for m in (f"{v}_chain", f"{v}_tree") if m in b]
        chosen = [r for r in cands if r.get("selected")]
        return chosen[0] if chosen else max(cands, key=lambda r: r["speedup_vs_hf_greedy"], default=None)
    return {"ntp": b.get("hf_greedy"), **{v: pick(v) for v in ("mtp", "medusa", "mtp_seq")}}


def speedup_of(row: dict) -> S.CI:
    """A benchmark row's speedup over HF greedy of the same model, with its interval."""
    return S.CI(row["speedup_vs_hf_greedy"], row["speedup_lo"], row["speedup_hi"])


def gain_of(row: dict) -> S.CI:
    """A benchmark row's speedup over this engine without drafts (``greedy_kv``): speculation's own gain, the part
    that does not come from the engine's leaner forward. Verdicts that speculation is faster are drawn from this."""
    return S.CI(row["speedup_vs_greedy_kv"], row["speedup_vs_greedy_kv_lo"], row["speedup_vs_greedy_kv_hi"])


def best_peer_speedups(rows: list[dict], per: pd.DataFrame) -> tuple[str | None, dict[str, S.CI]]:
    """The fastest peer (an HF method on the NTP model: ``hf_greedy``, the compiled recipe, prompt lookup; by
    tokens/s on these prompts) and every other method on the NTP model's outputs against it: (tokens/s of the method)
    / (tokens/s of the peer) with its 95% interval, resampling prompts paired, from ``per`` (the benchmark's
    per-prompt frame or ``decoding_per_prompt.csv``: method, prompt, new_tokens, seconds). Methods of other models
    (the MTP model's) have no peer here. (None, {}) when no peer ran."""
    peers = [r for r in rows if r["method"].startswith("hf_") and r["baseline"] == "hf_greedy"]
    if not peers:
        return None, {}
    peer = max(peers, key=lambda r: r["tokens_per_s"])["method"]
    base = per[per.method == peer].sort_values("prompt")
    out = {}
    for r in rows:
        if r["baseline"] != "hf_greedy" or r["method"] == peer:
            continue
        d = per[per.method == r["method"]].sort_values("prompt")
        if list(d.prompt) != list(base.prompt):
            raise ValueError(f"{r['method']} and the peer {peer} were timed on different prompts")
        out[r["method"]] = S.speedup_ci(d.new_tokens.to_numpy(), d.seconds.to_numpy(), base.new_tokens.to_numpy(),
                                        base.seconds.to_numpy())
    return peer, out


@torch.inference_mode()
def first_divergences(model, prompts, per: pd.DataFrame, method: str, baseline: str) -> list[dict]:
    """Where ``method``'s output first leaves ``baseline``'s (same model), and the model's top-2 logit gap there,
    recomputed with one plain forward over prompt + the shared prefix in the model's dtype (the gap in float32).
    A small gap is a near-tie that rounding in a differently shaped (multi-token) forward can flip."""
    dev = model_device(model)
    a = per[per.method == method].set_index("prompt").seq
    b = per[per.method == baseline].set_index("prompt").seq
    out = []
    for i in a.index:
        x, y = a[i], b[i]
        k = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), None)
        if k is None:
            continue
        ids = torch.cat([prompts[i].to(dev), torch.tensor(y[:k], dtype=torch.long, device=dev)]).view(1, -1)
        logits = model(input_ids=ids).logits[0, -1]
        top = logits.float().topk(2)
        out.append({"method": method, "prompt": i, "position": k, "method_token": x[k], "greedy_token": y[k],
                    "top2_gap": float(top.values[0] - top.values[1]),
                    "greedy_is_argmax": int(top.indices[0]) == y[k]})
    return out


# --- memory --------------------------------------------------------------------------------------------------------

def peak_memory_mb(device=None) -> float:
    """Peak CUDA memory allocated on ``device`` (any GPU when None and one is present), else the process' peak RSS
    (MB)."""
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def generation_memory(model, prompts, max_new_tokens: int, tree=None) -> dict:
    """Memory of one model generating (batch 1, HF greedy and this engine), in MB.

    On CUDA: ``max_memory_allocated`` after ``empty_cache`` + ``reset_peak_memory_stats`` (the caller keeps only this
    model on the GPU). On the CPU, where no allocator reports a per-model peak, it is computed: weights + the KV caches
    the engine held at the end of the longest generation (their real tensors: head and module caches, grouped
    key-value heads included) + one step's logits.
    """
    dev = model_device(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    longest = max(prompts, key=len)
    Method.hf("hf_generate", model)(longest.view(1, -1), max_new_tokens)
    engine = Method.engine("engine", model, tree if getattr(model, "num_heads", 0) else "none")
    seq, st = engine(longest.view(1, -1), max_new_tokens)
    drafts = len(parse_tree(tree, model.num_heads)) if getattr(model, "num_heads", 0) else 0
    kv = st["kv_cache_bytes"] / 2 ** 20                                 # every cache's real tensors at the end
    logits = model.config.vocab_size * (1 + drafts) * 4 / 2 ** 20      # one step's float32 logits, root + drafts
    out = {"weights_mb": weights, "kv_cache_mb": kv, "logits_mb": logits, "device": str(dev)}
    if dev.type == "cuda":
        out.update(peak_mb=torch.cuda.max_memory_allocated(dev) / 2 ** 20, measured="cuda_max_allocated")
    else:
        out.update(peak_mb=weights + kv + logits, measured="weights+kv+logits (computed)")
    return out


def train_time_per_epoch(log_csv) -> float:
    """Seconds per epoch from a training log CSV (elapsed at the last row / epochs done)."""
    p = Path(log_csv)
    if not p.exists():
        raise FileNotFoundError(f"training log {p} not found: run the training notebook for this profile first")
    df = pd.read_csv(p)
    last = df.dropna(subset=["epoch"]).iloc[-1]
    return float(last.elapsed_s / max(last.epoch, 1e-9))


# --- thesis API ----------------------------------------------------------------------------------------------------

class PerformanceTracker:
    """Collects training and inference measurements per name and relates them to a baseline (the first name
    tracked, unless given).

    Both call shapes work: the workbook's ``track_training(name, losses, seconds)`` (a run's losses at once) and the
    MTP accelerator's ``track_training(name, epoch, loss, seconds)`` (one loss at a time; ``seconds`` since the epoch
    began, so an epoch's time is its last value). ``get_summary()`` gives one entry per name (final loss, the run's
    own relative loss reduction, training seconds, tokens/s, speedup vs the baseline) and, as the accelerator reads
    it, ``summary["training"]["loss_reduction"]`` = (baseline final loss - other final loss) / baseline final loss and
    ``summary["inference"]["speedup"]`` = other tokens/s / baseline tokens/s, "other" being the first name tracked
    after the baseline (``"mtp"`` in its example)."""

    SECTIONS = ("training", "inference")

    def __init__(self, baseline: str | None = None):
        self.baseline, self.training, self.inference = baseline, {}, {}

    def _name(self, name):
        if name in self.SECTIONS:
            raise ValueError(f"{name!r} is a section of the summary; name the run something else")
        self.baseline = self.baseline or name
        return name

    def track_training(self, name: str, *args):
        """``(name, losses, seconds)`` or ``(name, epoch, loss, seconds)``."""
        rec = self.training.setdefault(self._name(name), {"losses": [], "epoch_seconds": {}})
        if len(args) == 2:
            losses, seconds = list(args[0]), args[1]
            if not losses:
                raise ValueError("track_training needs at least one loss value")
            rec["losses"] += [float(x) for x in losses]
            rec["epoch_seconds"][len(rec["epoch_seconds"])] = float(seconds)
        elif len(args) == 3:
            epoch, loss, seconds = args
            rec["losses"].append(float(loss))
            rec["epoch_seconds"][epoch] = float(seconds)
        else:
            raise TypeError("track_training(name, losses, seconds) or track_training(name, epoch, loss, seconds)")

    def track_inference(self, name: str, tokens: int, seconds: float):
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        rec = self.inference.setdefault(self._name(name), {"tokens": 0, "seconds": 0.0})
        rec["tokens"] += tokens
        rec["seconds"] += seconds

    def _tps(self, name):
        i = self.inference[name]
        return i["tokens"] / i["seconds"]

    def get_summary(self) -> dict:
        out, base = {}, self.baseline
        for name in dict.fromkeys([*self.training, *self.inference]):
            s = {}
            if name in self.training:
                t = self.training[name]
                s.update(final_loss=t["losses"][-1], training_seconds=sum(t["epoch_seconds"].values()),
                         loss_reduction=(t["losses"][0] - t["losses"][-1]) / t["losses"][0])
            if name in self.inference:
                s["tokens_per_s"] = self._tps(name)
                if base in self.inference:
                    s["speedup"] = s["tokens_per_s"] / self._tps(base)
            out[name] = s
        other = lambda d: next((n for n in d if n != base), None)  # noqa: E731
        o = other(self.training)
        if base in self.training and o is not None:
            b, m = self.training[base]["losses"][-1], self.training[o]["losses"][-1]
            out["training"] = {"baseline": base, "compared": o, "loss_reduction": (b - m) / b}
        o = other(self.inference)
        if base in self.inference and o is not None:
            out["inference"] = {"baseline": base, "compared": o, "speedup": self._tps(o) / self._tps(base)}
        return out


def evaluate_model_performance(models, test_dataloader, tokenizer, max_length=256, limit: int | None = 50,
                               tree=None) -> dict:
    """The thesis' evaluation: ``models`` is a list of (name, model) (or models, named by class). Returns a dict of
    ``speed`` (tokens/s, latency, mean accepted length), ``perplexity``, ``accuracy``, ``bleu`` and ``memory``."""
    models = [m if isinstance(m, tuple) else (type(m).__name__, m) for m in models]
    pairs = prompts_and_references(test_dataloader, limit)
    if not pairs:
        raise ValueError("the test dataloader is empty")
    refs = [tokenizer.decode(r, skip_special_tokens=True) for _, r in pairs]
    res = {k: {} for k in ("speed", "perplexity", "accuracy", "bleu", "memory")}
    for name, model in models:
        texts, stats = generate_responses(model, tokenizer, [p for p, _ in pairs], max_length, tree=tree, desc=name)
        new, secs, fps = (sum(s[k] for s in stats) for k in ("new_tokens", "wall_time_s", "forward_passes"))
        res["speed"][name] = {"tokens_per_s": new / secs, "latency_s": secs / len(stats),
                              "mean_accepted_length": new / fps}
        res["perplexity"][name] = perplexity(model, test_dataloader)
        res["accuracy"][name] = answer_accuracy(texts, refs)
        res["bleu"][name] = bleu(texts, refs)
        res["memory"][name] = peak_memory_mb()
    return res


def _left_padded(prompts, pad: int, device=None):
    """Token-id rows left-padded with ``pad`` into one batch on ``device``, and its 0/1 attention mask."""
    W = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), W), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), W, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, W - len(p):], mask[b, W - len(p):] = p.to(ids.device), 1
    return ids, mask


def _new_tokens(seqs, width: int, eos: set) -> list[list[int]]:
    """Each row's new tokens up to and including its first EOS (what a caller keeps)."""
    out = []
    for row in seqs[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out


def batch_rows(ntp, heads, test, val, sizes=(1, 4, 16), new_tokens: int = 48,
               trees=("chain:1", "chain:2", "chain", "medusa:8", "medusa:16"), rounds: int = 2,
               pad: int | None = None, compiled_trees: tuple = ()) -> list[dict]:
    """Batched speculative decoding (``heads``, a head model on ``ntp``'s backbone) against HF's batched greedy
    ``generate`` of ``ntp`` (left-padded), this engine without drafts, and speculation row by row, at each batch size:
    total tokens/s over the ``test`` prompts (chunks of the batch size, each row's tokens counted up to its EOS), every
    method once per round in a fresh order; at batch > 1 also batched speculation with finished rows kept as masked
    no-ops (``masked_vs_drop``: its tokens/s over dropping them). The tree of each batch size is the fastest of
    ``trees`` on one chunk of ``val`` prompts, timed after a warm-up at that batch size, and every method runs once on
    that chunk before the timed rounds (first calls at a new shape pay one-time costs, the engine's layout timing
    among them); the test prompts only measure.
    ``spec_batched_tau``: batched speculation's tokens per row per step, the reason a speedup is or is not there.
    ``compiled_trees``: candidate trees for the engine's compiled step too (``fast="compiled"``, the batch kept whole,
    finished rows masked): ``engine_no_drafts_compiled`` and ``spec_batched_compiled`` with the fastest of them on the
    same validation chunk; ``compile_s``: the seconds spent compiling their graphs (warm-up, not timed).
    Speed only: the engine decodes with ``exact=False`` (in bf16, steps of their own size, as HF's)."""
    import random
    import time

    from .decoding.engine import _eos_set, speculative_generate, sync

    dev = next(ntp.parameters()).device
    if ntp.generation_config.pad_token_id is not None:
        pad = ntp.generation_config.pad_token_id
    if pad is None:
        raise ValueError("batch_rows needs a pad token id: the model's generation_config has none, pass pad=")
    eos = _eos_set(ntp, None)
    taus = []

    def fast_of(method):                      # a compiled method: the step compiled, the batch kept whole
        return dict(fast="compiled", batched=True) if method.endswith("_compiled") else {}

    def run(method, chunk, tree=None):
        ids, mask = _left_padded(chunk, pad, dev)
        if method == "hf_generate":
            out = ntp.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        elif method.startswith("engine_no_drafts"):
            out = speculative_generate(ntp, ids, new_tokens, tree="none", attention_mask=mask, exact=False,
                                       **fast_of(method))[0]
        else:
            kw = fast_of(method) or {"batched": {"spec_rows": False, "spec_batched": True}.get(method, "masked")}
            out, st = speculative_generate(heads, ids, new_tokens, tree=tree, attention_mask=mask, exact=False, **kw)
            if method == "spec_batched":
                taus.append((st["new_tokens"], st["new_tokens"] / st["mean_accepted_length"]))
        return _new_tokens(out.cpu(), ids.shape[1], eos)

    def timed(method, chunks, tree=None):
        sync(dev)
        t0, outs = time.perf_counter(), []
        for c in chunks:
            outs += run(method, c, tree)
        sync(dev)
        return time.perf_counter() - t0, outs

    rows, order = [], random.Random(0)
    for B in sizes:
        chunks = [test[i: i + B] for i in range(0, len(test), B)]
        run("spec_batched", val[:B], trees[0])                                # warm-up at this batch size
        pick = {t: timed("spec_batched", [val[:B]], t)[0] for t in trees}    # validation chooses the tree
        tree = min(pick, key=pick.get)
        methods = ["hf_generate", "engine_no_drafts", "spec_rows", "spec_batched"] + ["spec_batched_masked"] * (B > 1)
        compile_before, pick_c, tree_c = compiled.COMPILE_S[0], {}, None
        if compiled_trees:
            methods += ["engine_no_drafts_compiled", "spec_batched_compiled"]
            for t in compiled_trees:                                         # compiles each step size once
                run("spec_batched_compiled", val[:B], t)
            pick_c = {t: timed("spec_batched_compiled", [val[:B]], t)[0] for t in compiled_trees}
            tree_c = min(pick_c, key=pick_c.get)
        tree_of = {m: tree_c if m == "spec_batched_compiled" else tree for m in methods}
        times, outs = {m: [] for m in methods}, {}
        for m in methods:                                                     # warm-up of every method
            run(m, val[:B], tree_of[m])
        taus.clear()
        bar = tqdm(total=rounds * len(methods), desc=f"batch benchmark, {B} rows", leave=False)
        for _ in range(rounds):
            for m in order.sample(methods, len(methods)):
                s, o = timed(m, chunks, tree_of[m])
                times[m].append(s)
                outs[m] = o
                bar.update()
        bar.close()
        n = {m: sum(len(r) for r in outs[m]) for m in methods}
        tps = {m: [n[m] / s for s in times[m]] for m in methods}

        def same_as_hf(m):                                                    # rows identical to HF's
            return sum(a == b for a, b in zip(outs[m], outs["hf_generate"]))

        def ratio_range(a, b):                                                # [min, max] over rounds of a / b
            r = [x / y for x, y in zip(tps[a], tps[b])]
            return [round(min(r), 2), round(max(r), 2)]

        row = dict(batch=B, tree=tree, tree_validation_s={k: round(v, 2) for k, v in pick.items()},
                   spec_batched_tau=round(sum(t for t, _ in taus) / sum(s for _, s in taus), 3),
                   **{f"{m}_tokens_per_s": round(sum(tps[m]) / rounds, 1) for m in methods},
                   batched_vs_hf=ratio_range("spec_batched", "hf_generate"),
                   batched_vs_rows=ratio_range("spec_batched", "spec_rows"),
                   batched_identical_to_rows=outs["spec_batched"] == outs["spec_rows"],
                   **({"masked_vs_drop": ratio_range("spec_batched_masked", "spec_batched"),
                       "masked_identical": outs["spec_batched_masked"] == outs["spec_batched"]} if B > 1 else {}),
                   rows_identical_to_hf=same_as_hf("spec_rows"),
                   rows=len(test))
        if compiled_trees:
            row.update(tree_compiled=tree_c, tree_compiled_validation_s={k: round(v, 2) for k, v in pick_c.items()},
                       compile_s=round(compiled.COMPILE_S[0] - compile_before, 1),
                       compiled_vs_hf=ratio_range("spec_batched_compiled", "hf_generate"),
                       compiled_vs_no_drafts=ratio_range("spec_batched_compiled", "engine_no_drafts_compiled"),
                       compiled_identical_to_hf=same_as_hf("spec_batched_compiled"),
                       no_drafts_compiled_identical_to_hf=same_as_hf("engine_no_drafts_compiled"))
        rows.append(row)
        print(row, flush=True)
    return rows
