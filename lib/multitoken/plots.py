"""Figures and tables, one function each. Every figure is saved as PNG and PDF into ``out_dir`` and returned, so a
notebook shows it inline (the executed copies under ``runs/`` embed the PNG); it is closed after saving, so
Jupyter's inline backend does not show it a second time.
Quality and speed figures draw 95% bootstrap intervals (``multitoken.stats``)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .evaluation import best_methods, gain_of, speedup_of
from .report import THESIS
from .stages import result_note
from .stats import ci, speed_verdict, verdict
from .utils import atomic_write_text, note_written

sns.set_theme(style="whitegrid", context="notebook")


def _save(fig, out_dir, name):
    """Write ``name``.png and .pdf, close the figure (no second inline copy) and return it for display."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}", dpi=130)
        note_written(out / f"{name}.{ext}")
    plt.close(fig)
    fig.saved = out / f"{name}.png"
    return fig


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


def drafter_scaling(df: pd.DataFrame, out_dir, name="drafter_scaling"):
    """First-draft acceptance, chain τ and each head's top-1 against the training tokens the drafters saw, one panel
    per family; dashed where they trained on reference solutions instead of the model's own text (column ``text``)."""
    df = df.assign(text=df.text if "text" in df else "self-distilled")
    long = pd.concat([df.assign(measure="first draft accepted", value=df.first_token),
                      df.assign(measure="chain τ - 1", value=df.tau - 1)]
                     + [df.assign(measure=f"head {c[4:-5]} top-1", value=df[c]) for c in df if c.endswith("_top1")],
                     ignore_index=True).dropna(subset=["value"])   # a family with fewer heads has no value there
    g = sns.relplot(long, x="train_tokens", y="value", hue="measure", style="text", col="variant", kind="line",
                    markers=True, height=3.4, aspect=1.1, facet_kws={"sharey": True})
    g.set(xscale="log", xlabel="training tokens (head-1 targets)", ylabel="")
    g.set_titles("{col_name} (validation, teacher-forced)")
    return _save(g.figure, out_dir, name)


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
        ax.set_xticks(sorted({r["depth"] for r in rows}))
    ax.set(title="Draft acceptance by depth (share of steps whose accepted path reached it)", ylim=(0, 1))
    return _save(fig, out_dir, "head_acceptance")


def quality_comparison(quality: dict, out_dir):
    """Perplexity, answer accuracy and BLEU per variant with 95% bootstrap intervals over problems (left), and the
    paired differences against NTP on the same problems (right: an interval covering 0 is no detectable change)."""
    metrics = ("perplexity", "accuracy", "bleu")
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.5))
    for ax, m in zip(axes[0], metrics):
        for i, (v, q) in enumerate(quality.items()):
            c = ci(q[m])
            ax.bar(i, c.value, color=sns.color_palette()[i], alpha=0.8)
            ax.errorbar(i, c.value, yerr=[[c.value - c.lo], [c.hi - c.value]], color="k", capsize=4)
        ax.set(xticks=range(len(quality)), xticklabels=list(quality), title=m)
    for ax, m in zip(axes[1], metrics):
        diffs = [(v, ci(q["diff_vs_ntp"][m])) for v, q in quality.items() if "diff_vs_ntp" in q]
        for i, (v, c) in enumerate(diffs):
            ax.errorbar(c.value, i, xerr=[[c.value - c.lo], [c.hi - c.value]], fmt="o", color="k", capsize=4)
        ax.axvline(0, color="0.5", ls="--", lw=1)
        ax.set(yticks=range(len(diffs)), yticklabels=[f"{v} - ntp" for v, _ in diffs], ylim=(-0.6, len(diffs) - 0.4),
               title=f"{m}: difference vs NTP")
    fig.suptitle("Quality on held-out problems (95% bootstrap intervals)")
    return _save(fig, out_dir, "quality_comparison")


def leak_curves(logs: dict, out_dir):
    """Validation perplexity of the next-token head over training (the thesis' recipe: padding scored): NTP, the
    thesis' MTP layout run causally, and the same with its padding-only-mask leak."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, df in logs.items():
        col = "eval_head0_loss" if "eval_head0_loss" in df else "eval_loss"
        d = df.dropna(subset=[col])
        ax.plot(d.step, d[col].map(math.exp), marker="o", ms=3, label=name)
    ax.set(yscale="log", xlabel="optimizer step", ylabel="validation perplexity (head 1)",
           title="The thesis' MTP forward: causal vs leaky")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "thesis_leak_perplexity")


def speedup_intervals(bench: pd.DataFrame, out_dir):
    """Each method's speedup over HF greedy of the same model and over this engine without drafts (greedy_kv),
    with 95% bootstrap intervals over prompts; the dashed line is no speedup."""
    cols = [("speedup_vs_hf_greedy", "speedup_lo", "speedup_hi", "vs HF generate (same model)")]
    if "speedup_vs_greedy_kv" in bench:
        cols.append(("speedup_vs_greedy_kv", "speedup_vs_greedy_kv_lo", "speedup_vs_greedy_kv_hi",
                     "vs this engine without drafts (greedy_kv)"))
    fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 0.35 * len(bench) + 1.5), sharey=True)
    axes = [axes] if len(cols) == 1 else axes
    for ax, (c, lo, hi, title) in zip(axes, cols):
        y = range(len(bench))
        ax.errorbar(bench[c], y, xerr=[bench[c] - bench[lo], bench[hi] - bench[c]], fmt="o", capsize=3, color="k")
        ax.axvline(1, color="0.5", ls="--", lw=1)
        ax.set(yticks=list(y), yticklabels=bench.method, title=title, xlabel="speedup")
    return _save(fig, out_dir, "speedup_intervals")


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
    return atomic_write_text(Path(out_dir) / "qualitative.md", "\n".join(lines) + "\n\n" + result_note() + "\n")


def thesis_table(quality: dict, bench: list, memory_: dict, out_dir, profile: str) -> pd.DataFrame:
    """One row per variant: our speed, perplexity, accuracy, BLEU (each with its 95% bootstrap interval), memory,
    beside the thesis' numbers, and a verdict drawn from the intervals (never from two point estimates)."""
    best = best_methods(bench)
    rows = []
    for v, t in THESIS.items():
        q, r = quality[v], best[v]
        sp = speedup_of(r) if r else None
        gain = gain_of(r) if r and v != "ntp" and "speedup_vs_greedy_kv" in r else None
        row = {"variant": v, "method": r["method"] if r else None,
               "speculation's gain (vs greedy_kv)": gain.fmt(2) if gain else "—",
               "speedup vs HF generate": sp.fmt(2) if sp else "n/a", "speedup (thesis)": t["speedup"],
               "τ": r["mean_accepted_length"] if r else None,
               "identical to greedy": r["identical_to_greedy"] if r else None,
               "perplexity (ours)": ci(q["perplexity"]).fmt(3), "perplexity (thesis)": t["perplexity"],
               "answer accuracy (ours)": ci(q["accuracy"]).fmt(3), "BLEU (ours)": ci(q["bleu"]).fmt(1),
               "memory MB (ours)": round(memory_[v]["peak_mb"], 1), "memory GB (thesis)": t["memory_gb"]}
        if v == "ntp":
            row["reproduced?"] = "baseline"
        else:
            d = {m: ci(q["diff_vs_ntp"][m]) for m in ("perplexity", "accuracy")}
            row["Δ perplexity vs NTP"], row["Δ accuracy vs NTP"] = d["perplexity"].fmt(3), d["accuracy"].fmt(3)
            speed = speed_verdict(gain, t["speedup"]) if gain else "n/a"
            if v == "medusa":
                ppl = ("cannot change by construction (frozen backbone: the same next-token logits), so the thesis' "
                       f"16.85 < 17.45 is not reproducible; Δ = {d['perplexity'].fmt(3)}")
            else:
                ppl = {"lower": "lower than NTP, as the thesis claims",
                       "higher": "higher than NTP (the thesis: lower)",
                       "no detectable difference": "no detectable difference from NTP (the thesis: lower)"}[
                    verdict(d["perplexity"])] + " (next-token logits are causal, tested)"
            acc = verdict(d["accuracy"])
            row["reproduced?"] = f"speed: {speed}; perplexity: {ppl}; answer accuracy vs NTP: {acc}"
        rows.append(row)
    df = pd.DataFrame(rows).fillna("—")
    q0 = quality["ntp"]
    note = (f"\n\nProfile `{profile}`, {q0.get('n_eval', '?')} held-out problems ({q0.get('split', '?')} split; "
            f"accuracy and BLEU on the answers to the first {q0.get('n_answers', q0.get('n_eval', '?'))}). Intervals: 95% percentile bootstrap, over problems for quality "
            "and over prompts for speed; Δ = variant − NTP on the same problems. Speed: the variant's method chosen on "
            "validation prompts (chain or tree), measured on the test prompts, batch 1; the verdict is drawn from "
            "speculation's own gain, the speedup over this engine without drafts (`greedy_kv`), and the speedup over HF "
            "greedy `generate()` of the same model (which includes the engine's leaner forward) stands beside it. Memory: computed weights + KV cache + logits "
            "on a CPU, CUDA max allocated on a GPU (one model resident).\n")
    atomic_write_text(Path(out_dir) / "thesis_table.md", df.to_markdown(index=False) + note + "\n" + result_note() + "\n")
    atomic_write_text(Path(out_dir) / "thesis_table.tex", df.to_latex(index=False))
    return df
