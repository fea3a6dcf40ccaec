"""The decoding engine at two commits, timed in turns on one profile's trained models: is a change to the engine
faster or slower, method by method?

    .venv/bin/python scripts/engine_ab.py PROFILE REV_A [REV_B] [--rounds 2] [--prompts 8] [--new-tokens 64]

REV_B defaults to the working tree. Each revision (its ``lib/``, settings and data; ``runs/`` shared) is checked out
in a scratch worktree; rounds alternate A, B, A, B (each a fresh process timing every method on the same validation
prompts, interleaved in a random order per prompt, through the engine's entry point alone, which every revision
has), so drift of the machine's speed hits both alike. Reported per method: tokens/s of each round, the ratio B/A of the mean, and the spread between the two
rounds of the same revision (a ratio inside it is no difference).
Needs the profile's stages 00-03; writes runs/<profile>/results/engine_ab.json (naming both commits)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(profile: str, n_prompts: int, new_tokens: int, out: str) -> None:
    """Time the methods with whichever ``multitoken`` is importable (the revision under test)."""
    import torch

    from multitoken import evaluation as E
    from multitoken import pipeline as PL
    from multitoken.decoding import speculative_generate

    cfg = PL.profile_config(profile)
    tr, va, tok, prep = PL.loaders(cfg)
    ntp, med, mtp = (PL.load_variant(cfg, v) for v in ("ntp", "medusa", "mtp"))
    prompts = PL.validation_prompts(cfg, tok, prep)
    prompts = E.fit_prompts(prompts, PL.context_size(cfg), new_tokens, "engine a/b")[0][:n_prompts]
    m = new_tokens
    meths = {"greedy_kv": (ntp, "none", "heads"), "prompt_lookup": (ntp, "none", "prompt_lookup"),
             "mtp_chain": (mtp, "chain", "heads"), "medusa_chain": (med, "chain", "heads"),
             "medusa_tree16": (med, "medusa:16", "heads"), "medusa_chain+lookup": (med, "chain", "hybrid")}
    # the revisions' own benchmark harnesses differ: this loop uses only what both have (the engine's entry point),
    # interleaved in a fresh order per prompt after one warm-up each
    import random

    for model, tree, drafter in meths.values():
        speculative_generate(model, prompts[0].view(1, -1), m, tree=tree, drafter=drafter)
    tot = {k: [0, 0.0, 0] for k in meths}                                  # tokens, seconds, forwards
    for i, p in enumerate(prompts):
        for name in random.Random(i).sample(list(meths), len(meths)):
            model, tree, drafter = meths[name]
            t0 = time.perf_counter()
            _, st = speculative_generate(model, p.view(1, -1), m, tree=tree, drafter=drafter)
            tot[name][1] += time.perf_counter() - t0
            tot[name][0] += st["new_tokens"]
            tot[name][2] += st["forward_passes"]
    res = {k: dict(tokens_per_s=n / s, tau=n / f) for k, (n, s, f) in tot.items()}
    batch = [p for p in prompts[:4]]                                         # a left-padded batch of four
    W = max(len(p) for p in batch)
    ids = torch.full((len(batch), W), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(batch):
        ids[b, W - len(p):], mask[b, W - len(p):] = p, 1
    speculative_generate(med, ids, m, tree="medusa:16", attention_mask=mask)  # warm-up
    t0, n = time.perf_counter(), 0
    for _ in range(2):
        _, st = speculative_generate(med, ids, m, tree="medusa:16", attention_mask=mask)
        n += st["new_tokens"]
    res["medusa_tree16_batch4"] = dict(tokens_per_s=n / (time.perf_counter() - t0), tau=st["mean_accepted_length"])
    Path(out).write_text(json.dumps(res))


def worktree(rev: str, tmp: Path) -> Path:
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    wt = tmp / sha[:10]
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(wt), sha], cwd=ROOT, check=True,
                   capture_output=True)
    (wt / "runs").symlink_to(ROOT / "runs")            # the trained models; its own settings files and data
    return wt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("rev_a")
    ap.add_argument("rev_b", nargs="?", default=None, help="default: the working tree")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.profile, a.prompts, a.new_tokens, a.child)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        libs = {"a": worktree(a.rev_a, tmp) / "lib",
                "b": worktree(a.rev_b, tmp) / "lib" if a.rev_b else ROOT / "lib"}
        runs = {"a": [], "b": []}
        try:
            for r in range(a.rounds):
                for side in ("a", "b"):
                    out = tmp / f"{side}{r}.json"
                    env = dict(os.environ, PYTHONPATH=str(libs[side]))
                    subprocess.run([sys.executable, __file__, a.profile, a.rev_a, "--prompts", str(a.prompts),
                                    "--new-tokens", str(a.new_tokens), "--child", str(out)], cwd=libs[side].parent,
                                   env=env, check=True)           # each revision reads its own profile settings
                    runs[side].append(json.loads(out.read_text()))
        finally:
            subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
            for side in ("a", "b"):
                if libs[side].parent.parent == tmp:
                    subprocess.run(["git", "worktree", "remove", "--force", str(libs[side].parent)], cwd=ROOT,
                                   capture_output=True)
    sys.path.insert(0, str(ROOT / "lib"))
    from multitoken import stages
    from multitoken.utils import write_json

    rows = []
    for meth in runs["a"][0]:
        ta, tb = ([x[meth]["tokens_per_s"] for x in runs[s]] for s in ("a", "b"))
        spread = max(max(t) / min(t) - 1 for t in (ta, tb)) if a.rounds > 1 else None
        rows.append(dict(method=meth, a=ta, b=tb, ratio=(sum(tb) / len(tb)) / (sum(ta) / len(ta)),
                         within_revision_spread=spread, tau_a=runs["a"][0][meth]["tau"],
                         tau_b=runs["b"][0][meth]["tau"]))
        print(f"{meth:22s} A {' '.join(f'{t:6.1f}' for t in ta)}  B {' '.join(f'{t:6.1f}' for t in tb)} tok/s  "
              f"B/A {rows[-1]['ratio']:.3f}  (spread {spread if spread is None else f'{spread:.1%}'})  "
              f"tau {rows[-1]['tau_a']:.2f} -> {rows[-1]['tau_b']:.2f}")
    head = stages.commit(ROOT)
    path = ROOT / "runs" / a.profile / "results" / "engine_ab.json"
    write_json(path, dict(profile=a.profile, rev_a=a.rev_a, rev_b=a.rev_b or f"working tree at {head['commit']}",
                          dirty=head.get("dirty"), time=time.strftime("%Y-%m-%d %H:%M:%S"), prompts=a.prompts,
                          new_tokens=a.new_tokens, rounds=a.rounds, rows=rows))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
