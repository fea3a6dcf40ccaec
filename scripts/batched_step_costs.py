"""What one speculation step of MEDUSA-1 on the `pretrained` profile costs at batch 1 / 4 / 16, fp32 and bf16: a cached
forward of 1, 2 and 5 tokens per row (the verification of 0, 1 and 4 drafts) on a 200-token cache, and the four heads'
drafting (their residual blocks and unembeddings, top-4) for the batch's rows; best of 5, ms.
The measurement behind the README's batch section. Needs the trained models (`make all PROFILE=pretrained`).
Usage: PYTHONPATH=lib .venv/bin/python scripts/batched_step_costs.py  ->  runs/pretrained/results/batched_step_costs.json
(published to figures/pretrained/ by the next `make all`)
"""
import time

import torch

from multitoken import pipeline


def best(f, n=5):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return round(min(ts) * 1000, 1)


def main():
    cfg = pipeline.profile_config("pretrained")
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    rows = []
    for dt in ("float32", "bfloat16"):
        m = pipeline.load_variant(cfg, "medusa", dtype=dt)
        for B in (1, 4, 16):
            cache = m.spec_new_cache()
            m.spec_forward(torch.randint(0, 1000, (B, 200), generator=g), cache)
            row = dict(dtype=dt, batch=B)
            for T in (1, 2, 5):
                x, pos = torch.randint(0, 1000, (B, T), generator=g), torch.arange(200, 200 + T).expand(B, T)

                def step():
                    m.spec_forward(x, cache, position_ids=pos)
                    for c in cache:
                        c.crop(-T)
                row[f"verify_{T}_tokens_ms"] = best(step)
            h = torch.randn(B, m.backbone.hidden_size, generator=g).to(next(m.parameters()).dtype)
            row["draft_4_heads_ms"] = best(lambda: m._stacked_logits(h).topk(4, -1))
            print(row, flush=True)
            rows.append(row)
    pipeline.write_result(cfg, "batched_step_costs.json", dict(model=cfg["model_name"], cache_tokens=200,
                                                               torch_threads=torch.get_num_threads(), rows=rows),
                          "scripts/batched_step_costs.py")


if __name__ == "__main__":
    main()
