"""Greedy decoding without drafts, every way the workbook knows, on a profile's NTP model: HF ``generate`` (eager),
transformers' static-cache + ``torch.compile`` recipe, and this engine's eager and fast steps, interleaved on the
same test prompts (the baseline of every speculation verdict, and the engine-greedy targets of the fast step).

    .venv/bin/python scripts/greedy_peers.py pretrained [PROMPTS] [NEW_TOKENS] [DTYPE]

Compilation happens in the warm-up, timed apart (``warmup_s``). Needs the profile's stages 00-01; writes
runs/<profile>/results/greedy_peers[_<dtype>].json (profile, commit, time, machine)."""
from __future__ import annotations

import sys
import time

import torch

from multitoken import evaluation as E
from multitoken import pipeline as PL
from multitoken import stages
from multitoken.decoding import speculative_generate


def main(profile="pretrained", n_prompts=8, new_tokens=64, dtype=None):
    cfg = PL.profile_config(profile)
    stages.require(profile, cfg, ("00_data", "01_train_ntp"))
    tr, va, tok, prep = PL.loaders(cfg)
    ntp = PL.load_variant(cfg, "ntp", dtype=dtype)
    prompts = E.fit_prompts(PL.eval_set(cfg, tok, prep)["prompts"], PL.context_size(cfg), new_tokens,
                            "greedy peers")[0][:n_prompts + 1]
    M = E.Method
    eager = M.loop("engine_eager", lambda m, ids, n: speculative_generate(m, ids, n, tree="none", fast=False), ntp,
                   "hf_greedy")
    meths = [M.hf("hf_greedy", ntp), M.hf_compiled("hf_compiled", ntp, "hf_greedy"), eager,
             M.engine("greedy_kv", ntp, "none", baseline="hf_greedy")]
    rows, _ = E.benchmark_decoding(meths, prompts[1:], new_tokens, warmup=1, desc="greedy peers")
    name = "greedy_peers" + (f"_{dtype}" if dtype else "") + ".json"
    dt = str(next(ntp.parameters()).dtype).replace("torch.", "")
    out = PL.write_result(cfg, name, dict(profile=profile, **stages.commit(PL.repo_root()),
                                          time=time.strftime("%Y-%m-%d %H:%M:%S"),
                                          cpu=torch.backends.cpu.get_cpu_capability(), dtype=dt,
                                          threads=torch.get_num_threads(), prompts=len(prompts) - 1,
                                          new_tokens=new_tokens, rows=rows), "scripts/greedy_peers.py")
    for r in rows:
        print(f"{r['method']:12s} {r['tokens_per_s']:7.1f} tok/s  x HF {r['speedup_vs_hf_greedy']:.2f} "
              f"[{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}]  warm-up {r['warmup_s']:.1f} s  "
              f"identical {r['identical_to_greedy']:.2f}")
    print(f"written: {out}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0] if a else "pretrained", *(int(x) for x in a[1:3]), *(a[3:4] or [None]))
