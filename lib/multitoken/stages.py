"""The numbered notebooks as stages that resume: each records what it read and wrote, and reruns only when that changed.

A notebook opens with ``cfg = stages.begin("<its name>", profile)`` and closes with ``stages.finish(cfg)``. Between
the two, ``cfg`` (the profile's settings, checked and resolved) notes every key the stage reads, and the workbook's
writers note every file it writes. :func:`finish` writes the stage's stamp, ``runs/<profile>/stages/<name>.json``:

- ``settings``: each key the stage read, with its value; ``settings_hash`` over them;
- ``notebook_sha256``: the notebook's code cells (its prose is not an input);
- ``upstream``: the ``run_id`` of each stage whose outputs it read (``STAGES``);
- ``outputs``: the files and folders it wrote; ``commit`` / ``dirty`` of the package that made them, and times.

:func:`begin` refuses to start while a stage it reads is missing or out of date (an error naming the stage and the
reason), and removes the stage's own stamp first: a stage that is interrupted (Ctrl-C, a crash, a killed machine)
leaves no stamp, so nothing downstream takes its half-written outputs as finished, and :func:`run_stages` (``make
all``) starts again there. A stage is up to date when its stamp exists, its notebook and every setting it read are
unchanged, its upstream stages' run ids are those it read, and its outputs exist. The package's code is recorded
(commit, dirty), not an input: editing the library does not rerun the profile; results label the commit that made
them.

A long stage keeps its finished parts: ``value = stages.section(cfg, "quality", fn)`` runs ``fn`` once and keeps its
value under ``runs/<profile>/stages/partial/<stage>/``, so the same stage interrupted later and started again under the
same settings, notebook and upstream runs takes it from there instead of computing it again. :func:`finish` removes
those kept values; the stamp's ``resumed`` names the sections taken from an interrupted run (with their commit).
"""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import time
import uuid
from pathlib import Path

from . import utils
from .utils import (MODEL_STAGES, atomic_write_text, commit, models_run, read_stamp, record_output,  # noqa: F401
                    repo_root, stamp_path, write_csv, write_json)

# each stage and the stages whose outputs it reads (05 reads 01-03's training logs beside 04's results)
STAGES = {
    "00_data": (),
    "01_train_ntp": ("00_data",),
    "02_train_mtp": ("00_data",),
    "03_train_medusa": ("00_data", "01_train_ntp"),
    "04_evaluate": ("00_data", "01_train_ntp", "02_train_mtp", "03_train_medusa"),
    "05_figures": ("01_train_ntp", "02_train_mtp", "03_train_medusa", "04_evaluate"),
    "06_ablations": ("00_data",),
    "07_thesis_claims": ("00_data", "01_train_ntp", "04_evaluate"),
}


class StageError(RuntimeError):
    """A stage that cannot start (what it reads is missing or out of date) or a stage name that does not exist."""


class Tracked(dict):
    """The settings as a dict that notes each key read (``reads``: key -> value as JSON stores it)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reads = {}

    def _note(self, key):
        if key in self and key not in self.reads:
            self.reads[key] = _jsonable(dict.__getitem__(self, key))

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def __iter__(self):  # a copy (dict(cfg), {**cfg}) reads everything
        for k in super().__iter__():
            self._note(k)
            yield k

    def items(self):
        return [(k, self[k]) for k in self]

    def values(self):
        return [self[k] for k in self]


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def notebook_path(name: str, root: Path | None = None) -> Path:
    return Path(root or repo_root()) / "notebooks" / f"{name}.ipynb"


def notebook_sha256(path: Path) -> str:
    """SHA-256 of a notebook's code cells (sources only: outputs and prose do not make it a different stage)."""
    cells = json.loads(Path(path).read_text())["cells"]
    code = "\n\x00".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return hashlib.sha256(code.encode()).hexdigest()


def settings_hash(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def stage_names(root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (Path(root or repo_root()) / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def check_name(name: str, root: Path | None = None) -> str:
    names = stage_names(root)
    if name not in names:
        import difflib

        near = difflib.get_close_matches(name, names, n=1)
        raise StageError(f"no stage {name!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                         + f" (stages: {', '.join(names)})")
    return name




def stale_reason(name: str, profile: str, cfg: dict, root: Path | None = None) -> str | None:
    """Why stage ``name`` of ``profile`` must run again under the settings ``cfg``, or ``None`` when it is up to
    date (its stamp exists; its notebook, the settings it read, its upstream runs and its outputs are as recorded)."""
    root = Path(root or repo_root())
    st = read_stamp(profile, name, root)
    if st is None:
        return "not run yet" if not stamp_path(profile, name, root).parent.exists() else "no finished run"
    if st.get("profile") != profile:
        return f"its run was made for profile {st.get('profile')!r}"
    nb = notebook_path(name, root)
    if nb.exists() and notebook_sha256(nb) != st["notebook_sha256"]:
        return "its notebook changed"
    for key, old in st["settings"].items():
        if key not in cfg:
            return f"setting {key} no longer exists"
        new = _jsonable(cfg[key] if not isinstance(cfg, Tracked) else dict.__getitem__(cfg, key))
        if new != old:
            return f"setting {key} changed: {old!r} -> {new!r}"
    for up, run_id in st["upstream"].items():
        got = read_stamp(profile, up, root)
        if got is None:
            return f"{up} has no finished run"
        if got["run_id"] != run_id:
            return f"{up} ran again since"
    for out in st["outputs"]:
        if not (root / out).exists():
            return f"its output {out} is missing"
    return None


def _settings(profile: str, root: Path, **overrides) -> dict:
    from .pipeline import profile_config

    return profile_config(profile, root, **overrides)


class _Running:
    def __init__(self, name, profile, root, upstream, cfg):
        self.name, self.profile, self.root, self.upstream, self.cfg = name, profile, root, upstream, cfg
        self.started, self.run_id, self.code = time.time(), uuid.uuid4().hex[:12], commit(root)
        self.resumed = {}


_CURRENT: _Running | None = None   # the stage this process is running (what result notes name)


def begin(name: str, profile: str = "smoke", *, after: tuple | None = None, root: Path | None = None,
          **overrides) -> Tracked:
    """Start stage ``name`` of ``profile``: the checked settings (a :class:`Tracked` dict), after making sure every
    stage it reads (``after``, default ``STAGES[name]``) has a finished, up-to-date run, and removing its own stamp.
    ``overrides`` change settings for this run (they are recorded like the profile's)."""
    root = Path(root or repo_root())
    check_name(name, root)
    after = STAGES.get(name, ()) if after is None else tuple(after)
    cfg = Tracked(_settings(profile, root, **overrides))
    for up in after:
        why = stale_reason(up, profile, cfg, root)
        if why is not None:
            raise StageError(f"stage {name} reads {up}'s results, but {up} of profile {profile!r} is not up to date "
                             f"({why}): run `make all PROFILE={profile}`, which runs what is missing")
    global _CURRENT
    stamp_path(profile, name, root).unlink(missing_ok=True)
    upstream = {up: read_stamp(profile, up, root)["run_id"] for up in after}
    _CURRENT = _Running(name, profile, root, upstream, cfg)
    utils.start_noting_writes()
    return cfg


def finish(cfg: Tracked) -> dict:
    """Write the stamp of the stage ``cfg`` was begun for (what it read and wrote, its commit and times) and the
    provenance of its outputs in the manifests (:func:`write_manifests`); returns the stamp."""
    global _CURRENT
    run, _CURRENT = _CURRENT, None
    if run is None or run.cfg is not cfg:
        _CURRENT = run
        raise StageError("finish(cfg) needs the settings that the running stage's stages.begin returned")
    root = run.root
    outputs = set()
    for p in utils.stop_noting_writes():
        rel = _relative(Path(p), root)
        if rel is not None and rel.parts[:2] in (("runs", run.profile), ("figures", run.profile)) \
                and "stages" not in rel.parts:
            outputs.add(str(_top_output(rel)))
    nb = notebook_path(run.name, root)
    stamp = dict(stage=run.name, profile=run.profile, run_id=run.run_id,
                 settings=dict(sorted(cfg.reads.items())), settings_hash=settings_hash(cfg.reads),
                 notebook_sha256=notebook_sha256(nb) if nb.exists() else None, upstream=run.upstream,
                 outputs=sorted(outputs), **run.code, **({"resumed": run.resumed} if run.resumed else {}),
                 started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started)),
                 finished=time.strftime("%Y-%m-%d %H:%M:%S"), seconds=round(time.time() - run.started, 1))
    write_manifests(stamp, root)
    write_json(stamp_path(run.profile, run.name, root), stamp)
    shutil.rmtree(partial_dir(run.profile, run.name, root), ignore_errors=True)
    return stamp


def partial_dir(profile: str, name: str, root: Path | None = None) -> Path:
    """Where stage ``name`` keeps the values of its finished sections until it finishes (:func:`section`)."""
    return stamp_path(profile, name, root).parent / "partial" / name


def section(cfg: Tracked, key: str, fn):
    """``fn()``, or its value kept from an interrupted run of this stage: one that had finished this section with
    the same notebook and upstream runs, where every setting the stage had read up to the section's end (before it
    and inside it) still has the value it had then, and whose written files still exist; a setting nobody had read
    yet (another stage's, a new one) does not matter. The kept section counts as run: the settings it read and the
    files it wrote are noted for the stamp as if ``fn`` had run now, and the stamp's ``resumed`` names it with the
    time and commit that made it. ``fn``'s value must pickle. A value that cannot be read back (a half-written or
    foreign file) is computed anew. Outside a stage (a library call, a test) ``fn()`` simply runs."""
    run = _CURRENT
    if run is None:
        return fn()
    if run.cfg is not cfg:
        raise StageError("section(cfg, ...) needs the settings that the running stage's stages.begin returned")
    nb = notebook_path(run.name, run.root)
    fingerprint = settings_hash({"upstream": run.upstream, "notebook": notebook_sha256(nb) if nb.exists() else None})
    path = partial_dir(run.profile, run.name, run.root) / f"{key}.pkl"
    kept = None
    if path.exists():
        try:
            kept = pickle.loads(path.read_bytes())
        except Exception:  # noqa: BLE001 - anything unreadable is recomputed
            kept = None

    def same_settings(read: dict) -> bool:
        return all(k in cfg and _jsonable(dict.__getitem__(cfg, k)) == v for k, v in read.items())
    if (isinstance(kept, dict) and kept.get("fingerprint") == fingerprint and "read_before" in kept
            and same_settings({**kept["read_before"], **kept["reads"]})
            and all(Path(w).exists() for w in kept["written"])):
        for k, v in kept["reads"].items():
            cfg.reads.setdefault(k, v)
        for w in kept["written"]:
            utils.note_written(w)
        run.resumed[key] = {"finished": kept["finished"], "commit": kept["commit"], "dirty": kept["dirty"]}
        print(f"{run.name}: section {key!r} taken from the interrupted run that finished it at {kept['finished']} "
              f"(commit {kept['commit']}{', dirty' if kept['dirty'] else ''})", flush=True)
        return kept["value"]
    reads_before, written_before = set(cfg.reads), utils.noted_writes()
    value = fn()
    kept = {"fingerprint": fingerprint, "value": value, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **run.code,
            "read_before": {k: v for k, v in cfg.reads.items() if k in reads_before},
            "reads": {k: v for k, v in cfg.reads.items() if k not in reads_before},
            "written": sorted(utils.noted_writes() - written_before)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(kept))
    tmp.replace(path)
    return value


def _relative(path: Path, root: Path) -> Path | None:
    """``path`` relative to the workbook ``root``, also where ``runs/`` or ``figures/`` is a link to elsewhere (a
    larger disk); None outside the workbook."""
    path = path.resolve()
    for top in ("", "runs", "figures"):
        try:
            return Path(top) / path.relative_to((root / top).resolve())
        except ValueError:
            continue
    return None


def _top_output(rel: Path) -> Path:
    """A model folder is one output (``runs/p/models/ntp/final``), a data folder too; other files stand alone."""
    parts = rel.parts
    for marker, depth in (("models", 3), ("data", 2), ("ablations", 2)):
        if len(parts) > 2 and parts[2] == marker:
            return Path(*parts[: 2 + depth]) if len(parts) > 2 + depth else rel
    return rel


def _who(stage, run_id, code, when) -> str:
    c = f"commit `{code['commit']}`{' with uncommitted changes' if code['dirty'] else ''}" if code.get("commit") \
        else "no commit recorded"
    return f"{stage} run `{run_id}` ({c}, {when})"


def result_note() -> str:
    """One line for a rendered table: the run that made it and the runs of the stages it read, each with its commit
    (a table whose inputs came from other runs says so here); outside a stage, that no run was recorded."""
    run = _CURRENT
    if run is None:
        return "Made outside a workbook stage: no run recorded."
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started))
    parts = [f"Made by {_who(run.name, run.run_id, run.code, started)}, profile `{run.profile}`"]
    ups = [read_stamp(run.profile, up, run.root) for up in run.upstream]
    if ups:
        parts.append("from " + "; ".join(_who(u["stage"], u["run_id"], u, u["finished"][:16]) for u in ups if u))
    older = sorted({u["commit"] for u in ups if u and u.get("commit") and u["commit"] != run.code.get("commit")})
    if older:
        parts.append(f"inputs made by another commit ({', '.join(older)}) than this table")
    return "; ".join(parts) + "."


def runs_table(profile: str, root: Path | None = None) -> str:
    """Markdown: each stage's finished run (id, commit, when, settings hash), flagging runs made by a commit other than
    the checkout's, and stages with no finished run."""
    root = Path(root or repo_root())
    head = commit(root).get("commit")
    rows = ["| stage | run | commit | finished | seconds | settings |", "|---|---|---|---|---|---|"]
    for name in stage_names(root):
        st = read_stamp(profile, name, root)
        if st is None:
            rows.append(f"| {name} | no finished run | | | | |")
            continue
        c = f"`{st['commit']}`" + (" (uncommitted changes)" if st["dirty"] else "") if st["commit"] else "—"
        if st["commit"] and head and st["commit"] != head:
            c += f" — older than the checkout (`{head}`)"
        rows.append(f"| {name} | `{st['run_id']}` | {c} | {st['finished']} | {st['seconds']} | "
                    f"`{st['settings_hash']}` |")
    return "\n".join(rows)


def provenance(stamp: dict) -> dict:
    """What a result file records of the run that made it."""
    return {k: stamp[k] for k in ("stage", "profile", "run_id", "commit", "dirty", "settings_hash", "finished")}


def write_manifests(stamp: dict, root: Path) -> None:
    """``manifest.json`` beside the outputs (``runs/<profile>/results/``, ``figures/<profile>/``): each file the stage
    wrote -> its run's :func:`provenance`; entries of files the stage made before and did not write again are dropped
    (nothing stale stays unlabelled)."""
    by_dir = {}
    for out in stamp["outputs"]:
        p = Path(out)
        by_dir.setdefault(p.parent, []).append(p.name)
    for d in {Path("runs") / stamp["profile"] / "results", Path("figures") / stamp["profile"]} | set(by_dir):
        f = root / d / "manifest.json"
        if not f.exists() and d not in by_dir:
            continue
        old = json.loads(f.read_text()) if f.exists() else {}
        keep = {k: v for k, v in old.items() if v.get("stage") != stamp["stage"] and (root / d / k).exists()}
        keep.update({name: provenance(stamp) for name in by_dir.get(d, []) if name != "manifest.json"})
        write_json(f, dict(sorted(keep.items())))


def require(profile: str, cfg, names) -> None:
    """Stop (``SystemExit``) unless every stage in ``names`` of ``profile`` is up to date: what a script that reads a
    profile's trained models checks first."""
    for up in names:
        why = stale_reason(up, profile, cfg)
        if why:
            raise SystemExit(f"{up} of {profile} is not up to date ({why}): run make all PROFILE={profile}")


def figures_dir(profile: str, root: Path | None = None) -> Path:
    """Where a profile's figures and published results live: ``figures/<profile>/`` (``runs/smoke/figures/``)."""
    root = Path(root or repo_root())
    return root / "runs" / "smoke" / "figures" if profile == "smoke" else root / "figures" / profile


def publish(profile: str, root: Path | None = None) -> dict:
    """Make ``figures/<profile>/`` hold one run: copy the result files (CSV, JSON, Markdown) of the stages whose runs
    are up to date from ``runs/<profile>/results/``, and those made since by commands on the same models (``record_output``
    with ``models``), each copy with its manifest entry and where it came from; write the stages' times; move
    every other file there (made by an earlier run, or of unknown origin) into ``earlier/``, its manifest entry with
    it. Returns ``{"copied": [...], "moved": [...]}``."""
    import shutil

    root = Path(root or repo_root())
    run_dir, fig = root / "runs" / profile, figures_dir(profile, root)
    cfg = _settings(profile, root)
    current = {(n, st["run_id"]) for n in stage_names(root)
               if (st := read_stamp(profile, n, root)) and stale_reason(n, profile, cfg, root) is None}
    models = models_run(profile, root)

    def is_current(e):
        return (e.get("stage"), e.get("run_id")) in current or (
            e.get("run_id") is None and e.get("models") == models and all(models.values()))

    def manifest(d):
        f = d / "manifest.json"
        return json.loads(f.read_text()) if f.exists() else {}
    results, man = manifest(run_dir / "results"), manifest(fig)
    fig.mkdir(parents=True, exist_ok=True)
    copied, moved = [], []
    for name, entry in results.items():
        src = run_dir / "results" / name
        if is_current(entry) and src.suffix in (".json", ".csv", ".md") and src.is_file():
            shutil.copy2(src, fig / name)
            man[name] = dict(entry, copied_from=f"runs/{profile}/results/{name}")
            copied.append(name)
    atomic_write_text(fig / "stage_times.md", time_table(profile, root) + "\n")   # from the stamps, as they are
    man["stage_times.md"] = dict(stage="make all", profile=profile, run_id=None, **commit(root),
                                 finished=time.strftime("%Y-%m-%d %H:%M:%S"), models=models)
    copied.append("stage_times.md")
    earlier = fig / "earlier"
    old = manifest(earlier)
    for f in sorted(fig.iterdir()):
        if f.is_file() and f.name != "manifest.json" and not is_current(man.get(f.name, {})):
            earlier.mkdir(exist_ok=True)
            f.replace(earlier / f.name)
            old[f.name] = man.pop(f.name, {"stage": None, "note": "made before runs were recorded"})
            moved.append(f.name)
    write_json(fig / "manifest.json", dict(sorted(man.items())))
    if moved:
        write_json(earlier / "manifest.json", dict(sorted(old.items())))
    return {"copied": copied, "moved": moved}


def run_stages(profile: str, *, force: bool = False, start: str | None = None, only: list[str] | None = None,
               root: Path | None = None, kernel: str = "multitoken", dry: bool = False) -> int:
    """Run the profile's stages in order with papermill, each only when :func:`stale_reason` says so (``force``: all;
    ``start``: that stage and every later one; ``only``: just those). One line per stage with its time or why it was
    skipped, a table at the end (``runs/<profile>/notebook_times.csv``); the first failure stops the run (exit 1)
    and keeps the executed notebook under ``runs/<profile>/notebooks/``. A stage rerun by ``force`` or ``start``
    starts afresh; otherwise an interrupted stage takes the sections it finished (:func:`section`). ``dry``: print what would run and why
    (a stage whose upstream would run runs after it), run nothing."""
    import pandas as pd
    import papermill as pm

    root = Path(root or repo_root())
    cfg = _settings(profile, root)  # the settings are checked before any work
    names = stage_names(root)
    for n in [start] + list(only or []):
        if n is not None:
            check_name(n, root)
    if dry:
        return _dry_run(profile, cfg, names, force, start, only, root)
    out_dir = root / "runs" / profile / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, t_all = [], time.perf_counter()
    for name in names:
        if only and name not in only:
            continue
        why = _why_run(name, profile, cfg, force, start, only, root)
        if why is None:
            st = read_stamp(profile, name, root)
            print(f"== {name}: up to date, skipped (finished {st['finished']}, commit {st['commit']}"
                  f"{', dirty' if st['dirty'] else ''})", flush=True)
            rows.append({"stage": name, "seconds": 0.0, "status": "skipped"})
            continue
        if force or (start is not None and name >= start):  # a rerun asked for starts afresh
            shutil.rmtree(partial_dir(profile, name, root), ignore_errors=True)
        print(f"== {name} ({profile}): running ({why})", flush=True)
        t0, status = time.perf_counter(), "ok"
        try:
            pm.execute_notebook(str(notebook_path(name, root)), str(out_dir / f"{name}.ipynb"),
                                parameters={"profile": profile}, kernel_name=kernel, cwd=str(root),
                                log_output=True, progress_bar=True)
            st = read_stamp(profile, name, root)
            if st is None:
                raise StageError(f"{name} ended without its stamp: its last cell must call stages.finish(cfg)")
            # the stage's time as a reader waits for it: the kernel's start and imports included
            write_json(stamp_path(profile, name, root), dict(st, wall_seconds=round(time.perf_counter() - t0, 1)))
        except Exception as e:  # papermill's execution error names the failing cell
            status = "FAILED"
            print(f"FAILED: {name} (kept at {out_dir / name}.ipynb): {type(e).__name__}: {str(e)[-1500:]}",
                  flush=True)
        dt = time.perf_counter() - t0
        rows.append({"stage": name, "seconds": round(dt, 1), "status": status})
        print(f"   {name}: {status} in {_mmss(dt)}", flush=True)
        if status != "ok":
            break
    table = pd.DataFrame(rows)
    times = root / "runs" / profile / "notebook_times.csv"
    write_csv(times, table)
    print(f"\n{table.to_string(index=False)}\ntotal: {_mmss(time.perf_counter() - t_all)} ({profile})", flush=True)
    atomic_write_text(root / "runs" / profile / "stage_times.md", time_table(profile, root) + "\n")
    ok = all(r["status"] != "FAILED" for r in rows)
    if ok and not only:  # the figures folder then holds this run alone
        done = publish(profile, root)
        print(f"published {len(done['copied'])} result files to {figures_dir(profile, root)}"
              + (f"; moved {len(done['moved'])} of earlier runs to earlier/" if done["moved"] else ""), flush=True)
    return 0 if ok else 1


def _why_run(name, profile, cfg, force, start, only, root) -> str | None:
    """Why ``run_stages`` runs stage ``name`` (asked for, from ``start`` on, or stale), ``None`` to skip it."""
    if force or only:
        return "asked for"
    if start is not None and name >= start:
        return f"from {start} on"
    return stale_reason(name, profile, cfg, root)


def _dry_run(profile, cfg, names, force, start, only, root) -> int:
    will = []
    for name in names:
        if only and name not in only:
            continue
        ups = [u for u in (read_stamp(profile, name, root) or {}).get("upstream", {}) if u in will]
        why = _why_run(name, profile, cfg, force, start, only, root) or (f"{ups[0]} runs before it" if ups else None)
        if why is not None:
            will.append(name)
        print(f"== {name}: " + (f"would run ({why})" if why else "up to date, would be skipped"), flush=True)
    return 0


def time_table(profile: str, root: Path | None = None, yardstick: str = "smoke") -> str:
    """Markdown: each stage's finished run (its time, when, commit) and their total, with the ``yardstick`` profile's
    total beside it (the same machine's speed varies from day to day: compare runs through it)."""
    root = Path(root or repo_root())

    def stamps(p):
        return {n: st for n in stage_names(root) if (st := read_stamp(p, n, root))}

    mine = stamps(profile)
    rows = ["| stage | time | finished | commit |", "|---|---|---|---|"]
    rows += [f"| {n} | {_mmss(_secs(st))} | {st['finished']} | `{st['commit']}` |" if (st := mine.get(n))
             else f"| {n} | no finished run | | |" for n in stage_names(root)]
    rows.append(f"| **total** | **{_mmss(sum(map(_secs, mine.values())))}** | | |")
    ref = stamps(yardstick)
    if ref and yardstick != profile:
        day = max(st["finished"] for st in ref.values())
        rows.append(f"\nYardstick: `make all PROFILE={yardstick}`'s stages took "
                    f"{_mmss(sum(map(_secs, ref.values())))} in all on this machine (last finished {day}).")
    return "\n".join(rows)


def _secs(stamp: dict) -> float:
    """A run's seconds as ``make all`` timed it (kernel start included), else from its first cell to its last."""
    return stamp.get("wall_seconds", stamp["seconds"])


def _mmss(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"
