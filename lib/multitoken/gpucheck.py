"""``make gpu-check``: a ~10-minute GPU benchmark for any CUDA machine, in one call.

It assumes little of the machine: no package registry, no checkpoint (everything starts from scratch) and nothing of
``datasets``, ``papermill`` or ``gguf``. In about 6 minutes of wall time on one H200 it:

1. runs the CUDA tests (``tests/test_cuda.py``);
2. trains the ``gpu`` profile's shape, GPT-2 124M (12 x 768, vocabulary padded to 50,257), from scratch on GSM8K for
   a fixed time under bf16 autocast: NTP, then MEDUSA-1 heads on the frozen NTP model (self-distilled) and MTP n=4
   transformer heads (fine-tuned jointly from NTP). The point is the engine's behaviour at this shape, not a good model;
3. benchmarks decoding at batch 1 in bf16 and fp32 (HF ``generate``, ``greedy_kv``, Medusa and MTP chains and a fixed
   tree, all interleaved), plus the **perfect-drafter ceiling**: a drafter that proposes the model's own greedy
   continuation, i.e. the speedup any drafter could reach with chains of 1..8 drafts on this GPU;
4. times a training step at the same shape (NTP vs MTP n=2 / n=4, naive vs head-wise loss): step time, peak memory;
5. if time is left (it starts before ``budget_seconds``), the batch section in bf16: batched MEDUSA-1
   speculation against HF's batched ``generate`` at batch 1, 4, 16 and 64 (``batch_benchmark.json``);
6. checks the GPU targets (``TARGETS``) and writes everything to its output folder (``--out``; ``runs/gpu_check``),
   after every phase, so a run cut short still returns what it measured: ``gpu_check.json`` (device, versions,
   commit, phases, targets), ``decoding_benchmark.json``, ``train_benchmark.json``, ``cuda_tests.txt``.

Trees are fixed (a chain and Medusa's first 16 nodes), not selected: there are no validation prompts to select on
in six minutes. ``GPU_CHECK_DRY=1`` runs the same code on the CPU at a toy size (``make test`` does, so it cannot rot);
without CUDA and without it, the check says so and exits 2.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import data as D
from . import stages
from .decoding import model_device, speculative_generate, sync
from .decoding.drafters import RowDrafter
from .decoding.trees import Tree, chain
from .evaluation import Method, benchmark_decoding
from .core.medusa import wrap_model_with_medusa
from .core.models import wrap_model_with_mtp
from .training import GPT2LMHeadModel, _fresh_config, build_mtp_model
from .utils import repo_root, write_json

SIZES = {
    "gpu": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=8192, padded_vocab=50257,
                max_seq_len=384, batch_size=32, lr=6e-4, ntp_seconds=100, medusa_seconds=35, mtp_seconds=50,
                distill_prompts=512, prompts=8, new_tokens=96, oracle_depths=(1, 2, 4, 8), bench_batch=16,
                bench_steps=10, tests_timeout=240, budget_seconds=420,
                batch_sizes=((1, 4), (16, 64)), batch_prompts=(16, 64), batch_new_tokens=32),
    "dry": dict(n_layer=2, n_embd=64, n_head=2, n_positions=512, vocab_size=400, padded_vocab=None, max_seq_len=256,
                batch_size=8, lr=3e-3, ntp_seconds=3, medusa_seconds=1.5, mtp_seconds=1.5, distill_prompts=16,
                prompts=2, new_tokens=12, oracle_depths=(1, 2), bench_batch=4, bench_steps=2, tests_timeout=300,
                budget_seconds=300, batch_sizes=((1, 2), (4,)), batch_prompts=(2, 4), batch_new_tokens=8),
}
# the GPU targets on one H200, batch 1, 124M shape, bf16 (met only where the measurement clears them)
TARGETS = dict(speedup_vs_hf=3.0, tokens_per_s=1500.0, identical_fp32=1.0, identical_tokens_bf16=0.99,
               mtp4_step_vs_ntp=1.2, mtp4_peak_vs_ntp=1.10)


class PerfectDrafter(RowDrafter):
    """The model's own greedy continuation (``reference``: prompt + continuation, known in advance) as a chain of
    ``depth`` drafts: every draft is accepted unless the engine's own rounding disagrees, so its speedup is the
    ceiling any drafter of that depth could reach on this hardware."""

    def __init__(self, reference: torch.Tensor, depth: int):
        self.ref, self.depth, self.name = reference.tolist(), depth, f"perfect{depth}"

    def propose_row(self, model, ctx, j, x0, history, limit):
        k = min(self.depth, limit)
        if k < 1:
            return Tree(()), None
        at = len(history)                                             # the token after x0 sits here in the text
        return chain(k), torch.tensor([self.ref[i] if i < len(self.ref) else 0 for i in range(at, at + k)],
                                      device=model_device(model))


class Check:
    """The phases, their results, and the files in ``out``: rewritten after every phase."""

    def __init__(self, out: Path, dry: bool):
        self.out, self.dry, self.t0 = out, dry, time.perf_counter()
        self.S = SIZES["dry" if dry else "gpu"]
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.report = dict(info=_info(self.dev, dry), sizes={k: v for k, v in self.S.items()}, phases={})
        self.rows, self.train_rows, self.batch_rows = [], [], []
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def phase(self, name, fn, *args):
        if self.elapsed() > self.S["budget_seconds"]:
            self.report["phases"][name] = {"status": f"skipped: past the {self.S['budget_seconds']} s budget"}
            self.save()
            return None
        t = time.perf_counter()
        print(f"== {name} ({self.elapsed():.0f} s in)", flush=True)
        try:
            res = fn(*args)
            self.report["phases"][name] = dict(status="ok", seconds=round(time.perf_counter() - t, 1),
                                               **(res if isinstance(res, dict) else {}))
        except Exception as e:  # keep what the other phases measured
            self.report["phases"][name] = dict(status=f"FAILED: {type(e).__name__}: {e}"[:2000],
                                               seconds=round(time.perf_counter() - t, 1))
            res = None
        self.save()
        return res

    def save(self):
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        self.report["targets"] = targets(self.rows, self.train_rows, self.dry)
        write_json(self.out / "gpu_check.json", self.report)
        write_json(self.out / "decoding_benchmark.json", self.rows)
        write_json(self.out / "train_benchmark.json", self.train_rows)
        write_json(self.out / "batch_benchmark.json", self.batch_rows)


def _info(dev, dry) -> dict:
    import transformers

    commit = os.environ.get("COMMIT") or stages.commit()["commit"]
    return dict(device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform
                .processor() or "cpu", dry_run=dry, torch=torch.__version__, cuda=torch.version.cuda,
                transformers=transformers.__version__, python=platform.python_version(), commit=commit,
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))



def cuda_tests(ck: Check) -> dict:
    """``tests/test_cuda.py`` in a fresh interpreter (all skipped without CUDA); the output goes to cuda_tests.txt."""
    root = repo_root()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "lib"), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests" /
                                                                                          "test_cuda.py")],
                       capture_output=True, text=True, cwd=root, env=env, timeout=ck.S["tests_timeout"])
    (ck.out / "cuda_tests.txt").write_text(p.stdout + p.stderr)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode not in (0, 5):
        raise RuntimeError(f"CUDA tests failed (exit {p.returncode}): {last}")
    return {"summary": last}


def gsm8k(ck: Check, d: dict) -> dict:
    """GSM8K in the workbook's format, a byte-level BPE trained on it, examples as token lists (no ``datasets``)."""
    S = ck.S
    train = D.read_gsm8k(D.GSM8K_DIR / "train.jsonl")[: 200 if ck.dry else None]
    nb = max(S["batch_prompts"])
    test = D.read_gsm8k(D.GSM8K_DIR / "test.jsonl")[: max(S["prompts"], 2 * nb)]
    tok = D.build_tokenizer((D.format_prompt(r["query"]) + r["response"] for r in train), vocab_size=S["vocab_size"])
    enc = [torch.tensor(tok(D.format_prompt(r["query"]), add_special_tokens=False)["input_ids"]) for r in test]
    # batch section: the first nb test prompts measure, the next nb choose each batch size's tree
    d.update(tok=tok, train=train, examples=examples(train, tok, S["max_seq_len"]), prompts=enc[: S["prompts"]],
             batch_test=enc[:nb], batch_val=enc[nb: 2 * nb])
    return dict(train_examples=len(d["examples"]), prompts=len(d["prompts"]), vocab=len(tok))


def examples(records, tok, max_seq_len):
    enc = D.encode_examples([r["query"] for r in records], [r["response"] for r in records], tok, max_seq_len)
    return [dict(input_ids=i, labels=lab) for i, lab, p in zip(enc["input_ids"], enc["labels"], enc["prompt_len"])
            if p < len(lab)]


def batches(ex, tok, batch_size, dev, seed=0):
    """Shuffled batches forever, on ``dev``."""
    epoch = 0
    while True:
        for b in D.make_dataloader(ex, tok, batch_size, shuffle=True, seed=seed + epoch):
            yield {k: v.to(dev) for k, v in b.items()}
        epoch += 1


def fit(model, it, seconds: float, lr: float, dev) -> dict:
    """Train for ``seconds`` of wall time (AdamW, bf16 autocast on CUDA): steps, tokens/s, first and last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    losses, tokens, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or not losses:
        b = next(it)
        with amp:
            loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int(b["attention_mask"].sum())
    dt = time.perf_counter() - t0
    model.eval()
    return dict(steps=len(losses), tokens_per_s=round(tokens / dt, 1), first_loss=round(losses[0], 3),
                last_loss=round(sum(losses[-10:]) / len(losses[-10:]), 3))


@torch.inference_mode()
def self_distill(model, tok, records, n, max_new_tokens, dev, batch_size=64):
    """The frozen model's greedy continuations of the first ``n`` training prompts that leave room for
    ``max_new_tokens`` (batched, left-padded)."""
    room = model.config.n_positions - max_new_tokens
    records = [r for r in records if len(tok(D.format_prompt(r["query"]), add_special_tokens=False)["input_ids"]) <= room]
    out, side = [], tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, min(n, len(records)), batch_size):
            rs = records[i: i + batch_size]
            enc = tok([D.format_prompt(r["query"]) for r in rs], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(dev)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
            out += [dict(r, response=t.strip() or r["response"]) for r, t in zip(rs, texts)]
    finally:
        tok.padding_side = side
    return out


def train_models(ck: Check, d: dict) -> dict:
    S, dev, tok = ck.S, ck.dev, d["tok"]
    torch.manual_seed(0)
    mc = dict(n_layer=S["n_layer"], n_embd=S["n_embd"], n_head=S["n_head"], n_positions=S["n_positions"],
              vocab_size=S["padded_vocab"])
    ntp = GPT2LMHeadModel(_fresh_config(tok, mc)).to(dev)
    res = {"ntp": fit(ntp, batches(d["examples"], tok, S["batch_size"], dev), S["ntp_seconds"], S["lr"], dev)}
    distilled = self_distill(ntp, tok, d["train"], S["distill_prompts"], S["new_tokens"], dev)
    medusa = wrap_model_with_medusa(ntp, num_medusa_heads=4)            # frozen: shares NTP's parameters
    res["medusa"] = fit(medusa, batches(examples(distilled, tok, S["max_seq_len"]), tok, S["batch_size"], dev),
                        S["medusa_seconds"], 1e-3, dev)
    mtp = wrap_model_with_mtp(copy.deepcopy(ntp), num_predict_tokens=4, head_type="transformer")  # trained jointly
    res["mtp"] = fit(mtp, batches(d["examples"], tok, S["batch_size"], dev, seed=1), S["mtp_seconds"], S["lr"] / 2,
                     dev)
    d["models"] = dict(ntp=ntp, medusa=medusa, mtp=mtp)
    res["params_m"] = {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for k, m in d["models"].items()}
    return res


def decoding(ck: Check, d: dict, dtype: torch.dtype, oracle: bool) -> dict:
    S, n = ck.S, ck.S["new_tokens"]
    with torch.no_grad():  # copies outside inference mode: the heads' stacked weights track parameter versions
        ms = {k: copy.deepcopy(m).to(dtype).eval() for k, m in d["models"].items()}
    prompts = [p.to(ck.dev) for p in d["prompts"]]
    # exact=False: what CUDA decodes with (bf16 exactness is the CPU's default), on a CPU dry run too
    meths = [Method.hf("hf_greedy", ms["ntp"]),
             Method.engine("greedy_kv", ms["ntp"], "none", baseline="hf_greedy", exact=False),
             Method.engine("medusa_chain", ms["medusa"], "chain", baseline="hf_greedy", exact=False),
             Method.engine("medusa_tree", ms["medusa"], "medusa:16", baseline="hf_greedy", exact=False),
             Method.hf("hf_greedy_mtp", ms["mtp"]),
             Method.engine("mtp_chain", ms["mtp"], "chain", baseline="hf_greedy_mtp", exact=False),
             Method.engine("mtp_tree", ms["mtp"], "medusa:16", baseline="hf_greedy_mtp", exact=False)]
    if oracle:
        refs = {tuple(p.tolist()): meths[0](p.view(1, -1), n)[0][0] for p in prompts}

        def perfect(model, ids, m, k):
            return speculative_generate(model, ids, m, drafter=PerfectDrafter(refs[tuple(ids[0].tolist())], k),
                                        exact=False)
        meths += [Method.loop(f"oracle_chain{k}", lambda model, ids, m, k=k: perfect(model, ids, m, k), ms["ntp"],
                              "hf_greedy") for k in S["oracle_depths"]]
    rows, _ = benchmark_decoding(meths, prompts, n, warmup=1, desc=f"decoding {str(dtype)[6:]}")
    name = ck.report["info"]["device_name"]
    for r in rows:
        r.update(dtype=str(dtype).replace("torch.", ""), device_name=name, tree={"medusa_tree": "medusa16",
                 "mtp_tree": "medusa16"}.get(r["method"], "chain" if "chain" in r["method"] else None))
    ck.rows += rows
    del ms
    if ck.dev.type == "cuda":
        torch.cuda.empty_cache()
    best = max((r for r in rows if r["method"] in ("medusa_chain", "medusa_tree", "mtp_chain", "mtp_tree")),
               key=lambda r: r["speedup_vs_hf_greedy"])
    return dict(best=best["method"], speedup_vs_hf=best["speedup_vs_hf_greedy"],
                speedup_vs_greedy_kv=best.get("speedup_vs_greedy_kv"), tokens_per_s=best["tokens_per_s"])


def compiled_step(ck: Check, d: dict, dtype: torch.dtype) -> dict:
    """The engine's compiled step (``fast="compiled"``: CUDA graphs on a GPU) beside its eager step and HF
    ``generate``: greedy and MEDUSA-1's chain, on the decoding phases' prompts; compilation reported apart. A phase of
    its own, last, so that a failure here costs nothing else."""
    from .core import compiled

    with torch.no_grad():
        ms = {k: copy.deepcopy(d["models"][k]).to(dtype).eval() for k in ("ntp", "medusa")}
    meths = [Method.hf("hf_greedy", ms["ntp"]),
             Method.engine("greedy_kv", ms["ntp"], "none", baseline="hf_greedy"),
             Method.engine("greedy_kv_compiled", ms["ntp"], "none", baseline="hf_greedy", fast="compiled"),
             Method.engine("medusa_chain", ms["medusa"], "chain", baseline="hf_greedy"),
             Method.engine("medusa_chain_compiled", ms["medusa"], "chain", baseline="hf_greedy", fast="compiled")]
    if ck.dry:                                           # the dry run proves the phase runs: greedy is enough
        meths = meths[:3]
    before = compiled.AUTOTUNE[0]
    compiled.AUTOTUNE[0] = not ck.dry                    # the CPU dry run: the same graphs without kernel timing
    try:
        rows, _ = benchmark_decoding(meths, [p.to(ck.dev) for p in d["prompts"]], ck.S["new_tokens"], warmup=1,
                                     desc=f"compiled step {str(dtype)[6:]}")
    finally:
        compiled.AUTOTUNE[0] = before
    keep = ("method", "tokens_per_s", "speedup_vs_hf_greedy", "speedup_lo", "speedup_hi", "speedup_vs_greedy_kv",
            "mean_accepted_length", "identical_to_greedy", "compile_s")
    return dict(dtype=str(dtype).replace("torch.", ""), rows=[{k: r.get(k) for k in keep} for r in rows])


def batch(ck: Check, d: dict) -> dict:
    """The batch section on this GPU, in bf16: batched MEDUSA-1 speculation against HF's batched greedy
    ``generate``, the engine without drafts and speculation row by row (:func:`evaluation.batch_rows`, one round), at
    batch 1 and 4 on 16 prompts and at 16 and 64 on 64 (row by row costs the same at every size: fewer prompts where
    the batch is small); each size's tree chosen on other test prompts. Rows in ``batch_benchmark.json``."""
    from .evaluation import batch_rows

    S, rows = ck.S, []
    with torch.no_grad():
        ntp = copy.deepcopy(d["models"]["ntp"]).to(torch.bfloat16).eval()
        heads = copy.deepcopy(d["models"]["medusa"]).to(torch.bfloat16).eval()
        ntp.generation_config.pad_token_id = heads.generation_config.pad_token_id = d["tok"].pad_token_id
        for sizes, n in zip(S["batch_sizes"], S["batch_prompts"]):
            rows += batch_rows(ntp, heads, d["batch_test"][:n], d["batch_val"], sizes, S["batch_new_tokens"],
                               rounds=1)
    name = ck.report["info"]["device_name"]
    for r in rows:
        r.update(dtype="bfloat16", device_name=name)
    ck.batch_rows = rows
    del ntp, heads
    if ck.dev.type == "cuda":
        torch.cuda.empty_cache()
    return {f"batch_{r['batch']}": dict(tree=r["tree"], tau=r["spec_batched_tau"], batched_vs_hf=r["batched_vs_hf"],
                                        hf_tokens_per_s=r["hf_generate_tokens_per_s"],
                                        batched_tokens_per_s=r["spec_batched_tokens_per_s"]) for r in rows}


def train_bench(ck: Check, d: dict) -> dict:
    """One training step at the check's shape: NTP vs MTP n=2/4 (transformer heads), naive vs head-wise loss; the
    median of ``bench_steps`` steps after two warm-ups, CUDA-fenced; peak memory after resetting the counters (CUDA:
    max allocated; the CPU dry run reports the process' peak RSS, which only grows)."""
    S, dev, tok = ck.S, ck.dev, d["tok"]
    batch = {k: v.to(dev) for k, v in next(iter(D.make_dataloader(d["examples"][: S["bench_batch"]], tok,
                                                                   S["bench_batch"]))).items()}
    mc = dict(n_layer=S["n_layer"], n_embd=S["n_embd"], n_head=S["n_head"], n_positions=S["n_positions"],
              vocab_size=S["padded_vocab"])
    cuda = dev.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (
        lambda: torch.autocast("cpu", enabled=False))
    rows = []
    for name, n, eff in (("ntp", 1, True), ("mtp2_naive", 2, False), ("mtp2_efficient", 2, True),
                         ("mtp4_naive", 4, False), ("mtp4_efficient", 4, True)):
        torch.manual_seed(0)
        model = (GPT2LMHeadModel(_fresh_config(tok, mc)) if n == 1 else
                 build_mtp_model(tok, n, model_config=mc, head_type="transformer", memory_efficient_loss=eff))
        model.to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with amp():
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(2):
            step()
        sync(dev)
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(S["bench_steps"]):
            sync(dev)
            t = time.perf_counter()
            step()
            sync(dev)
            times.append(time.perf_counter() - t)
        peak = (torch.cuda.max_memory_allocated(dev) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                * 1024) / 2 ** 20
        rows.append(dict(config=name, n=n, memory_efficient=eff, step_s=round(sorted(times)[len(times) // 2], 4),
                         peak_mb=round(peak, 1), tokens=int(batch["attention_mask"].sum()),
                         memory="cuda_max_allocated" if cuda else "peak_rss"))
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    for r in rows:
        r["step_vs_ntp"] = round(r["step_s"] / rows[0]["step_s"], 3)
        r["peak_vs_ntp"] = round(r["peak_mb"] / rows[0]["peak_mb"], 3)
    ck.train_rows = rows
    return {r["config"]: dict(step_vs_ntp=r["step_vs_ntp"], peak_vs_ntp=r["peak_vs_ntp"]) for r in rows}


def targets(rows, train_rows, dry) -> dict:
    """The GPU targets from what was measured (bf16 rows for speed and near-identity, fp32 rows for identity)."""
    heads = ("medusa_chain", "medusa_tree", "mtp_chain", "mtp_tree")
    bf = [r for r in rows if r["dtype"] == "bfloat16" and r["method"] in heads]
    fp = [r for r in rows if r["dtype"] == "float32" and r["method"] in heads]
    ok_bf = [r for r in bf if r["identical_tokens"] >= TARGETS["identical_tokens_bf16"]]
    best = max(ok_bf, key=lambda r: r["speedup_vs_hf_greedy"], default=None)
    t4 = next((r for r in train_rows if r["config"] == "mtp4_efficient"), None)
    out = {}
    if best:
        out["speedup_vs_hf"] = dict(target=TARGETS["speedup_vs_hf"], value=best["speedup_vs_hf_greedy"],
                                    interval=[best["speedup_lo"], best["speedup_hi"]], method=best["method"],
                                    met=bool(best["speedup_lo"] >= TARGETS["speedup_vs_hf"]))
        out["tokens_per_s"] = dict(target=TARGETS["tokens_per_s"], value=best["tokens_per_s"],
                                   met=bool(best["tokens_per_s"] >= TARGETS["tokens_per_s"]))
    if bf:
        worst = min(r["identical_tokens"] for r in bf)
        out["identical_tokens_bf16"] = dict(target=TARGETS["identical_tokens_bf16"], value=worst,
                                            met=bool(worst >= TARGETS["identical_tokens_bf16"]))
    if fp:
        worst = min(r["identical_to_greedy"] for r in fp)
        out["identical_fp32"] = dict(target=1.0, value=worst, met=bool(worst == 1.0))
    if t4:
        out["mtp4_step_vs_ntp"] = dict(target=TARGETS["mtp4_step_vs_ntp"], value=t4["step_vs_ntp"],
                                       met=bool(t4["step_vs_ntp"] <= TARGETS["mtp4_step_vs_ntp"]))
        out["mtp4_peak_vs_ntp"] = dict(target=TARGETS["mtp4_peak_vs_ntp"], value=t4["peak_vs_ntp"],
                                       met=bool(t4["peak_vs_ntp"] <= TARGETS["mtp4_peak_vs_ntp"]))
    if dry:
        out["note"] = "dry run on the CPU at a toy size: the targets are about one H200, not this"
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m multitoken.gpucheck", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(repo_root() / "runs" / "gpu_check"))
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1",
                    help="the same check on the CPU at a toy size (GPU_CHECK_DRY=1)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry:
        print("make gpu-check needs a CUDA device, and this machine has none (torch "
              f"{torch.__version__}, cuda {torch.version.cuda}). Run it on a CUDA machine (docs/GPU.md), or "
              "GPU_CHECK_DRY=1 make gpu-check for the same check on the CPU at a toy size.", file=sys.stderr)
        return 2
    if args.dry:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    ck = Check(Path(args.out), args.dry)
    d: dict = {}                                       # what the phases hand on: tokenizer, data, models
    ck.phase("cuda_tests", cuda_tests, ck)
    if ck.phase("data", gsm8k, ck, d) is not None:
        ck.phase("train", train_models, ck, d)
        if "models" in d:
            ck.phase("decoding_bf16", decoding, ck, d, torch.bfloat16, True)
            ck.phase("decoding_fp32", decoding, ck, d, torch.float32, False)
        ck.phase("train_bench", train_bench, ck, d)
        if "models" in d:
            ck.phase("batch_bf16", batch, ck, d)
            ck.phase("compiled_step", compiled_step, ck, d, torch.bfloat16 if ck.dev.type == "cuda" else torch.float32)
    ck.save()
    failed = [k for k, v in ck.report["phases"].items() if str(v.get("status", "")).startswith("FAILED")]
    print(json.dumps(ck.report["targets"], indent=1))
    print(f"\nwritten: {ck.out}/gpu_check.json, decoding_benchmark.json, train_benchmark.json, "
          f"batch_benchmark.json, cuda_tests.txt "
          f"({ck.elapsed():.0f} s){'; FAILED: ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
