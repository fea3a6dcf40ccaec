"""A profile's result tables, from the files its last published run left in figures/<profile>/.

    .venv/bin/python scripts/readme_results.py pretrained            # print them
    .venv/bin/python scripts/readme_results.py pretrained --write    # write them into docs/RESULTS.md and README.md

``--write`` replaces two blocks: every table, between ``<!-- results:<profile> -->`` and ``<!-- /results:<profile> -->``
in docs/RESULTS.md, and the verdict table (each of the thesis' claims: its number, ours with its interval, the
verdict), between ``<!-- answer:<profile> -->`` and ``<!-- /answer:<profile> -->`` in README.md, where it has one.
What they say comes from the files alone (each table names its file), so a rerun refreshes them and nothing is
copied by hand. The prose around the blocks is written by hand, from these numbers."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from multitoken import evaluation as E
from multitoken.report import controls_table, verdict_table

ROOT = Path(__file__).resolve().parents[1]


def ci(d, k=2, sign=False):
    f = f"{{:{'+' if sign else ''}.{k}f}}"
    return f"{f.format(d['value'])} [{f.format(d['lo'])}, {f.format(d['hi'])}]"


def quality(res: Path) -> str:
    q = json.loads((res / "quality.json").read_text())
    out = ["| variant | perplexity | Δ perplexity vs NTP | right answers | answer accuracy | BLEU | Δ accuracy | Δ BLEU "
           "| answers from |", "|:--|:--|:--|--:|:--|:--|:--|:--|:--|"]
    for v, r in q.items():
        d = r.get("diff_vs_ntp")
        dd = [ci(d["accuracy"], 3, True), ci(d["bleu"], 1, True)] if d else ["—"] * 2
        out.append(f"| {v} | {ci(r['perplexity'], 3)} | {ci(d['perplexity'], 3, True) if d else '—'} | "
                   f"{r.get('correct', '?')} of {r.get('n_answers', '?')} | {ci(r['accuracy'], 3)} | "
                   f"{ci(r['bleu'], 1)} | " + " | ".join(dd) + f" | {r.get('answers_from', v)} |")
    heads = {v: r["head_top1"] for v, r in q.items() if r.get("head_top1")}
    out += ["", "Top-1 accuracy on the reference answers by offset (t+1 = the model's next token, then its heads' "
            "t+2, t+3, ...): " + "; ".join(
        f"{v} " + " / ".join(f"{a:.3f}" for a in h) for v, h in heads.items()),
        f"(perplexity on {next(iter(q.values()))['n_ppl']} problems of the {next(iter(q.values()))['split']} split; "
        f"answers to the first {next(iter(q.values()))['n_answers']})"]
    return "\n".join(out)


def decoding(res: Path, name: str) -> str:
    rows = json.loads((res / name).read_text())
    r0 = rows[0]
    per = res / "decoding_per_prompt.csv"          # the per-prompt times of decoding_benchmark.json's first run
    peer, vs_peer = (E.best_peer_speedups(rows, pd.read_csv(per)) if name == "decoding_benchmark.json"
                     and per.exists() else (None, {}))
    out = [f"{r0['device_name']}, {r0['dtype']}, batch 1, {r0['prompts']} test prompts, {r0['new_tokens']} new "
           f"tokens in all per method, {r0.get('torch_threads', '?')} threads"
           + (f"; the fastest peer is `{peer}`" if peer else ""), "",
           "| method | tokens/s | vs HF generate [95% CI] | vs greedy_kv [95% CI] | vs greedy_kv, each run | "
           "vs fastest peer [95% CI] | τ | efficiency vs greedy_kv | acceptance by depth | identical | tree | "
           "chosen on validation |",
           "|:--|--:|:--|:--|:--|:--|--:|--:|:--|--:|:--|:--|"]
    for r in rows:
        kv = (f"{r['speedup_vs_greedy_kv']:.2f} [{r['speedup_vs_greedy_kv_lo']:.2f}, {r['speedup_vs_greedy_kv_hi']:.2f}]"
              if "speedup_vs_greedy_kv" in r else "")
        each = " / ".join(f"{g[0]:.2f}" for g in r.get("runs_gain_vs_greedy_kv") or [])
        acc = ", ".join(f"{a:.2f}" for a in r.get("per_head_acceptance") or [])
        sel = {True: "yes", False: ""}.get(r.get("selected"), "")
        if r.get("validation_speedup") and r.get("selected"):
            sel = f"yes ({r['validation_speedup']:.2f}x on validation)"
        out.append(f"| {r['method']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_hf_greedy']:.2f} [{r['speedup_lo']:.2f}, "
                   f"{r['speedup_hi']:.2f}] | {kv} | {each} | {vs_peer[r['method']].fmt(2) if r['method'] in vs_peer else ''} | "
                   f"{r['mean_accepted_length']:.2f} | "
                   f"{r.get('efficiency_vs_greedy_kv', float('nan')):.2f} | {acc} | "
                   f"{r['identical_to_greedy']:.0%} ({r.get('identical_tokens', 1):.1%} tokens) | {r.get('tree') or ''} "
                   f"| {sel} |")
    return "\n".join(out)


def targets(res: Path) -> str:
    t = json.loads((res / "speed_targets.json").read_text())
    out = [f"Fastest lossless head method, chosen on validation prompts: **{t['method']}**", "",
           "| target | reached [95% CI] | status |", "|:--|:--|:--|"]
    for k, label in (("hf", "x HF generate"), ("greedy_kv", "x greedy_kv"), ("efficiency", "efficiency (gain / τ)")):
        r = t[k]
        out.append(f"| ≥ {r['target']} {label} | {ci(r)} | {r['status']} |")
    return "\n".join(out)


def times(run: Path) -> str:
    t = pd.read_csv(run / "notebook_times.csv")
    total = t.seconds.sum()
    return (" · ".join(f"{r.notebook.split('.')[0]} {int(r.seconds // 60)}m{int(r.seconds % 60):02d}s"
                       for r in t.itertuples()) + f" · **total {int(total // 60)} min {int(total % 60)} s**")


def batch(res: Path) -> str:
    f = res / "batch_benchmark.json"
    if not f.exists():
        return "(no batch benchmark: `make bench-batch`)"
    b = json.loads(f.read_text())
    out = [f"{b['variant']}, {b['dtype']}, {b['prompts']} test prompts x up to {b['new_tokens']} new tokens, "
           f"{b['rounds']} rounds; ratios [min, max] over rounds", "",
           "| batch | tree (validation) | HF generate | engine, no drafts | speculation row by row | batched speculation | "
           "batched / HF | batched / row by row | batched = row by row |", "|--:|:--|--:|--:|--:|--:|:--|:--|:--|"]
    for r in b["rows"]:
        out.append(f"| {r['batch']} | {r['tree']} | {r['hf_generate_tokens_per_s']} | "
                   f"{r['engine_no_drafts_tokens_per_s']} | {r['spec_rows_tokens_per_s']} | "
                   f"{r['spec_batched_tokens_per_s']} | {r['batched_vs_hf']} | {r['batched_vs_rows']} | "
                   f"{r['batched_identical_to_rows']} |")
    return "\n".join(out)


def provenance(fig: Path) -> str:
    """Which runs made the published files: stage, run id, commit, when (figures/<profile>/manifest.json)."""
    man = json.loads((fig / "manifest.json").read_text())
    runs = {}
    for name, e in man.items():
        if e.get("run_id"):
            runs.setdefault((e["stage"], e["run_id"], e["commit"], e.get("dirty"), e["finished"]), []).append(name)
    out = ["| stage | run | commit | finished |", "|---|---|---|---|"]
    for (stage, rid, com, dirty, fin) in sorted(runs):
        out.append(f"| {stage} | `{rid}` | `{com}`{' (dirty)' if dirty else ''} | {fin} |")
    others = {}                                          # (command, the runs of the models it measured) -> files
    for name, e in man.items():
        if not e.get("run_id") and e.get("stage") not in (None, "make all"):
            used = ", ".join(f"{s[:2]} `{r}`" for s, r in sorted((e.get("models") or {}).items()))
            others.setdefault((e["stage"], used or "?"), []).append(name)
    for (command, used), names in sorted(others.items()):
        out.append(f"\nAlso published, made by `{command}` on the models of runs {used}: {', '.join(sorted(names))}.")
    return "\n".join(out)


def scaling(fig: Path) -> str:
    """The drafters trained on the first N tokens of each text, scored on the validation continuations
    (``drafter_scaling.csv``): where each family's curve flattens, and which text helps."""
    df = pd.read_csv(fig / "drafter_scaling.csv")
    heads = [c for c in df if c.endswith("_top1")]
    out = ["| drafter | training text | tokens | first draft accepted | chain τ | top-1 by head |",
           "|:--|:--|--:|--:|--:|:--|"]
    for r in df.sort_values(["variant", "text", "train_tokens"]).itertuples():
        top1 = " / ".join(f"{getattr(r, h):.3f}" for h in heads if pd.notna(getattr(r, h)))
        out.append(f"| {r.variant} | {r.text} | {r.train_tokens:,} | {r.first_token:.3f} | {r.tau:.2f} | {top1} |")
    return "\n".join(out)


def ablations(fig: Path) -> str:
    df = pd.read_csv(fig / "ablations.csv")
    cols = [c for c in ("group", "n", "lr", "head_type", "weighting", "val_ppl", "mean_head_acc") if c in df]
    return df[cols].round({"val_ppl": 3, "mean_head_acc": 3}).to_markdown(index=False)


def step_costs(bench: Path) -> str:
    """One decoding step of the pretrained model for 1..16 new tokens, from the newest `make bench-steps` file with
    the fast step: transformers' forward, the engine's fast step, its compiled step (where the file has it) and the
    memory limit."""
    files = {f: json.loads(f.read_text()) for f in bench.glob("step_costs_*.json")}
    files = {f: d for f, d in files.items() if "fast_ms" in d["steps"][0]}
    if not files:
        raise FileNotFoundError("no step_costs_*.json with the fast step: run `make bench-steps`")
    f, d = max(files.items(), key=lambda fd: fd[1].get("run", {}).get("finished", ""))
    out = []
    for dt in dict.fromkeys(r["dtype"] for r in d["steps"]):
        rows = [r for r in d["steps"] if r["dtype"] == dt]
        out += [f"| {dt}, new tokens | " + " | ".join(str(r["tokens"]) for r in rows) + " |",
                "|:--|" + "--:|" * len(rows),
                "| transformers' forward (ms) | " + " | ".join(f"{r['hf_ms']:.1f}" for r in rows) + " |",
                "| engine, fast step (ms) | " + " | ".join(f"{r['fast_ms']:.1f}" for r in rows) + " |",
                "| fast step / one-token step | " + " | ".join(f"{r['fast_vs_1_token']:.2f}" for r in rows) + " |"]
        if "compiled_ms" in rows[0]:
            out += ["| engine, compiled step (ms) | " + " | ".join(f"{r['compiled_ms']:.1f}" for r in rows) + " |",
                    "| compiled step / one-token step | "
                    + " | ".join(f"{r['compiled_vs_1_token']:.2f}" for r in rows) + " |"]
        out += [f"| memory limit (ms) | {rows[0]['memory_limit_ms']:.1f} |" + " |" * (len(rows) - 1), ""]
    run = d.get("run", {})
    out.append(f"{d['model']}, {d['context']}-token cache, {d['torch_threads']} threads, {d['cpu_capability']} CPU, "
               f"{run.get('finished', '?')[:10]}:\n`figures/bench/{f.name}`.")
    return "\n".join(out)


def block(profile: str) -> str:
    fig = ROOT / ("runs/smoke/figures" if profile == "smoke" else f"figures/{profile}")
    parts = [("Which runs made these files", lambda: provenance(fig)),
             ("Stage times (`stage_times.md`)", lambda: (fig / "stage_times.md").read_text().strip()),
             ("Quality (`quality.json`)", lambda: quality(fig)),
             ("Decoding (`decoding_benchmark.json`)", lambda: decoding(fig, "decoding_benchmark.json")),
             ("Decoding in bf16 (`decoding_benchmark_bfloat16.json`)",
              lambda: decoding(fig, "decoding_benchmark_bfloat16.json")),
             ("MTP under controls (`mtp_controls_quality.json`)", lambda: controls_table(fig)),
             ("Drafters against training tokens (`drafter_scaling.csv`)", lambda: scaling(fig)),
             ("Speed targets (`speed_targets.json`)", lambda: targets(fig)),
             ("The thesis table (`thesis_table.md`)", lambda: (fig / "thesis_table.md").read_text().strip()),
             ("The claims ledger (`thesis_claims.md`)", lambda: (fig / "thesis_claims.md").read_text().strip()),
             ("Other systems' claims (`other_claims.md`)", lambda: (fig / "other_claims.md").read_text().strip()),
             ("Ablations (`ablations.csv`)", lambda: ablations(fig))]
    out = []
    for title, fn in parts:
        try:
            body = fn()
        except FileNotFoundError:
            continue                       # not made by this run (e.g. bf16 on a CPU without native bf16)
        out.append(f"#### {title}\n\n{body}\n")
    return "\n".join(out)


def replace_block(path: Path, tag: str, body: str, required: bool = True) -> None:
    text, start, end = path.read_text(), f"<!-- {tag} -->", f"<!-- /{tag} -->"
    if start not in text or end not in text:
        if required:
            sys.exit(f"{path.relative_to(ROOT)} has no block {start} ... {end}")
        return
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + (body.rstrip() + "\n" if body.strip() else "") + end + rest.split(end, 1)[1])


def write(profile: str) -> None:
    replace_block(ROOT / "docs" / "RESULTS.md", f"results:{profile}", block(profile))
    fig = ROOT / "figures" / profile
    replace_block(ROOT / "README.md", f"answer:{profile}", verdict_table(fig), required=False)
    controls = ("MTP under controls (`mtp_controls_quality.json`), each run on the test problems; notebook 04 measures "
                "as `mtp` the run\nwith the lowest validation perplexity among those whose heads train:\n\n"
                + controls_table(fig)) if (fig / "mtp_controls_quality.json").exists() else ""
    replace_block(ROOT / "README.md", f"controls:{profile}", controls, required=False)
    replace_block(ROOT / "README.md", "steps", step_costs(ROOT / "figures" / "bench"), required=False)


if __name__ == "__main__":
    args = sys.argv[1:]
    name = next((a for a in args if not a.startswith("--")), "pretrained")
    if "--write" in args:
        write(name)
    else:
        print(block(name))
