"""Evaluation: perplexity, MetaMath answer accuracy, BLEU, decoding speed, memory, and the thesis' tracker."""
from __future__ import annotations

import math
import re
import resource
import random
import statistics
import time
from fractions import Fraction
from pathlib import Path

import pandas as pd
import sacrebleu
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .decoding import speculative_generate

ANSWER_RE = re.compile(r"The answer is:?\s*(.+)", re.IGNORECASE)
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")


# --- quality -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model, dataloader, max_batches: int | None = None) -> float:
    """Token-weighted next-token perplexity on the response tokens (labels != -100)."""
    model.eval()
    nll, n = 0.0, 0
    for i, batch in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lg, tg = logits[:, :-1].float(), batch["labels"][:, 1:]
        nll += F.cross_entropy(lg.reshape(-1, lg.size(-1)), tg.reshape(-1), ignore_index=-100, reduction="sum").item()
        n += int((tg != -100).sum())
    if n == 0:
        raise ValueError("no response tokens to score: every label is -100")
    return math.exp(nll / n)


def extract_answer(text: str) -> str | None:
    """MetaMath-style: the number after 'The answer is:' (commas, $, negatives, decimals, a/b and \\frac{a}{b})."""
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


def answer_accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions whose extracted answer equals the reference's."""
    if not references:
        raise ValueError("no references to score")
    hits = [extract_answer(p) is not None and extract_answer(p) == extract_answer(r)
            for p, r in zip(predictions, references)]
    return sum(hits) / len(references)


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


def generate_responses(model, tokenizer, prompts, max_new_tokens=256, tree=None, desc="generate"):
    """Greedy responses (decoded) for a list of prompt-id tensors, via the speculative engine (output == greedy)."""
    n_pos = model.config.n_positions
    texts, stats = [], []
    for p in tqdm(prompts, desc=desc, leave=False):
        room = min(max_new_tokens, n_pos - len(p))
        out, st = speculative_generate(model, p.view(1, -1), room, tree=tree if getattr(model, "num_heads", 0) else "none")
        texts.append(tokenizer.decode(out[0, len(p):], skip_special_tokens=True))
        stats.append(st)
    return texts, stats


# --- speed ---------------------------------------------------------------------------------------------------------

def _run(fn, ids):
    t0 = time.perf_counter()
    seq, st = fn(ids)
    return seq, st, time.perf_counter() - t0


def hf_method(model, max_new_tokens, **gen_kw):
    """HF generate as a benchmark method (batch 1)."""
    def fn(ids):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.generation_config.pad_token_id, **gen_kw)
        return out, {"new_tokens": out.shape[1] - ids.shape[1], "forward_passes": None}
    return fn


def engine_method(model, max_new_tokens, tree):
    def fn(ids):
        return speculative_generate(model, ids, max_new_tokens, tree=tree)
    return fn


@torch.inference_mode()
def benchmark_decoding(methods: dict, prompts: list, baseline: dict, warmup: int = 2, repeats: int = 1,
                       desc="decoding benchmark") -> tuple[list[dict], pd.DataFrame]:
    """Time every method on every prompt, interleaved, in a fresh random method order per prompt, so machine noise
    and order effects hit all alike. (With a fixed rotation, the same tree run right after another method of the same
    model timed ~12% faster than when it ran after another model, presumably from cache warmth.)

    ``methods``: name -> (fn, baseline_name) where ``fn(ids) -> (sequences, stats)`` and ``baseline_name`` is the
    HF-greedy method of the same model (for speedup and identical_to_greedy). Returns (summary rows, per-prompt frame).
    """
    names = list(methods)
    for name in names:  # warm-up
        for p in prompts[:warmup]:
            methods[name][0](p.view(1, -1))
    per = []
    for i, p in enumerate(tqdm(prompts, desc=desc)):
        ids = p.view(1, -1)
        order = random.Random(i).sample(names, len(names))
        outs = {}
        for name in order:
            times = []
            for _ in range(repeats):
                seq, st, dt = _run(methods[name][0], ids)
                times.append(dt)
            outs[name] = seq
            new = seq.shape[1] - ids.shape[1]
            per.append({"method": name, "prompt": i, "new_tokens": new, "seconds": statistics.median(times),
                        "forward_passes": st.get("forward_passes"), "seq": seq[0, ids.shape[1]:].tolist(),
                        "per_head_acceptance": st.get("per_head_acceptance")})
    df = pd.DataFrame(per)
    rows = []
    for name in names:
        d = df[df.method == name]
        base = df[df.method == baseline.get(name, methods[name][1])]
        tps = d.new_tokens.sum() / d.seconds.sum()
        base_tps = base.new_tokens.sum() / base.seconds.sum()
        fp = d.forward_passes.dropna()
        tau = float(d.new_tokens.sum() / fp.sum()) if len(fp) == len(d) and fp.sum() else 1.0
        same = [a == b for a, b in zip(d.seq.tolist(), base.seq.tolist())]
        acc = [a for a in d.per_head_acceptance.dropna().tolist() if a]
        speed = tps / base_tps
        rows.append({"method": name, "baseline": baseline.get(name, methods[name][1]), "prompts": len(d),
                     "new_tokens": int(d.new_tokens.sum()), "tokens_per_s": round(tps, 1),
                     "latency_s_per_seq": round(float(d.seconds.mean()), 4),
                     "speedup_vs_hf_greedy": round(speed, 3), "mean_accepted_length": round(tau, 3),
                     "efficiency": round(speed / tau, 3), "identical_to_greedy": sum(same) / len(same),
                     "per_head_acceptance": [round(x, 3) for x in (pd.DataFrame(acc).mean().tolist() if acc else [])]})
    df["tokens_per_s"] = df.new_tokens / df.seconds
    return rows, df.drop(columns=["seq"])


# --- memory --------------------------------------------------------------------------------------------------------

def peak_memory_mb(device=None) -> float:
    """CUDA max allocated on a GPU, else the process' peak RSS (MB)."""
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    """Collects training and inference measurements per model; ``get_summary`` relates them to a baseline."""

    def __init__(self, baseline: str | None = None):
        self.baseline, self.training, self.inference = baseline, {}, {}

    def track_training(self, name: str, losses, seconds: float):
        losses = list(losses)
        if not losses:
            raise ValueError("track_training needs at least one loss value")
        self.baseline = self.baseline or name
        self.training[name] = {"initial_loss": losses[0], "final_loss": losses[-1], "seconds": seconds}

    def track_inference(self, name: str, tokens: int, seconds: float):
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        self.baseline = self.baseline or name
        rec = self.inference.setdefault(name, {"tokens": 0, "seconds": 0.0})
        rec["tokens"] += tokens
        rec["seconds"] += seconds

    def get_summary(self) -> dict:
        out, base = {}, self.baseline
        for name in sorted(set(self.training) | set(self.inference)):
            s = {}
            if name in self.training:
                t = self.training[name]
                s.update(final_loss=t["final_loss"], training_seconds=t["seconds"],
                         loss_reduction=(t["initial_loss"] - t["final_loss"]) / t["initial_loss"])
            if name in self.inference:
                i = self.inference[name]
                s["tokens_per_s"] = i["tokens"] / i["seconds"]
                if base in self.inference:
                    b = self.inference[base]
                    s["speedup"] = s["tokens_per_s"] / (b["tokens"] / b["seconds"])
            out[name] = s
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
