"""Stages that resume: a stage reruns only when a setting it read, its notebook, an upstream run or an output changed;
an interrupted stage leaves no stamp, so nothing downstream takes its outputs as finished and the runner starts there.

Three tiny stages in a scratch workbook (``a`` -> ``b`` -> ``c``, ``b`` reads ``ntp_lr``, ``c`` reads ``mtp_n``),
in-process for the bookkeeping and through papermill for the runner."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from multitoken import stages
from multitoken.stages import StageError
from multitoken.utils import repo_root

WORKBOOK = Path(__file__).resolve().parents[1]
GRAPH = {"00_a": (), "01_b": ("00_a",), "02_c": ("01_b",)}
READS = {"00_a": "seed", "01_b": "ntp_lr", "02_c": "mtp_n"}


def _notebook(name):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "smoke"')
    params.metadata["tags"] = ["parameters"]
    body = f'''import os, time
from multitoken import pipeline, stages, utils
cfg = stages.begin("{name}", profile, after={GRAPH[name]!r})
utils.write_json(pipeline.paths(cfg)["results"] / "{name}.json", {{"value": cfg["{READS[name]}"]}})
if os.environ.get("SLEEP_IN") == "{name}":
    (pipeline.paths(cfg)["run"] / "sleeping").touch()
    time.sleep(600)'''
    nb.cells = [params, nbformat.v4.new_code_cell(body), nbformat.v4.new_code_cell("stages.finish(cfg)")]
    nb.metadata["kernelspec"] = {"name": "multitoken", "display_name": "Python (multitoken)", "language": "python"}
    return nb


@pytest.fixture
def workbook(tmp_path, monkeypatch):
    """A scratch workbook root with the three stages and profile ``t``; the cwd inside it."""
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "lib" / "multitoken").mkdir(parents=True)
    (tmp_path / "notebooks" / "params").mkdir(parents=True)
    for name in GRAPH:
        nbformat.write(_notebook(name), tmp_path / "notebooks" / f"{name}.ipynb")
    set_profile(tmp_path, ntp_lr=1.0e-4, mtp_n=3)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_profile(root, **values):
    lines = ["profile: t"] + [f"{k}: {v}" for k, v in values.items()]
    (root / "notebooks" / "params" / "t.yaml").write_text("\n".join(lines) + "\n")


def run_in_process(name, root):
    """What the stage's notebook does, without a kernel."""
    cfg = stages.begin(name, "t", after=GRAPH[name], root=root)
    from multitoken import pipeline, utils

    utils.write_json(pipeline.paths(cfg)["results"] / f"{name}.json", {"value": cfg[READS[name]]})
    return stages.finish(cfg)


def stale(root):
    cfg = stages._settings("t", root)
    return {n: stages.stale_reason(n, "t", cfg, root) for n in GRAPH}


def test_a_stage_records_what_it_read_and_wrote_and_is_up_to_date_until_that_changes(workbook):
    for name in GRAPH:
        run_in_process(name, workbook)
    st = stages.read_stamp("t", "01_b", workbook)
    assert st["settings"] == {"ntp_lr": 1e-4, "profile": "t"} and st["upstream"] == {
        "00_a": stages.read_stamp("t", "00_a", workbook)["run_id"]}
    assert st["outputs"] == ["runs/t/results/01_b.json"] and st["commit"] is None  # no git checkout here
    assert stale(workbook) == dict.fromkeys(GRAPH)
    manifest = json.loads((workbook / "runs/t/results/manifest.json").read_text())
    assert manifest["01_b.json"]["run_id"] == st["run_id"] and manifest["00_a.json"]["stage"] == "00_a"

    set_profile(workbook, ntp_lr=1.0e-4, mtp_n=3, eval_examples=5)  # read by no stage
    assert stale(workbook) == dict.fromkeys(GRAPH)
    set_profile(workbook, ntp_lr=2.0e-4, mtp_n=3)                   # read by b: b is stale, c after b reruns
    assert stale(workbook) == {"00_a": None, "01_b": "setting ntp_lr changed: 0.0001 -> 0.0002", "02_c": None}
    run_in_process("01_b", workbook)
    assert stale(workbook) == {"00_a": None, "01_b": None, "02_c": "01_b ran again since"}

    (workbook / "runs/t/results/00_a.json").unlink()
    assert stale(workbook)["00_a"] == "its output runs/t/results/00_a.json is missing"
    run_in_process("00_a", workbook)
    nb = workbook / "notebooks" / "02_c.ipynb"
    nb.write_text(nb.read_text().replace("stages.finish(cfg)", "stages.finish(cfg)  # edited"))
    assert stale(workbook)["02_c"] == "its notebook changed"


def test_a_stage_refuses_to_start_on_an_unfinished_or_stale_upstream(workbook):
    with pytest.raises(StageError, match=r"01_b reads 00_a's results, but 00_a of profile 't' is not up to date "
                                         r"\(not run yet\): run `make all PROFILE=t`"):
        run_in_process("01_b", workbook)
    run_in_process("00_a", workbook)
    run_in_process("01_b", workbook)
    stages.begin("01_b", "t", after=GRAPH["01_b"], root=workbook)  # started again, then interrupted
    with pytest.raises(StageError, match=r"stage 02_c reads 01_b's results, but 01_b of profile 't' is not up to date "
                                         r"\(no finished run\)"):
        run_in_process("02_c", workbook)
    run_in_process("01_b", workbook)
    set_profile(workbook, ntp_lr=3.0e-4, mtp_n=3)
    with pytest.raises(StageError, match="setting ntp_lr changed"):
        run_in_process("02_c", workbook)


def test_results_copied_under_another_profile_are_not_taken_as_its_own(workbook):
    run_in_process("00_a", workbook)
    import shutil

    shutil.copytree(workbook / "runs" / "t", workbook / "runs" / "u")
    (workbook / "notebooks" / "params" / "u.yaml").write_text("profile: u\n")
    cfg = stages._settings("u", workbook)
    assert stages.stale_reason("00_a", "u", cfg, workbook) == "its run was made for profile 't'"


def test_unknown_stage_names_are_refused_with_the_nearest(workbook):
    with pytest.raises(StageError, match=r"no stage '01_bb'; did you mean '01_b'\? \(stages: 00_a, 01_b, 02_c\)"):
        stages.begin("01_bb", "t", root=workbook)
    with pytest.raises(StageError, match="no stage '04_evaluation'; did you mean '04_evaluate'"):
        stages.check_name("04_evaluation", WORKBOOK)


def _runner(root, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "multitoken", "notebooks", "--profile", "t", *args], cwd=root,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, process_group=0)


def _lines(proc):
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    return [ln for ln in out.splitlines() if ln.startswith("== ")]


def test_the_runner_skips_what_is_up_to_date_resumes_a_killed_stage_and_reruns_from_a_stage(workbook):
    killed = _runner(workbook, env={"SLEEP_IN": "01_b"})
    deadline = time.time() + 240
    while not (workbook / "runs/t/sleeping").exists():
        assert time.time() < deadline and killed.poll() is None, killed.communicate()[0]
        time.sleep(0.5)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert stages.read_stamp("t", "00_a", workbook) and (workbook / "runs/t/results/01_b.json").exists()
    assert stages.read_stamp("t", "01_b", workbook) is None        # its output is there, but not as finished

    lines = _lines(_runner(workbook))                                 # resumes at the killed stage
    assert lines[0].startswith("== 00_a: up to date, skipped") and "running (no finished run)" in lines[1]
    assert "02_c (t): running (not run yet)" in lines[2] or "02_c (t): running (no finished run)" in lines[2]
    assert all("skipped" in ln for ln in _lines(_runner(workbook)))  # at once again: nothing runs
    lines = _lines(_runner(workbook, "--from", "01_b"))
    assert "skipped" in lines[0] and "running (from 01_b on)" in lines[1] and "running" in lines[2]
    times = (workbook / "runs/t/notebook_times.csv").read_text().splitlines()
    assert times[0] == "stage,seconds,status" and times[1].startswith("00_a,0.0,skipped")
    bad = _runner(workbook, "--from", "01_x")
    out = bad.communicate(timeout=120)[0]
    assert bad.returncode == 2 and "error: no stage '01_x'; did you mean" in out and "Traceback" not in out


def test_every_workbook_notebook_begins_and_finishes_its_own_stage():
    root = repo_root()
    assert set(stages.STAGES) == set(stages.stage_names(root))
    for name in stages.STAGES:
        code = [c for c in json.loads((root / "notebooks" / f"{name}.ipynb").read_text())["cells"]
                if c["cell_type"] == "code"]
        assert sum(f'stages.begin("{name}", profile)' in "".join(c["source"]) for c in code) == 1, name
        assert "stages.finish(cfg)" in "".join(code[-1]["source"]), name
        assert all(up < name for up in stages.STAGES[name]), name  # upstream stages run earlier


def test_a_folder_written_in_place_is_all_or_nothing(tmp_path):
    from multitoken.utils import atomic_dir

    def model(text, fail=False):
        def write(tmp):
            (tmp / "config.json").write_text(text)
            if fail:
                raise KeyboardInterrupt  # killed between two files
            (tmp / "model.safetensors").write_text(text)
        return write

    final = tmp_path / "ntp" / "final"
    atomic_dir(final, model("old"))
    with pytest.raises(KeyboardInterrupt):
        atomic_dir(final, model("new", fail=True))
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    assert (final / "config.json").read_text() == "old" and [p.name for p in final.parent.iterdir()] == ["final"]
    atomic_dir(final, model("new"))
    assert (final / "model.safetensors").read_text() == "new"


def test_tables_name_their_run_and_inputs_made_by_another_commit(workbook):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=workbook, check=True,
                       capture_output=True)

    assert stages.result_note() == "Made outside a workbook stage: no run recorded."
    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "one")
    first = stages.commit(workbook)["commit"]
    run_in_process("00_a", workbook)
    git("commit", "-q", "--allow-empty", "-m", "two")
    cfg = stages.begin("01_b", "t", after=GRAPH["01_b"], root=workbook)
    note = stages.result_note()
    a = stages.read_stamp("t", "00_a", workbook)
    assert note.startswith(f"Made by 01_b run `{stages._CURRENT.run_id}` (commit `{stages.commit(workbook)['commit']}`")
    assert f"from 00_a run `{a['run_id']}` (commit `{first}`" in note
    assert note.endswith(f"inputs made by another commit ({first}) than this table.")
    stages.finish(cfg)
    assert stages.result_note() == "Made outside a workbook stage: no run recorded."
    table = stages.runs_table("t", workbook)
    assert f"| 00_a | `{a['run_id']}` | `{first}` — older than the checkout" in table
    assert "| 02_c | no finished run |" in table


def test_a_dry_run_says_what_would_run_and_why_and_runs_nothing(workbook, capsys):
    for name in GRAPH:
        run_in_process(name, workbook)
    before = {n: stages.read_stamp("t", n, workbook)["run_id"] for n in GRAPH}
    set_profile(workbook, ntp_lr=2.0e-4, mtp_n=3)
    assert stages.run_stages("t", root=workbook, dry=True) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("== ")]
    assert lines == ["== 00_a: up to date, would be skipped",
                     "== 01_b: would run (setting ntp_lr changed: 0.0001 -> 0.0002)",
                     "== 02_c: would run (01_b runs before it)"]
    assert {n: stages.read_stamp("t", n, workbook)["run_id"] for n in GRAPH} == before
    stages.run_stages("t", root=workbook, dry=True, start="02_c")
    assert capsys.readouterr().out.splitlines()[-1] == "== 02_c: would run (from 02_c on)"


def test_the_commit_is_dirty_for_code_changes_not_for_a_runs_own_outputs(tmp_path):
    """A run rewrites tracked files under figures/ (and runs/): that must not label its own results "uncommitted"; a
    change to the code or settings must."""
    import subprocess

    from multitoken.utils import commit

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    for rel in ("lib/multitoken/x.py", "figures/toy/table.md", "notebooks/params/toy.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("a\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x")
    assert commit(tmp_path)["dirty"] is False
    (tmp_path / "figures/toy/table.md").write_text("b\n")
    assert commit(tmp_path)["dirty"] is False
    for rel in ("notebooks/params/toy.yaml", "lib/multitoken/x.py"):
        (tmp_path / rel).write_text("b\n")
        assert commit(tmp_path)["dirty"] is True
        git("checkout", "--", rel)


def test_an_interrupted_stage_takes_the_sections_it_finished_and_only_under_the_same_settings(workbook):
    from multitoken import pipeline, utils

    run_in_process("00_a", workbook)
    calls = []

    def quality(cfg):
        calls.append(1)
        utils.write_json(pipeline.paths(cfg)["results"] / "q.json", {"lr": cfg["ntp_lr"]})
        return {"ppl": 2.5 * len(calls)}

    cfg = stages.begin("01_b", "t", after=GRAPH["01_b"], root=workbook)
    assert stages.section(cfg, "quality", lambda: quality(cfg)) == {"ppl": 2.5}
    stages._CURRENT = None                                  # interrupted after the section
    cfg = stages.begin("01_b", "t", after=GRAPH["01_b"], root=workbook)
    assert stages.section(cfg, "quality", lambda: quality(cfg)) == {"ppl": 2.5} and len(calls) == 1
    st = stages.finish(cfg)
    assert st["settings"]["ntp_lr"] == 1e-4 and "runs/t/results/q.json" in st["outputs"]  # as if it had run now
    assert set(st["resumed"]) == {"quality"} and not stages.partial_dir("t", "01_b", workbook).exists()

    cfg = stages.begin("01_b", "t", after=GRAPH["01_b"], root=workbook)  # finished runs leave nothing to take
    assert stages.section(cfg, "quality", lambda: quality(cfg)) == {"ppl": 5.0}
    stages._CURRENT = None
    set_profile(workbook, ntp_lr=1.0e-4, mtp_n=4)           # a setting the stage had not read: the part stands
    cfg = stages.begin("01_b", "t", after=GRAPH["01_b"], root=workbook)
    assert stages.section(cfg, "quality", lambda: quality(cfg)) == {"ppl": 5.0} and len(calls) == 2
    stages._CURRENT = None
    set_profile(workbook, ntp_lr=2.0e-4, mtp_n=4)           # one it had read (inside the part): computed anew
    cfg = stages.begin("01_b", "t", after=GRAPH["01_b"], root=workbook)
    assert stages.section(cfg, "quality", lambda: quality(cfg)) == {"ppl": 7.5}
    stages._CURRENT = None
    set_profile(workbook, ntp_lr=1.0e-4, mtp_n=4)
    cfg = stages.begin("01_b", "t", after=GRAPH["01_b"], root=workbook)
    cfg["eval_examples"]                                     # ntp_lr back to the first value: computed anew
    assert stages.section(cfg, "quality", lambda: quality(cfg)) == {"ppl": 10.0}
    stages._CURRENT = None
    set_profile(workbook, ntp_lr=1.0e-4, mtp_n=4, eval_examples=7)
    cfg = stages.begin("01_b", "t", after=GRAPH["01_b"], root=workbook)
    cfg["eval_examples"]                                     # read before the part, and changed: computed anew
    assert stages.section(cfg, "quality", lambda: quality(cfg)) == {"ppl": 12.5}
    stages._CURRENT = None
    (stages.partial_dir("t", "01_b", workbook) / "quality.pkl").write_bytes(b"half-writ")
    cfg = stages.begin("01_b", "t", after=GRAPH["01_b"], root=workbook)
    assert stages.section(cfg, "quality", lambda: quality(cfg)) == {"ppl": 15.0}
    assert "resumed" not in stages.finish(cfg)
    assert stages.section(cfg, "quality", lambda: "ran") == "ran"          # outside a stage: just runs
    stages.begin("01_b", "t", after=GRAPH["01_b"], root=workbook)
    with pytest.raises(StageError, match="needs the settings"):
        stages.section(cfg, "quality", lambda: quality(cfg))             # another stage's settings
    stages._CURRENT = None


def test_publishing_leaves_one_run_in_the_figures_folder_and_moves_the_rest_aside(workbook, monkeypatch):
    from multitoken import utils

    for name in GRAPH:
        run_in_process(name, workbook)
    fig = workbook / "figures" / "t"
    fig.mkdir(parents=True, exist_ok=True)
    (fig / "old_table.md").write_text("made by an earlier run")
    utils.write_json(fig / "manifest.json", {"old_table.md": {"stage": None, "commit": "abc123"}})
    (fig / "stray.csv").write_text("a\n1\n")                                  # no record at all
    monkeypatch.setattr(utils, "MODEL_STAGES", ("01_b",))
    res = workbook / "runs" / "t" / "results"
    utils.write_json(res / "bench.json", {"x": 1})                            # a command on the same models
    stages.record_output(res / "bench.json", "make bench", workbook, models=stages.models_run("t", workbook))
    utils.write_json(res / "older_bench.json", {"x": 0})                      # one on models trained before
    stages.record_output(res / "older_bench.json", "make bench", workbook, models={"01_b": "gone"})

    done = stages.publish("t", workbook)
    assert sorted(done["copied"]) == ["00_a.json", "01_b.json", "02_c.json", "bench.json", "stage_times.md"]
    assert "| 01_b |" in (fig / "stage_times.md").read_text()
    assert sorted(done["moved"]) == ["old_table.md", "stray.csv"]
    man = json.loads((fig / "manifest.json").read_text())
    assert man["01_b.json"]["run_id"] == stages.read_stamp("t", "01_b", workbook)["run_id"]
    assert man["01_b.json"]["copied_from"] == "runs/t/results/01_b.json" and man["bench.json"]["stage"] == "make bench"
    assert man["bench.json"]["profile"] == "t"                                # the profile, not its results folder
    earlier = json.loads((fig / "earlier" / "manifest.json").read_text())
    assert earlier["old_table.md"]["commit"] == "abc123" and earlier["stray.csv"]["stage"] is None
    assert not (fig / "older_bench.json").exists() and (fig / "earlier" / "stray.csv").exists()

    run_in_process("01_b", workbook)                                          # 01_b again: its old copy is stale
    done = stages.publish("t", workbook)
    assert "01_b.json" in done["copied"] and "bench.json" in done["moved"]    # measured the models 01_b replaced
    assert "02_c.json" in done["moved"]                                       # 02_c read the old 01_b: stale


def test_outputs_are_recorded_when_runs_is_a_link_to_another_disk(workbook, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("big_disk")
    (workbook / "runs").rename(elsewhere / "runs") if (workbook / "runs").exists() else None
    (elsewhere / "runs").mkdir(exist_ok=True)
    (workbook / "runs").symlink_to(elsewhere / "runs")
    st = run_in_process("00_a", workbook)
    assert st["outputs"] == ["runs/t/results/00_a.json"]
    assert "00_a.json" in json.loads((elsewhere / "runs/t/results/manifest.json").read_text())


def test_the_provenance_table_names_the_models_a_command_measured(tmp_path):
    """The README's provenance: each stage's run, and a file made by a command (``make bench-batch``) named with the
    runs of the models it measured, so a file made on models since retrained is not passed off as this run's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_results", repo_root() / "scripts" / "readme_results.py")
    rr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rr)
    stage = dict(stage="03_train_medusa", run_id="new", commit="c1", finished="today")
    man = {"drafter_scaling.csv": stage,
           "batch_benchmark.json": dict(stage="make bench-batch", run_id=None, models={"03_train_medusa": "old"})}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    text = rr.provenance(tmp_path)
    assert "| 03_train_medusa | `new` | `c1` | today |" in text
    assert "`make bench-batch` on the models of runs 03 `old`: batch_benchmark.json" in text
