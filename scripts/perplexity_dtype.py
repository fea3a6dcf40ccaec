"""Perplexity of the pretrained profile's NTP and MTP models in fp32 and bf16 on the first test problems, each by
``token_nll`` (only the scored positions unembedded) and by the full logits: the size of the dtype's effect on the
quality table (notebook 04 computes perplexity in ``quality_dtype``); writes results/perplexity_dtype.json
(published to figures/<profile>/ by the next `make all`).

    .venv/bin/python scripts/perplexity_dtype.py [--batches 6]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from multitoken import evaluation as E
from multitoken import pipeline as PL

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def full_logits_ppl(model, batches) -> float:
    nll = ntok = 0.0
    for b in batches:
        lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        tg = b["labels"][:, 1:]
        nll += float(F.cross_entropy(lg.transpose(1, 2), tg, ignore_index=-100, reduction="sum"))
        ntok += int((tg != -100).sum())
    return math.exp(nll / ntok)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=6)
    a = ap.parse_args()
    cfg = PL.profile_config("pretrained")
    prep = PL.loaders(cfg)[3]
    ev = PL.eval_set(cfg, prep["tokenizer"], prep)
    batches = [b for _, b in zip(range(a.batches), ev["loader"])]
    out = {"problems": sum(len(b["input_ids"]) for b in batches), "split": ev["split"], "models": {}}
    for v in ("ntp", "mtp"):
        for dt in ("float32", "bfloat16"):
            m = PL.load_variant(cfg, v, dt)
            nll, ntok = E.token_nll(m, batches)
            out["models"].setdefault(v, {})[dt] = {"token_nll": math.exp(sum(nll) / sum(ntok)),
                                                   "full_logits": full_logits_ppl(m, batches)}
        d = out["models"][v]
        d["bf16_over_fp32"] = d["bfloat16"]["token_nll"] / d["float32"]["token_nll"]
    PL.write_result(cfg, "perplexity_dtype.json", out, "scripts/perplexity_dtype.py")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
