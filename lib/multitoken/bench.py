"""Benchmarks: ``make bench`` (decoding) and ``make bench-train`` (training step time and peak memory).

Both measure side by side in one run and write JSON under ``runs/<profile>/results/``.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from . import pipeline, report, stages
from .core import compiled, fastpath
from .core.backbones import backbone_of
from .evaluation import batch_rows
from .utils import write_json

COLS = ["method", "tokens_per_s", "speedup_vs_hf_greedy", "speedup_vs_greedy_kv", "mean_accepted_length",
        "efficiency_vs_greedy_kv", "identical_to_greedy", "tree"]


@torch.no_grad()
def decoding_bench(cfg, repeat: int = 1):
    """The decoding benchmark ``repeat`` times (independent runs, each recorded in ``results/bench_runs.json``), then
    the spread between every recorded run (notebook 04's included) beside the last run's intervals."""
    try:
        models = {v: pipeline.load_variant(cfg, v) for v in pipeline.VARIANTS}
    except FileNotFoundError as e:
        sys.exit(f"make bench needs the trained {cfg['profile']} models: run `make all PROFILE={cfg['profile']}` "
                 f"first ({e})")
    for i in range(repeat):
        rows, _ = pipeline.run_decoding_benchmark(cfg, models, source=f"make bench ({i + 1}/{repeat})")
    spread = pipeline.bench_spread(cfg)
    pipeline.write_result(cfg, "bench_spread.json", spread, "make bench")
    print("spread over the recorded runs (min, max):\n" + pd.DataFrame(spread).T.to_string())
    print(pd.DataFrame(rows)[COLS].to_string(index=False))
    print("\n" + report.targets_summary(report.speed_targets(rows, cfg["speed_targets"])))
    if pipeline.device(cfg).type == "cpu":  # what a step of several positions costs here, layout by layout
        d, v = backbone_of(models["ntp"]).hidden_size, models["ntp"].config.vocab_size   # any family
        t = pd.DataFrame(fastpath.layout_timings([(d, 3 * d), (d, 4 * d), (4 * d, d), (d, v)]))
        pipeline.write_result(cfg, "matmul_layouts.json", t.round(1).to_dict("records"), "make bench")
        print("\nmatmul time per layout (µs):\n" + t.round(1).to_string(index=False))
    length_section(cfg, models["ntp"], models["medusa"])
    print(f"\nwritten: {pipeline.paths(cfg)['results'] / 'decoding_benchmark.json'}, speed_targets.json, "
          "length_benchmark.json")
    return rows


@torch.no_grad()
def length_section(cfg, model=None, heads=None) -> list[dict]:
    """``make bench``'s length section (alone: ``make bench-length``): NTP's tokens/s at 64, 256 and 1,024 new tokens,
    and MEDUSA-1's speculation on it, written to ``results/length_benchmark.json``."""
    if model is None:
        try:
            model, heads = pipeline.load_variant(cfg, "ntp"), pipeline.load_variant(cfg, "medusa")
        except FileNotFoundError as e:
            sys.exit(f"make bench-length needs the trained {cfg['profile']} NTP and MEDUSA-1 models: run `make all "
                     f"PROFILE={cfg['profile']}` first ({e})")
    lengths = length_bench(model, pipeline.context_size(cfg), heads=heads)
    pipeline.write_result(cfg, "length_benchmark.json", lengths, "make bench-length")
    print("\ntokens/s by output length (one prompt, EOS ignored):\n" + pd.DataFrame(lengths).to_string(index=False))
    return lengths


def length_bench(model, context: int, lengths=(64, 256, 1024), prompt_len: int = 16, repeats: int = 2,
                 heads=None, tree: str = "medusa:8") -> list[dict]:
    """Tokens/s of this engine without drafts at growing output lengths, with its cache (``GrowingCache``: appends
    cost the new tokens, compaction is in place) and with transformers' ``DynamicCache`` (which concatenates the whole
    cache at every step), interleaved, after one warm-up generation each, best of ``repeats``: the per-token cost
    should not grow with the output length. With ``heads`` (a head model on the same backbone) also speculation with
    ``tree`` (accepted entries compacted in place at every step): its tokens/s, ms per step and τ, since τ moves with
    the text. Lengths that do not fit the context are left out."""
    import time

    from .decoding import speculative_generate

    bb = backbone_of(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(next(model.parameters()).device)
    caches = (("growing_cache", None), ("dynamic_cache", DynamicCache))

    def seconds(n, cache):
        if cache is not None:
            bb.new_cache = cache                               # this adapter instance only, undone below
        try:
            t0 = time.perf_counter()
            speculative_generate(model, ids, n, tree="none", eos_token_id=[])
            return time.perf_counter() - t0
        finally:
            bb.__dict__.pop("new_cache", None)

    def speculation(n):
        t0 = time.perf_counter()
        _, st = speculative_generate(heads, ids, n, tree=tree, eos_token_id=[])
        return time.perf_counter() - t0, st

    for _, cache in caches:                                    # warm-up: the lean forward's layout choice, allocations
        seconds(8, cache)
    if heads is not None:
        speculation(8)
    rows = []
    for n in [n for n in lengths if prompt_len + n <= context]:
        row = {"new_tokens": n}
        for name, cache in caches:
            row[f"{name}_tokens_per_s"] = round(n / min(seconds(n, cache) for _ in range(repeats)), 1)
        if heads is not None:
            s, st = min((speculation(n) for _ in range(repeats)), key=lambda r: r[0])
            row.update({"speculation_tree": tree, "speculation_tokens_per_s": round(n / s, 1),
                        "speculation_ms_per_step": round(1000 * s / st["forward_passes"], 2),
                        "speculation_tau": round(st["mean_accepted_length"], 2)})
        rows.append(row)
    return rows


_CHILD = r"""
import contextlib, json, resource, statistics, sys, time, torch
from multitoken import pipeline
from multitoken.pretrained import load_model
from multitoken.training import GPT2LMHeadModel, _fresh_config, _sync_vocab, build_mtp_model
cfg, n, eff, steps = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
dev = pipeline.device(cfg)
cuda = dev.type == "cuda"
torch.manual_seed(0)
tr, _, tok, _ = pipeline.loaders(cfg)
batch = {k: v.to(dev) for k, v in next(iter(tr)).items()}
mc, base = pipeline.model_config(cfg), cfg["model_name"]
if n == 1:
    model = _sync_vocab(load_model(base), tok) if base else GPT2LMHeadModel(_fresh_config(tok, mc))
else:
    model = build_mtp_model(tok, n, base_model=base, model_config=None if base else mc,
                            **{**pipeline.mtp_fields(cfg), "memory_efficient_loss": eff})
model.to(dev).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
def sync():
    if cuda:
        torch.cuda.synchronize(dev)
def step():
    with amp():
        loss = model(**batch).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
step()  # warm-up, allocates optimizer state
sync()
rest = torch.cuda.memory_allocated(dev) / 2**20 if cuda else int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if cuda:
    torch.cuda.reset_peak_memory_stats(dev)
times = []
for _ in range(steps):
    sync(); t = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t)
peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"step_s": statistics.median(times), "peak_mb": peak, "rest_mb": rest,
                  "memory": "cuda_max_allocated" if cuda else "peak_rss", "device": str(dev),
                  "tokens": int(batch["attention_mask"].sum()), "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))
"""


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """This machine's memory read bandwidth in bytes/s, as PyTorch's threads see it: the best of ``reps`` sums over a
    ``gib`` GiB fp32 tensor (far larger than any cache), after one warm-up."""
    import time

    big = torch.ones(int(gib * 2**30) // 4, device=torch.device("cpu"))
    big.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t0)
    return big.numel() * 4 / best


def weight_bytes(model) -> int:
    """Bytes of a model's parameters as stored (a tied embedding once): what a decoding step reads at least."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def step_costs(name: str, dtypes=None, context: int = 300, sizes=(1, 2, 4, 8, 16), reps: int = 20,
               prompts: int = 6, new_tokens: int = 64, out=None, compiled_step: bool = True) -> dict:
    """What one decoding step of a pretrained model costs on this machine: a forward of T new tokens on top of a
    ``context``-token KV cache, for each T in ``sizes`` (median of ``reps``), in each dtype, three ways: transformers'
    own forward (``hf``), the engine's step with the row-major products a plain forward computes (``eager``) and with
    its fast products (``fast``: every weight in the fastest layout this CPU offers, ``core.fastpath``) and, with
    ``compiled_step``, the compiled step (``compiled``: T tokens in a step of the next compiled size,
    ``core.compiled``; its compilation in the warm-up, seconds in ``compile_s``); every combination once per round
    in a fresh random order (this machine's speed drifts). Beside them the memory limit:
    the model's weight bytes over the measured read bandwidth, the least a step can cost. Then HF ``generate``'s and
    the engine's greedy tokens/s (eager, fast) on GSM8K test prompts, interleaved (``prompts`` x ``new_tokens``).
    ``dtypes``: fp32, and bf16 where this CPU has native bf16 products (emulated bf16 measures the emulation).
    Written to ``figures/bench/step_costs_<name>_<CPU capability>.json`` (one file per kind of CPU), with the
    commit and time in the file and in the folder's manifest.
    The ratio step(T) / step(1) is what speculation must beat: a chain of T-1 drafts pays off only if
    τ > step(T) / step(1)."""
    import random
    import statistics
    import time

    from . import data as D
    from .decoding import speculative_generate
    from .evaluation import Method
    from .core.pretrained import load
    from .utils import DTYPES

    if dtypes is None:
        dtypes = ("float32", "bfloat16") if fastpath.cpu_bf16_fast() else ("float32",)
    model, tok = load(name)
    gsm = D.load_metamathqa("gsm8k", max_examples=10, test_examples=prompts)["test"]
    texts = [tok(D.format_prompt(q), return_tensors="pt").input_ids for q in gsm["query"]]
    bandwidth = read_bandwidth()
    rows, speed = [], []
    for dt in dtypes:
        model = model.to(DTYPES[dt])
        bb = backbone_of(model)
        limit_ms = weight_bytes(model) / bandwidth * 1e3
        g = torch.Generator().manual_seed(0)
        cache = bb.new_cache()
        prefix = torch.randint(0, model.config.vocab_size, (1, context), generator=g)
        model(prefix, past_key_values=cache, use_cache=True)
        paths = ("hf", "eager", "fast") + (("compiled",) if compiled_step else ())
        combos = [(T, via) for T in sizes for via in paths]
        times = {c: [] for c in combos}
        if compiled_step:                             # the compiled step's own cache: the same prefix, fixed capacity
            cap = compiled.capacity_for(context + compiled.LADDER[-1])
            ccache = compiled.compiled_of(bb).cache(1, cap, model.device)
            ccache.compiled = False
            ccache.set_length(0)
            causal = F.pad(torch.ones(context, context, dtype=torch.bool).tril(), (0, cap - context))[None, None]
            bb.trunk(prefix, ccache, torch.arange(context)[None], causal, eager=True)
            ccache.set_length(context)
            ccache.compiled = True
            compile_s = {}
        order = random.Random(0)
        for rep in range(reps + 2):                   # every (tokens, path) once per round, in a fresh order
            for T, via in order.sample(combos, len(combos)):
                x = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
                t0 = time.perf_counter()
                if via == "hf":
                    model(x, past_key_values=cache, use_cache=True)
                elif via == "compiled":                   # T tokens in a step of the ladder's next size
                    r = compiled.rung(T)
                    xs = torch.cat([x, x.new_zeros(1, r - T)], 1)
                    mask = torch.zeros(1, 1, r, cap, dtype=torch.bool)
                    mask[..., :context] = True
                    mask[0, 0, :, context: context + r] = torch.ones(r, r, dtype=torch.bool).tril()
                    c0 = compiled.COMPILE_S[0]
                    with fastpath.decoding(model, compiled=(bb.unembed,), skip=(bb.layers,)):
                        fastpath.linear(bb.unembed, bb.trunk(xs, ccache, torch.arange(context, context + r)[None],
                                                             mask)[1])
                    compile_s[T] = compile_s.get(T, 0.0) + compiled.COMPILE_S[0] - c0
                    if rep >= 2:
                        times[(T, via)].append(time.perf_counter() - t0)
                    continue                              # its cache is rewritten at the same slots each time
                else:
                    with fastpath.decoding(model, fast=via == "fast"):
                        fastpath.linear(bb.unembed, bb.trunk(x, cache)[1])
                if rep >= 2:                          # two warm-up rounds (the fast path times its layouts there)
                    times[(T, via)].append(time.perf_counter() - t0)
                cache.crop(-T)                        # transformers 5: a negative count removes that many tokens
        ms = {c: statistics.median(t) * 1e3 for c, t in times.items()}
        for T in sizes:
            q = statistics.quantiles(times[(T, "fast")], n=4)
            rows.append(dict(dtype=dt, tokens=T, hf_ms=round(ms[(T, "hf")], 2), eager_ms=round(ms[(T, "eager")], 2),
                             fast_ms=round(ms[(T, "fast")], 2),
                             fast_iqr_ms=[round(q[0] * 1e3, 1), round(q[2] * 1e3, 1)],
                             memory_limit_ms=round(limit_ms, 2),
                             eager_vs_1_token=round(ms[(T, "eager")] / ms[(1, "eager")], 2),
                             fast_vs_1_token=round(ms[(T, "fast")] / ms[(1, "fast")], 2),
                             fast_vs_limit=round(ms[(T, "fast")] / limit_ms, 2)))
            if compiled_step:
                rows[-1].update(compiled_ms=round(ms[(T, "compiled")], 2), compiled_step_tokens=compiled.rung(T),
                                compiled_vs_1_token=round(ms[(T, "compiled")] / ms[(1, "compiled")], 2),
                                compiled_vs_limit=round(ms[(T, "compiled")] / limit_ms, 2),
                                compile_s=round(compile_s.get(T, 0.0), 1))
        hf = Method.hf("hf_generate", model)
        runs = {"hf_generate": lambda ids: hf(ids, new_tokens)[0],
                "engine_greedy_eager": lambda ids: speculative_generate(model, ids, new_tokens, tree="none",
                                                                        fast=False)[0],
                "engine_greedy_fast": lambda ids: speculative_generate(model, ids, new_tokens, tree="none")[0]}
        if compiled_step:
            runs["engine_greedy_compiled"] = lambda ids: speculative_generate(model, ids, new_tokens, tree="none",
                                                                              fast="compiled", exact=False)[0]
        tot = {k: [0, 0.0] for k in runs}
        for f in runs.values():
            f(texts[0])
        for i, ids in enumerate(texts):
            for which in random.Random(i).sample(list(runs), len(runs)):
                t0 = time.perf_counter()
                seq = runs[which](ids)
                tot[which][1] += time.perf_counter() - t0
                tot[which][0] += seq.shape[1] - ids.shape[1]
        speed.append(dict(dtype=dt, **{f"{k}_tokens_per_s": round(n / s, 1) for k, (n, s) in tot.items()}))
    res = dict(model=name, context=context, reps=reps, torch_threads=torch.get_num_threads(),
               read_bandwidth_gb_s=round(bandwidth / 1e9, 1), cpu_bf16_fast=fastpath.cpu_bf16_fast(),
               cpu_capability=torch.backends.cpu.get_cpu_capability(), steps=rows, generation=speed,
               layouts=fastpath.layout_choices())
    cap = torch.backends.cpu.get_cpu_capability()
    out = out or pipeline.repo_root() / "figures" / "bench" / f"step_costs_{name}_{cap}.json"
    res["run"] = stages.record_output(out, "make bench-steps")
    write_json(out, res)
    print(pd.DataFrame(rows).to_string(index=False) + "\n\n" + pd.DataFrame(speed).to_string(index=False))
    print(f"\nread bandwidth {bandwidth / 1e9:.1f} GB/s; written: {out}")
    return res


@torch.inference_mode()
def peers(name: str, dtype: str = "bfloat16", prompts: int = 16, new_tokens: int = 128, out=None,
          lookup_tokens: int = 10) -> dict:
    """Every greedy way to decode an installed model, no training needed, on GSM8K test prompts at batch 1 in one
    dtype, interleaved by :func:`evaluation.benchmark_decoding`: transformers' ``generate`` (eager, the static-cache
    + ``torch.compile`` recipe, prompt lookup of ``lookup_tokens``) and this engine's greedy and prompt lookup (4
    tokens) on its fast step and its compiled one (``_compiled_1``: each step its own compiled size, greedy one token a
    step; in 16-bit also ``_compiled``: exact, every step one shape of :data:`decoding.engine.EXACT_STEP` tokens).
    Each row: tokens/s, speedup over HF greedy and over the fastest peer with 95% intervals over prompts (paired), and
    the share of prompts whose tokens equal those of HF greedy and of the engine's greedy of the same step
    (``exact_ref``: what "lossless" means in 16-bit). Written to
    ``figures/bench/peers_<name>_<dtype>_<CPU capability>.json``."""
    from . import data as D
    from .core.pretrained import load
    from .decoding.engine import EXACT_STEP
    from .evaluation import Method as M, benchmark_decoding, best_peer_speedups
    from .utils import DTYPES

    model, tok = load(name)
    model = model.to(DTYPES[dtype]).eval()
    gsm = D.load_metamathqa("gsm8k", max_examples=10, test_examples=prompts)["test"]
    ids = [tok(D.format_prompt(q), return_tensors="pt").input_ids[0] for q in gsm["query"]]
    meths = [M.hf("hf_greedy", model), M.hf_compiled("hf_compiled", model, "hf_greedy"),
             M.hf("hf_prompt_lookup", model, "hf_greedy", prompt_lookup_num_tokens=lookup_tokens),
             M.engine("greedy_kv", model, "none", baseline="hf_greedy"),
             M.engine("prompt_lookup", model, "none", "prompt_lookup", "hf_greedy"),
             M.engine("greedy_compiled_1", model, "none", baseline="hf_greedy", fast="compiled", exact=False),
             M.engine("prompt_lookup_compiled_1", model, "none", "prompt_lookup", "hf_greedy", fast="compiled",
                      exact=False)]
    exact_ref = {"prompt_lookup": "greedy_kv", "prompt_lookup_compiled_1": "greedy_compiled_1"}
    if model.dtype != torch.float32:          # exact by one step shape: the compiled greedy of that shape is its own
        meths += [M.engine("greedy_compiled", model, "none", baseline="hf_greedy", fast="compiled"),
                  M.engine("prompt_lookup_compiled", model, "none", "prompt_lookup", "hf_greedy", fast="compiled")]
        exact_ref["prompt_lookup_compiled"] = "greedy_compiled"
    rows, per = benchmark_decoding(meths, ids, new_tokens, warmup=1, desc=f"peers ({dtype})", reference="greedy_kv")
    peer, vs_peer = best_peer_speedups(rows, per)
    seqs = {m: per[per.method == m].sort_values("prompt").seq.tolist() for m in per.method.unique()}
    for r in rows:
        ref = exact_ref.get(r["method"])
        if ref:
            r["exact_ref"], r["identical_to_exact_ref"] = ref, sum(
                a == b for a, b in zip(seqs[r["method"]], seqs[ref])) / len(seqs[ref])
        if r["method"] in vs_peer:
            ci = vs_peer[r["method"]]
            r.update(peer=peer, speedup_vs_peer=round(ci.value, 3), speedup_vs_peer_lo=round(ci.lo, 3),
                     speedup_vs_peer_hi=round(ci.hi, 3))
    cap = torch.backends.cpu.get_cpu_capability()
    res = dict(model=name, dtype=dtype, prompts=len(ids), new_tokens=new_tokens, peer=peer,
               torch_threads=torch.get_num_threads(), cpu_bf16_fast=fastpath.cpu_bf16_fast(), cpu_capability=cap,
               exact_step=EXACT_STEP, methods=rows)
    out = out or pipeline.repo_root() / "figures" / "bench" / f"peers_{name}_{dtype}_{cap}.json"
    res["run"] = stages.record_output(out, "make bench-peers")
    write_json(out, res)
    cols = ["method", "tokens_per_s", "speedup_vs_hf_greedy", "speedup_vs_peer", "speedup_vs_peer_lo",
            "speedup_vs_peer_hi", "mean_accepted_length", "identical_to_greedy", "identical_to_exact_ref", "compile_s"]
    print(pd.DataFrame(rows).reindex(columns=cols).to_string(index=False) + f"\n\nwritten: {out}")
    return res


def compile_reuse(name: str, dtype: str = "float32", new_tokens: int = 32, out=None) -> dict:
    """What the disk cache of compiled steps saves: the same decodings (greedy and prompt lookup on the compiled
    step, one GSM8K test prompt) in two fresh processes in turn over one empty inductor cache directory: the first
    compiles every graph (``cold``), the second should load them (``warm``). Per process and method: the seconds spent
    compiling (apart from decoding), the FX graph cache's hits, misses and bypasses, and whether both processes
    decoded the same tokens. Written to ``figures/bench/compile_reuse_<name>_<dtype>_<CPU capability>.json``."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    cache = tempfile.mkdtemp(prefix="inductor-", dir=pipeline.repo_root() / "runs")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    runs = {}
    try:
        for which in ("cold", "warm"):
            print(f"{which} process: greedy and prompt lookup on the compiled step ({dtype}) ...", flush=True)
            cmd = [sys.executable, "-m", "multitoken", "bench-compile", "--model", name, "--dtype", dtype,
                   "--new-tokens", str(new_tokens), "--child"]
            done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            runs[which] = json.loads(done.stdout.strip().splitlines()[-1])
        size = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    cold, warm = runs["cold"], runs["warm"]
    rows = []
    for m, c in cold["methods"].items():
        w = warm["methods"][m]
        rows.append(dict(method=m, cold_compile_s=c["compile_s"], warm_compile_s=w["compile_s"],
                         warm_vs_cold=round(w["compile_s"] / c["compile_s"], 3) if c["compile_s"] else None,
                         decode_s_cold=c["decode_s"], decode_s_warm=w["decode_s"],
                         same_tokens=c["tokens"] == w["tokens"]))
    cap = torch.backends.cpu.get_cpu_capability()
    res = dict(model=name, dtype=dtype, new_tokens=new_tokens, torch_threads=torch.get_num_threads(),
               cpu_capability=cap, cache_mb=round(size / 2**20, 1), persistent=warm["persistent"],
               fx_graph_cache=dict(cold=cold["fx_graph_cache"], warm=warm["fx_graph_cache"]), methods=rows)
    out = out or pipeline.repo_root() / "figures" / "bench" / f"compile_reuse_{name}_{dtype}_{cap}.json"
    res["run"] = stages.record_output(out, "make bench-compile")
    write_json(out, res)
    print(pd.DataFrame(rows).to_string(index=False) + f"\n\ncache {res['cache_mb']} MB; {res['fx_graph_cache']}"
          f"\nwritten: {out}")
    return res


@torch.inference_mode()
def compile_reuse_child(name: str, dtype: str, new_tokens: int) -> dict:
    """One process of :func:`compile_reuse`: greedy, then prompt lookup, each decoded once on the compiled step."""
    import time

    from torch._dynamo.utils import counters

    from . import data as D
    from .core.pretrained import load
    from .decoding import speculative_generate
    from .utils import DTYPES

    model, tok = load(name)
    model = model.to(DTYPES[dtype]).eval()
    q = D.load_metamathqa("gsm8k", max_examples=10, test_examples=1)["test"]["query"][0]
    ids = tok(D.format_prompt(q), return_tensors="pt").input_ids
    methods = {}
    for method, drafter in (("greedy_compiled", "heads"), ("prompt_lookup_compiled", "prompt_lookup")):
        c0, t0 = compiled.COMPILE_S[0], time.perf_counter()
        seq = speculative_generate(model, ids, new_tokens, tree="none", drafter=drafter, fast="compiled")[0]
        spent = compiled.COMPILE_S[0] - c0
        methods[method] = dict(compile_s=round(spent, 1), decode_s=round(time.perf_counter() - t0 - spent, 2),
                               tokens=seq[0, ids.shape[1]:].tolist())
    fx = {k.removeprefix("fxgraph_cache_"): v for k, v in counters["inductor"].items()
          if k.startswith("fxgraph_cache")}
    return dict(methods=methods, fx_graph_cache=fx, persistent=compiled.PERSISTENT[0])


def training_bench(cfg, steps: int = 10):
    """NTP vs MTP n=2 and n=4 (naive and memory-efficient loss), each in a fresh process (a clean peak): step time
    (median of ``steps``, CUDA-fenced) and peak memory (CUDA max allocated on a GPU with bf16 autocast, peak RSS on
    the CPU), also above the resting state after the first step (weights, optimizer state)."""
    configs = [("ntp", 1, True), ("mtp2_naive", 2, False), ("mtp2_efficient", 2, True), ("mtp4_naive", 4, False),
               ("mtp4_efficient", 4, True)]
    rows = []
    for name, n, eff in configs:
        out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg), str(n), "1" if eff else "0", str(steps)],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"config": name, "n": n, "memory_efficient": eff, **r})
    base = rows[0]
    for r in rows:
        r["step_time_vs_ntp"] = round(r["step_s"] / base["step_s"], 3)
        r["peak_vs_ntp"] = round(r["peak_mb"] / base["peak_mb"], 3)
        # memory a training step adds above the resting state (weights, optimizer state, interpreter)
        r["step_peak_above_rest_mb"] = round(r["peak_mb"] - r["rest_mb"], 1)
    for r in rows:
        r["step_peak_above_rest_vs_ntp"] = round(r["step_peak_above_rest_mb"] / max(base["step_peak_above_rest_mb"],
                                                                                    1e-9), 3)
    dev = pipeline.device(cfg)
    path = pipeline.write_result(cfg, "train_benchmark.json", {
        "profile": cfg["profile"], "steps": steps, "machine_cpus": torch.get_num_threads(), "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "rows": rows},
        "make bench-train")
    print(pd.DataFrame(rows)[["config", "step_s", "step_time_vs_ntp", "peak_mb", "peak_vs_ntp",
                              "step_peak_above_rest_mb", "step_peak_above_rest_vs_ntp"]].to_string(index=False))
    print(f"\nwritten: {path}")
    return rows


@torch.no_grad()
def batch_bench(cfg, sizes=(1, 4, 16), prompts: int = 16, new_tokens: int = 48, variant: str = "medusa",
                trees=("chain:1", "chain:2", "chain", "medusa:8", "medusa:16"), rounds: int = 2,
                dtype: str | None = None, compiled_trees=("chain:2", "chain")) -> dict:
    """``make bench-batch``: :func:`batch_rows` on the profile's trained NTP model and ``variant``'s heads, in
    ``dtype`` (default the profile's ``inference_dtype``), over ``prompts`` test prompts; the trees are chosen on
    validation prompts. Where the profile's ``engine_step`` is ``compiled``, the compiled batched step too, its tree
    the fastest of ``compiled_trees`` (each step size a graph per batch size: tens of seconds each to compile).
    ``results/batch_benchmark.json`` (``batch_benchmark_<dtype>.json`` in another dtype)."""
    try:
        ntp, heads = (pipeline.load_variant(cfg, v, dtype=dtype) for v in ("ntp", variant))
    except FileNotFoundError as e:
        sys.exit(f"make bench-batch needs the trained {cfg['profile']} models: run `make all "
                 f"PROFILE={cfg['profile']}` first ({e})")
    _, _, tok, prep = pipeline.loaders(cfg)
    fit = lambda ps: [p for p in ps if len(p) + new_tokens <= pipeline.context_size(cfg)]  # noqa: E731
    test = fit(pipeline.eval_set(cfg, tok, prep)["prompts"])[:prompts]
    val = fit(pipeline.validation_prompts(cfg, tok, prep))
    rows = batch_rows(ntp, heads, test, val, sizes, new_tokens, trees, rounds, pad=tok.pad_token_id,
                      compiled_trees=tuple(compiled_trees) if cfg["engine_step"] == "compiled" else ())
    dt = str(next(ntp.parameters()).dtype)
    res = dict(profile=cfg["profile"], variant=variant, dtype=dt, device=str(pipeline.device(cfg)),
               prompts=len(test), new_tokens=new_tokens, rounds=rounds, torch_threads=torch.get_num_threads(),
               note="ratios: [min, max] over rounds of per-round tokens/s ratios; the tree of each batch size chosen "
                    "on validation prompts (after a warm-up at that batch size; every method warmed up before the rounds); tau: tokens per row per step of "
                    "batched speculation", rows=rows)
    same = dt == str(pipeline.resolve_dtype(cfg["inference_dtype"], pipeline.device(cfg)))
    name = "batch_benchmark.json" if same else f"batch_benchmark_{dt.removeprefix('torch.')}.json"
    pipeline.write_result(cfg, name, res, "make bench-batch")
    cols = ["batch", "tree", "spec_batched_tau", "hf_generate_tokens_per_s", "engine_no_drafts_tokens_per_s",
            "spec_rows_tokens_per_s", "spec_batched_tokens_per_s", "batched_vs_hf", "batched_vs_rows",
            "batched_identical_to_rows"] + (["tree_compiled", "spec_batched_compiled_tokens_per_s", "compiled_vs_hf",
                                             "compiled_identical_to_hf", "compile_s"] if "compile_s" in rows[0] else [])
    print(pd.DataFrame(rows)[cols].to_string(index=False))
    return res
