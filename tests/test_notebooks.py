"""What a reader sees: an executed notebook embeds every figure as PNG, and the HTML report holds the figures and
the thesis table with no external resources (it opens offline)."""
import json
import re

import pytest

from multitoken.report import build_report
from multitoken.utils import repo_root


def test_executed_notebook_shows_every_figure_and_the_report_embeds_them(tmp_path):
    papermill = pytest.importorskip("papermill")
    import shutil

    root = repo_root()
    (tmp_path / "pyproject.toml").write_text("")          # a scratch workbook: the run's files stay in tmp_path
    (tmp_path / "lib" / "multitoken").mkdir(parents=True)
    (tmp_path / "notebooks" / "params").mkdir(parents=True)
    shutil.copy(root / "notebooks" / "00_data.ipynb", tmp_path / "notebooks")
    shutil.copy(root / "notebooks" / "params" / "smoke.yaml", tmp_path / "notebooks" / "params")
    run = tmp_path / "runs" / "smoke"
    out = run / "notebooks" / "00_data.ipynb"
    out.parent.mkdir(parents=True)
    papermill.execute_notebook(str(tmp_path / "notebooks" / "00_data.ipynb"), str(out), kernel_name="multitoken",
                               cwd=str(tmp_path), progress_bar=False)
    assert (run / "stages" / "00_data.json").exists()
    nb = json.loads(out.read_text())
    figure_cells = [c for c in nb["cells"] if c["cell_type"] == "code" and "plots." in "".join(c["source"])]
    assert figure_cells
    for c in figure_cells:
        assert any("image/png" in o.get("data", {}) for o in c["outputs"]), "".join(c["source"])
    assert any("text/markdown" in o.get("data", {}) for c in nb["cells"] if c["cell_type"] == "code"
               for o in c.get("outputs", []))  # the closing sentence written from the results
    (run / "figures").mkdir(exist_ok=True)
    (run / "figures" / "thesis_table.md").write_text("| variant | speedup (ours) |\n|---|---|\n| mtp | 2.21 [2.1, 2.3] |\n")
    from test_evaluation import fixture_results
    _, q, bench, _, mem, *_ = fixture_results()
    bench = [dict(r, device_name="cpu", dtype="float32", prompts=5) for r in bench]
    for name, obj in (("quality.json", q), ("decoding_benchmark.json", bench), ("memory.json", mem)):
        (run / "figures" / name).write_text(json.dumps(obj))
    html = build_report("smoke", root=tmp_path, runs="| stage | run |\n|---|---|\n| 00_data | r1 |").read_text()
    assert html.count("data:image/png;base64,") >= len(figure_cells)
    assert -1 < html.find("The verdicts") < html.find("The thesis table")   # the same verdicts as the README, first
    assert "consistent with the claimed 1.61x" in html
    assert "The thesis table" in html and "2.21 [2.1, 2.3]" in html and "The runs behind these results" in html
    assert not re.findall(r'(?:src|href)="https?://', html)   # nothing fetched from the network
    assert "pipeline.run_data(cfg)" not in html               # code hidden
    assert "drop prompt-only" not in html                     # progress bars stay in the console


def test_report_without_executed_notebooks_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="make all PROFILE=nothing"):
        build_report("nothing", root=tmp_path)
