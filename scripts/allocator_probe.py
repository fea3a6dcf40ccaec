"""The memory allocator's share of a CPU run: the same workloads in child processes with glibc's defaults and with the
Makefile's settings (freed buffers kept for reuse, huge pages), in the order A B B A; writes
figures/bench/allocator.json.

Why: glibc serves every buffer over 32 MB (a vocabulary-sized logits tensor is 160 MB) with its own mmap and hands it
back with munmap when freed, so the next one is page-faulted in again; in this VM a few fine-tuning steps fault about
20 GB that way, and the kernel's time (sys) rivals the compute's (user).

    .venv/bin/python scripts/allocator_probe.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNED = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736",
         "THP_MEM_ALLOC_ENABLE": "1"}

CHILD = r'''
import json, resource, sys, time, torch
import transformers
transformers.logging.set_verbosity_error()
from multitoken import evaluation as E, ledger as L, pipeline as PL, thesis as TH
cfg = PL.profile_config("pretrained")
tr, va, tok, prep = PL.loaders(cfg)
out = {}

def clock(name, fn, tokens):
    fn()                                                     # warm-up
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    out[name] = {"tokens_per_s": tokens / dt, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                 "minor_faults": r1.ru_minflt - r0.ru_minflt}

def train_steps(model, batches):
    def fn():
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**b).loss
            loss.backward()
    return fn

ttr, _ = L.thesis_loaders(cfg, tok)
it = iter(ttr); tb = [next(it) for _ in range(3)]
model = TH.from_lm(cfg["model_name"], cfg["thesis_mtp_n"]).train()
clock("thesis_mtp_train_step", train_steps(model, tb), sum(b["input_ids"].numel() for b in tb))
del model
it = iter(tr); wb = [next(it) for _ in range(3)]
ntp = PL.load_variant(cfg, "ntp")
clock("ntp_train_step", train_steps(ntp.train(), wb), sum(int(b["attention_mask"].sum()) for b in wb))
ntp.eval().zero_grad(set_to_none=True)
ev = PL.eval_set(cfg, tok, prep)
eb = [b for _, b in zip(range(4), ev["loader"])]
with torch.no_grad():
    bf = PL.load_variant(cfg, "ntp", "bfloat16")
clock("token_nll_bf16", lambda: E.token_nll(bf, eb), sum(int(b["attention_mask"].sum()) for b in eb))
gen = E.Method.hf("hf_generate", ntp)
clock("hf_generate_fp32_batch1", lambda: gen(ev["prompts"][0].view(1, -1), 32), 32)
print(json.dumps(out))
'''


def child(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TUNED} | env_extra | {"PYTHONPATH": str(ROOT / "lib")}
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    runs = {"default": [], "tuned": []}
    for arm in ("default", "tuned", "tuned", "default"):
        runs[arm].append(child(TUNED if arm == "tuned" else {}))
        print(arm, runs[arm][-1], flush=True)
    summary = {}
    for w in runs["default"][0]:
        d = [r[w]["tokens_per_s"] for r in runs["default"]]
        t = [r[w]["tokens_per_s"] for r in runs["tuned"]]
        summary[w] = {"default_tokens_per_s": d, "tuned_tokens_per_s": t,
                      "ratio_each_pair": [b / a for a, b in zip(d, t)],
                      "sys_s": {k: [r[w]["sys_s"] for r in runs[k]] for k in runs},
                      "minor_faults": {k: [r[w]["minor_faults"] for r in runs[k]] for k in runs}}
    res = {"settings": TUNED, "order": "default tuned tuned default, one child process each", "workloads": summary}
    path = ROOT / "figures" / "bench" / "allocator.json"     # a fact of the machine, not of one run's models
    path.write_text(json.dumps(res, indent=1))
    from multitoken import stages

    stages.record_output(path, "scripts/allocator_probe.py", ROOT)
    print(json.dumps({w: [round(x, 2) for x in s["ratio_each_pair"]] for w, s in summary.items()}))


if __name__ == "__main__":
    main()
