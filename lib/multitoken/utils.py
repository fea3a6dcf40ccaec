"""Small shared helpers: repo paths, atomic writes, parameter files."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import yaml


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
    return path


def write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def write_csv(path, rows: list[dict] | pd.DataFrame) -> Path:
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    return atomic_write_text(path, df.to_csv(index=False))


def load_params(path: str | Path) -> dict:
    """A papermill parameter file (YAML) as a dict."""
    with open(path) as f:
        return yaml.safe_load(f) or {}
