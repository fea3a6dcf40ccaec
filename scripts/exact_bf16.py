"""Exact bf16 speculation on a profile's trained models: does every drafter return, token for token, what the
engine's bf16 greedy decoding returns, with the engine's invariant arithmetic (``exact=True``, the bf16 default on a
CPU) and without it? And how many tokens equal HF's bf16 ``generate``?

    .venv/bin/python scripts/exact_bf16.py pretrained [PROMPTS] [NEW_TOKENS]

Test prompts, batch 1, the profile's NTP and MEDUSA-1 models cast to bf16. Without native bf16 (AVX-512 BF16 / AMX)
PyTorch emulates it: slow, but the arithmetic is what is checked here, not the speed. Writes
runs/<profile>/results/exact_bf16.json (profile, commit, time, machine)."""
from __future__ import annotations

import sys
import time

import torch

from multitoken import evaluation as E
from multitoken import pipeline as PL
from multitoken import stages
from multitoken.core import fastpath
from multitoken.decoding import speculative_generate


def _same_tokens(a, b) -> float:
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


@torch.inference_mode()
def main(profile="pretrained", n_prompts=8, new_tokens=64):
    cfg = PL.profile_config(profile)
    stages.require(profile, cfg, ("00_data", "01_train_ntp", "03_train_medusa"))
    tr, va, tok, prep = PL.loaders(cfg)
    ntp, med = (PL.load_variant(cfg, v, dtype="bfloat16") for v in ("ntp", "medusa"))
    prompts = E.fit_prompts(PL.eval_set(cfg, tok, prep)["prompts"], PL.context_size(cfg), new_tokens,
                            "exact bf16")[0][:n_prompts]
    methods = {"medusa_chain": (med, "chain", "heads"), "medusa_tree16": (med, "medusa:16", "heads"),
               "prompt_lookup": (ntp, "none", "prompt_lookup"), "medusa_chain+lookup": (med, "chain", "hybrid")}
    rows, hf_rate = [], None
    for exact in (True, False):
        same = {k: [] for k in methods}
        same_hf, tau = [], {k: [] for k in methods}
        for p in prompts:
            ids = p.view(1, -1)
            kw = dict(exact=exact, step_tokens=17 if exact else None)      # one shape: 16-node trees and greedy
            greedy = speculative_generate(ntp, ids, new_tokens, tree="none", **kw)[0][0, ids.shape[1]:]
            if exact:
                hf = ntp.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=ntp.generation_config.pad_token_id)[0, ids.shape[1]:]
                same_hf.append(_same_tokens(greedy.tolist(), hf.tolist()))
            for name, (model, tree, drafter) in methods.items():
                out, st = speculative_generate(model, ids, new_tokens, tree=tree, drafter=drafter, **kw)
                same[name].append(torch.equal(out[0, ids.shape[1]:], greedy))
                tau[name].append(st["mean_accepted_length"])
        for name in methods:
            rows.append(dict(method=name, exact=exact, identical_to_engine_greedy=sum(same[name]) / len(prompts),
                             tau=round(sum(tau[name]) / len(prompts), 3)))
            print(rows[-1])
        if exact:
            print(f"engine bf16 greedy vs HF bf16 generate: {sum(same_hf) / len(same_hf):.3f} of tokens identical")
            hf_rate = sum(same_hf) / len(same_hf)
    out = PL.write_result(cfg, "exact_bf16.json", dict(profile=profile, **stages.commit(PL.repo_root()), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                         cpu=torch.backends.cpu.get_cpu_capability(), cpu_bf16_native=fastpath.cpu_bf16_fast(),
                         prompts=len(prompts), new_tokens=new_tokens, rows=rows,
                         engine_greedy_vs_hf_bf16_identical_tokens=round(hf_rate, 4)), "scripts/exact_bf16.py")
    print(f"written: {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pretrained", *map(int, sys.argv[2:]))
