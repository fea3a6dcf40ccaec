"""Small shared helpers: repo paths, atomic writes, parameter files."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def repo_root(start: str | Path | None = None) -> Path:
    """The workbook's root (the folder holding pyproject.toml), found from ``start`` or the cwd upwards."""
    here = Path(start or Path.cwd()).resolve()
    for p in [here, *here.parents]:
        if (p / "pyproject.toml").exists() and (p / "lib" / "multitoken").exists():
            return p
    return here


def run_dir(profile: str) -> Path:
    """``runs/<profile>`` under the repo root, created on demand."""
    d = repo_root() / "runs" / profile
    d.mkdir(parents=True, exist_ok=True)
    return d


def figures_dir() -> Path:
    d = repo_root() / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


_WRITTEN: set | None = None  # what the running stage wrote (multitoken.stages reads it)


def start_noting_writes() -> None:
    global _WRITTEN
    _WRITTEN = set()


def stop_noting_writes() -> set:
    global _WRITTEN
    out, _WRITTEN = _WRITTEN or set(), None
    return out


def in_stage() -> bool:
    """Whether a stage is running in this process (its writes are being noted)."""
    return _WRITTEN is not None


def run_part(cfg, key: str, fn):
    """``fn()``, kept nowhere: what a long computation's ``keep`` is outside a notebook; a notebook passes
    ``stages.section`` (same signature), which keeps each finished part for an interrupted stage to resume from."""
    return fn()


def noted_writes() -> set:
    """The files and folders noted so far by the running stage (empty outside a stage)."""
    return set(_WRITTEN or ())


def note_written(path: str | Path) -> None:
    """Note a file or folder the running stage wrote (nothing happens outside a stage)."""
    if _WRITTEN is not None:
        _WRITTEN.add(str(Path(path).resolve()))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write to a temporary file beside ``path`` and rename it, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    note_written(path)
    return path


def atomic_dir(path: str | Path, write) -> Path:
    """``write(tmp)`` fills a temporary folder beside ``path``, which then replaces ``path``: an interrupted write
    leaves the old folder or none, never a half-written one."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    note_written(path)
    return path


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def write_csv(path, rows: list[dict] | pd.DataFrame) -> Path:
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    return atomic_write_text(path, df.to_csv(index=False))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cuda[:i]`` or ``cpu``; a clear error for CUDA without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but this machine has no CUDA device (torch "
                           f"{torch.__version__}, cuda {torch.version.cuda}). Run on a GPU machine, or set "
                           "`device: cpu` to run it on the CPU anyway (GPT-2 124M-sized profiles take hours there)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}: auto, cuda or cpu")
    return dev


def resolve_dtype(name: str, device) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16``, checked against what the device can run."""
    if name not in DTYPES:
        raise ValueError(f"unknown inference_dtype {name!r}: one of {sorted(DTYPES)}")
    dtype, dev = DTYPES[name], torch.device(device)
    if dtype == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"{torch.cuda.get_device_name(dev)} cannot run bfloat16: use float16 or float32")
    return dtype


def stamp_path(profile: str, name: str, root: Path | None = None) -> Path:
    """Where stage ``name`` of ``profile`` records its finished run (``multitoken.stages``)."""
    return Path(root or repo_root()) / "runs" / profile / "stages" / f"{name}.json"


def read_stamp(profile: str, name: str, root: Path | None = None) -> dict | None:
    """Stage ``name``'s record of its finished run (None: no finished run)."""
    f = stamp_path(profile, name, root)
    return json.loads(f.read_text()) if f.exists() else None


def commit(root: Path | None = None) -> dict:
    """The package's commit and whether the tree had changes to what makes results (code, notebooks, settings,
    data; not ``figures/`` and ``runs/``, which a run itself rewrites) (``None`` outside a git checkout)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root or repo_root(), capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)figures", ":(exclude)runs")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


# --- what the stages record (multitoken.stages runs them; the workbook's writers note into them) ----------------
MODEL_STAGES = ("01_train_ntp", "02_train_mtp", "03_train_medusa")


def models_run(profile: str, root: Path | None = None) -> dict:
    """The run ids of the stages that trained the profile's models (``None`` where one has no finished run): what
    makes two results results of the same models."""
    return {s: (read_stamp(profile, s, root) or {}).get("run_id") for s in MODEL_STAGES}


def record_output(path: Path, producer: str, root: Path | None = None, models: dict | None = None) -> dict:
    """A result made outside the stages (``make bench-steps``, a script): its entry in the folder's ``manifest.json``
    (who made it, the commit and whether the tree was dirty, when, and ``models``: the run ids of the stages that
    trained the models it measured, where it measured a profile's models); returns that entry for the file to hold
    too."""
    root = Path(root or repo_root())
    path = Path(path).resolve()
    folder = path.parent                                   # runs/<profile>/results/ or figures/<profile>/
    profile = folder.parent.name if folder.name == "results" else folder.name
    entry = dict(stage=producer, profile=profile, run_id=None, **commit(root), settings_hash=None,
                 finished=time.strftime("%Y-%m-%d %H:%M:%S"), **({"models": models} if models else {}))
    f = path.parent / "manifest.json"
    old = json.loads(f.read_text()) if f.exists() else {}
    write_json(f, dict(sorted({**old, path.name: entry}.items())))
    return entry
