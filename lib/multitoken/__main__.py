"""``python -m multitoken {data,train,bench,bench-train,bench-batch,bench-length} -f params.yaml`` (``train`` also under ``accelerate launch`` /
``torchrun``); ``python -m multitoken notebooks|report --profile P`` for the pipeline and its HTML report."""
from __future__ import annotations

import argparse
import sys

from . import pipeline


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m multitoken")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train one variant with a profile's parameters")
    tr.add_argument("--variant", choices=list(pipeline.VARIANTS), required=True)
    for name in ("train", "bench", "bench-train", "bench-batch", "bench-length", "data"):
        p = tr if name == "train" else sub.add_parser(name)
        p.add_argument("-f", "--params", default=None, help="papermill parameter YAML (a profile)")
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override parameters")
        if name == "bench":
            p.add_argument("--repeat", type=int, default=1, help="independent benchmark runs (make bench REPEAT=n)")
        if name == "bench-batch":
            p.add_argument("--sizes", type=int, nargs="*", default=[1, 4, 16], help="batch sizes")
            p.add_argument("--prompts", type=int, default=16, help="test prompts (chunks of the batch size)")
            p.add_argument("--new-tokens", type=int, default=48)
            p.add_argument("--variant", default="medusa", help="the head model: medusa, mtp, mtp_seq")
            p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the profile's inference_dtype)")
    nb = sub.add_parser("notebooks", help="run the profile's stages (numbered notebooks) that are not up to date (make all)")
    nb.add_argument("--profile", default="pretrained")
    nb.add_argument("--only", nargs="*", help="run just these stages, e.g. 02_train_mtp")
    nb.add_argument("--force", action="store_true", help="run every stage (make all FORCE=1)")
    nb.add_argument("--from", dest="start", default=None, help="run this stage and every later one (make all FROM=...)")
    nb.add_argument("--dry-run", action="store_true", help="say what would run and why, run nothing (make all DRY=1)")
    rp = sub.add_parser("report", help="runs/<profile>/report.html from the executed notebooks")
    rp.add_argument("--profile", default="pretrained")
    st = sub.add_parser("bench-steps", help="one decoding step's cost for 1..16 tokens: HF, the engine eager and fast")
    st.add_argument("--model", default="smollm2-135m-instruct", help="a registry name, local directory or hub name")
    pe = sub.add_parser("bench-peers", help="greedy decoding every way (HF's peers, this engine's steps), no training")
    pe.add_argument("--model", default="smollm2-135m-instruct", help="a registry name, local directory or hub name")
    pe.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    pe.add_argument("--prompts", type=int, default=16)
    pe.add_argument("--new-tokens", type=int, default=128)
    cc = sub.add_parser("bench-compile", help="compiled steps in two fresh processes: compiled, then loaded from disk")
    cc.add_argument("--model", default="smollm2-135m-instruct", help="a registry name, local directory or hub name")
    cc.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    cc.add_argument("--new-tokens", type=int, default=32)
    cc.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cmd == "bench-compile":
        import json

        from .bench import compile_reuse, compile_reuse_child

        if args.child:
            print(json.dumps(compile_reuse_child(args.model, args.dtype, args.new_tokens)))
        else:
            compile_reuse(args.model, args.dtype, args.new_tokens)
        return 0
    if args.cmd == "bench-peers":
        from .bench import peers

        peers(args.model, args.dtype, args.prompts, args.new_tokens)
        return 0
    if args.cmd == "bench-steps":
        from .bench import step_costs

        step_costs(args.model)
        return 0
    if args.cmd == "notebooks":
        from .stages import run_stages

        return run_stages(args.profile, force=args.force, start=args.start or None, only=args.only, dry=args.dry_run)
    if args.cmd == "report":
        from .report import build_report
        from .stages import runs_table, stamp_path

        runs = runs_table(args.profile) if stamp_path(args.profile, "x").parent.exists() else None
        print(f"written: {build_report(args.profile, runs=runs)}")
        return 0
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = pipeline.profile_config(args.params, **overrides) if args.params else pipeline.config(**overrides)
    if args.cmd == "data":
        pipeline.run_data(cfg)
    elif args.cmd == "train":
        pipeline.train_variant(cfg, args.variant)
    elif args.cmd == "bench":
        from .bench import decoding_bench

        decoding_bench(cfg, repeat=args.repeat)
    elif args.cmd == "bench-length":
        from .bench import length_section

        length_section(cfg)
    elif args.cmd == "bench-batch":
        from .bench import batch_bench

        batch_bench(cfg, sizes=tuple(args.sizes), prompts=args.prompts, new_tokens=args.new_tokens,
                    variant=args.variant, dtype=args.dtype)
    else:
        from .bench import training_bench

        training_bench(cfg)
    return 0


def cli(argv=None) -> int:
    """``main`` with a one-line message instead of a traceback for settings and stages that cannot run."""
    from .settings import SettingsError
    from .stages import StageError

    try:
        return main(argv)
    except (SettingsError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
