"""Drafters side by side on a profile's trained models, on its validation prompts: tokens per verification step (τ)
and speed for the heads, prompt lookup and their hybrid, beside HF generate and HF's prompt lookup, in one
interleaved run with 95% intervals over prompts.

    .venv/bin/python scripts/drafter_tau.py pretrained [PROMPTS] [NEW_TOKENS]

Needs the profile's stages 00-03 (``make all``); writes runs/<profile>/results/drafter_tau.json (it names its run:
profile, commit, time, machine)."""
from __future__ import annotations

import json
import sys
import time

import torch

from multitoken import evaluation as E
from multitoken import pipeline as PL
from multitoken import stages
from multitoken.decoding.trees import fitted_tree
from multitoken.utils import write_json


def main(profile="pretrained", n_prompts=16, new_tokens=96):
    cfg = PL.profile_config(profile)
    for up in ("00_data", "01_train_ntp", "03_train_medusa"):
        why = stages.stale_reason(up, profile, cfg)
        if why:
            raise SystemExit(f"{up} of {profile} is not up to date ({why}): run make all PROFILE={profile}")
    tr, va, tok, prep = PL.loaders(cfg)
    ntp, med = PL.load_variant(cfg, "ntp"), PL.load_variant(cfg, "medusa")
    prompts = PL.validation_prompts(cfg, tok, prep)
    prompts = E.fit_prompts(prompts, PL.context_size(cfg), new_tokens, "drafter tau")[0][:n_prompts]
    acc = PL.head_topk_accuracy(med, va)
    tree = fitted_tree(acc, 8)
    m = new_tokens
    meths = {"hf_greedy": (E.hf_method(ntp, m), "hf_greedy"),
             "hf_prompt_lookup": (E.hf_method(ntp, m, prompt_lookup_num_tokens=10), "hf_greedy"),
             "greedy_kv": (E.engine_method(ntp, m, "none"), "hf_greedy")}
    for k in (4, 8):
        meths[f"prompt_lookup:{k}"] = (E.engine_method(ntp, m, "none", drafter=f"prompt_lookup:{k}"), "hf_greedy")
    meths["medusa_chain"] = (E.engine_method(med, m, "chain"), "hf_greedy")
    meths["medusa_tree"] = (E.engine_method(med, m, tree), "hf_greedy")
    meths["medusa_chain+lookup"] = (E.engine_method(med, m, "chain", drafter="hybrid"), "hf_greedy")
    meths["medusa_tree+lookup"] = (E.engine_method(med, m, tree, drafter="hybrid"), "hf_greedy")
    rows, _ = E.benchmark_decoding(meths, prompts, {}, warmup=1, desc="drafters (validation)")
    out = dict(profile=profile, **stages.commit(), time=time.strftime("%Y-%m-%d %H:%M:%S"),
               machine=dict(cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
                            dtype=str(next(ntp.parameters()).dtype)),
               prompts=len(prompts), new_tokens=m, split="validation", tree=tree.name, head_topk_accuracy=acc,
               rows=rows)
    path = PL.paths(cfg)["results"] / "drafter_tau.json"
    write_json(path, out)
    for r in rows:
        print(f"{r['method']:22s} tau {r['mean_accepted_length']:.2f}  vs HF {r['speedup_vs_hf_greedy']:.2f} "
              f"[{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}]  vs greedy_kv {r.get('speedup_vs_greedy_kv', 0):.2f} "
              f"identical {r['identical_to_greedy']:.2f}")
    print(f"written: {path}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0] if a else "pretrained", *(int(x) for x in a[1:3]))
