"""The workbook's steps, one function each; notebooks and ``python -m multitoken`` call these.

``DEFAULTS`` is the smoke profile (what nbval runs); ``notebooks/params/<profile>.yaml`` overrides it
(``multitoken.settings`` types and checks every key).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping

import pandas as pd
import torch

from . import data as D
from . import evaluation as E
from .core import fastpath
from .core import pretrained as P
from . import report as R
from . import settings
from . import stats as S
from . import training as T
from .core.medusa import MedusaMixin
from .core.models import HEAD_TYPES, MultiTokenMixin
from .decoding.trees import fitted_tree, medusa_tree
from .utils import (atomic_dir, commit, in_stage, models_run, record_output, repo_root, resolve_device, resolve_dtype,
                    run_part, sha256_of, write_csv, write_json)

VARIANTS = ("ntp", "mtp", "medusa", "mtp_seq")
HEADED = VARIANTS[1:]  # the variants with heads that draft
FROZEN = ("medusa", "mtp_seq")  # heads on the frozen NTP model: its next-token logits, so its greedy answers
NOTEBOOK_OF = {"ntp": "01_train_ntp", "mtp": "02_train_mtp", "medusa": "03_train_medusa", "mtp_seq": "03_train_medusa",
               "base": "00_data"}

DEFAULTS = settings.DEFAULTS  # every key with its default: the smoke profile (multitoken.settings types them)


def config(**overrides) -> dict:
    """The defaults with ``overrides``, every key checked (``settings.SettingsError`` names an unknown key's nearest
    valid one), then resolved: the device and dtype checked here, before any work; a profile that names a pretrained
    ``model_name`` uses that model's own tokenizer unless it names another; nanochat's fields applied; bf16 settings
    in fp32 on a CPU without fast bf16 (``cpu_bf16_fallback``)."""
    return resolve(settings.validate(overrides, "overrides").flat())


def profile_config(profile: str, root=None, **overrides) -> dict:
    """``<root>/notebooks/params/<profile>.yaml`` (or a YAML file's path) over the defaults, checked and resolved like
    :func:`config`; ``root``: the workbook's (default :func:`repo_root`)."""
    return resolve(settings.load(profile, root or repo_root(), **overrides).flat())


def resolve(cfg: dict) -> dict:
    if cfg["model_name"] and not cfg["tokenizer_name"]:
        cfg["tokenizer_name"] = cfg["model_name"]
    if cfg["use_mtp"] is not None:
        from .compat.interfaces import nanochat_fields

        cfg.update(nanochat_fields(cfg["use_mtp"], cfg["mtp_n_tokens"], cfg["mtp_weight"]))
    dev = resolve_device(cfg["device"])
    resolve_dtype(cfg["inference_dtype"], dev)
    if cfg["cpu_bf16_fallback"] and dev.type == "cpu":
        cfg = cpu_fp32_fallback(cfg)
    for name in cfg["ablation_head_types"]:
        head_design(name)
    return cfg


BF16_FIELDS = ("inference_dtype", "quality_dtype", "distill_dtype", "thesis_dtype")


def cpu_fp32_fallback(cfg, fast=None) -> dict:
    """``cfg`` with its bf16 settings in fp32 when this CPU has no fast bf16 (``fastpath.cpu_bf16_fast``; ``fast``
    overrides the probe): training autocast off, bf16 evaluation / distillation / thesis dtypes to float32, and bf16
    dropped from the benchmark's extra dtypes; a warning names what changed. Unchanged where bf16 is fast or nothing
    asks for it."""
    asks = cfg["cpu_bf16"] or "bfloat16" in cfg["bench_extra_dtypes"] or any(
        cfg[k] == "bfloat16" for k in BF16_FIELDS)
    if not asks or (fastpath.cpu_bf16_fast() if fast is None else fast):
        return cfg
    import warnings

    out = dict(cfg, cpu_bf16=False, bench_extra_dtypes=[d for d in cfg["bench_extra_dtypes"] if d != "bfloat16"],
               **{k: "float32" for k in BF16_FIELDS if cfg[k] == "bfloat16"})
    changed = [k for k in out if out[k] != cfg[k]]
    warnings.warn(f"this CPU has no fast bfloat16 (no AVX-512 BF16 / AMX: bf16 products are emulated, far slower than "
                  f"fp32), so profile {cfg['profile']!r} runs in float32 where it asked for bf16 ({', '.join(sorted(changed))}); "
                  "set cpu_bf16_fallback: false to keep bf16", stacklevel=2)
    return out


def device(cfg) -> torch.device:
    return resolve_device(cfg["device"])


def context_size(cfg) -> int:
    """The model's context: ``n_positions`` of a GPT-2 trained from scratch, or the pretrained model's own."""
    if not cfg["model_name"]:
        return cfg["n_positions"]
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(P.model_dir(str(cfg["model_name"]))).max_position_embeddings


def bench_tokens(cfg) -> int:
    return cfg["bench_max_new_tokens"] or cfg["max_new_tokens"]


def sweep_tokens(cfg) -> int:
    """New tokens per validation prompt in the tree sweep (selection): ``sweep_max_new_tokens``, else the benchmark's."""
    return cfg["sweep_max_new_tokens"] or bench_tokens(cfg)


def variants(cfg) -> tuple:
    """The rows of the quality table: ``base`` (the pretrained model as installed, no fine-tuning) where the profile
    starts from one, then the four trained variants."""
    return (("base",) if cfg["model_name"] else ()) + VARIANTS


def family(cfg) -> str:
    """The backbone family the profile's models belong to ('gpt2' for the from-scratch profiles)."""
    return P.family(str(cfg["model_name"])) if cfg["model_name"] else "gpt2"


def paths(cfg) -> dict:
    root = repo_root()
    run = root / "runs" / cfg["profile"]
    fig = run / "figures" if cfg["profile"] == "smoke" else root / "figures" / cfg["profile"]
    for d in (run / "results", fig):
        d.mkdir(parents=True, exist_ok=True)
    return {"run": run, "results": run / "results", "models": run / "models", "figures": fig}


# --- 00 data -------------------------------------------------------------------------------------------------------

def run_data(cfg) -> dict:
    p = paths(cfg)
    return D.prepare(p["run"], source=cfg["source"], max_examples=cfg["max_examples"], seed=cfg["seed"],
                     tokenizer_name=cfg["tokenizer_name"], vocab_size=cfg["vocab_size"],
                     max_seq_len=cfg["max_seq_len"], val_fraction=cfg["val_fraction"],
                     test_examples=cfg["test_examples"], first_examples=cfg["first_examples"],
                     prompt_format=cfg["prompt_format"])


def loaders(cfg):
    prep = D.load_prepared(paths(cfg)["run"])
    tok = prep["tokenizer"]
    D.check_max_seq_len(cfg["max_seq_len"], context_size(cfg))
    t = prep["tokenized"]
    return (D.make_dataloader(t["train"], tok, cfg["batch_size"], shuffle=True, seed=cfg["seed"]),
            D.make_dataloader(t["validation"], tok, cfg["batch_size"]), tok, prep)


# --- 01-03 training ------------------------------------------------------------------------------------------------

def _common(cfg, prefix):
    return dict(num_train_epochs=cfg[f"{prefix}_epochs"], learning_rate=cfg[f"{prefix}_lr"],
                gradient_accumulation_steps=cfg[f"{prefix}_grad_accum"] if f"{prefix}_grad_accum" in cfg else 1,
                eval_steps=cfg["eval_steps"], logging_steps=cfg["logging_steps"], max_steps=cfg["max_steps"],
                seed=cfg["seed"], warmup_steps=cfg["warmup_steps"], device=device(cfg), cpu_bf16=cfg["cpu_bf16"])


def model_config(cfg):
    return dict(n_layer=cfg["n_layer"], n_embd=cfg["n_embd"], n_head=cfg["n_head"], n_positions=cfg["n_positions"],
                vocab_size=cfg["model_vocab_size"])


def mtp_fields(cfg) -> dict:
    return dict(head_type=cfg["mtp_head_type"], sequential=cfg["mtp_sequential"],
                share_weights_across_steps=cfg["mtp_share"], head_own_unembedding=cfg["mtp_own_unembedding"],
                num_trunk_layers=cfg["mtp_trunk_layers"],
                loss_weighting=cfg["mtp_weighting"], loss_beta=cfg["mtp_beta"], loss_lambda=cfg["mtp_lambda"], mtp_warmup_steps=cfg["mtp_warmup_steps"],
                memory_efficient_loss=cfg["mtp_memory_efficient"])


def train_variant(cfg, variant: str, control: str | None = None):
    """Train ``ntp``, ``mtp``, ``medusa`` or ``mtp_seq``; the model lands in
    ``runs/<profile>/models/<variant>/final``. ``control``: the MTP run of that name in ``mtp_controls`` instead of
    the recipe (``models/mtp_<control>/``, ``results/mtp_<control>_train_log.csv``)."""
    p = paths(cfg)
    tr, va, tok, prep = loaders(cfg)
    if control is not None:
        if variant != "mtp" or control not in cfg["mtp_controls"]:
            raise ValueError(f"no MTP control {control!r}; the profile's mtp_controls: {sorted(cfg['mtp_controls'])}")
        cfg = Overlay(cfg, cfg["mtp_controls"][control])
    name = variant if control is None else mtp_run_dir(cfg, control).name
    out, log = p["models"] / name, p["results"] / f"{name}_train_log.csv"
    if variant == "ntp":
        model, _ = T.train_standard_gpt2(tr, va, tok, out, model_name=cfg["model_name"], model_config=model_config(cfg),
                                         log_csv=log, **_common(cfg, "ntp"))
    elif variant == "mtp":
        model, _ = T.train_multi_token_gpt2(tr, va, tok, out, num_tokens_to_predict=cfg["mtp_n"],
                                            base_model=cfg["model_name"], model_config=model_config(cfg),
                                            log_csv=log, mtp=mtp_fields(cfg), trunk_lr_scale=cfg["mtp_trunk_lr_scale"],
                                            heads_first_steps=cfg["mtp_heads_first_steps"], **_common(cfg, "mtp"))
    elif variant in ("medusa", "mtp_seq"):
        base = _ntp_checkpoint(p)
        prefix = "medusa" if variant == "medusa" else "mtpseq"
        if cfg[f"{prefix}_self_distill"]:
            # train *and* validate on the base model's own greedy continuations: that is what the heads must
            # predict at decoding time (validation on the references would show a loss that rises as heads improve)
            tr, va = distilled_loaders(cfg, prep, tok)
        if cfg[f"{prefix}_features"]:
            model = _heads_on_features(cfg, variant, base, tr, va, tok, out, log)
        elif variant == "medusa":
            model, _ = T.train_medusa(base, tr, va, tok, out, num_medusa_heads=cfg["medusa_heads"],
                                      medusa_num_layers=cfg["medusa_layers"], draft_vocab=cfg["medusa_draft_vocab"],
                                      log_csv=log, **_common(cfg, "medusa"))
        else:
            model, _ = T.train_multi_token_gpt2(tr, va, tok, out, num_tokens_to_predict=cfg["mtpseq_n"],
                                                base_model=str(base), log_csv=log, mtp=mtpseq_fields(cfg),
                                                freeze_backbone=cfg["mtpseq_freeze"],
                                                draft_vocab=cfg["mtpseq_draft_vocab"], **_common(cfg, "mtpseq"))
    else:
        raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")
    return model


def _heads_on_features(cfg, variant, base, tr, va, tok, out, log, n_tokens=None, feats=None):
    """Fresh heads of ``variant`` on the frozen NTP model, trained with the profile's recipe on cached features (the
    first ``n_tokens`` training tokens when given: not saved); ``feats``: the (train, validation) features when the
    caller holds them already."""
    from transformers import set_seed

    prefix = "medusa" if variant == "medusa" else "mtpseq"
    if variant == "mtp_seq" and not cfg["mtpseq_freeze"]:
        raise ValueError("mtpseq_features: true needs mtpseq_freeze: true (a trunk that trains has no fixed states to "
                         "cache)")
    set_seed(cfg["seed"])
    model = (T.build_medusa(base, tok, tr, cfg["medusa_heads"], cfg["medusa_layers"], cfg["medusa_draft_vocab"])
             if variant == "medusa" else T.build_mtp_model(tok, cfg["mtpseq_n"], str(base), train_dataloader=tr,
                                                           draft_vocab=cfg["mtpseq_draft_vocab"], **mtpseq_fields(cfg)))
    model.freeze_backbone()
    train, val = feats or [head_features(cfg, model, loader, variant, split) for split, loader in (("train", tr),
                                                                                                  ("validation", va))]
    if n_tokens is not None:
        train = train.first(n_tokens)
    model, _ = T.train_heads_on_features(model, train, val, tok, out, log_csv=log, batch_size=tr.batch_size,
                                         save=n_tokens is None, **_common(cfg, prefix))
    return model


def run_drafter_scaling(cfg, models: dict | None = None) -> pd.DataFrame:
    """Where the frozen model's drafters stop gaining from more text: for each family trained on cached features
    (``medusa_features``, ``mtpseq_features``), heads trained afresh with the profile's recipe on the first N
    training tokens (each N of ``drafter_scaling_tokens`` below the total) beside the stage's own model (all of them),
    each scored on the validation text (the model's own continuations where self-distilled): every head's top-1, the
    first draft's acceptance and the chain's τ (``T.acceptance``). With ``drafter_scaling_reference`` the same on
    the reference solutions of the distilled prompts (column ``text``; each N only, no model on all of them), scored
    on the same validation text: which training text helps. Writes ``results/drafter_scaling.csv``."""
    p = paths(cfg)
    rows = []
    for variant, prefix in (("medusa", "medusa"), ("mtp_seq", "mtpseq")):
        if not cfg[f"{prefix}_features"]:
            continue
        tr, va, tok, prep = loaders(cfg)
        if cfg[f"{prefix}_self_distill"]:
            tr, va = distilled_loaders(cfg, prep, tok)
        base, scratch = _ntp_checkpoint(p), p["models"] / "scaling" / variant
        full = (models or {}).get(variant) or load_variant(cfg, variant)
        train, val = (head_features(cfg, full, loader, variant, split) for split, loader in (("train", tr),
                                                                                              ("validation", va)))
        texts = [("self-distilled" if cfg[f"{prefix}_self_distill"] else "reference", tr, train, full)]
        if cfg["drafter_scaling_reference"] and cfg[f"{prefix}_self_distill"]:
            ref = D.tokenize_dataset(distill_prompts(cfg, prep)["train"], tok, cfg["max_seq_len"])
            end = T.leading_examples(ref["labels"], max(cfg["drafter_scaling_tokens"]))   # as many as needed
            ref = D.make_dataloader(ref.select(range(end)), tok, cfg["batch_size"], True)
            texts.append(("reference", ref, head_features(cfg, full, ref, variant, "reference"), None))
        for text, loader, feats, whole in texts:
            total = feats.num_tokens
            runs = [(n, None) for n in cfg["drafter_scaling_tokens"] if n < total] + ([(total, whole)] if whole else [])
            for n, model in runs:
                if model is None:
                    model = _heads_on_features(cfg, variant, base, loader, va, tok, scratch, None, n_tokens=n,
                                               feats=(feats, val))
                acc = T.acceptance(T.head_hits(model, val))
                top1 = {f"head{k}_top1": a for k, a in enumerate(acc.pop("per_head_top1"), 1)}
                rows.append({"variant": variant, "text": text, "train_tokens": n, **acc, **top1})
    df = pd.DataFrame(rows)
    write_csv(p["results"] / "drafter_scaling.csv", df)
    return df


def head_features(cfg, model, loader, variant: str, split: str) -> T.FeatureSet:
    """The states ``model``'s heads read over ``loader``'s text (``T.cache_head_features``, bf16), kept under
    ``runs/<profile>/data/features/<variant>/`` and reused while the frozen model, what the heads read and the text
    are the same (a key of the NTP checkpoint's hash, the model class and cut, and a hash of the tokens)."""
    import hashlib

    text = hashlib.sha256(json.dumps([[r["input_ids"], r["labels"]] for r in loader.dataset]).encode()).hexdigest()
    key = dict(model_sha256=sha256_of(_ntp_checkpoint(paths(cfg)) / "model.safetensors"), reads=type(model).__name__,
               cut=model._trunk_cut, text_sha256=text, dtype="bfloat16")
    folder = paths(cfg)["run"] / "data" / "features" / variant
    file, meta = folder / f"{split}.safetensors", folder / f"{split}.json"
    if file.exists() and meta.exists() and json.loads(meta.read_text()) == key:
        return T.FeatureSet.load(file)
    feats = T.cache_head_features(model, loader, desc=f"{variant}: {split} features")
    folder.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)                       # the key is written last: a half-written file is never taken
    tmp = file.with_suffix(".tmp")
    feats.save(tmp)
    tmp.replace(file)
    write_json(meta, key)
    return feats


class Overlay(Mapping):
    """``base`` with some keys changed (an MTP control's settings over the profile's): reading a changed key does
    not count as reading the profile's (a stage's recorded settings stay what it read)."""

    def __init__(self, base, changes: dict):
        self.base, self.changes = base, dict(changes)

    def __getitem__(self, key):
        return self.changes[key] if key in self.changes else self.base[key]

    def __contains__(self, key):
        return key in self.changes or key in self.base

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)


def mtp_run_dir(cfg, run: str):
    """The folder of MTP run ``run``: ``"recipe"`` (the profile's own) or a control of ``mtp_controls``."""
    return paths(cfg)["models"] / ("mtp" if run == "recipe" else f"mtp_{run}")


def mtp_measured(cfg) -> str:
    """The MTP run that notebooks 04-07 measure as ``mtp``: with ``mtp_select`` the one notebook 02 chose
    (``results/mtp_selection.json``; a clear error before 02 has chosen), else ``"recipe"``."""
    if not cfg["mtp_select"]:
        return "recipe"
    chosen = paths(cfg)["results"] / "mtp_selection.json"
    if not chosen.exists():
        raise FileNotFoundError(f"{chosen} is missing: mtp_select needs notebooks/02_train_mtp.ipynb's choice")
    return json.loads(chosen.read_text())["run"]


def train_log(cfg, variant: str):
    """``results/<variant>_train_log.csv``; for ``mtp``, the log of the run measured as ``mtp`` (named like its
    folder, :func:`mtp_run_dir`)."""
    name = mtp_run_dir(cfg, mtp_measured(cfg)).name if variant == "mtp" else variant
    return paths(cfg)["results"] / f"{name}_train_log.csv"


def run_mtp_controls(cfg, models: dict | None = None, keep=run_part) -> pd.DataFrame:
    """Train every control of ``mtp_controls`` (the recipe trained before, in ``models["mtp"]`` or on disk) and
    tabulate each MTP run on the validation problems: next-token perplexity, each head's top-1, and whether its heads
    train (some auxiliary weight above 0: not the lambda = 0 control). With ``mtp_select`` the run with the lowest
    validation next-token perplexity among those whose heads train becomes notebook 04's ``mtp``
    (``results/mtp_selection.json``). Writes ``results/mtp_controls.csv``. ``keep``: ``stages.section`` in a
    notebook, so an interrupted stage resumes after the last control it trained."""
    val = loaders(cfg)[1]
    runs = {"recipe": (models or {}).get("mtp")}
    for name in cfg["mtp_controls"]:
        keep(cfg, f"mtp_{name}", lambda name=name: train_variant(cfg, "mtp", control=name) and None)
        runs[name] = None
    rows = []
    for name, model in runs.items():
        if model is None:
            model = _load_checkpoint(cfg, mtp_run_dir(cfg, name) / "final", MultiTokenMixin, "mtp")
        model.eval()
        nll, ntok = E.token_nll(model, val)
        acc = head_accuracy(model, val)
        rows.append({"run": name, "changes": json.dumps(cfg["mtp_controls"].get(name, {})),
                     "heads_train": any(w > 0 for w in model.head_loss_weights()),
                     "val_perplexity": math.exp(sum(nll) / sum(ntok)),
                     **{f"head{k}_top1": a for k, a in enumerate(acc[1:], 1)}})
    df = pd.DataFrame(rows)
    res = paths(cfg)["results"]
    write_csv(res / "mtp_controls.csv", df)
    if cfg["mtp_select"]:
        best = df[df.heads_train].sort_values("val_perplexity").iloc[0]
        write_json(res / "mtp_selection.json", {"run": best.run, "val_perplexity": best.val_perplexity,
                                                "among": list(df[df.heads_train].run)})
    return df


def _ntp_checkpoint(p):
    base = p["models"] / "ntp" / "final"
    if not base.exists():
        raise FileNotFoundError(f"{base} is missing: train the NTP baseline first (notebooks/01_train_ntp.ipynb)")
    return base


def mtpseq_fields(cfg) -> dict:
    """DeepSeek-V3 MTP modules (sequential transformer heads); FastMTP's one shared module with ``mtpseq_share``."""
    return dict(head_type="transformer", sequential=True, share_weights_across_steps=cfg["mtpseq_share"],
                loss_weighting=cfg["mtpseq_weighting"], memory_efficient_loss=cfg["mtp_memory_efficient"])


def distill_prompts(cfg, prep) -> dict:
    """The records whose prompts self-distillation continues: the first ``medusa_max_examples`` training records
    (beyond the fine-tuning sample: more of the source's train pool) and every validation record; their
    ``response`` is still the reference solution."""
    out = {}
    for split in ("train", "validation"):
        raw, n = prep["raw"][split], cfg["medusa_max_examples"] if split == "train" else None
        if n and len(raw) > n:
            raw = raw.select(range(n))  # already shuffled by the split
        elif n and len(raw) < n:
            raw = D.more_prompts(cfg["source"], prep["raw"], n, cfg["seed"])
        out[split] = raw
    return out


def distilled_loaders(cfg, prep, tok):
    """Medusa's self-distillation data: the frozen NTP model's greedy continuations of the first
    ``medusa_max_examples`` training prompts and of the validation prompts, as long as decoding will verify
    (``bench_max_new_tokens``, within ``max_seq_len``). Generated once per NTP checkpoint and cached under
    ``runs/<profile>/data/distilled/``: MEDUSA-1's heads and the MTP modules train on the same text. Generated in
    parts of ``8 x distill_batch`` prompts, each saved when done: an interrupted generation resumes after its last
    saved part."""
    import shutil

    from datasets import concatenate_datasets, load_from_disk

    base = _ntp_checkpoint(paths(cfg))
    n_new = min(bench_tokens(cfg), cfg["max_seq_len"])
    key = dict(model_sha256=sha256_of(base / "model.safetensors"), max_new_tokens=n_new,
               max_examples=cfg["medusa_max_examples"], dtype=cfg["distill_dtype"] or cfg["inference_dtype"],
               **({"engine": cfg["distill_engine"]} if cfg["distill_engine"] != "hf" else {}))
    cache = paths(cfg)["run"] / "data" / "distilled"
    meta, parts = cache / "key.json", cache / "parts"
    if not (meta.exists() and json.loads(meta.read_text()) == key):
        meta.unlink(missing_ok=True)
        if not ((parts / "key.json").exists() and json.loads((parts / "key.json").read_text()) == key):
            shutil.rmtree(parts, ignore_errors=True)
            write_json(parts / "key.json", key)
        dev, model = device(cfg), None
        per_part = 8 * cfg["distill_batch"]
        for split, raw in distill_prompts(cfg, prep).items():
            done = []
            for i in range(0, len(raw), per_part):
                part = parts / f"{split}_{i // per_part:05d}"
                if not part.exists():
                    model = model or P.load_model(str(base), dtype=resolve_dtype(
                        cfg["distill_dtype"] or cfg["inference_dtype"], dev), device=dev)
                    ds = T.self_distill(model, tok, raw.select(range(i, min(i + per_part, len(raw)))),
                                        max_new_tokens=n_new, batch_size=cfg["distill_batch"],
                                        engine=cfg["distill_engine"])
                    atomic_dir(part, lambda tmp, ds=ds: ds.save_to_disk(str(tmp)))
                done.append(load_from_disk(str(part)))
            whole = concatenate_datasets(done)
            atomic_dir(cache / split, lambda tmp, whole=whole: whole.save_to_disk(str(tmp)))
        write_json(meta, key)
        shutil.rmtree(parts, ignore_errors=True)
    return tuple(D.make_dataloader(D.tokenize_dataset(load_from_disk(str(cache / split)), tok, cfg["max_seq_len"]),
                                   tok, cfg["batch_size"], split == "train") for split in ("train", "validation"))


def load_variant(cfg, variant: str, dtype: str | None = None):
    """A trained variant on the profile's device (``device``) in ``dtype`` (default: its ``inference_dtype``), in eval
    mode."""
    dtype = dtype or cfg["inference_dtype"]
    if variant == "base":
        dev = device(cfg)
        return P.load_model(str(cfg["model_name"]), dtype=resolve_dtype(dtype, dev), device=dev)
    d = paths(cfg)["models"] / variant / "final"
    if variant == "mtp":
        d = mtp_run_dir(cfg, mtp_measured(cfg)) / "final"
    want = {"ntp": None, "mtp": MultiTokenMixin, "medusa": MedusaMixin, "mtp_seq": MultiTokenMixin}[variant]
    return _load_checkpoint(cfg, d, want, variant, dtype)


def _load_checkpoint(cfg, d, want, variant, dtype=None):
    dtype = dtype or cfg["inference_dtype"]
    if not d.exists():
        raise FileNotFoundError(f"{d} is missing: run notebooks/{NOTEBOOK_OF[variant]}.ipynb (profile "
                                f"{cfg['profile']}) first")
    check_family(cfg, d)
    dev = device(cfg)
    model = P.load_model(str(d), dtype=resolve_dtype(dtype, dev), device=dev)
    if want is not None and not isinstance(model, want):
        raise ValueError(f"{d} holds a {type(model).__name__}, not a {variant} model: retrain it "
                         f"(notebooks/{NOTEBOOK_OF[variant]}.ipynb)")
    return model


def check_family(cfg, checkpoint) -> None:
    """A clear error when a checkpoint belongs to another backbone family than the profile's model (e.g. runs/ of a
    GPT-2 profile left under a profile that now names a Llama)."""
    from transformers import AutoConfig

    from .core.backbones import family_of

    P.check_checkpoint_dir(checkpoint)
    got, want = family_of(AutoConfig.from_pretrained(str(checkpoint))), family(cfg)
    if got != want:
        raise ValueError(f"{checkpoint} holds a {got} checkpoint, but profile {cfg['profile']!r} names a {want} model "
                         f"({cfg['model_name'] or 'GPT-2 from scratch'}): retrain it, or `make clean` the profile's "
                         "runs/")


def head_accuracy(model, loader, max_batches=20) -> list:
    """Validation top-1 accuracy per offset (index 0 = next token), on the model's device."""
    model.eval()
    dev, accs = E.model_device(model), []
    with torch.no_grad():
        for i, b in enumerate(loader):
            if i >= max_batches:
                break
            accs.append(model(**E.to_device(b, dev)).step_accuracy.tolist())
    return pd.DataFrame(accs).mean().tolist()


@torch.no_grad()
def head_topk_accuracy(model, loader, k=8, max_batches=10):
    """acc[d][j] = P(head d+1's (j+1)-th ranked token is the right one) on validation responses; ranks up to k, or
    up to the size of the heads' output where that is smaller (a draft vocabulary)."""
    model.eval()
    dev = E.model_device(model)
    hits, n = None, 0
    for i, b in enumerate(loader):
        if i >= max_batches:
            break
        b = E.to_device(b, dev)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_head_logits=True)
        if hits is None:
            k = min(k, min(lg.shape[-1] for lg in out.head_logits))
            hits = torch.zeros(model.num_heads, k, device=dev)
        for d, lg in enumerate(out.head_logits, 1):
            T = b["labels"].shape[1]
            tgt = b["labels"][:, d + 1:]
            top = model.head_token_ids(lg[:, : T - d - 1].topk(k, -1).indices)
            valid = tgt != -100
            hits[d - 1] += ((top == tgt.unsqueeze(-1)) & valid.unsqueeze(-1)).sum((0, 1)).float()
            if d == 1:
                n += int(valid.sum())
    if hits is None:
        raise ValueError("head_topk_accuracy needs at least one batch")
    return (hits / max(n, 1)).cpu().tolist()


# --- 04 evaluation -------------------------------------------------------------------------------------------------

def eval_split(prep) -> str:
    """The held-out split results are reported on: GSM8K's official ``test``, else ``validation``."""
    return "test" if "test" in prep["raw"] else "validation"


def eval_set(cfg, tok, prep) -> dict:
    """The first ``eval_examples`` problems of the evaluation split: prompt ids, reference responses (untruncated
    text), and a loader over the same problems' tokenized form (for perplexity). Prompts with no room left in the
    context are skipped, with a count in the log."""
    split = eval_split(prep)
    raw = prep["raw"][split]
    raw = raw.select(range(min(cfg["eval_examples"], len(raw))))
    prompts = [torch.tensor(tok(D.format_prompt(q, tok), add_special_tokens=False)["input_ids"], dtype=torch.long)
               for q in raw["query"]]
    keep = E.fitting(prompts, context_size(cfg), 1, "evaluation")
    raw = raw.select(keep)
    tokenized = D.tokenize_dataset(raw, tok, cfg["max_seq_len"])
    return {"split": split, "prompts": [prompts[i] for i in keep], "references": list(raw["response"]),
            "loader": D.make_dataloader(tokenized, tok, cfg["batch_size"]), "skipped": len(prompts) - len(keep)}


def variant_of(method: str) -> str:
    """The variant whose model a benchmark method runs."""
    return next((v for v in ("mtp_seq", "mtp", "medusa") if method.endswith(v) or f"{v}_" in method), "ntp")


def baseline_variant(cfg, v: str) -> str:
    """The variant whose HF generate ``v``'s methods are timed against: NTP's for the frozen-backbone families (the
    same weights, the same outputs) unless ``frozen_hf_baselines``, else ``v``'s own."""
    return "ntp" if v in FROZEN and not cfg["frozen_hf_baselines"] else v


def engine_step(cfg):
    """``speculative_generate``'s ``fast`` for the profile's ``engine_step``: True (eager, fastest layouts) or
    "compiled" (one graph per step size, ``core.compiled``)."""
    return "compiled" if cfg["engine_step"] == "compiled" else True


def decoding_methods(cfg, models: dict, trees: dict, hybrids: dict | None = None):
    """Every method the benchmark can time (``hybrids``: each family's ``(tree, spec)`` chosen on validation, see
    :func:`bench_hybrids`; otherwise the family's tree and an uncapped hybrid)."""
    M, step = E.Method, engine_step(cfg)
    meths = [M.hf("hf_greedy", models["ntp"])]
    for v in HEADED:
        if baseline_variant(cfg, v) == "ntp":
            continue  # its HF generate is NTP's: the same weights, the same outputs
        meths.append(M.hf(f"hf_greedy_{v}", models[v]))
    if cfg["bench_compiled_peer"]:
        meths.append(M.hf_compiled("hf_compiled", models["ntp"], "hf_greedy"))
    meths += [M.hf("hf_prompt_lookup", models["ntp"], "hf_greedy", prompt_lookup_num_tokens=10),
              M.engine("greedy_kv", models["ntp"], "none", baseline="hf_greedy", fast=step),
              M.engine("prompt_lookup", models["ntp"], "none", "prompt_lookup", "hf_greedy", fast=step)]
    for v in HEADED:
        base = "hf_greedy" if baseline_variant(cfg, v) == "ntp" else f"hf_greedy_{v}"
        meths += [M.engine(f"{v}_chain", models[v], "chain", baseline=base, fast=step),
                  M.engine(f"{v}_tree", models[v], trees[v], baseline=base, fast=step)]
        if v != "mtp_seq":  # the MTP modules' caches follow their own tree: no hybrid
            tree, spec = (hybrids or {}).get(v, (trees[v], "hybrid"))
            meths.append(M.engine(f"{v}_hybrid", models[v], tree, spec, base, fast=step))
    return meths


def _sweep_accuracy(cfg, models, loader):
    """``acc(variant)``: the top-k accuracies the validation sweep fitted its trees from
    (``results/head_topk_accuracy.json``, on the same loader), measured on ``loader`` for a family it lacks."""
    f = paths(cfg)["results"] / "head_topk_accuracy.json"
    accs = json.loads(f.read_text()) if f.exists() else {}
    return lambda v: accs[v] if v in accs else head_topk_accuracy(models[v], loader)


def bench_trees(cfg, models, loader, budget, prep=None):
    """The tree per head family for the benchmark: fitted to measured top-k accuracy (on ``loader``, the validation
    split) under ``budget`` nodes; or with ``"auto"`` the tree that was fastest in this machine's sweep on the
    validation prompts (``results/tree_sweep.csv``, run if missing), fitted or Medusa's sparse tree."""
    if budget != "auto":
        return {v: fitted_tree(head_topk_accuracy(models[v], loader), budget) for v in HEADED}
    sweep = tree_sweep(cfg, models, loader, prep)
    acc = _sweep_accuracy(cfg, models, loader)
    trees = {}
    for v in HEADED:
        best = sweep[(sweep.variant == v) & ~sweep.tree.isin(["chain", "hybrid"])].sort_values("speedup").iloc[-1]
        if best.tree == "fitted":
            trees[v] = fitted_tree(acc(v), int(best.budget))
        else:
            trees[v] = medusa_tree(int(best.budget), models[v].num_heads)
    return trees


def hybrid_tree(cfg, acc):
    """The heads' tree inside a hybrid whose node budget is chosen on validation: the largest fitted tree of
    ``tree_budgets`` (the budget then cuts it to the nodes left beside the lookup's chain)."""
    return fitted_tree(acc, max(cfg["tree_budgets"]))


def bench_hybrids(cfg, models, loader, prep=None) -> dict:
    """Each head family's hybrid for the benchmark, ``{variant: (tree, drafter spec)}``: with ``hybrid_budgets`` the
    budget that was fastest in the validation sweep (``results/tree_sweep.csv``) over :func:`hybrid_tree`; without,
    ``{}`` (the family's tree, no cap)."""
    if not cfg["hybrid_budgets"]:
        return {}
    sweep = tree_sweep(cfg, models, loader, prep)
    acc = _sweep_accuracy(cfg, models, loader)
    out = {}
    for v in HEADED:
        rows = sweep[(sweep.variant == v) & (sweep.tree == "hybrid")]
        if len(rows):
            out[v] = (hybrid_tree(cfg, acc(v)), f"hybrid:4:{int(rows.sort_values('speedup').iloc[-1].budget)}")
    return out


def selection(cfg, models, loader, prep=None) -> dict:
    """What each head family is judged by, chosen on the validation prompts' sweep (the test prompts only measure):
    ``{variant: {"method": "<v>_chain" | "<v>_tree", "validation_speedup": x}}``."""
    sweep = tree_sweep(cfg, models, loader, prep)
    out = {}
    for v in HEADED:
        best = sweep[(sweep.variant == v) & (sweep.tree != "hybrid")].sort_values("speedup").iloc[-1]
        out[v] = {"method": f"{v}_chain" if best.tree == "chain" else f"{v}_tree",
                  "validation_speedup": float(best.speedup), "on": f"{int(best.prompts)} validation prompts"}
    return out


def tree_sweep(cfg, models, loader, prep=None) -> pd.DataFrame:
    f = paths(cfg)["results"] / "tree_sweep.csv"
    return pd.read_csv(f) if f.exists() else run_tree_sweep(cfg, models, loader, prep=prep)


def validation_prompts(cfg, tok, prep) -> list:
    """Prompt ids of the validation split (what trees and chain-vs-tree are chosen on)."""
    raw = prep["raw"]["validation"]
    return [torch.tensor(tok(D.format_prompt(q, tok), add_special_tokens=False)["input_ids"], dtype=torch.long)
            for q in raw["query"]]


def bench_prompts(cfg, prompts, n):
    """The first ``n`` prompts that leave room for ``max_new_tokens`` (the others are skipped, counted in the log)."""
    return E.fit_prompts(prompts, context_size(cfg), bench_tokens(cfg), "decoding benchmark")[0][:n]


def _setup(cfg, models, prep):
    if models is None:
        models = {v: load_variant(cfg, v) for v in VARIANTS}
    if prep is None:
        _, _, tok, prep = loaders(cfg)
    return models, prep


def trained_runs(cfg) -> dict:
    """The run ids of the stages that trained the profile's models (``None`` where a stage has no finished run): what
    makes two benchmark runs runs of the same models."""
    return models_run(cfg["profile"], repo_root())


def write_result(cfg, name: str, obj, producer: str):
    """Write ``results/<name>`` (JSON, or CSV for a ``.csv`` name). Inside a stage it is the stage's output; outside
    (``make bench``, a script) its manifest entry names ``producer`` and the runs that trained the profile's models,
    so ``make all`` publishes it with the run it belongs to."""
    path = paths(cfg)["results"] / name
    (write_csv if name.endswith(".csv") else write_json)(path, obj)
    if not in_stage():
        record_output(path, producer, repo_root(), models=trained_runs(cfg))
    return path


def record_bench_run(cfg, rows: list[dict], source: str) -> list[dict]:
    """Append this benchmark run's speedups to ``results/bench_runs.json`` (one entry per independent run: notebook
    04, each ``make bench`` repeat) with the commit and the runs that trained its models, so speed claims can carry
    the spread between runs of the same models beside the within-run interval. Returns every run so far."""
    import time

    f = paths(cfg)["results"] / "bench_runs.json"
    runs = json.loads(f.read_text()) if f.exists() else []
    runs.append(dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), source=source, dtype=rows[0].get("dtype"),
                     commit=commit()["commit"], models=trained_runs(cfg),
                     methods={r["method"]: dict(vs_hf=r["speedup_vs_hf_greedy"], vs_greedy_kv=r.get(
                         "speedup_vs_greedy_kv"), tokens_per_s=r["tokens_per_s"]) for r in rows}))
    write_result(cfg, "bench_runs.json", runs, source)
    return runs


def bench_spread(cfg, dtype: str | None = None) -> dict:
    """Per method, the range of its speedups over the recorded independent runs (``bench_runs.json``) in ``dtype`` of
    the models the profile has now (runs of other models, or recorded before models were identified, are left out):
    ``{method: {"runs": n, "vs_hf": [min, max], "vs_greedy_kv": [min, max]}}``."""
    f = paths(cfg)["results"] / "bench_runs.json"
    now = trained_runs(cfg)
    runs = [r for r in (json.loads(f.read_text()) if f.exists() else [])
            if r["dtype"] == (dtype or cfg["inference_dtype"]) and r.get("models") == now]
    out = {}
    for m in dict.fromkeys(k for r in runs for k in r["methods"]):
        vals = [r["methods"][m] for r in runs if m in r["methods"]]
        out[m] = {"runs": len(vals), **{k: [min(v[k] for v in vals), max(v[k] for v in vals)]
                                        for k in ("vs_hf", "vs_greedy_kv") if all(v[k] is not None for v in vals)}}
    return out


def run_decoding_benchmark(cfg, models=None, prep=None, write=True, source="notebook 04", keep=run_part):
    """The decoding benchmark table (see ``make bench``) on the evaluation split's prompts, trees and chain-vs-tree
    chosen on the validation split; in ``inference_dtype`` (``results/decoding_benchmark.json``, with the per-prompt
    times and, where an output left greedy, ``results/divergences.csv``) and in each of ``bench_extra_dtypes``
    (``results/decoding_benchmark_<dtype>.json``, the same models converted). ``keep``: ``stages.section`` in a
    notebook, so each independent run is a part an interrupted stage keeps."""
    import copy

    models, prep = _setup(cfg, models, prep)
    models = {v: models[v] for v in VARIANTS}
    tok = prep["tokenizer"]
    val = D.make_dataloader(prep["tokenized"]["validation"], tok, cfg["batch_size"])
    prompts = bench_prompts(cfg, eval_set(cfg, tok, prep)["prompts"], cfg["bench_prompts"])
    trees = bench_trees(cfg, models, val, cfg["tree_budget"], prep)
    chosen = selection(cfg, models, val, prep) if cfg["tree_budget"] == "auto" else {}
    hybrids = bench_hybrids(cfg, models, val, prep)
    out = None
    extra = [d for d in cfg["bench_extra_dtypes"] if d != cfg["inference_dtype"]]
    for i, name in enumerate([cfg["inference_dtype"], *extra]):
        dt = resolve_dtype(name, device(cfg))
        with torch.no_grad():
            ms = models if i == 0 else {v: copy.deepcopy(m).to(dt) for v, m in models.items()}
        # the extra dtypes time the baselines and each family's selected method (all methods when nothing is selected)
        everything = (i == 0 and not cfg["bench_selected_only"]) or not chosen
        def timed(ms=ms, everything=everything):
            rows, per = _benchmark(cfg, ms, prompts, trees, chosen, everything=everything, hybrids=hybrids)
            if write:
                record_bench_run(cfg, rows, source)
            return rows, per
        rows, per = keep(cfg, f"bench_{name}_run1", timed)
        runs = [rows]
        for k in range(1, cfg["bench_runs"] if i == 0 else 1):      # independent repeats: their speedups beside
            runs.append(keep(cfg, f"bench_{name}_run{k + 1}", timed)[0])
        for r in rows:
            same = [next(x for x in run if x["method"] == r["method"]) for run in runs]
            r["runs_speedup_vs_hf"] = [x["speedup_vs_hf_greedy"] for x in same]
            if "speedup_vs_greedy_kv" in r:     # each run's interval, so a verdict can be checked run by run
                r["runs_gain_vs_greedy_kv"] = [[x[f"speedup_vs_greedy_kv{k}"] for k in ("", "_lo", "_hi")]
                                               for x in same]
        if write:
            write_result(cfg, "decoding_benchmark.json" if i == 0 else f"decoding_benchmark_{name}.json", rows, source)
        if i == 0:
            out = rows, per
            if write:
                write_result(cfg, "speed_targets.json", R.speed_targets(rows, cfg["speed_targets"]), source)
                write_result(cfg, "matmul_layout_choices.json", fastpath.layout_choices(), source)
                write_result(cfg, "decoding_per_prompt.csv", per.drop(columns=["seq"]), source)
                div = [d for r in rows if r["identical_to_greedy"] < 1 for d in E.first_divergences(
                    ms[variant_of(r["method"])], prompts, per, r["method"], r["baseline"])]
                write_result(cfg, "divergences.csv", div if div else pd.DataFrame(
                    columns=["method", "prompt", "position", "top2_gap"]), source)
        del ms
    return out


def _benchmark(cfg, models, prompts, trees, chosen, everything=True, hybrids=None):
    dtype = next(models["ntp"].parameters()).dtype
    meths = decoding_methods(cfg, models, trees, hybrids)
    if not everything:  # every peer, the engine's greedy, prompt lookup and hybrids, each family's choice
        keep = {c["method"] for c in chosen.values()} | {"greedy_kv", "prompt_lookup"}
        meths = [mt for mt in meths if mt.name in keep or mt.name.startswith("hf_") or mt.name.endswith("_hybrid")]
    rows, per = E.benchmark_decoding(E.one_shape(meths), prompts, bench_tokens(cfg), warmup=cfg["bench_warmup"],
                                     desc=f"decoding benchmark ({str(dtype).replace('torch.', '')})")
    dev = E.model_device(models["ntp"])
    info = dict(device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                dtype=str(dtype).replace("torch.", ""), torch_threads=torch.get_num_threads())
    sel = {c["method"]: c for c in chosen.values()}
    specs = {f"{v}_hybrid": spec for v, (_, spec) in (hybrids or {}).items()}   # the budget chosen on validation
    rows = [dict(r, tree=str(trees[variant_of(r["method"])].name) if r["method"].endswith("_tree") else
                 specs.get(r["method"]),
                 selected=r["method"] in sel, validation_speedup=sel.get(r["method"], {}).get("validation_speedup"),
                 **info) for r in rows]
    return rows, per


def run_tree_sweep(cfg, models, loader, prompts=None, prep=None):
    """Speedup vs tree node budget (fitted trees and Medusa's sparse tree), the chain over every head and the hybrid
    drafter under each of ``hybrid_budgets``, for each head family, on the validation prompts (``prompts``
    overrides); against HF generate of the same model (for the
    frozen-backbone families, NTP's, unless ``frozen_hf_baselines``: the same weights, the same outputs), every
    method of every family interleaved in one run. Writes ``results/tree_sweep.csv`` and the top-k accuracies the
    fitted trees were built from (``results/head_topk_accuracy.json``, which ``bench_trees`` reuses)."""
    if prompts is None:
        prep = prep if prep is not None else loaders(cfg)[3]
        prompts = validation_prompts(cfg, prep["tokenizer"], prep)
    prompts = bench_prompts(cfg, prompts, cfg["sweep_prompts"] or max(2, cfg["bench_prompts"] // 2))
    M, meths, accs, step = E.Method, [], {}, engine_step(cfg)
    for v in HEADED:
        accs[v] = acc = head_topk_accuracy(models[v], loader)
        hf = f"hf/{baseline_variant(cfg, v)}"
        if hf not in {mt.name for mt in meths}:
            meths.append(M.hf(hf, models[baseline_variant(cfg, v)]))
        meths.append(M.engine(f"{v}/chain_all", models[v], "chain", baseline=hf, fast=step))
        for b in cfg["tree_budgets"]:
            if "fitted" in cfg["tree_kinds"]:
                meths.append(M.engine(f"{v}/fitted_{b}", models[v], fitted_tree(acc, b), baseline=hf, fast=step))
            if "medusa" in cfg["tree_kinds"]:
                meths.append(M.engine(f"{v}/medusa_{b}", models[v], medusa_tree(b, models[v].num_heads), baseline=hf,
                                      fast=step))
        if v != "mtp_seq":                   # the MTP modules draft alone: no hybrid
            for n in cfg["hybrid_budgets"]:
                meths.append(M.engine(f"{v}/hybrid_{n}", models[v], hybrid_tree(cfg, acc), f"hybrid:4:{n}",
                                      baseline=hf, fast=step))
    rows, _ = E.benchmark_decoding(E.one_shape(meths), prompts, sweep_tokens(cfg), warmup=1,
                                   desc="tree sweep (validation)")
    out = []
    for r in rows:
        v, name = r["method"].split("/")
        if v == "hf":
            continue
        kind, b = name.split("_")
        out.append(dict(variant=v, tree=kind, budget=models[v].num_heads if b == "all" else int(b),
                        speedup=r["speedup_vs_hf_greedy"], speedup_lo=r["speedup_lo"], speedup_hi=r["speedup_hi"],
                        mean_accepted_length=r["mean_accepted_length"], identical=r["identical_to_greedy"],
                        prompts=len(prompts), split="validation", baseline=r["baseline"]))
    write_csv(paths(cfg)["results"] / "tree_sweep.csv", out)
    write_json(paths(cfg)["results"] / "head_topk_accuracy.json", accs)
    return pd.DataFrame(out)


def run_quality(cfg, models=None, prep=None, keep=run_part):
    """Perplexity (on the first ``eval_examples`` problems of the evaluation split), answer accuracy and BLEU (on the
    first ``answer_examples`` of them, all by default) per variant, each with a 95% bootstrap interval over problems
    and the number of right answers, and the paired differences vs NTP (same problems, resampled together); ``base`` (the pretrained
    model as installed) is a row of its own where the profile has one. Answers (in batches of ``quality_batch``; 1:
    the engine, row by row), perplexities and head accuracies in ``quality_dtype``; with ``reuse_frozen`` MEDUSA-1 and
    the MTP modules take NTP's answers and NLLs, which a frozen backbone and lossless decoding make identical
    (checked: their NLLs on the first batches must equal NTP's exactly). Writes ``results/quality.json``,
    ``results/answers_per_problem.csv`` (1 = right), ``results/nll_per_problem.csv`` (each problem's mean NLL per
    token of its reference solution, per variant, and its number of tokens) and qualitative samples. ``keep``:
    ``stages.section`` in a notebook, so each variant's answers and perplexities (and each MTP run's) are parts an
    interrupted stage keeps."""
    import copy

    if models is None:
        models = {v: load_variant(cfg, v) for v in variants(cfg)}
    models, prep = _setup(cfg, models, prep)
    tok = prep["tokenizer"]
    ev = eval_set(cfg, tok, prep)
    refs = ev["references"]
    n_ans = min(cfg["answer_examples"] or len(refs), len(refs))  # answers cost ~100x a perplexity pass
    quality, samples, per, texts_of = {}, [], {}, {}
    qdt = resolve_dtype(cfg["quality_dtype"], device(cfg)) if cfg["quality_dtype"] else None

    def measure(v, model):
        with torch.no_grad():
            q = model if qdt is None or qdt == next(model.parameters()).dtype else copy.deepcopy(model).to(qdt)
        if cfg["reuse_frozen"] and v in FROZEN and "ntp" in per:
            nll, ntok = E.token_nll(q, ev["loader"], max_batches=2)
            if nll != per["ntp"]["nll"][: len(nll)] or ntok != per["ntp"]["ntok"][: len(ntok)]:
                raise AssertionError(f"{v}'s NLLs differ from NTP's: its backbone is not NTP's frozen one")
            got, texts = dict(per["ntp"], reused="ntp"), texts_of["ntp"]
        else:
            # in batches every variant's answers take the same greedy path, without drafts: at 32 rows a forward is
            # already compute-bound on a CPU (drafts would cost more than they save), and drafts change bf16's
            # rounding (not lossless there); row by row (quality_batch 1) the model's own drafts, lossless in fp32
            texts, _ = E.generate_responses(q, tok, ev["prompts"][:n_ans], cfg["max_new_tokens"], desc=f"{v}: answers",
                                            batch_size=cfg["quality_batch"], engine=cfg["quality_engine"],
                                            tree="none" if cfg["quality_batch"] > 1 else None)
            nll, ntok = E.token_nll(q, ev["loader"])
            got = {"hit": E.answer_hits(texts, refs[:n_ans]), "bleu": S.bleu_stats(texts, refs[:n_ans]), "nll": nll,
                   "ntok": ntok}
        top1 = head_accuracy(q, ev["loader"]) if v not in ("ntp", "base") else None
        return got, texts, top1, str(next(q.parameters()).dtype).removeprefix("torch.")

    for v, model in models.items():
        per[v], texts, top1, qdtype = keep(cfg, f"quality_{v}", lambda v=v, model=model: measure(v, model))
        texts_of[v] = texts
        log = train_log(cfg, v)
        quality[v] = {"perplexity": S.perplexity_ci(per[v]["nll"], per[v]["ntok"]).as_dict(),
                      "accuracy": S.mean_ci(per[v]["hit"]).as_dict(),
                      "bleu": S.bootstrap(S.bleu_of_columns, *per[v]["bleu"].T).as_dict(),
                      "n_eval": len(refs), "n_ppl": len(per[v]["nll"]), "n_answers": n_ans,
                      "correct": int(sum(per[v]["hit"])), "split": ev["split"],
                      "skipped_prompts": ev["skipped"], "answers_from": per[v].get("reused", v),
                      "train_s_per_epoch": E.train_time_per_epoch(log) if log.exists() else None,
                      "head_top1": top1, "dtype": qdtype,
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
        for i in range(min(3, len(texts))):
            samples.append({"variant": v, "prompt": prep["raw"][ev["split"]][i]["query"], "output": texts[i],
                            "reference": refs[i]})
    base = per["ntp"]
    for v in models:
        if v == "ntp":
            continue
        a = per[v]
        quality[v]["diff_vs_ntp"] = {
            "accuracy": S.paired_difference(S.np.mean, [a["hit"]], [base["hit"]]).as_dict(),
            "bleu": S.paired_difference(S.bleu_of_columns, list(a["bleu"].T), list(base["bleu"].T)).as_dict(),
            "perplexity": S.paired_difference(S.perplexity_of, [a["nll"], a["ntok"]],
                                              [base["nll"], base["ntok"]]).as_dict()}
    res = paths(cfg)["results"]
    if cfg["mtp_controls"]:
        write_json(res / "mtp_controls_quality.json", _controls_quality(cfg, ev, per, keep))
    write_json(res / "quality.json", quality)
    write_csv(res / "samples.csv", samples)
    write_csv(res / "answers_per_problem.csv", pd.DataFrame({v: d["hit"] for v, d in per.items()}))
    write_csv(res / "nll_per_problem.csv", pd.DataFrame(
        {"tokens": per["ntp"]["ntok"], **{v: [n / t for n, t in zip(d["nll"], d["ntok"])] for v, d in per.items()}}))
    return quality, samples


def _controls_quality(cfg, ev, per, keep=run_part) -> dict:
    """Every MTP run (the recipe and each control) on the evaluation problems: next-token perplexity with its
    interval, paired differences vs NTP and vs the base model (where the profile has one), each head's top-1, the
    first draft's acceptance and a chain's τ teacher-forced on the reference solutions (``tau_reference``: decoding
    verifies against the model's own text, so its τ differs); which run notebook 04 measures as ``mtp``."""
    measured = mtp_measured(cfg)
    def measure(run):
        model = _load_checkpoint(cfg, mtp_run_dir(cfg, run) / "final", MultiTokenMixin, "mtp",
                                 cfg["quality_dtype"] or None)
        nll, ntok = E.token_nll(model, ev["loader"])
        acc = T.acceptance(T.loader_head_hits(model, ev["loader"], max_batches=20))
        row = {"perplexity": S.perplexity_ci(nll, ntok).as_dict(), "head_top1": head_accuracy(model, ev["loader"]),
               "first_token": acc["first_token"], "tau_reference": acc["tau"],
               "changes": cfg["mtp_controls"].get(run, {}), "measured_as_mtp": run == measured}
        for ref in ("ntp", "base"):
            if ref in per:
                row[f"diff_vs_{ref}"] = S.paired_difference(S.perplexity_of, [nll, ntok],
                                                            [per[ref]["nll"], per[ref]["ntok"]]).as_dict()
        return row
    return {run: keep(cfg, f"quality_mtp_{run}", lambda run=run: measure(run))
            for run in ["recipe", *cfg["mtp_controls"]]}


def one_resident(models: dict, fn, dev) -> dict:
    """``{name: fn(model)}`` with only that model on a CUDA device while it runs (the others wait on the CPU), so a
    peak-memory reading is that model's; on the CPU nothing moves (memory there is computed per model)."""
    if torch.device(dev).type != "cuda":
        return {k: fn(m) for k, m in models.items()}
    out = {}
    for k, m in models.items():
        for other in models.values():
            other.to("cpu" if other is not m else dev)
        out[k] = fn(m)
    for m in models.values():
        m.to(dev)
    return out


def run_memory(cfg, models=None, prep=None):
    """Inference memory per variant while generating, one model on the device at a time (``generation_memory``)."""
    models, prep = _setup(cfg, models, prep)
    models = {v: models[v] for v in VARIANTS}
    prompts = bench_prompts(cfg, eval_set(cfg, prep["tokenizer"], prep)["prompts"], 4)
    out = one_resident(models, lambda m: E.generation_memory(m, prompts, bench_tokens(cfg), "chain"), device(cfg))
    write_json(paths(cfg)["results"] / "memory.json", out)
    return out


def load_results(cfg) -> dict:
    """Everything 04 wrote (what 05 draws from); a clear error if 04 has not run."""
    res = paths(cfg)["results"]
    need = ["quality.json", "decoding_benchmark.json", "decoding_per_prompt.csv", "memory.json", "tree_sweep.csv",
            "samples.csv", "divergences.csv"]
    missing = [f for f in need if not (res / f).exists()]
    if missing:
        raise FileNotFoundError(f"{res} lacks {missing}: run notebooks/04_evaluate.ipynb for profile "
                                f"{cfg['profile']} first")
    out = {f.split(".")[0]: (json.loads((res / f).read_text()) if f.endswith(".json") else pd.read_csv(res / f))
           for f in need}
    logs = {v: train_log(cfg, v) for v in VARIANTS}
    out["logs"] = {v: pd.read_csv(f) for v, f in logs.items() if f.exists()}
    abl = res / "ablations.csv"
    out["ablations"] = pd.read_csv(abl) if abl.exists() else None
    return out


# --- 06 ablations --------------------------------------------------------------------------------------------------

# head designs by name: the four head types, and DeepSeek-V3's sequential transformer modules (FastMTP: one shared)
HEAD_DESIGNS = {"seq_transformer": dict(head_type="transformer", sequential=True, share_weights_across_steps=False),
                "fastmtp": dict(head_type="transformer", sequential=True, share_weights_across_steps=True)}


def head_design(name: str) -> dict:
    """MTP config fields of a head design named in ``ablation_head_types`` (a head type, or a HEAD_DESIGNS key)."""
    if name in HEAD_DESIGNS:
        return HEAD_DESIGNS[name]
    if name not in HEAD_TYPES:
        raise ValueError(f"unknown head design {name!r}: one of {HEAD_TYPES + tuple(HEAD_DESIGNS)}")
    return dict(head_type=name)


def run_ablations(cfg):
    """Short MTP runs over n x learning rate (the thesis' grid), head types and weighting schemes."""
    tr, va, tok, _ = loaders(cfg)
    grid = [dict(n=n, lr=lr, head_type=cfg["mtp_head_type"], weighting=cfg["mtp_weighting"], group="n x lr")
            for n in cfg["ablation_n"] for lr in cfg["ablation_lrs"]]
    grid += [dict(n=cfg["mtp_n"], lr=cfg["mtp_lr"], head_type=h, weighting=cfg["mtp_weighting"], group="head type")
             for h in cfg["ablation_head_types"]]
    grid += [dict(n=cfg["mtp_n"], lr=cfg["mtp_lr"], head_type=cfg["mtp_head_type"], weighting=w, group="weighting")
             for w in cfg["ablation_weightings"]]
    rows, done = [], {}
    for g in grid:
        setting = (g["n"], g["lr"], g["head_type"], g["weighting"])
        if setting in done:  # the same run in another group (e.g. the profile's own head type and weighting)
            rows.append(dict(done[setting], group=g["group"]))
            continue
        fields = dict(mtp_fields(cfg), **head_design(g["head_type"]), loss_weighting=g["weighting"])
        out = paths(cfg)["run"] / "ablations" / "_".join(map(str, setting))
        model, trainer = T.train_multi_token_gpt2(tr, va, tok, out, num_tokens_to_predict=g["n"],
                                                  base_model=cfg["model_name"], model_config=model_config(cfg),
                                                  mtp=fields, learning_rate=g["lr"], max_steps=cfg["ablation_steps"],
                                                  eval_steps=cfg["ablation_steps"], logging_steps=cfg["logging_steps"],
                                                  gradient_accumulation_steps=1, seed=cfg["seed"], save_steps=10 ** 9,
                                                  device=device(cfg), cpu_bf16=cfg["cpu_bf16"])
        acc = head_accuracy(model, va, max_batches=5)
        ppl = E.perplexity(model, va, max_batches=5)
        rows.append(dict(g, val_ppl=ppl, next_token_acc=acc[0], head2_acc=acc[1] if len(acc) > 1 else None,
                         mean_head_acc=sum(acc[1:]) / max(1, len(acc) - 1)))
        done[setting] = rows[-1]
    write_csv(paths(cfg)["results"] / "ablations.csv", rows)
    return pd.DataFrame(rows)
