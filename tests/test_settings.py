"""Strict, typed settings: every shipped profile loads; a misspelt key, a wrong type, a value out of range or a missing
profile stops before any work with the key, the file and the nearest valid key."""
import json
import typing

import pytest

from multitoken import __main__ as cli
from multitoken import data, pipeline, settings
from multitoken.core import heads, models
from multitoken.settings import SettingsError
from multitoken.utils import DTYPES, repo_root


def _root(tmp_path, text, name="p"):
    (tmp_path / "notebooks" / "params").mkdir(parents=True)
    (tmp_path / "notebooks" / "params" / f"{name}.yaml").write_text(text)
    return tmp_path


@pytest.mark.parametrize("profile", settings.profiles(repo_root()))
def test_every_shipped_profile_loads_and_names_itself(profile):
    s = settings.load(profile, repo_root())
    assert s.run.profile == profile and set(s.flat()) == set(settings.DEFAULTS)


def test_the_smoke_profile_is_the_defaults_and_the_sections_cover_every_key_once():
    assert settings.load("smoke", repo_root()).flat() == settings.DEFAULTS
    keys = [k for cls in settings.SECTIONS.values() for k in cls.__dataclass_fields__]
    assert len(keys) == len(set(keys)) == len(settings.DEFAULTS)


def test_a_misspelt_key_in_a_profile_names_the_key_the_file_and_the_nearest_valid_key(tmp_path):
    root = _root(tmp_path, "profile: p\nntp_lrr: 1.0e-4\n")
    with pytest.raises(SettingsError, match=r"unknown setting 'ntp_lrr' \(in .*p\.yaml\); did you mean 'ntp_lr'"):
        settings.load("p", root)


@pytest.mark.parametrize("text, match", [
    ("ntp_lr: 1e-4", r"ntp_lr: '1e-4' is not float \(YAML reads 1e-4 as text: write 1.0e-4\)"),
    ("max_seq_len: long", "max_seq_len: 'long' is not int"),
    ("n_layer: true", "n_layer: True is not int"),
    ("val_fraction: 1.5", r"val_fraction: 1.5 is out of range \(must be < 1\)"),
    ("ntp_lr: 0", r"ntp_lr: 0 is out of range \(must be > 0\)"),
    ("tree_budgets: [4, 0]", r"tree_budgets: \[4, 0\] is out of range \(must be >= 1\)"),
    ("tree_budget: best", "tree_budget: 'best' is not int or 'auto'"),
    ("inference_dtype: fp8", "inference_dtype: 'fp8' is not one of 'float32', 'bfloat16', 'float16'"),
    ("tree_kinds: [fitted, eagle]", "tree_kinds: .* is not list of one of 'fitted', 'medusa'"),
    ("mtp_weighting: exp", "mtp_weighting: 'exp' is not one of"),
    ("ntp: {mtp_n: 3}", "ntp.mtp_n: not a key of section 'ntp' .*; it belongs to 'mtp'"),
    ("ntp: 3", "ntp: a section takes a mapping"),
    ("profile: q", "profile: 'q' in .*p.yaml, whose name says 'p'"),
    ("[1, 2]", "must hold a mapping of settings"),
    ("a: [", "is not valid YAML"),
])
def test_bad_values_stop_with_the_key_and_the_file(tmp_path, text, match):
    with pytest.raises(SettingsError, match=match):
        settings.load("p", _root(tmp_path, text + "\n"))


def test_a_profile_by_section_equals_the_same_profile_flat(tmp_path):
    flat = settings.load("p", _root(tmp_path / "a", "ntp_lr: 2.0e-4\nmtp_n: 4\neval_examples: 9\n"))
    nested = settings.load("p", _root(tmp_path / "b", "ntp: {ntp_lr: 2.0e-4}\nmtp:\n  mtp_n: 4\neval_examples: 9\n"))
    assert flat == nested and nested.ntp.ntp_lr == 2e-4 and nested.mtp.mtp_n == 4


def test_a_profile_that_does_not_exist_lists_the_profiles():
    with pytest.raises(SettingsError, match=r"no profile 'pretrianed'.*profiles: .*pretrained.*smoke.*toy"):
        settings.load("pretrianed", repo_root())


def test_overrides_are_checked_like_the_file():
    with pytest.raises(SettingsError, match="did you mean 'eval_examples'"):
        pipeline.config(eval_exampels=3)
    with pytest.raises(SettingsError, match="in .*smoke.yaml and overrides"):
        pipeline.profile_config("smoke", eval_examples="3")
    assert pipeline.profile_config("smoke", eval_examples=3)["eval_examples"] == 3


def test_the_choices_the_settings_offer_are_the_codes_own():
    assert typing.get_args(settings.HeadType) == models.HEAD_TYPES
    assert typing.get_args(settings.Weighting) == heads.WEIGHTINGS
    assert set(typing.get_args(settings.Dtype)) == set(DTYPES)
    assert typing.get_args(typing.get_type_hints(settings.Data)["prompt_format"]) == data.PROMPT_FORMATS


def test_the_command_line_refuses_a_bad_profile_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: bad\nbench_promts: 3\n")
    assert cli.cli(["bench", "-f", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown setting 'bench_promts'") and "did you mean 'bench_prompts'" in err
    assert "Traceback" not in err


def test_notebook_parameter_cells_hold_the_profile_alone():
    for nb in sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        params = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
        assert len(params) == 1 and "".join(params[0]["source"]).strip() == 'profile = "smoke"', nb.name
