"""Drafters side by side on a profile's trained models: the heads, prompt lookup and their hybrid, each configured on
validation prompts and then measured on test prompts beside HF generate and HF's prompt lookup.

    .venv/bin/python scripts/drafter_tau.py pretrained [VAL_PROMPTS] [TEST_PROMPTS] [NEW_TOKENS]

Validation chooses, by speed against this engine without drafts: the MEDUSA-1 tree (fitted to the heads' validation
top-k accuracy, 4 / 8 / 16 nodes, or the chain), the lookup's length (4 or 8 tokens) and the hybrid's node budget
(the chosen tree's nodes, 8, 12 or unlimited, beside the chosen lookup). The test prompts only measure: tokens per
verification step (τ) and speed, with 95% intervals over prompts, one interleaved run each. Needs the profile's
stages 00-03 (``make all``); writes runs/<profile>/results/drafter_tau.json (profile, commit, time, machine)."""
from __future__ import annotations

import sys
import time

import torch

from multitoken import evaluation as E
from multitoken import pipeline as PL
from multitoken import stages
from multitoken.decoding.trees import chain, fitted_tree


def _best(rows, prefix):
    """The fastest method named ``prefix...`` against the engine without drafts."""
    cands = [r for r in rows if r["method"].startswith(prefix)]
    return max(cands, key=lambda r: r["speedup_vs_greedy_kv"])["method"]


def main(profile="pretrained", n_val=12, n_test=32, new_tokens=96):
    cfg = PL.profile_config(profile)
    stages.require(profile, cfg, ("00_data", "01_train_ntp", "03_train_medusa"))
    tr, va, tok, prep = PL.loaders(cfg)
    ntp, med = PL.load_variant(cfg, "ntp"), PL.load_variant(cfg, "medusa")
    fit = lambda ps, what: E.fit_prompts(ps, PL.context_size(cfg), new_tokens, what)[0]  # noqa: E731
    val = fit(PL.validation_prompts(cfg, tok, prep), "drafters (validation)")[:n_val]
    test = fit(PL.eval_set(cfg, tok, prep)["prompts"], "drafters (test)")[:n_test]
    acc = PL.head_topk_accuracy(med, va)
    m = new_tokens
    trees = {f"fitted{b}": fitted_tree(acc, b) for b in (4, 8, 16)} | {"chain": chain(med.num_heads)}

    # validation: the tree, the lookup's length, then the hybrid's budget
    M = E.Method
    greedy = M.engine("greedy_kv", ntp, "none")
    meths = [greedy] + [M.engine(f"lookup:{k}", ntp, "none", f"prompt_lookup:{k}", "greedy_kv") for k in (4, 8)]
    meths += [M.engine(f"heads:{n}", med, t, baseline="greedy_kv") for n, t in trees.items()]
    rows, _ = E.benchmark_decoding(meths, val, m, warmup=1, desc="drafters (validation: tree, lookup)")
    tree_name, lookup = _best(rows, "heads:").split(":")[1], _best(rows, "lookup:")
    tree, k = trees[tree_name], int(lookup.split(":")[1])
    budgets = sorted({len(tree) + k, 8, 12} - {0})
    hyb = [greedy] + [M.engine(f"hybrid@{b}", med, tree, f"hybrid:{k}:{b}", "greedy_kv") for b in budgets]
    hrows, _ = E.benchmark_decoding(hyb, val, m, warmup=1, desc="drafters (validation: hybrid budget)")
    budget = int(_best(hrows, "hybrid@").split("@")[1])
    chosen = dict(tree=tree.name, lookup_tokens=k, hybrid_budget=budget)
    print("validation chose", chosen)

    # test: measure only
    tests = [M.hf("hf_greedy", ntp), M.hf("hf_prompt_lookup", ntp, "hf_greedy", prompt_lookup_num_tokens=10),
             M.engine("greedy_kv", ntp, "none", baseline="hf_greedy"),
             M.engine(f"prompt_lookup:{k}", ntp, "none", f"prompt_lookup:{k}", "hf_greedy"),
             M.engine(f"medusa_{tree.name}", med, tree, baseline="hf_greedy"),
             M.engine(f"medusa_{tree.name}+lookup{k}@{budget}", med, tree, f"hybrid:{k}:{budget}", "hf_greedy")]
    trows, _ = E.benchmark_decoding(tests, test, m, warmup=1, desc="drafters (test)")
    out = dict(profile=profile, **stages.commit(), time=time.strftime("%Y-%m-%d %H:%M:%S"),
               machine=dict(cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
                            dtype=str(next(ntp.parameters()).dtype)),
               new_tokens=m, validation_prompts=len(val), test_prompts=len(test), chosen=chosen,
               head_topk_accuracy=acc, validation=rows + hrows, test=trows)
    path = PL.write_result(cfg, "drafter_tau.json", out, "scripts/drafter_tau.py")
    for r in trows:
        print(f"{r['method']:32s} tau {r['mean_accepted_length']:.2f}  vs HF {r['speedup_vs_hf_greedy']:.2f} "
              f"[{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}]  vs greedy_kv {r.get('speedup_vs_greedy_kv', 0):.2f} "
              f"identical {r['identical_to_greedy']:.2f}")
    print(f"written: {path}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0] if a else "pretrained", *(int(x) for x in a[1:4]))
