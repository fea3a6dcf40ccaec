"""The workbook's settings: one typed field per key, grouped in sections by what they govern, loaded strictly.

A profile is ``notebooks/params/<profile>.yaml``: flat keys (``ntp_lr: 1.0e-4``) or the same keys under their
section's name (``ntp: {ntp_lr: 1.0e-4}``); keys it leaves out take the defaults below (the ``smoke`` profile is the
defaults alone). An unknown or misspelt key, a value of the wrong type or out of its range stops with a
:class:`SettingsError` that names the key, the file and the nearest valid key, before any work starts.

:func:`load` returns a :class:`Settings` (nested: ``s.ntp.ntp_lr``); ``Settings.flat()`` is the flat dict the
workbook's functions take.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

Dtype = Literal["float32", "bfloat16", "float16"]
HeadType = Literal["linear", "mlp", "transformer", "shared_lm_head"]
Weighting = Literal["uniform", "linear", "exponential", "primary_aux", "olmo"]
Engine = Literal["speculative", "hf"]


class SettingsError(ValueError):
    """A profile that cannot run: the message names the key, where it came from and what would be valid."""


def _f(default, *, ge=None, gt=None, le=None, lt=None, doc=""):
    """A field with an optional numeric range (checked on every number, and on each item of a list)."""
    kw = ({"default_factory": (lambda d=default: type(d)(d))} if isinstance(default, (list, dict))
          else {"default": default})
    return field(metadata=dict(ge=ge, gt=gt, le=le, lt=lt, doc=doc), **kw)


@dataclass(frozen=True)
class Run:
    """Where and in which precision everything runs."""
    profile: str = "smoke"
    device: str = _f("auto", doc="auto, cpu, cuda or cuda:i")
    inference_dtype: Dtype = _f("float32", doc="the dtype of decoding and its verdicts")
    cpu_bf16: bool = _f(False, doc="fine-tune under bf16 autocast on the CPU")
    cpu_bf16_fallback: bool = _f(True, doc="a CPU without fast bf16 runs every bf16 setting in fp32 (with a warning)")


@dataclass(frozen=True)
class Data:
    """The data set, its split and its tokenization (notebook 00)."""
    source: str = _f("synthetic", doc="synthetic, gsm8k[:dir], metamath[:dir] or hub")
    max_examples: Optional[int] = _f(240, ge=1)
    first_examples: bool = False
    seed: int = _f(0, ge=0)
    val_fraction: float = _f(0.1, gt=0, lt=1)
    test_examples: Optional[int] = _f(None, ge=1)
    tokenizer_name: Optional[str] = None
    vocab_size: int = _f(512, ge=8)
    prompt_format: Literal["alpaca", "chat"] = "alpaca"
    max_seq_len: int = _f(192, ge=8)


@dataclass(frozen=True)
class Model:
    """The backbone: a pretrained model by name, or a GPT-2 trained from scratch of this size."""
    model_name: Optional[str] = None
    model_vocab_size: Optional[int] = _f(None, ge=8)
    n_layer: int = _f(2, ge=1)
    n_embd: int = _f(64, ge=1)
    n_head: int = _f(2, ge=1)
    n_positions: int = _f(256, ge=8)


@dataclass(frozen=True)
class Training:
    """What every fine-tuning run shares (notebooks 01-03, 06)."""
    batch_size: int = _f(8, ge=1)
    eval_steps: int = _f(20, ge=1)
    logging_steps: int = _f(5, ge=1)
    max_steps: int = _f(-1, ge=-1, doc="-1: the epochs decide")
    warmup_steps: int = _f(0, ge=0)


@dataclass(frozen=True)
class NTP:
    """Next-token fine-tuning (notebook 01)."""
    ntp_epochs: float = _f(1, gt=0)
    ntp_lr: float = _f(3e-3, gt=0)
    ntp_grad_accum: int = _f(1, ge=1)


@dataclass(frozen=True)
class MTP:
    """Multi-token prediction trained jointly with the trunk (notebook 02)."""
    mtp_n: int = _f(3, ge=1)
    mtp_head_type: HeadType = "mlp"
    mtp_sequential: bool = False
    mtp_share: bool = False
    mtp_own_unembedding: bool = False
    mtp_trunk_layers: Optional[int] = _f(None, ge=1, doc="heads branch off after this many layers (None: the last)")
    mtp_weighting: Weighting = "uniform"
    mtp_beta: float = _f(0.8, gt=0)
    mtp_lambda: float = _f(1.0, ge=0)
    mtp_warmup_steps: int = _f(0, ge=0)
    mtp_epochs: float = _f(1, gt=0)
    mtp_lr: float = _f(3e-3, gt=0)
    mtp_grad_accum: int = _f(1, ge=1)
    mtp_memory_efficient: bool = True
    use_mtp: Optional[bool] = _f(None, doc="nanochat's field: sets mtp_n and the weighting when given")
    mtp_n_tokens: int = _f(3, ge=1)
    mtp_weight: float = _f(0.2, ge=0)
    mtp_trunk_lr_scale: float = _f(1.0, gt=0, doc="the trunk's learning rate as a fraction of the heads'")
    mtp_heads_first_steps: int = _f(0, ge=0, doc="optimizer steps that train the heads alone before all trains")
    mtp_controls: dict[str, dict[str, Union[int, float, str, bool, None]]] = _f(
        {}, doc="more MTP runs, each the recipe above with these MTP settings changed, e.g. "
                "{lambda0: {mtp_lambda: 0.0}}; notebook 02 trains them, 04 scores them")
    mtp_select: bool = _f(False, doc="notebook 04's mtp is the run (recipe or control whose heads train) with the "
                                     "lowest validation next-token loss")


@dataclass(frozen=True)
class Medusa:
    """MEDUSA-1 heads on the frozen NTP model (notebook 03)."""
    medusa_heads: int = _f(3, ge=1)
    medusa_layers: int = _f(1, ge=0)
    medusa_epochs: float = _f(1, gt=0)
    medusa_lr: float = _f(3e-3, gt=0)
    medusa_self_distill: bool = True
    medusa_max_examples: Optional[int] = _f(None, ge=1, doc="distilled training prompts (None: every train prompt)")
    medusa_draft_vocab: int = _f(0, ge=0, doc="K > 0: heads predict over their targets' K most frequent tokens")
    medusa_features: bool = _f(False, doc="train on the frozen model's cached states: one backbone pass, then "
                                          "epochs of the heads alone")
    drafter_scaling_tokens: list[int] = _f([], ge=1, doc="notebook 03 also trains the drafters of cached features "
                                                        "on the first N training tokens, for each N")
    drafter_scaling_reference: bool = _f(False, doc="the same on GSM8K's reference solutions of the distilled "
                                                    "prompts, scored on the same validation text: which text helps")


@dataclass(frozen=True)
class MTPSeq:
    """MTP modules (DeepSeek-V3's sequential heads) on the frozen NTP model (notebook 03)."""
    mtpseq_n: int = _f(4, ge=1)
    mtpseq_share: bool = False
    mtpseq_freeze: bool = True
    mtpseq_self_distill: bool = True
    mtpseq_weighting: Weighting = "uniform"
    mtpseq_epochs: float = _f(1, gt=0)
    mtpseq_lr: float = _f(3e-3, gt=0)
    mtpseq_features: bool = _f(False, doc="train on the frozen model's cached states (needs mtpseq_freeze)")
    mtpseq_draft_vocab: int = _f(0, ge=0, doc="K > 0: the modules predict over their targets' K most frequent tokens "
                                              "(rows of the shared LM head)")


@dataclass(frozen=True)
class Evaluation:
    """Quality on the held-out problems and the self-distilled training text (notebooks 03, 04)."""
    eval_examples: int = _f(8, ge=1, doc="held-out problems scored by perplexity (teacher-forced: cheap)")
    answer_examples: Optional[int] = _f(None, ge=1, doc="the first of them answered, for accuracy, BLEU and examples "
                                                        "(None: all)")
    max_new_tokens: int = _f(48, ge=1)
    quality_batch: int = _f(1, ge=1, doc="answers in batches of this many rows (1: the engine with drafts)")
    quality_dtype: Optional[Dtype] = None
    reuse_frozen: bool = True
    quality_engine: Engine = "speculative"
    distill_engine: Engine = "speculative"
    distill_dtype: Optional[Dtype] = None
    distill_batch: int = _f(16, ge=1)


@dataclass(frozen=True)
class Benchmark:
    """The decoding benchmark and the validation sweep that selects what it measures (notebook 04)."""
    bench_prompts: int = _f(4, ge=1)
    bench_warmup: int = _f(1, ge=0)
    bench_max_new_tokens: Optional[int] = _f(None, ge=1, doc="None: max_new_tokens")
    tree_budgets: list[int] = _f([4, 8, 16], ge=1)
    tree_budget: Union[int, Literal["auto"]] = _f("auto", ge=1)
    tree_kinds: list[Literal["fitted", "medusa"]] = _f(["fitted", "medusa"])
    bench_extra_dtypes: list[Dtype] = _f([])
    bench_compiled_peer: bool = _f(False, doc="time transformers' static-cache + torch.compile generate as a peer")
    engine_step: Literal["fast", "compiled"] = _f("fast", doc="the engine's step in the sweep and the benchmark: "
                                                  "'fast' (eager, each product in the fastest layout for its shape) or "
                                                  "'compiled' (one inductor graph per step size, weights frozen; "
                                                  "compiled in the warm-up, its time reported apart)")
    bench_runs: int = _f(1, ge=1, doc="independent benchmark runs (the table is the first; each run's speedups beside it)")
    bench_selected_only: bool = _f(False, doc="on the test prompts time the peers, the engine's greedy, prompt lookup, "
                                              "the hybrids and each family's method chosen on validation, not every method")
    hybrid_budgets: list[int] = _f([], ge=1, doc="node budgets N of the hybrid drafter (the heads' largest fitted "
                                              "tree and prompt lookup, hybrid:4:N) tried on the validation prompts; "
                                              "the fastest is each family's hybrid on test (empty: no cap)")
    sweep_prompts: Optional[int] = _f(None, ge=1, doc="validation prompts that choose trees and chain vs tree "
                                                      "(None: half of bench_prompts, at least 2)")
    sweep_max_new_tokens: Optional[int] = _f(None, ge=1, doc="new tokens per validation prompt in the sweep (None: as "
                                                             "in the benchmark)")
    frozen_hf_baselines: bool = True
    speed_targets: Optional[dict[str, float]] = None


@dataclass(frozen=True)
class Ablations:
    """Short MTP runs over n x learning rate, head designs and weightings (notebook 06)."""
    ablation_n: list[int] = _f([2, 3], ge=1)
    ablation_lrs: list[float] = _f([3e-3], gt=0)
    ablation_head_types: list[str] = _f(["linear", "mlp", "seq_transformer"])
    ablation_weightings: list[Weighting] = _f(["uniform", "exponential"])
    ablation_steps: int = _f(8, ge=1)


@dataclass(frozen=True)
class Thesis:
    """The thesis' own experiment: its layout, recipe, loops and timing protocol (notebook 07)."""
    thesis_mtp_n: int = _f(2, ge=1)
    thesis_examples: int = _f(60, ge=2)
    thesis_epochs: float = _f(1, gt=0)
    thesis_lr: float = _f(3e-3, gt=0)
    thesis_batch_size: int = _f(8, ge=1)
    thesis_grad_accum: int = _f(1, ge=1)
    thesis_eval_steps: int = _f(3, ge=1)
    thesis_bench_prompts: int = _f(2, ge=1)
    thesis_protocol_runs: int = _f(1, ge=1)
    thesis_protocol_tokens: int = _f(12, ge=1)
    thesis_protocol_warmup: int = _f(4, ge=0)
    thesis_dtype: Optional[Dtype] = None


@dataclass(frozen=True)
class Settings:
    run: Run = field(default_factory=Run)
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    ntp: NTP = field(default_factory=NTP)
    mtp: MTP = field(default_factory=MTP)
    medusa: Medusa = field(default_factory=Medusa)
    mtp_seq: MTPSeq = field(default_factory=MTPSeq)
    evaluation: Evaluation = field(default_factory=Evaluation)
    benchmark: Benchmark = field(default_factory=Benchmark)
    ablations: Ablations = field(default_factory=Ablations)
    thesis: Thesis = field(default_factory=Thesis)

    def flat(self) -> dict:
        """Every key with its value, one level (what ``pipeline`` and the notebooks read)."""
        return {k: v for s in dataclasses.fields(self) for k, v in dataclasses.asdict(getattr(self, s.name)).items()}


SECTIONS = {s.name: typing.get_type_hints(Settings)[s.name] for s in dataclasses.fields(Settings)}
SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
DEFAULTS = Settings().flat()


def _nearest(key: str) -> str:
    near = difflib.get_close_matches(key, list(SECTION_OF) + list(SECTIONS), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(SECTION_OF))}"


def _type_name(tp) -> str:
    """``int or 'auto'``, ``one of 'float32', 'bfloat16'``, ``list of int``, ``None``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Union:
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(map(repr, args))
    if origin in (list, dict):
        return f"{origin.__name__} of " + " to ".join(_type_name(a) for a in args)
    return tp.__name__


def _matches(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return value is None
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check(key: str, value, where: str):
    cls = SECTIONS[SECTION_OF[key]]
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    tp = typing.get_type_hints(cls)[key]
    if not _matches(value, tp):
        hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if isinstance(value, str) and tp in (float, Optional[float]) \
            else ""
        raise SettingsError(f"{key}: {value!r} is not {_type_name(tp)}{hint} (in {where})")
    m = f.metadata
    for v in (value if isinstance(value, list) else [value]):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        for op, bad in (("ge", m.get("ge") is not None and v < m["ge"]),
                        ("gt", m.get("gt") is not None and v <= m["gt"]),
                        ("le", m.get("le") is not None and v > m["le"]),
                        ("lt", m.get("lt") is not None and v >= m["lt"])):
            if bad:
                sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op]
                raise SettingsError(f"{key}: {value!r} is out of range (must be {sign} {m[op]}) (in {where})")


def flatten(values: dict, where: str) -> dict:
    """Flat keys from a mapping that may hold section mappings (``ntp: {ntp_lr: ...}``); unknown keys refused."""
    out = {}
    for key, value in (values or {}).items():
        if key in SECTIONS and key not in SECTION_OF:
            if not isinstance(value, dict):
                raise SettingsError(f"{key}: a section takes a mapping of its keys, not {value!r} (in {where})")
            for k, v in value.items():
                if SECTION_OF.get(k) != key:
                    raise SettingsError(f"{key}.{k}: not a key of section {key!r} (in {where})"
                                        + (f"; it belongs to {SECTION_OF[k]!r}" if k in SECTION_OF else _nearest(k)))
                out[k] = v
        elif key not in SECTION_OF:
            raise SettingsError(f"unknown setting {key!r} (in {where}){_nearest(str(key))}")
        else:
            out[key] = value
    return out


def validate(values: dict, where: str = "settings") -> Settings:
    """The defaults overridden by ``values`` (flat or by section), every key and value checked."""
    flat = flatten(values, where)
    for k, v in flat.items():
        _check(k, v, where)
    for name, changes in (flat.get("mtp_controls") or {}).items():
        for k, v in changes.items():
            if SECTION_OF.get(k) != "mtp" or k in ("mtp_controls", "mtp_select"):
                near = difflib.get_close_matches(k, [f for f, sec in SECTION_OF.items() if sec == "mtp"], n=1,
                                                 cutoff=0.5)
                raise SettingsError(f"mtp_controls.{name}.{k}: a control changes the MTP recipe's settings only "
                                    f"(in {where})" + (f"; did you mean {near[0]!r}?" if near else ""))
            _check(k, v, f"{where}, mtp_controls.{name}")
    by_section = {name: {} for name in SECTIONS}
    for k, v in flat.items():
        by_section[SECTION_OF[k]][k] = v
    return Settings(**{name: cls(**by_section[name]) for name, cls in SECTIONS.items()})


def profile_path(profile: str, root: Path) -> Path:
    return Path(root) / "notebooks" / "params" / f"{profile}.yaml"


def profiles(root: Path) -> list[str]:
    return sorted(p.stem for p in (Path(root) / "notebooks" / "params").glob("*.yaml"))


def load(profile: str, root: Path, **overrides) -> Settings:
    """The profile's settings from ``<root>/notebooks/params/<profile>.yaml`` (or a YAML file's path), checked, with
    ``overrides`` on top; the file's ``profile`` key must agree with its name."""
    path = Path(profile) if str(profile).endswith((".yaml", ".yml")) else profile_path(profile, root)
    if not path.exists():
        raise SettingsError(f"no profile {profile!r}: {path} does not exist; profiles: {', '.join(profiles(root))}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SettingsError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise SettingsError(f"{path} must hold a mapping of settings, not {type(values).__name__}")
    values = flatten(values, str(path))
    name = values.setdefault("profile", path.stem)
    if path.suffix in (".yaml", ".yml") and path.parent.name == "params" and name != path.stem:
        raise SettingsError(f"profile: {name!r} in {path}, whose name says {path.stem!r}: make them agree")
    values.update(flatten(overrides, "overrides"))
    return validate(values, str(path) if not overrides else f"{path} and overrides")
