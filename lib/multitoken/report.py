"""What the notebooks say about their results, and the one-file HTML report of a profile.

Each ``*_summary`` returns Markdown written from the results themselves, so an executed notebook ends with its
findings in words (shown with ``IPython.display.Markdown``). ``build_report`` joins the executed notebooks of a
profile into ``runs/<profile>/report.html``: the verdicts and the thesis table first, then every notebook's prose,
tables and figures (code hidden, images embedded, no external resources), so it opens offline in any browser.
"""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pandas as pd

from .stats import CI, ci, verdict
from .utils import atomic_write_text, repo_root

# The thesis' Table 1: speedup over NTP, perplexity, memory.
THESIS = {"ntp": {"speedup": 1.00, "perplexity": 17.45, "memory_gb": 3.2},
          "mtp": {"speedup": 1.61, "perplexity": 15.23, "memory_gb": 3.4},
          "medusa": {"speedup": 1.27, "perplexity": 16.85, "memory_gb": 3.3}}
NAMES = {"base": "base (pretrained, not fine-tuned)", "ntp": "NTP", "mtp": "MTP", "medusa": "MEDUSA-1",
         "mtp_seq": "MTP modules (frozen backbone)"}


def data_summary(prep, cfg) -> str:
    raw, tok = prep["raw"], prep["tokenizer"]
    parts = ", ".join(f"{len(raw[s]):,} {s}" for s in raw)
    return (f"**Data** (`{cfg['source']}`): {parts} problems; tokenizer of {len(tok):,} tokens; sequences cut at "
            f"{cfg['max_seq_len']} tokens.")


def training_summary(log: pd.DataFrame, variant: str) -> str:
    ev = log.dropna(subset=["eval_loss"])
    if ev.empty:
        return f"**{NAMES[variant]}**: no validation yet."
    first, last = ev.iloc[0], ev.iloc[-1]
    heads = [c for c in ev.columns if c.startswith("eval_head") and c.endswith("_acc")]
    offsets = [int(re.search(r"head(\d+)", c).group(1)) + 1 for c in heads]
    acc = ", ".join(f"t+{k} {last[c]:.3f}" for k, c in zip(offsets, heads))
    mem = f"; peak memory {last['peak_mem_mb']:,.0f} MB" if "peak_mem_mb" in ev and pd.notna(last.get("peak_mem_mb")) else ""
    return (f"**{NAMES[variant]}**: {int(last.step)} steps in {last.elapsed_s / 60:.1f} min{mem}; validation loss "
            f"{first.eval_loss:.3f} (step {int(first.step)}) → {last.eval_loss:.3f}"
            + (f"; validation top-1 by offset: {acc}" if acc else "") + ".")


def quality_summary(quality: dict) -> str:
    q0 = quality["ntp"]
    n_ans = q0.get("n_answers", q0["n_eval"])
    lines = [f"**Quality** on {q0['n_eval']} held-out problems ({q0['split']} split; answers to the first {n_ans}), "
             "95% bootstrap intervals over problems; Δ = variant − NTP on the same problems:", ""]
    for v, q in quality.items():
        right = f" ({q['correct']} of {n_ans} right)" if "correct" in q else ""
        s = (f"- {NAMES[v]}: perplexity {ci(q['perplexity']).fmt(3)}, answer accuracy {ci(q['accuracy']).fmt(3)}"
             f"{right}, BLEU {ci(q['bleu']).fmt(1)}")
        if "diff_vs_ntp" in q:
            d = q["diff_vs_ntp"]
            s += (f"; Δ perplexity {ci(d['perplexity']).fmt(3)}, Δ accuracy {ci(d['accuracy']).fmt(3)}, "
                  f"Δ BLEU {ci(d['bleu']).fmt(1)}")
        lines.append(s)
    return "\n".join(lines)


def bench_summary(rows: list[dict]) -> str:
    dev = rows[0].get("device_name", "?")
    lines = [f"**Decoding** ({dev}, {rows[0].get('dtype', '?')}, batch 1, {rows[0]['prompts']} prompts); speedup over "
             "HF `generate()` of the same model with its 95% interval over prompts:", ""]
    for r in rows:
        if r["method"].startswith("hf_greedy"):
            continue
        kv = (f", {r['speedup_vs_greedy_kv']:.2f}x greedy_kv [{r['speedup_vs_greedy_kv_lo']:.2f}, "
              f"{r['speedup_vs_greedy_kv_hi']:.2f}]") if "speedup_vs_greedy_kv" in r else ""
        same = round(r["identical_to_greedy"] * r["prompts"])
        lines.append(f"- {r['method']}: {r['speedup_vs_hf_greedy']:.2f}x [{r['speedup_lo']:.2f}, "
                     f"{r['speedup_hi']:.2f}]{kv}, {r['tokens_per_s']:.0f} tokens/s, τ {r['mean_accepted_length']:.2f}; "
                     f"identical outputs {same}/{r['prompts']}, identical tokens {r.get('identical_tokens', 1):.1%}")
    return "\n".join(lines)


def lossless(r: dict) -> bool:
    """A benchmark row counts as lossless: every output identical to greedy in fp32; in bf16 (where a several-token
    verification rounds differently from a one-token step, so near-ties flip) at least 99% identical tokens."""
    return r["identical_to_greedy"] == 1 if r.get("dtype", "float32") == "float32" else r["identical_tokens"] >= 0.99


def speed_targets(rows: list[dict], targets: dict | None) -> dict:
    """The fastest lossless head method against ``targets`` (``hf``: speedup over HF generate, ``greedy_kv``: over
    this engine without drafts, ``efficiency``: speedup over greedy_kv / τ). "Fastest" is decided on the validation
    prompts where the benchmark recorded that choice (each family's ``selected`` method and its validation speedup),
    so the test prompts only measure. A target is "met" when the interval lies above it, "not met" when below, else
    "undecided"; efficiency has no interval."""
    heads = [r for r in rows if r["method"].endswith(("_chain", "_tree")) and lossless(r)]
    if not heads or "speedup_vs_greedy_kv" not in heads[0]:
        return {}
    chosen = [r for r in heads if r.get("selected")]
    best = (max(chosen, key=lambda r: r["validation_speedup"]) if chosen else
            max(heads, key=lambda r: r["speedup_vs_hf_greedy"]))
    got = {"hf": CI(best["speedup_vs_hf_greedy"], best["speedup_lo"], best["speedup_hi"]),
           "greedy_kv": CI(best["speedup_vs_greedy_kv"], best["speedup_vs_greedy_kv_lo"], best["speedup_vs_greedy_kv_hi"]),
           "efficiency": CI(best["efficiency_vs_greedy_kv"], best["efficiency_vs_greedy_kv"],
                            best["efficiency_vs_greedy_kv"])}
    out = {"method": best["method"], "tree": best.get("tree"),
           "chosen_on": "validation prompts" if chosen else "test prompts (no validation choice recorded)"}
    for k, c in got.items():
        t = (targets or {}).get(k)
        out[k] = {**c.as_dict(), "target": t,
                  "status": None if t is None else "met" if c.lo >= t else "not met" if c.hi < t else "undecided"}
    return out


def scaling_summary(df: pd.DataFrame) -> str:
    """What notebook 03's drafter scaling found, per family: the first draft's acceptance and τ at each amount of
    training text (and, where both texts ran, the model's own text against the reference solutions at equal
    tokens)."""
    if df.empty:
        return ""
    df = df.assign(text=df.text if "text" in df else "self-distilled")
    lines = ["**How much text the drafters need** (validation text, teacher-forced; first draft accepted / chain τ):",
             ""]
    for v, g in df.groupby("variant", sort=False):
        own = g[g.text == g.text.iloc[0]]
        pts = "; ".join(f"{int(r.train_tokens):,} tokens {r.first_token:.2f} / {r.tau:.2f}" for r in own.itertuples())
        line = f"- {NAMES[v]} ({own.text.iloc[0]} text): {pts}"
        ref = g[g.text == "reference"]
        if len(ref) and own.text.iloc[0] != "reference":
            same = own.merge(ref, on="train_tokens", suffixes=("", "_ref"))
            line += "; on the reference solutions instead: " + "; ".join(
                f"{int(r.train_tokens):,} tokens {r.first_token_ref:.2f} / {r.tau_ref:.2f}" for r in same.itertuples())
            better = (same.first_token > same.first_token_ref).sum()
            line += (f" (the model's own text ahead at {better} of {len(same)} sizes)" if len(same) else "")
        lines.append(line)
    return "\n".join(lines)


def controls_summary(results: Path) -> str:
    """What the MTP controls found (``results/mtp_controls_quality.json``): each run's perplexity Δ vs NTP and vs
    the base model, and which run notebook 04 measures as ``mtp``; "" where the profile ran none."""
    f = Path(results) / "mtp_controls_quality.json"
    if not f.exists():
        return ""
    runs = json.loads(f.read_text())
    parts = []
    for name, r in runs.items():
        d = {ref: verdict(ci(r[f"diff_vs_{ref}"])) for ref in ("ntp", "base") if f"diff_vs_{ref}" in r}
        said = ", ".join(f"{w} than {ref.upper() if ref == 'ntp' else ref}" if w != "no detectable difference"
                         else f"no detectable difference from {ref.upper() if ref == 'ntp' else ref}"
                         for ref, w in d.items())
        parts.append(f"- `{name}`{' (measured as `mtp`)' if r['measured_as_mtp'] else ''}: perplexity "
                     f"{ci(r['perplexity']).fmt(3)}, {said}")
    return "**MTP under controls** (next-token perplexity on the test problems):\n\n" + "\n".join(parts)


def targets_summary(res: dict) -> str:
    if not res:
        return ""
    names = {"hf": "x HF generate", "greedy_kv": "x greedy_kv", "efficiency": " efficiency vs greedy_kv"}
    parts = [(f"{res[m]['value']:.2f}" if m == "efficiency" else ci(res[m]).fmt(2)) + names[m]
             + (f" (target ≥ {res[m]['target']}: {res[m]['status']})" if res[m]["target"] is not None else "")
             for m in names]
    return f"**Fastest lossless head method**: {res['method']}: " + "; ".join(parts) + "."


def thesis_summary(table: pd.DataFrame) -> str:
    lines = ["**Against the thesis:**", ""]
    for r in table.to_dict("records"):
        if r["variant"] != "ntp":
            lines.append(f"- {NAMES[r['variant']]} ({r['method']}): {r['reproduced?']}")
    return "\n".join(lines)


def verdict_table(fig: Path) -> str:
    """The verdict table of a profile's published results (``figures/<profile>/``: quality.json,
    decoding_benchmark.json, memory.json): each of the thesis' claims, its number, ours with its interval, and the
    verdict drawn from the interval (speed from speculation's own gain over this engine without drafts, `greedy_kv`),
    then a note on what was measured. Markdown with lines of at most 120 characters; FileNotFoundError when a file is
    missing."""
    from .evaluation import best_methods, best_peer_speedups, gain_of, speedup_of
    from .stats import speed_verdict

    q = json.loads((fig / "quality.json").read_text())
    rows = json.loads((fig / "decoding_benchmark.json").read_text())
    mem = json.loads((fig / "memory.json").read_text())
    best = best_methods(rows)
    out = ["| the thesis' claim | thesis | ours [95% CI] | verdict |", "|:--|:--|:--|:--|"]
    again = []                                          # the speed verdicts of each further independent run
    for v, name in (("mtp", "MTP"), ("medusa", "MEDUSA-1")):
        g, claimed = gain_of(best[v]), THESIS[v]["speedup"]
        out.append(f"| {name} speedup | {claimed}x | {g.fmt(2)} | {speed_verdict(g, claimed)} |")
        for i, run in enumerate(best[v].get("runs_gain_vs_greedy_kv", [])[1:], 2):
            other = speed_verdict(ci(dict(zip(("value", "lo", "hi"), run))), claimed)
            again.append("the same" if other == speed_verdict(g, claimed) else f"{name} {run[0]:.2f}: {other}")
    rests = ""                                          # the MTP run the perplexity verdict rests on
    if (fig / "mtp_controls_quality.json").exists():
        rests = " (run `{}`)".format(next(k for k, r in json.loads((fig / "mtp_controls_quality.json").read_text())
                                          .items() if r["measured_as_mtp"]))
    ntp = THESIS["ntp"]["perplexity"]
    for v, name in (("mtp", "MTP"), ("medusa", "MEDUSA-1")):
        d = ci(q[v]["diff_vs_ntp"]["perplexity"])
        word = ("not reproducible: frozen backbone" if v == "medusa" else
                {"lower": "lower, as claimed", "higher": "higher (thesis: lower)",
                 "no detectable difference": "no detectable difference"}[verdict(d)] + rests)
        out.append(f"| {name} perplexity, Δ vs NTP | {THESIS[v]['perplexity'] - ntp:+.2f} | "
                   f"{d.fmt(2) if v == 'mtp' else d.fmt(3)} | {word} |")
    same = min(r["identical_to_greedy"] for r in rows if r["method"] not in ("hf_greedy", "greedy_kv"))
    out.append(f"| MEDUSA-1 keeps the output | stated | {same:.0%} identical | "
               f"{'holds for every method: verification is exact' if same == 1 else 'not for every method'} |")
    m = {v: mem[v]["peak_mb"] / mem["ntp"]["peak_mb"] - 1 for v in ("mtp", "medusa")}
    t = {v: THESIS[v]["memory_gb"] / THESIS["ntp"]["memory_gb"] - 1 for v in ("mtp", "medusa")}
    out.append(f"| memory over NTP, MTP / MEDUSA-1 | {t['mtp']:+.0%} / {t['medusa']:+.0%} | {m['mtp']:+.0%} / "
               f"{m['medusa']:+.0%} | {'similar' if all(abs(m[v] - t[v]) < 0.05 for v in m) else 'different'} |")
    top = max(rows, key=lambda r: r["speedup_vs_hf_greedy"] if r["identical_to_greedy"] == 1 else 0)
    r0, pq = rows[0], q["ntp"]["perplexity"]
    sp = {v: speedup_of(best[v]).fmt(2) for v in ("mtp", "medusa")}
    n_ppl = q["ntp"].get("n_ppl", q["ntp"].get("n_eval"))
    second = [a for a in again if a != "the same"]
    over_peer = ""                                      # against the fastest peer on the same prompts
    if (fig / "decoding_per_prompt.csv").exists():
        peer, vs = best_peer_speedups(rows, pd.read_csv(fig / "decoding_per_prompt.csv"))
        if top["method"] in vs:
            over_peer = f" and {vs[top['method']].fmt(2)} over the fastest peer (`{peer}`)"
    note = (f"Speed: speculation's own gain over this engine decoding without drafts, for the method chosen on "
            f"validation prompts (`{best['mtp']['method']}`, `{best['medusa']['method']}`; over HF `generate`: "
            f"{sp['mtp']} and {sp['medusa']}), {r0['dtype']} on {r0['device_name']}, batch 1, {r0['prompts']} test "
            f"prompts. The fastest lossless method is `{top['method']}`: {speedup_of(top).fmt(2)} over HF `generate`"
            f"{over_peer}, τ {top['mean_accepted_length']:.2f}. Perplexity on {n_ppl} test problems (NTP "
            f"{ci(pq).fmt(2)}; the thesis' NTP {ntp}).")
    if again:
        note += (" A second independent benchmark run gives "
                 + ("; ".join(second) if second else "the same speed verdicts") + ".")
    out += [""] + textwrap.wrap(note + f" Files: `figures/{fig.name}/`.", 118)
    return "\n".join(out)


def controls_table(fig: Path) -> str:
    """MTP under controls, from ``mtp_controls_quality.json``: each run (the recipe, then each control with what it
    changed) with its next-token perplexity on the test problems, its paired differences against NTP and the base
    model, its heads' top-1 (t+2, t+3, ...), a chain's τ teacher-forced on the reference solutions, and which run
    notebook 04 measured as ``mtp``. FileNotFoundError when the profile ran no controls."""
    runs = json.loads((fig / "mtp_controls_quality.json").read_text())
    out = ["|MTP run|changed|perplexity|Δ vs NTP|Δ vs base|heads' top-1|τ|", "|:--|:--|:--|:--|:--|:--|--:|"]
    for name, r in runs.items():                          # cells unpadded: every line within 120 characters
        changed = ", ".join(f"{k.removeprefix('mtp_')} {v}" for k, v in r["changes"].items()) or "(the recipe)"
        diff = [ci(r[f"diff_vs_{ref}"]).fmt(2) if f"diff_vs_{ref}" in r else "—" for ref in ("ntp", "base")]
        heads = "/".join(f"{a:.2f}" for a in r["head_top1"][1:])
        tau = f"{r['tau_reference']:.2f}" if "tau_reference" in r else "—"
        run = f"`{name}`" + (" (as `mtp`)" if r["measured_as_mtp"] else "")
        out.append("|" + "|".join([run, changed, ci(r["perplexity"]).fmt(2), *diff, heads, tau]) + "|")
    return "\n".join(out)


# --- the HTML report ---------------------------------------------------------------------------------------------

def build_report(profile: str, root: Path | None = None, runs: str | None = None) -> Path:
    """``runs/<profile>/report.html`` from the executed notebooks (and the thesis table when there is one; ``runs``:
    the table of the stage runs behind the results, ``stages.runs_table``)."""
    import nbformat
    from nbconvert import HTMLExporter

    root = root or repo_root()
    run = root / "runs" / profile
    executed = sorted((run / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not executed:
        raise FileNotFoundError(f"no executed notebooks under {run / 'notebooks'}: run `make all PROFILE={profile}`")
    figs = run / "figures" if profile == "smoke" else root / "figures" / profile
    head = [f"# Faster LLMs with Multi-Token Prediction and MEDUSA-1 — workbook report, profile `{profile}`",
            "Every number below was computed by the notebooks that follow; code is hidden."]
    for title, table in (("The verdicts", verdict_table), ("MTP under controls", controls_table)):
        try:
            head += [f"## {title}", table(figs)]
        except (FileNotFoundError, KeyError):      # a profile without a finished evaluation, or without controls
            pass
    for name, title in (("thesis_table.md", "The thesis table"), ("thesis_claims.md", "The thesis' claims")):
        if (figs / name).exists():
            head += [f"## {title}", (figs / name).read_text()]
    if runs:
        head += ["## The runs behind these results", runs]
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("\n\n".join(head))])
    for f in executed:
        nb = nbformat.read(f, as_version=4)
        for c in nb.cells:
            if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", [])):
                continue
            if c.cell_type == "code":  # progress bars (stderr, tqdm widgets) are for the console, not the reader
                c.outputs = [o for o in c.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")
                             and "application/vnd.jupyter.widget-view+json" not in o.get("data", {})]
            book.cells.append(c)
    book.metadata = nb.metadata
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True)
    exporter.mathjax_url = ""       # no external script: the report opens offline
    html, _ = exporter.from_notebook_node(book)
    html = re.sub(r'<script[^>]+src="https?://[^"]+"[^>]*>\s*</script>', "", html)
    return atomic_write_text(run / "report.html", html)
