"""Figures and tables, one function each; every figure is saved as PNG and PDF into ``out_dir``."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .utils import atomic_write_text  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")
THESIS = {"ntp": {"speedup": 1.00, "perplexity": 17.45, "memory_gb": 3.2},
          "mtp": {"speedup": 1.61, "perplexity": 15.23, "memory_gb": 3.4},
          "medusa": {"speedup": 1.27, "perplexity": 16.85, "memory_gb": 3.3}}


def _save(fig, out_dir, name) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}", dpi=130)
    plt.close(fig)
    return out / f"{name}.png"


def token_lengths(lengths: pd.DataFrame, out_dir):
    """Histogram of prompt and response lengths (tokens); ``lengths`` has columns part, tokens."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.histplot(lengths, x="tokens", hue="part", bins=40, ax=ax, element="step")
    ax.set(title="Token lengths", xlabel="tokens")
    return _save(fig, out_dir, "token_lengths")


def loss_curves(logs: dict, out_dir, name="loss_curves"):
    """Train and eval loss against step, one panel per variant."""
    frames = []
    for v, df in logs.items():
        for col, split in (("train_loss", "train"), ("eval_loss", "eval")):
            d = df.dropna(subset=[col])
            frames.append(pd.DataFrame({"variant": v, "step": d.step, "loss": d[col], "split": split}))
    data = pd.concat(frames)
    g = sns.relplot(data=data, x="step", y="loss", hue="split", col="variant", kind="line", height=3,
                    facet_kws={"sharey": False}, marker="o", markersize=3)
    g.set_titles("{col_name}")
    return _save(g.figure, out_dir, name)


def per_head_accuracy(acc: dict, out_dir, name="per_head_accuracy"):
    """Validation top-1 accuracy by offset (0 = next token) for each multi-head variant."""
    data = pd.DataFrame([{"variant": v, "offset": f"t+{k + 1}", "top1": a} for v, accs in acc.items()
                         for k, a in enumerate(accs)])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.barplot(data=data, x="offset", y="top1", hue="variant", ax=ax)
    ax.set(title="Per-head validation top-1 accuracy", ylim=(0, 1), ylabel="top-1 accuracy")
    return _save(fig, out_dir, name)


def decoding_speed(per_prompt: pd.DataFrame, out_dir):
    """Tokens/s per method, one point per prompt (spread), box for the quartiles."""
    order = per_prompt.groupby("method").tokens_per_s.median().sort_values().index
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.boxplot(per_prompt, y="method", x="tokens_per_s", order=order, ax=ax, color="0.85", fliersize=0)
    sns.stripplot(per_prompt, y="method", x="tokens_per_s", order=order, ax=ax, size=2.5, alpha=0.6)
    ax.set(title="Generation speed per prompt (batch 1)", xlabel="tokens / s", ylabel="")
    return _save(fig, out_dir, "decoding_speed")


def theoretical_vs_measured(bench: pd.DataFrame, out_dir):
    """Mean accepted length τ (the speedup if a step cost as much as a plain one) against measured speedup."""
    fig, ax = plt.subplots(figsize=(5, 4))
    sns.scatterplot(bench, x="mean_accepted_length", y="speedup_vs_hf_greedy", hue="method", s=70, ax=ax)
    lim = max(bench.mean_accepted_length.max(), bench.speedup_vs_hf_greedy.max()) * 1.1
    ax.plot([0, lim], [0, lim], "k--", lw=1, label="speedup = τ")
    ax.set(xlim=(0, lim), ylim=(0, lim), xlabel="mean accepted length τ (theoretical speedup)",
           ylabel="measured speedup vs HF greedy", title="Theoretical vs measured speedup")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, out_dir, "theoretical_vs_measured")


def head_acceptance(bench: pd.DataFrame, out_dir):
    """Acceptance rate of the draft at each depth during decoding (chain and tree methods)."""
    rows = [{"method": r.method, "depth": d + 1, "acceptance": a} for r in bench.itertuples()
            for d, a in enumerate(r.per_head_acceptance or [])]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if rows:
        sns.lineplot(pd.DataFrame(rows), x="depth", y="acceptance", hue="method", marker="o", ax=ax)
    ax.set(title="Draft acceptance by head (depth)", ylim=(0, 1))
    return _save(fig, out_dir, "head_acceptance")


def quality_comparison(quality: dict, out_dir):
    """Perplexity, answer accuracy and BLEU per variant."""
    data = pd.DataFrame([{"variant": v, "metric": m, "value": q[m]} for v, q in quality.items()
                         for m in ("perplexity", "accuracy", "bleu")])
    g = sns.catplot(data=data, x="variant", y="value", col="metric", kind="bar", height=3, sharey=False)
    g.set_titles("{col_name}")
    return _save(g.figure, out_dir, "quality_comparison")


def tree_budget(sweep: pd.DataFrame, out_dir):
    """Speedup against the number of tree nodes verified per step."""
    g = sns.relplot(sweep, x="budget", y="speedup", hue="tree", col="variant", kind="line", marker="o", height=3)
    g.set_titles("{col_name}")
    return _save(g.figure, out_dir, "tree_budget")


def memory(mem: dict, out_dir):
    """Inference memory per variant (weights, KV cache, logits)."""
    data = pd.DataFrame([{"variant": v, "part": k.replace("_mb", ""), "MB": m[k]} for v, m in mem.items()
                         for k in ("weights_mb", "kv_cache_mb", "logits_mb")])
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    sns.barplot(data, x="variant", y="MB", hue="part", ax=ax)
    ax.set(title="Inference memory by part")
    return _save(fig, out_dir, "memory")


def ablations(df: pd.DataFrame, out_dir):
    """Ablation grid: validation perplexity and mean head accuracy per setting."""
    df = df.assign(setting=df.apply(lambda r: f"n={r.n} lr={r.lr:g} {r.head_type} {r.weighting}", axis=1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(df) + 1.5), sharey=True)
    sns.barplot(df, y="setting", x="val_ppl", hue="group", ax=axes[0], dodge=False)
    sns.barplot(df, y="setting", x="mean_head_acc", hue="group", ax=axes[1], dodge=False, legend=False)
    axes[0].set(title="validation perplexity", ylabel="")
    axes[1].set(title="mean extra-head top-1", ylabel="")
    return _save(fig, out_dir, "ablations")


def qualitative_table(samples: pd.DataFrame, out_dir) -> Path:
    """Same prompts, three models: a Markdown table."""
    lines = ["| prompt | variant | output | reference |", "|---|---|---|---|"]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    for r in samples.itertuples():
        lines.append(f"| {esc(r.prompt)} | {r.variant} | {esc(r.output)} | {esc(r.reference)} |")
    return atomic_write_text(Path(out_dir) / "qualitative.md", "\n".join(lines) + "\n")


def thesis_table(quality: dict, bench: list, memory_: dict, out_dir, profile: str) -> pd.DataFrame:
    """One row per variant: our speed, perplexity, accuracy, memory beside the thesis' and whether it reproduced."""
    b = {r["method"]: r for r in bench}
    best = {"ntp": b.get("hf_greedy"), "mtp": max((b[m] for m in ("mtp_chain", "mtp_tree") if m in b),
                                                 key=lambda r: r["speedup_vs_hf_greedy"], default=None),
            "medusa": max((b[m] for m in ("medusa_chain", "medusa_tree") if m in b),
                          key=lambda r: r["speedup_vs_hf_greedy"], default=None)}
    ppl0 = quality["ntp"]["perplexity"]
    rows = []
    for v, t in THESIS.items():
        q, r = quality[v], best[v]
        sp = r["speedup_vs_hf_greedy"] if r else float("nan")
        ppl = q["perplexity"]
        speed = ("n/a" if sp != sp else "yes" if sp >= t["speedup"] else
                 f"partly (faster, below {t['speedup']}x)" if sp > 1 else "no")
        if v == "ntp":
            verdict = "baseline"
        elif v == "medusa":
            verdict = (f"speed {speed}; perplexity cannot change (frozen backbone: {ppl:.3f} vs {ppl0:.3f}), so the "
                       "thesis' 16.85 < 17.45 is not reproducible")
        else:
            verdict = (f"speed {speed}; perplexity {'lower' if ppl < ppl0 else 'not lower'} than NTP "
                       "(next-token logits are causal, tested)")
        rows.append({"variant": v, "speedup (ours)": round(sp, 2), "speedup (thesis)": t["speedup"],
                     "mean accepted length": r["mean_accepted_length"] if r else None,
                     "identical to greedy": r["identical_to_greedy"] if r else None,
                     "perplexity (ours)": round(ppl, 3), "perplexity (thesis)": t["perplexity"],
                     "answer accuracy (ours)": round(q["accuracy"], 3), "BLEU (ours)": round(q["bleu"], 1),
                     "memory MB (ours)": round(memory_[v]["peak_mb"], 1), "memory GB (thesis)": t["memory_gb"],
                     "reproduced?": verdict})
    df = pd.DataFrame(rows)
    note = (f"\n\nProfile `{profile}`. Speedup: best lossless method of the variant vs HF greedy `generate()` of the "
            "same model, batch 1. Memory: inference weights+KV cache+logits on CPU, CUDA max allocated on a GPU.\n")
    atomic_write_text(Path(out_dir) / "thesis_table.md", df.to_markdown(index=False) + note)
    atomic_write_text(Path(out_dir) / "thesis_table.tex", df.to_latex(index=False))
    return df
