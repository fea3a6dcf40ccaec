"""Run the numbered notebooks of a profile in order with papermill (what ``make all`` does).

One line per notebook with its elapsed time, a summary table at the end (also written to
``runs/<profile>/notebook_times.csv``); the first failure stops the run with a non-zero exit and keeps the failing
executed notebook under ``runs/<profile>/notebooks/`` for inspection.
"""
from __future__ import annotations

import time
import pandas as pd

from .utils import load_params, repo_root, write_csv


def run_notebooks(profile: str, only: list[str] | None = None, kernel: str = "multitoken") -> int:
    import papermill as pm

    root = repo_root()
    params = load_params(root / "notebooks" / "params" / f"{profile}.yaml")
    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        notebooks = [nb for nb in notebooks if nb.stem in only or nb.name in only]
        if not notebooks:
            raise SystemExit(f"no notebook named {only} under notebooks/")
    out_dir = root / "runs" / profile / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, t_all = [], time.perf_counter()
    for nb in notebooks:
        out = out_dir / nb.name
        print(f"== {nb.name} ({profile})", flush=True)
        t0, status = time.perf_counter(), "ok"
        try:
            pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name=kernel, cwd=str(root),
                                log_output=True, progress_bar=True)
        except Exception as e:  # papermill's execution error names the failing cell
            status = "FAILED"
            print(f"FAILED: {nb.name} (kept at {out}): {type(e).__name__}: {str(e)[-1500:]}", flush=True)
        dt = time.perf_counter() - t0
        rows.append({"notebook": nb.name, "seconds": round(dt, 1), "status": status})
        print(f"   {nb.name}: {status} in {_mmss(dt)}", flush=True)
        if status != "ok":
            break
    total = time.perf_counter() - t_all
    table = pd.DataFrame(rows)
    times = root / "runs" / profile / "notebook_times.csv"
    if only and times.exists():  # a partial run updates its own rows and keeps the others' times
        old = pd.read_csv(times)
        table = pd.concat([old[~old.notebook.isin(table.notebook)], table]).sort_values("notebook")
    write_csv(times, table)
    print(f"\n{table.to_string(index=False)}\ntotal: {_mmss(total)} ({profile})", flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _mmss(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"

