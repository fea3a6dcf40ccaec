import json
import math

import pandas as pd
import pytest
import torch

from multitoken import evaluation as E
from multitoken import plots
from multitoken import stats as S


@pytest.mark.parametrize("text,want", [
    ("so 3 + 4 = 7.\nThe answer is: 7", "7"), ("The answer is: 1,234", "1234"), ("The answer is: -12", "-12"),
    ("The answer is: $45.50", "91/2"), ("The answer is: 3/4", "3/4"), ("The answer is: \\frac{6}{8}", "3/4"),
    ("The answer is: 0.75", "3/4"), ("no final line", None),
    # GSM8K's own formats and what small models write
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"), ("#### 1,080", "1080"), ("The answer is: 18 dollars.", "18"),
    ("The answer is $1,250.00", "1250"), ("The answer is: -3 degrees", "-3"), ("The answer is: 2.5 hours", "5/2"),
    ("The answer is: .", None),
])
def test_answer_extraction(text, want):
    assert E.extract_answer(text) == want


def test_accuracy_and_bleu():
    refs = ["x\nThe answer is: 12", "y\nThe answer is: 5", "z\nThe answer is: 2/4"]
    assert E.answer_accuracy(["The answer is: 12.0", "The answer is: 6", "The answer is: 0.5"], refs) == pytest.approx(2 / 3)
    assert E.bleu(refs, refs) == pytest.approx(100.0)
    assert E.bleu(["completely different words here"], ["The answer is: 12 because"]) < 10


def test_perplexity_of_a_known_distribution():
    """A model that always predicts uniform over V tokens has perplexity exactly V."""
    V = 7

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(3, V, bias=False)
            torch.nn.init.zeros_(self.lm_head.weight)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, attention_mask=None):
            return type("O", (), {"logits": self.lm_head(torch.ones(*input_ids.shape, 3))})()

    batch = {"input_ids": torch.randint(0, V, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long),
             "labels": torch.randint(0, V, (2, 9))}
    batch["labels"][:, :4] = -100
    assert E.perplexity(Uniform(), [batch]) == pytest.approx(V, rel=1e-5)
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no response tokens"):
        E.perplexity(Uniform(), [batch])


def _full_nll(model, batch):
    """The reference: every position unembedded, the unscored ones dropped after."""
    lg = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    tg = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(lg.transpose(1, 2), tg, ignore_index=-100, reduction="none")
    return ce.sum(1).tolist(), (tg != -100).sum(1).tolist()


@pytest.mark.parametrize("family", ["gpt2", "mtp", "medusa", "llama_mtp", "llama_medusa", "thesis_leak"])
def test_token_nll_unembeds_only_scored_positions_and_equals_the_full_logits(family):
    from conftest import PAD, V, medusa, mtp
    from test_backbones import llama
    from transformers import GPT2Config, GPT2LMHeadModel

    from multitoken import thesis, wrap_model_with_medusa, wrap_model_with_mtp

    torch.manual_seed(0)
    model = {"gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64)),
             "mtp": lambda: mtp(head_type="transformer"), "medusa": medusa,
             "llama_mtp": lambda: wrap_model_with_mtp(llama(), num_predict_tokens=3),
             "llama_medusa": lambda: wrap_model_with_medusa(llama(), num_medusa_heads=2),
             "thesis_leak": lambda: thesis.from_lm(llama(), 3, leak=True)}[family]().eval()
    ids = torch.randint(2, V, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[2, 4:] = 0                                    # right padding; row 2 is prompt only
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100                                                               # the prompt
    labels[0, 6] = -100                                                                # a hole inside a response
    batch = {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask, "labels": labels}
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].shape[:-1]))
    got = E.token_nll(model, [batch])
    hook.remove()
    want = _full_nll(model, batch)
    assert got[1] == want[1] == [7, 5, 0]
    assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-5) and got[0][2] == 0.0
    assert seen == [(12,)]                                                  # 12 scored positions, nothing else unembedded
    with pytest.raises(RuntimeError, match="one unembedding"), E.logits_where(model, torch.ones(3, 5, dtype=torch.bool)):
        model(input_ids=ids)                                                  # positions that are not the batch's
    with pytest.raises(RuntimeError, match="a second one"), E.logits_where(model, mask.bool()):
        model(input_ids=ids), model(input_ids=ids)                            # a second unembedding in one forward
    assert model(input_ids=ids).logits.shape == (3, 12, V)                    # the hook is gone after the block


def test_performance_tracker():
    t = E.PerformanceTracker()
    t.track_training("ntp", [4.0, 3.0, 2.0], 10.0)
    t.track_training("mtp", [4.0, 1.0], 12.0)
    t.track_inference("ntp", 100, 2.0)
    t.track_inference("mtp", 150, 1.0)
    s = t.get_summary()
    assert s["ntp"]["loss_reduction"] == pytest.approx(0.5) and s["mtp"]["loss_reduction"] == pytest.approx(0.75)
    assert s["mtp"]["tokens_per_s"] == 150 and s["mtp"]["speedup"] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        t.track_inference("x", 1, 0)


def test_train_time_per_epoch_and_missing_log(tmp_path):
    p = tmp_path / "log.csv"
    pd.DataFrame({"step": [1, 2], "epoch": [1.0, 2.0], "elapsed_s": [5.0, 12.0]}).to_csv(p, index=False)
    assert E.train_time_per_epoch(p) == 6.0
    with pytest.raises(FileNotFoundError, match="run the training notebook"):
        E.train_time_per_epoch(tmp_path / "none.csv")


def fixture_results():
    logs = {v: pd.DataFrame({"step": [10, 20, 20], "epoch": [0.5, 1, 1], "train_loss": [3.0, 2.5, None],
                             "eval_loss": [None, None, 2.6], "elapsed_s": [1, 2, 2.1]}) for v in ("ntp", "mtp", "medusa")}
    c = lambda x, w=0.1: {"value": x, "lo": x - w, "hi": x + w}  # noqa: E731
    q = {v: {"perplexity": c(5.0 + i), "accuracy": c(0.1 * i, 0.05), "bleu": c(20.0 + i, 2),
             "head_top1": [0.5, 0.3, 0.2] if i else None, "n_eval": 10, "split": "test"}
         for i, v in enumerate(("ntp", "mtp", "medusa"))}
    q["mtp"]["diff_vs_ntp"] = {"perplexity": c(1.0, 0.5), "accuracy": c(0.1, 0.02), "bleu": c(1.0, 3)}
    q["medusa"]["diff_vs_ntp"] = {"perplexity": c(0.0, 0.0), "accuracy": c(0.0, 0.0), "bleu": c(0.0, 0.0)}
    bench = [{"method": m, "speedup_vs_hf_greedy": s, "speedup_lo": s - 0.1, "speedup_hi": s + 0.1,
              "speedup_vs_greedy_kv": s / 1.3, "speedup_vs_greedy_kv_lo": s / 1.3 - 0.1,
              "speedup_vs_greedy_kv_hi": s / 1.3 + 0.1, "mean_accepted_length": t, "identical_to_greedy": 1.0,
              "per_head_acceptance": [0.6, 0.3] if "_" in m and "hf" not in m else []}
             for m, s, t in (("hf_greedy", 1.0, 1.0), ("greedy_kv", 1.3, 1.0), ("mtp_chain", 2.0, 2.4),
                             ("mtp_tree", 2.2, 2.7), ("medusa_chain", 1.8, 2.1), ("medusa_tree", 1.9, 2.3))]
    per = pd.DataFrame([{"method": r["method"], "prompt": i, "tokens_per_s": 100 * r["speedup_vs_hf_greedy"] + i}
                        for r in bench for i in range(5)])
    mem = {v: {"weights_mb": 10.0, "kv_cache_mb": 1.0, "logits_mb": 2.0, "peak_mb": 13.0} for v in q}
    sweep = pd.DataFrame([{"variant": v, "tree": t, "budget": b, "speedup": 1 + b / 10} for v in ("mtp", "medusa")
                          for t in ("fitted", "medusa") for b in (2, 4, 8)])
    samples = pd.DataFrame([{"variant": v, "prompt": "p | q", "output": "o\nThe answer is: 1", "reference": "r"}
                            for v in q])
    abl = pd.DataFrame([{"n": n, "lr": 1e-3, "head_type": "mlp", "weighting": "uniform", "group": "n x lr",
                         "val_ppl": 5.0 + n, "mean_head_acc": 0.1 * n} for n in (2, 4, 6)])
    return logs, q, bench, per, mem, sweep, samples, abl


def test_figure_functions_return_figures_and_write_files(tmp_path):
    from matplotlib.figure import Figure

    logs, q, bench, per, mem, sweep, samples, abl = fixture_results()
    figs = [plots.loss_curves(logs, tmp_path), plots.decoding_speed(per, tmp_path),
            plots.theoretical_vs_measured(pd.DataFrame(bench), tmp_path), plots.head_acceptance(pd.DataFrame(bench), tmp_path),
            plots.per_head_accuracy({"mtp": q["mtp"]["head_top1"]}, tmp_path), plots.quality_comparison(q, tmp_path),
            plots.speedup_intervals(pd.DataFrame(bench), tmp_path),
            plots.tree_budget(sweep, tmp_path), plots.memory(mem, tmp_path), plots.ablations(abl, tmp_path),
            plots.token_lengths(pd.DataFrame({"part": ["prompt", "response"] * 5, "tokens": range(10)}), tmp_path)]
    for fig in figs:
        f = fig.saved
        assert isinstance(fig, Figure) and f.exists() and f.stat().st_size > 5000 and f.with_suffix(".pdf").exists()
    table = plots.thesis_table(q, bench, mem, tmp_path, "fixture")
    assert list(table.variant) == ["ntp", "mtp", "medusa"]
    t = table.set_index("variant")
    assert t.loc["mtp", "speedup vs HF generate"] == "2.20 [2.10, 2.30]"
    assert t.loc["mtp", "speculation's gain (vs greedy_kv)"] == "1.69 [1.59, 1.79]"
    assert t.loc["mtp", "reproduced?"].startswith("speed: consistent with the claimed 1.61x")
    assert "perplexity: higher than NTP" in t.loc["mtp", "reproduced?"]            # Δ 1.0 [0.5, 1.5]
    assert "answer accuracy vs NTP: higher" in t.loc["mtp", "reproduced?"]         # Δ 0.1 [0.08, 0.12]
    assert "answer accuracy vs NTP: no detectable difference" in t.loc["medusa", "reproduced?"]
    # the verdict follows speculation's own gain, not the speedup over HF generate (which includes the lean forward)
    lean = [dict(r, speedup_vs_greedy_kv=1.2, speedup_vs_greedy_kv_lo=1.1, speedup_vs_greedy_kv_hi=1.3) for r in bench]
    t = plots.thesis_table(q, lean, mem, tmp_path / "lean", "fixture").set_index("variant")
    assert t.loc["mtp", "reproduced?"].startswith("speed: faster, but below the claimed 1.61x")
    assert t.loc["medusa", "reproduced?"].startswith("speed: consistent with the claimed 1.27x")
    noisy = [dict(r, speedup_vs_greedy_kv=1.1, speedup_vs_greedy_kv_lo=0.9, speedup_vs_greedy_kv_hi=1.3) for r in bench]
    t = plots.thesis_table(q, noisy, mem, tmp_path / "noisy", "fixture").set_index("variant")
    assert t.loc["mtp", "reproduced?"].startswith("speed: no detectable speedup")
    # an interval that holds 1x supports no speedup, even where it also holds the thesis' number
    assert t.loc["medusa", "reproduced?"].startswith("speed: no detectable speedup (the interval holds 1.27x too)")
    slow = [dict(r, speedup_vs_greedy_kv=0.8, speedup_vs_greedy_kv_lo=0.7, speedup_vs_greedy_kv_hi=0.9) for r in bench]
    assert plots.thesis_table(q, slow, mem, tmp_path / "slow", "fixture").set_index("variant").loc[
        "mtp", "reproduced?"].startswith("speed: slower")
    md = (tmp_path / "thesis_table.md").read_text()
    assert "frozen backbone" in md and "17.45" in md and (tmp_path / "thesis_table.tex").exists()
    assert "p \\| q" in plots.qualitative_table(samples, tmp_path).read_text()


def test_verdict_table_reads_the_published_files_and_draws_verdicts_from_intervals(tmp_path):
    from multitoken.report import controls_table, verdict_table

    _, q, bench, _, mem, *_ = fixture_results()
    bench = [dict(r, device_name="cpu", dtype="float32", prompts=5) for r in bench]
    for name, obj in (("quality.json", q), ("decoding_benchmark.json", bench), ("memory.json", mem)):
        (tmp_path / name).write_text(json.dumps(obj))
    t = verdict_table(tmp_path)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in t.splitlines() if line.startswith("| ")}
    assert rows["MTP speedup"][1:] == ["1.61x", "1.69 [1.59, 1.79]", "consistent with the claimed 1.61x |"]
    assert rows["MTP perplexity, Δ vs NTP"][2:] == ["1.00 [0.50, 1.50]", "higher (thesis: lower) |"]
    assert "not reproducible" in rows["MEDUSA-1 perplexity, Δ vs NTP"][3]
    assert rows["MEDUSA-1 keeps the output"][2] == "100% identical"
    assert "`mtp_tree`" in t and max(len(line) for line in t.splitlines()) <= 120
    noisy = [dict(r, speedup_vs_greedy_kv_lo=0.9) for r in bench]
    (tmp_path / "decoding_benchmark.json").write_text(json.dumps(noisy))
    assert "| MTP speedup | 1.61x | 1.69 [0.90, 1.79] | no detectable speedup (the interval holds" in verdict_table(tmp_path)
    assert "second independent" not in verdict_table(tmp_path)                      # one run: nothing to say
    two = [dict(r, runs_gain_vs_greedy_kv=[[1.7, 1.6, 1.8], [1.7, 1.6, 1.8]]) for r in bench]
    (tmp_path / "decoding_benchmark.json").write_text(json.dumps(two))
    assert "A second independent benchmark run gives the same speed verdicts." in " ".join(
        verdict_table(tmp_path).splitlines())
    two = [dict(r, runs_gain_vs_greedy_kv=[[1.7, 1.6, 1.8], [1.1, 0.9, 1.3]]) for r in bench]
    (tmp_path / "decoding_benchmark.json").write_text(json.dumps(two))
    assert ("gives MTP 1.10: no detectable speedup; MEDUSA-1 1.10: no detectable speedup (the interval holds 1.27x "
            "too).") in " ".join(
        verdict_table(tmp_path).splitlines())
    peers = [dict(r, baseline="hf_greedy", tokens_per_s=100 * r["speedup_vs_hf_greedy"]) for r in bench]
    peers.append(dict(peers[0], method="hf_prompt_lookup", speedup_vs_hf_greedy=1.5, tokens_per_s=150))
    (tmp_path / "decoding_benchmark.json").write_text(json.dumps(peers))
    pd.DataFrame([dict(method=r["method"], prompt=i, new_tokens=100, seconds=100 / r["tokens_per_s"])
                  for r in peers for i in range(4)]).to_csv(tmp_path / "decoding_per_prompt.csv", index=False)
    assert ("`mtp_tree`: 2.20 [2.10, 2.30] over HF `generate` and 1.47 [1.47, 1.47] over the fastest peer "
            "(`hf_prompt_lookup`)") in " ".join(verdict_table(tmp_path).splitlines())
    c = lambda x: {"value": x, "lo": x - 0.1, "hi": x + 0.1}  # noqa: E731
    controls = {"recipe": {"perplexity": c(4.5), "diff_vs_ntp": c(1.8), "diff_vs_base": c(0.8),
                           "head_top1": [0.65, 0.11, 0.07], "changes": {}, "measured_as_mtp": False,
                           "tau_reference": 1.123},
                "slow_trunk": {"perplexity": c(3.0), "diff_vs_ntp": c(0.3), "diff_vs_base": c(-0.7),
                               "head_top1": [0.7, 0.09, 0.05], "changes": {"mtp_trunk_lr_scale": 0.1},
                               "measured_as_mtp": True}}
    (tmp_path / "mtp_controls_quality.json").write_text(json.dumps(controls))
    assert "| higher (thesis: lower) (run `slow_trunk`) |" in verdict_table(tmp_path)
    rows = controls_table(tmp_path).splitlines()
    assert rows[2] == "|`recipe`|(the recipe)|4.50 [4.40, 4.60]|1.80 [1.70, 1.90]|0.80 [0.70, 0.90]|0.11/0.07|1.12|"
    assert rows[3].startswith("|`slow_trunk` (as `mtp`)|trunk_lr_scale 0.1|3.00") and rows[3].endswith("|0.09/0.05|—|")
    (tmp_path / "memory.json").unlink()
    with pytest.raises(FileNotFoundError):
        verdict_table(tmp_path)


def test_findings_of_the_drafter_scaling_and_the_mtp_controls(tmp_path):
    from multitoken import report

    df = pd.DataFrame([{"variant": "medusa", "text": t, "train_tokens": n, "first_token": a, "tau": 1 + a}
                       for t, pts in (("self-distilled", ((100, 0.3), (1000, 0.5))), ("reference", ((100, 0.2),)))
                       for n, a in pts])
    s = report.scaling_summary(df)
    assert "- MEDUSA-1 (self-distilled text): 100 tokens 0.30 / 1.30; 1,000 tokens 0.50 / 1.50" in s
    assert "on the reference solutions instead: 100 tokens 0.20 / 1.20 (the model's own text ahead at 1 of 1 sizes)" in s
    assert report.scaling_summary(df.iloc[:0]) == ""
    assert report.controls_summary(tmp_path) == ""                      # a profile without controls
    c = lambda x: {"value": x, "lo": x - 0.1, "hi": x + 0.1}  # noqa: E731
    (tmp_path / "mtp_controls_quality.json").write_text(json.dumps({
        "recipe": {"perplexity": c(4.5), "diff_vs_ntp": c(1.8), "diff_vs_base": c(0.8), "measured_as_mtp": False},
        "lambda0": {"perplexity": c(2.7), "diff_vs_ntp": c(0.0), "diff_vs_base": c(-1.0), "measured_as_mtp": True}}))
    s = report.controls_summary(tmp_path)
    assert "- `recipe`: perplexity 4.500 [4.400, 4.600], higher than NTP, higher than base" in s
    assert "- `lambda0` (measured as `mtp`): perplexity 2.700 [2.600, 2.800], no detectable difference from NTP, lower than base" in s


def test_missing_results_name_the_notebook(tmp_path, monkeypatch):
    from multitoken import pipeline

    monkeypatch.setattr(pipeline, "repo_root", lambda: tmp_path)
    cfg = pipeline.config(profile="empty")
    with pytest.raises(FileNotFoundError, match="04_evaluate"):
        pipeline.load_results(cfg)
    with pytest.raises(FileNotFoundError, match="01_train_ntp"):
        pipeline.load_variant(cfg, "ntp")


def test_bootstrap_known_cases():
    assert S.mean_ci([1] * 50) == S.CI(1.0, 1.0, 1.0)                      # all correct: [1, 1]
    half = S.mean_ci([0, 1] * 100)
    assert half.value == 0.5 and half.lo < 0.5 < half.hi and half.hi - half.lo < 0.2
    assert S.verdict(half, 0.5) == "no detectable difference"
    assert S.perplexity_ci([2.0, 2.0], [1, 1]).value == pytest.approx(math.e ** 2)
    with pytest.raises(ValueError, match="differ in length"):
        S.bootstrap(lambda a, b: 0, [1, 2], [1])


def test_paired_difference_sign_and_pairing():
    """A variant right on 60 of 100 problems where the baseline is right on 40 (a superset): the paired interval
    lies above 0; the reverse below; identical answers give exactly [0, 0]."""
    base = [1] * 40 + [0] * 60
    better = [1] * 60 + [0] * 40
    d = S.paired_difference(S.np.mean, [better], [base])
    assert d.value == pytest.approx(0.2) and d.lo > 0 and S.verdict(d) == "higher"
    assert S.verdict(S.paired_difference(S.np.mean, [base], [better])) == "lower"
    same = S.paired_difference(S.np.mean, [base], [base])
    assert (same.lo, same.hi) == (0.0, 0.0) and S.verdict(same) == "no detectable difference"


def test_speedup_ci_and_bleu_ci():
    tokens, secs = [100] * 30, [1.0, 1.2] * 15
    sp = S.speedup_ci(tokens, [t / 2 for t in secs], tokens, secs)
    assert sp.value == pytest.approx(2.0) and sp.lo == pytest.approx(2.0) and sp.hi == pytest.approx(2.0)
    refs = ["a b c d e f", "g h i j k l"] * 20
    b = S.bleu_ci(refs, refs)
    assert b.value == pytest.approx(100.0) and b.lo == pytest.approx(100.0)
    assert S.bleu_ci(refs, refs[::-1]).value == pytest.approx(E.bleu(refs, refs[::-1]))


def test_prompts_without_room_are_skipped_and_counted(caplog):
    prompts = [torch.ones(5, dtype=torch.long), torch.ones(60, dtype=torch.long), torch.ones(10, dtype=torch.long)]
    with caplog.at_level("WARNING"):
        keep, skipped = E.fit_prompts(prompts, n_positions=64, min_new_tokens=8, what="benchmark")
    assert [len(p) for p in keep] == [5, 10] and skipped == 1
    assert "benchmark: skipped 1 of 3 prompts" in caplog.text


def test_speed_targets_need_the_interval_above_the_target():
    from multitoken.report import speed_targets, targets_summary

    def row(method, sp, lo, hi, kv, kv_lo, kv_hi, same=1.0):
        return dict(method=method, speedup_vs_hf_greedy=sp, speedup_lo=lo, speedup_hi=hi, speedup_vs_greedy_kv=kv,
                    speedup_vs_greedy_kv_lo=kv_lo, speedup_vs_greedy_kv_hi=kv_hi, efficiency_vs_greedy_kv=kv / 3,
                    identical_to_greedy=same, tree=None)

    rows = [row("greedy_kv", 1.5, 1.4, 1.6, 1, 1, 1), row("medusa_chain", 3.2, 3.05, 3.4, 2.1, 1.9, 2.3),
            row("mtp_chain", 9.0, 8.0, 10.0, 6.0, 5.0, 7.0, same=0.9)]      # fastest, but not lossless: ignored
    res = speed_targets(rows, {"hf": 3.0, "greedy_kv": 2.0, "efficiency": 0.8})
    assert res["method"] == "medusa_chain"
    assert (res["hf"]["status"], res["greedy_kv"]["status"], res["efficiency"]["status"]) == ("met", "undecided",
                                                                                                "not met")
    assert "medusa_chain" in targets_summary(res) and "target ≥ 3.0: met" in targets_summary(res)
    assert speed_targets(rows, None)["hf"]["status"] is None


def test_unknown_head_design_fails_in_config():
    from multitoken import pipeline

    with pytest.raises(ValueError, match="unknown head design 'rnn'"):
        pipeline.config(ablation_head_types=["mlp", "rnn"])
    assert pipeline.head_design("fastmtp") == dict(head_type="transformer", sequential=True,
                                                   share_weights_across_steps=True)


def test_the_method_a_variant_is_judged_by_is_chosen_on_validation():
    """best_methods and the speed targets follow the validation choice recorded in the rows, not the test speedups;
    bf16 rows count as lossless by identical tokens."""
    from multitoken import report as R

    rows = [dict(method="hf_greedy", speedup_vs_hf_greedy=1.0, speedup_lo=1.0, speedup_hi=1.0),
            dict(method="mtp_chain", speedup_vs_hf_greedy=1.5, speedup_lo=1.4, speedup_hi=1.6, selected=True,
                 validation_speedup=1.9),
            dict(method="mtp_tree", speedup_vs_hf_greedy=1.8, speedup_lo=1.7, speedup_hi=1.9, selected=False),
            dict(method="medusa_tree", speedup_vs_hf_greedy=1.6, speedup_lo=1.5, speedup_hi=1.7, selected=True,
                 validation_speedup=1.2)]
    for r in rows:
        r.update(speedup_vs_greedy_kv=r["speedup_vs_hf_greedy"], speedup_vs_greedy_kv_lo=r["speedup_lo"],
                 speedup_vs_greedy_kv_hi=r["speedup_hi"], efficiency_vs_greedy_kv=0.5, identical_to_greedy=1.0,
                 identical_tokens=1.0, dtype="float32")
    best = E.best_methods(rows)
    assert best["mtp"]["method"] == "mtp_chain" and best["medusa"]["method"] == "medusa_tree"   # tree was faster on test
    t = R.speed_targets(rows, {"hf": 1.0})
    assert t["method"] == "mtp_chain" and t["chosen_on"] == "validation prompts"                 # 1.9 on validation
    legacy = [{k: v for k, v in r.items() if k not in ("selected", "validation_speedup")} for r in rows]
    assert E.best_methods(legacy)["mtp"]["method"] == "mtp_tree"                                 # old results: test
    bf = dict(rows[1], dtype="bfloat16", identical_to_greedy=0.5, identical_tokens=0.995)
    assert R.lossless(bf) and not R.lossless(dict(bf, identical_tokens=0.98)) and not R.lossless(dict(rows[1],
                                                                                                   identical_to_greedy=0.5))


def test_other_claims_latency_verdict_comes_from_speculations_own_gain(tmp_path, monkeypatch):
    """The MTP accelerator's "speculative decoding reduces latency": a method faster than HF generate only through
    the engine's lean forward (1.31x HF, 0.90x greedy_kv) is judged slower, not faster."""
    import json

    import pandas as pd

    from multitoken import ledger

    def row(method, hf, kv, **kw):
        return dict(method=method, speedup_vs_hf_greedy=hf, speedup_lo=hf - 0.1, speedup_hi=hf + 0.1,
                    speedup_vs_greedy_kv=kv, speedup_vs_greedy_kv_lo=kv - 0.05, speedup_vs_greedy_kv_hi=kv + 0.05,
                    mean_accepted_length=1.5, per_head_acceptance=[0.6, 0.3, 0.1], prompts=4, **kw)

    ci = dict(value=1.0, lo=0.5, hi=1.5)
    fake = dict(quality={"mtp": {"diff_vs_ntp": {"perplexity": ci, "accuracy": ci}}},
                decoding_benchmark=[row("hf_greedy", 1.0, 0.7), row("mtp_tree", 1.31, 0.90, selected=True)],
                logs={"ntp": pd.DataFrame({"eval_loss": [4.2], "train_loss": [4.0]}),
                      "mtp": pd.DataFrame({"eval_head0_loss": [4.3], "train_loss": [8.0]})})
    res, figs = tmp_path / "results", tmp_path / "figures"
    res.mkdir(), figs.mkdir()
    (res / "other_systems.json").write_text(json.dumps(
        [row("hf_greedy_mtp", 1.0, 0.7)] + [row(f"lookahead_{k}", 0.9, 0.6) for k in (1, 2, 3)]))
    monkeypatch.setattr(ledger.PL, "load_results", lambda cfg: fake)
    monkeypatch.setattr(ledger.PL, "paths", lambda cfg: {"results": res, "figures": figs})
    (res / "mtp_selection.json").write_text(json.dumps({"run": "n2"}))     # notebook 02 chose the control n2
    df = ledger.other_claims({"profile": "test", "mtp_n": 4, "mtp_select": True, "mtp_controls": {"n2": {"mtp_n": 2}}})
    latency = df[df.claim == "speculative decoding reduces latency"].iloc[0]
    assert latency.verdict.startswith("slower") and "0.90 [0.85, 0.95] vs greedy_kv" in latency.measured
    assert "notebook 02's run `n2`, n = 2" in (figs / "other_claims.md").read_text()   # the run measured, not the recipe


def test_the_sweep_times_frozen_families_against_ntps_generate_and_extra_dtypes_time_only_the_selection(
        tmp_path, monkeypatch):
    """The validation sweep is one interleaved run: MEDUSA-1 and the MTP modules (frozen NTP backbone) against NTP's
    HF generate unless frozen_hf_baselines, MTP against its own; the fitted trees' top-k accuracies are kept and
    reused by bench_trees. The extra-dtype benchmark times the baselines and each family's selected method only."""
    import json
    from types import SimpleNamespace

    import torch

    from multitoken import pipeline as PL

    models = {v: SimpleNamespace(name=v, num_heads=3, parameters=lambda: iter([torch.zeros(1)])) for v in PL.VARIANTS}
    calls, seen = {"acc": 0}, {}

    def acc(model, loader, **kw):
        calls["acc"] += 1
        return [[0.5, 0.2]] * 3

    def bench(meths, prompts, max_new_tokens, warmup=1, desc=""):
        seen[desc] = {m.name: m for m in meths}
        return [dict(method=m.name, baseline=m.compared_with, speedup_vs_hf_greedy=1.0, speedup_lo=1.0,
                     speedup_hi=1.0, mean_accepted_length=1.0, identical_to_greedy=1.0) for m in meths], None

    monkeypatch.setattr(PL, "head_topk_accuracy", acc)
    monkeypatch.setattr(PL, "fitted_tree", lambda a, b: f"fitted{b}")
    monkeypatch.setattr(PL, "paths", lambda cfg: {"results": tmp_path})
    monkeypatch.setattr(PL, "bench_prompts", lambda cfg, p, n: p)
    monkeypatch.setattr(PL.E, "benchmark_decoding", bench)
    monkeypatch.setattr(PL.E, "model_device", lambda model: torch.device("cpu"))
    cfg = PL.config(frozen_hf_baselines=False, tree_budgets=[4], tree_kinds=["fitted"], tree_budget="auto")

    sweep = PL.run_tree_sweep(cfg, models, None, prompts=[torch.arange(3)])
    meths = seen["tree sweep (validation)"]
    assert [k for k in meths if k.startswith("hf/")] == ["hf/mtp", "hf/ntp"]
    assert (meths["hf/ntp"].how, meths["hf/ntp"].model.name) == ("hf", "ntp") and meths["hf/mtp"].model.name == "mtp"
    assert {v: meths[f"{v}/fitted_4"].baseline for v in PL.HEADED} == {"mtp": "hf/mtp", "medusa": "hf/ntp",
                                                                        "mtp_seq": "hf/ntp"}
    assert sorted(sweep.variant.unique()) == sorted(PL.HEADED) and set(sweep.tree) == {"chain", "fitted"}
    assert sorted(json.loads((tmp_path / "head_topk_accuracy.json").read_text())) == sorted(PL.HEADED)
    n = calls["acc"]
    assert PL.bench_trees(cfg, models, None, "auto") == {v: "fitted4" for v in PL.HEADED} and calls["acc"] == n

    (tmp_path / "tree_sweep.csv").unlink()
    PL.run_tree_sweep(dict(cfg, frozen_hf_baselines=True), models, None, prompts=[torch.arange(3)])
    assert len([k for k in seen["tree sweep (validation)"] if k.startswith("hf/")]) == 3

    trees = {v: SimpleNamespace(name="fitted4") for v in PL.HEADED}
    chosen = {"mtp": {"method": "mtp_tree", "validation_speedup": 1.1},
              "medusa": {"method": "medusa_chain", "validation_speedup": 1.3},
              "mtp_seq": {"method": "mtp_seq_tree", "validation_speedup": 0.9}}
    rows, _ = PL._benchmark(cfg, models, [torch.arange(3)], trees, chosen, everything=False)
    assert [r["method"] for r in rows] == ["hf_greedy", "hf_greedy_mtp", "hf_prompt_lookup", "greedy_kv",
                                           "prompt_lookup", "mtp_tree", "mtp_hybrid", "medusa_chain", "medusa_hybrid",
                                           "mtp_seq_tree"]     # every peer, the training-free drafters, the selection
    assert [r["method"] for r in rows if r["selected"]] == ["mtp_tree", "medusa_chain", "mtp_seq_tree"]
    rows, _ = PL._benchmark(cfg, models, [torch.arange(3)], trees, chosen)
    names = [r["method"] for r in rows]
    assert len(rows) == 13 and {"prompt_lookup", "mtp_hybrid", "medusa_hybrid"} <= set(names)
    assert "mtp_seq_hybrid" not in names          # the MTP modules draft with their own tree only
    assert "hf_compiled" not in names
    rows, _ = PL._benchmark(dict(cfg, bench_compiled_peer=True), models, [torch.arange(3)], trees, chosen,
                            everything=False)                    # the compiled peer, in every dtype's benchmark
    peer = seen[next(d for d in seen if d.startswith("decoding benchmark"))]["hf_compiled"]
    assert "hf_compiled" in [r["method"] for r in rows] and peer.compared_with == "hf_greedy"
    assert peer.model.name == "ntp" and peer.gen_kw["cache_implementation"] == "static"


def test_a_cpu_without_fast_bf16_runs_the_profiles_bf16_settings_in_fp32(monkeypatch):
    """On a CPU whose bf16 products are emulated (AVX2 only: ~100x slower than fp32), the pretrained profile's bf16
    training, evaluation, distillation, thesis arms and bf16 benchmark run in fp32, with a warning; where bf16 is
    fast, or a profile asks for none, nothing changes (and the probe does not run); the fallback can be switched off."""
    import yaml

    from multitoken import pipeline as PL

    prof = yaml.safe_load((PL.repo_root() / "notebooks/params/pretrained.yaml").read_text())
    prof["bench_extra_dtypes"] = ["bfloat16"]
    monkeypatch.setattr(PL.fastpath, "cpu_bf16_fast", lambda: False)
    fields = "bench_extra_dtypes, cpu_bf16, distill_dtype, quality_dtype, thesis_dtype"
    with pytest.warns(UserWarning, match=f"no fast bfloat16.*{fields}"):
        cfg = PL.config(**dict(prof, device="cpu"))
    assert not cfg["cpu_bf16"] and cfg["bench_extra_dtypes"] == []
    assert (cfg["quality_dtype"], cfg["distill_dtype"], cfg["thesis_dtype"]) == ("float32",) * 3
    kept = PL.config(**dict(prof, device="cpu", cpu_bf16_fallback=False))
    assert kept["cpu_bf16"] and kept["quality_dtype"] == "bfloat16" and kept["bench_extra_dtypes"] == ["bfloat16"]
    assert PL.cpu_fp32_fallback(kept, fast=True) == kept

    def probe():
        raise AssertionError("probed a profile that asks for no bf16")
    monkeypatch.setattr(PL.fastpath, "cpu_bf16_fast", probe)
    plain = PL.config(profile="smoke", device="cpu")
    assert plain["quality_dtype"] is None and not plain["cpu_bf16"]


def _stub_benchmark_inputs(monkeypatch, PL, bench):
    """run_decoding_benchmark with no models, prompts or trees of its own; ``bench`` stands for its timing, and the
    validation sweep chose MEDUSA-1's tree."""
    monkeypatch.setattr(PL, "_setup", lambda cfg, m, p: (m, p))
    monkeypatch.setattr(PL.D, "make_dataloader", lambda *a, **k: None)
    monkeypatch.setattr(PL, "eval_set", lambda cfg, tok, prep: {"prompts": []})
    monkeypatch.setattr(PL, "bench_prompts", lambda cfg, p, n: p)
    monkeypatch.setattr(PL, "bench_trees", lambda *a, **k: {})
    monkeypatch.setattr(PL, "selection", lambda *a, **k: {"medusa": {"method": "medusa_tree"}})
    monkeypatch.setattr(PL, "_benchmark", bench)


@pytest.mark.parametrize("budget", ["auto", 4])
def test_the_extra_dtype_benchmark_times_only_the_selection_where_there_is_one(budget, monkeypatch):
    """run_decoding_benchmark: the inference dtype times every method; each extra dtype, on converted copies of the
    models, the baselines and the selection when the tree budget is chosen on validation ("auto"), else everything."""
    import torch

    from multitoken import pipeline as PL

    models = {v: torch.nn.Linear(2, 2) for v in PL.VARIANTS}
    calls = []

    def bench(cfg, ms, prompts, trees, chosen, everything=True, hybrids=None):
        calls.append((next(ms["ntp"].parameters()).dtype, everything, ms["ntp"] is models["ntp"]))
        return [], None

    _stub_benchmark_inputs(monkeypatch, PL, bench)
    cfg = PL.config(device="cpu", tree_budget=budget, bench_extra_dtypes=["bfloat16"], cpu_bf16_fallback=False)
    PL.run_decoding_benchmark(cfg, models, {"tokenizer": None, "tokenized": {"validation": None}}, write=False)
    assert calls == [(torch.float32, True, True), (torch.bfloat16, budget != "auto", False)]


def test_independent_benchmark_runs_stand_beside_the_table_and_test_times_only_the_selection(monkeypatch):
    """bench_runs: the first run is the table, each run's speedup beside it; bench_selected_only: the test prompts
    time the peers and each family's choice (the selection is the validation sweep's)."""
    import torch

    from multitoken import pipeline as PL

    models = {v: torch.nn.Linear(2, 2) for v in PL.VARIANTS}
    calls = []

    def bench(cfg, ms, prompts, trees, chosen, everything=True, hybrids=None):
        calls.append(everything)
        n = len(calls)
        gain = {"speedup_vs_greedy_kv": n, "speedup_vs_greedy_kv_lo": n - 0.5, "speedup_vs_greedy_kv_hi": n + 0.5}
        return [{"method": "greedy_kv", "speedup_vs_hf_greedy": n}, {"method": "x", "speedup_vs_hf_greedy": n + 1,
                                                                      **gain}], None

    _stub_benchmark_inputs(monkeypatch, PL, bench)
    cfg = PL.config(device="cpu", bench_runs=3, bench_selected_only=True)
    rows, _ = PL.run_decoding_benchmark(cfg, models, {"tokenizer": None, "tokenized": {"validation": None}},
                                        write=False)
    assert calls == [False, False, False]
    assert rows[0] == {"method": "greedy_kv", "speedup_vs_hf_greedy": 1, "runs_speedup_vs_hf": [1, 2, 3]}
    assert rows[1]["runs_speedup_vs_hf"] == [2, 3, 4] and rows[1]["speedup_vs_greedy_kv"] == 1
    assert rows[1]["runs_gain_vs_greedy_kv"] == [[1, 0.5, 1.5], [2, 1.5, 2.5], [3, 2.5, 3.5]]   # each run's interval
    kept = {}                          # each independent run a part of its own: a resumed stage times only the rest

    def keep(cfg, key, fn):
        kept[key] = kept[key] if key in kept else fn()
        return kept[key]
    calls.clear()
    again, _ = PL.run_decoding_benchmark(cfg, models, {"tokenizer": None, "tokenized": {"validation": None}},
                                         write=False, keep=keep)
    assert list(kept) == ["bench_float32_run1", "bench_float32_run2", "bench_float32_run3"] and len(calls) == 3
    del kept["bench_float32_run3"]
    resumed, _ = PL.run_decoding_benchmark(cfg, models, {"tokenizer": None, "tokenized": {"validation": None}},
                                           write=False, keep=keep)
    assert len(calls) == 4 and resumed[1]["runs_speedup_vs_hf"] == [2, 3, 5]       # only the third run again


def test_timing_only_the_selection_keeps_every_peer_and_every_training_free_or_hybrid_drafter(monkeypatch):
    from multitoken import pipeline as PL

    names = ["hf_greedy", "hf_greedy_mtp", "hf_compiled", "hf_prompt_lookup", "greedy_kv", "prompt_lookup",
             "mtp_chain", "mtp_tree", "mtp_hybrid", "medusa_chain", "medusa_tree", "medusa_hybrid", "mtp_seq_chain",
             "mtp_seq_tree"]
    monkeypatch.setattr(PL, "decoding_methods", lambda cfg, models, trees, hybrids=None: [E.Method(n, None, None)
                                                                                          for n in names])
    timed = []
    monkeypatch.setattr(PL.E, "benchmark_decoding", lambda meths, *a, **k: timed.append([m.name for m in meths]) or (
        [], None))
    models = {"ntp": torch.nn.Linear(2, 2)}
    chosen = {"mtp": {"method": "mtp_tree"}, "medusa": {"method": "medusa_chain"}, "mtp_seq": {"method": "mtp_seq_tree"}}
    PL._benchmark(PL.config(device="cpu"), models, [], {}, chosen, everything=False)
    assert timed[0] == ["hf_greedy", "hf_greedy_mtp", "hf_compiled", "hf_prompt_lookup", "greedy_kv", "prompt_lookup",
                        "mtp_tree", "mtp_hybrid", "medusa_chain", "medusa_hybrid", "mtp_seq_tree"]
    PL._benchmark(PL.config(device="cpu"), models, [], {}, chosen, everything=True)
    assert timed[1] == names


def test_the_hybrids_budget_is_chosen_on_validation_apart_from_each_familys_chain_or_tree(tmp_path, monkeypatch):
    from multitoken import pipeline as PL
    from multitoken.decoding.trees import fitted_tree

    rows = [("mtp", "chain", 3, 0.9), ("mtp", "fitted", 4, 1.1), ("mtp", "hybrid", 4, 1.3), ("mtp", "hybrid", 8, 1.6),
            ("medusa", "chain", 4, 1.2), ("medusa", "fitted", 8, 1.0), ("medusa", "hybrid", 4, 1.9),
            ("medusa", "hybrid", 8, 1.4), ("mtp_seq", "chain", 3, 0.8), ("mtp_seq", "fitted", 4, 0.7)]
    pd.DataFrame([dict(variant=v, tree=t, budget=b, speedup=x, prompts=16) for v, t, b, x in rows]).to_csv(
        tmp_path / "tree_sweep.csv", index=False)
    acc = {v: [[0.6, 0.2], [0.3, 0.1], [0.2, 0.1]] for v in ("mtp", "medusa", "mtp_seq")}
    (tmp_path / "head_topk_accuracy.json").write_text(json.dumps(acc))
    monkeypatch.setattr(PL, "paths", lambda cfg: {"results": tmp_path})
    cfg = PL.config(device="cpu", tree_budgets=[4, 8], hybrid_budgets=[4, 8])
    models = {v: None for v in PL.VARIANTS}
    sel = PL.selection(cfg, models, None)                # a hybrid never stands for its family's chain or tree
    assert {v: c["method"] for v, c in sel.items()} == {"mtp": "mtp_tree", "medusa": "medusa_chain",
                                                          "mtp_seq": "mtp_seq_chain"}
    assert {v: t.name for v, t in PL.bench_trees(cfg, models, None, "auto").items()} == {
        "mtp": "fitted4", "medusa": "fitted8", "mtp_seq": "fitted4"}
    hyb = PL.bench_hybrids(cfg, models, None)
    assert {v: spec for v, (_, spec) in hyb.items()} == {"mtp": "hybrid:4:8", "medusa": "hybrid:4:4"}
    assert all(t.paths == fitted_tree(acc[v], 8).paths for v, (t, _) in hyb.items())   # the largest fitted tree
    assert PL.bench_hybrids(PL.config(device="cpu"), models, None) == {}              # no budgets: no choice
    meths = {m.name: m for m in PL.decoding_methods(cfg, {v: torch.nn.Linear(1, 1) for v in PL.VARIANTS},
                                                    PL.bench_trees(cfg, models, None, "auto"), hyb)}
    assert meths["medusa_hybrid"].drafter == "hybrid:4:4" and meths["mtp_hybrid"].drafter == "hybrid:4:8"
    assert "mtp_seq_hybrid" not in meths


def test_the_bf16_probe_reads_the_cpus_flags_and_times_only_where_pytorch_cannot_tell(monkeypatch):
    """cpu_bf16_fast: PyTorch's AVX-512 BF16 / AMX checks decide; without them (private API gone) a warm one-thread
    timing does, and on this machine the timing agrees with the flags."""
    import torch

    from multitoken.core import fastpath

    flags = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    monkeypatch.setattr(fastpath, "_CPU_BF16_FAST", [])
    monkeypatch.setattr(fastpath, "_bf16_timed_fast", lambda: pytest.fail("timed although the flags were there"))
    assert fastpath.cpu_bf16_fast() == flags
    monkeypatch.setattr(fastpath, "_CPU_BF16_FAST", [])
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.setattr(fastpath, "_bf16_timed_fast", lambda: "timed")
    assert fastpath.cpu_bf16_fast() is True and fastpath._CPU_BF16_FAST == [True]
    monkeypatch.undo()
    assert fastpath._bf16_timed_fast() == flags


def test_the_spread_between_benchmark_runs_covers_only_runs_of_the_models_there_are_now(tmp_path, monkeypatch):
    """bench_runs.json records the runs that trained the models; bench_spread leaves out runs of older models (and
    those recorded before models were identified), so the spread never mixes heads trained by different runs."""
    import json

    from multitoken import pipeline as PL
    from multitoken import utils

    monkeypatch.setattr(PL, "paths", lambda cfg: {"results": tmp_path})
    trained = {"01_train_ntp": "a", "02_train_mtp": "b", "03_train_medusa": "c"}
    monkeypatch.setattr(utils, "read_stamp", lambda profile, name, root=None: {"run_id": trained[name]})
    cfg = PL.config(profile="spreadtest")
    row = lambda x: [dict(method="medusa_tree", speedup_vs_hf_greedy=x, speedup_vs_greedy_kv=x, tokens_per_s=1.0,  # noqa: E731
                          dtype="float32")]
    PL.record_bench_run(cfg, row(0.9), "old heads")
    trained["03_train_medusa"] = "c2"                               # MEDUSA-1 retrained
    PL.record_bench_run(cfg, row(1.2), "new heads")
    PL.record_bench_run(cfg, row(1.4), "new heads, again")
    runs = json.loads((tmp_path / "bench_runs.json").read_text())
    assert [r["models"]["03_train_medusa"] for r in runs] == ["c", "c2", "c2"] and all("commit" in r for r in runs)
    assert PL.bench_spread(cfg)["medusa_tree"] == {"runs": 2, "vs_hf": [1.2, 1.4], "vs_greedy_kv": [1.2, 1.4]}


def test_one_method_record_times_the_engine_hf_and_a_loop_alike():
    """A Method runs what it names (the engine's output is HF greedy's; a loop is called as written), and the
    benchmark refuses two methods of one name or a baseline that is not among them."""
    import pytest
    import torch

    from conftest import medusa
    from multitoken.evaluation import Method, benchmark_decoding

    model = medusa(initializer_range=0.4, seed=3)
    ids = torch.randint(2, 8, (1, 5))
    hf = Method.hf("hf_greedy", model)
    eng = Method.engine("medusa_chain", model, "chain", baseline="hf_greedy")
    loop = Method.loop("loop", lambda m, x, n: (x, {"new_tokens": 0}), model, baseline="hf_greedy")
    assert torch.equal(hf(ids, 12)[0], eng(ids, 12)[0]) and loop(ids, 3)[0] is ids
    assert eng.device == torch.device("cpu") and eng.compared_with == "hf_greedy" and hf.compared_with == "hf_greedy"
    rows, per = benchmark_decoding([hf, eng], [ids[0], ids[0, :3]], 12, warmup=1, reference=None)
    row = {r["method"]: r for r in rows}["medusa_chain"]
    assert row["baseline"] == "hf_greedy" and row["identical_to_greedy"] == 1.0 and row["prompts"] == 2
    assert set(per.method) == {"hf_greedy", "medusa_chain"} and per.new_tokens.between(1, 12).all()
    with pytest.raises(ValueError, match="share a name"):
        benchmark_decoding([hf, hf], [ids[0]], 4)
    with pytest.raises(ValueError, match=r"baseline\(s\) \['hf_greedy'\] are not among"):
        benchmark_decoding([eng], [ids[0]], 4)


def test_step_costs_time_every_path_against_the_memory_limit(tmp_path, monkeypatch):
    """``make bench-steps`` on a tiny Llama: every token count through transformers' forward, the engine's eager and
    fast steps, beside the memory limit (weight bytes / measured bandwidth, tied embeddings counted once); then
    generate's tokens/s three ways. Written as JSON naming the bandwidth and the layouts chosen."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from multitoken import bench
    from multitoken.core import pretrained

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, pad_token_id=1,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    d, f = 32, 64
    assert bench.weight_bytes(model) == 4 * (64 * d + 2 * (3 * d * d + 3 * d * f + 2 * d) + d)   # q,o d*d; k,v d*d/2
    assert bench.weight_bytes(model.to(torch.bfloat16)) == bench.weight_bytes(model.float()) // 2
    assert 1e8 < bench.read_bandwidth(gib=0.01, reps=2) < 1e13            # bytes/s, from a real timing

    class Tok:
        def __call__(self, text, return_tensors=None):
            return type("Enc", (), dict(input_ids=torch.randint(2, 64, (1, 5))))()
    monkeypatch.setattr(pretrained, "load", lambda name: (model, Tok()))
    monkeypatch.setattr(bench, "read_bandwidth", lambda: 2e9)
    from multitoken.core import compiled
    monkeypatch.setattr(compiled, "AUTOTUNE", [False])     # minutes of kernel timing saved; the same graphs
    res = bench.step_costs("tiny", dtypes=("float32",), context=8, sizes=(1, 2), reps=2, prompts=2, new_tokens=3,
                           out=tmp_path / "s.json")
    assert torch.is_grad_enabled()                        # the benchmark left autograd as it found it
    assert json.loads((tmp_path / "s.json").read_text())["steps"] == res["steps"]
    limit = bench.weight_bytes(model) / 2e9 * 1e3
    assert [(r["tokens"], r["memory_limit_ms"]) for r in res["steps"]] == [(1, round(limit, 2)), (2, round(limit, 2))]
    assert all(r[k] > 0 for r in res["steps"] for k in ("hf_ms", "eager_ms", "fast_ms", "compiled_ms"))
    assert [r["compiled_step_tokens"] for r in res["steps"]] == [1, 3]    # 2 tokens run in a 3-token graph
    assert res["steps"][0]["fast_vs_1_token"] == 1.0 and res["read_bandwidth_gb_s"] == 2.0
    assert set(res["generation"][0]) == {"dtype", "hf_generate_tokens_per_s", "engine_greedy_eager_tokens_per_s",
                                         "engine_greedy_fast_tokens_per_s", "engine_greedy_compiled_tokens_per_s"}
    assert res["layouts"]                                  # the fast step asked for layouts, recorded with the result
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["s.json"]["stage"] == "make bench-steps" == res["run"]["stage"] and "commit" in res["run"]


def test_the_compiled_static_cache_peer_runs_transformers_recipe_and_matches_generate():
    """The peer ``hf_compiled``: HF ``generate`` with a static cache and its decoding step compiled (here by the
    ``eager`` backend: the same dynamo capture, no inductor, seconds instead of a minute); its tokens are greedy
    generate's; the benchmark times its warm-up (the compilation) apart."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, eos_token_id=None, pad_token_id=0,
                      initializer_range=0.3)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    plain, peer = E.Method.hf("hf", model), E.Method.hf_compiled("hf_compiled", model, "hf", backend="eager")
    prompts = [torch.randint(1, 64, (n,)) for n in (5, 7, 6)]
    rows, _ = E.benchmark_decoding([plain, peer], prompts, 6, warmup=1, reference=None)
    assert hasattr(model, "_compiled_call")                                   # transformers compiled its step
    by = {r["method"]: r for r in rows}
    assert by["hf_compiled"]["identical_to_greedy"] == 1.0 and by["hf_compiled"]["new_tokens"] == 18
    assert all(r["warmup_s"] > 0 for r in rows)


def test_speedup_over_the_best_peer_is_paired_against_the_fastest_hf_method():
    """The best peer is the fastest HF method on the NTP model (not HF greedy, not the MTP model's own HF generate);
    each NTP-model method's speedup over it is the paired per-prompt ratio of tokens/s; other models get none."""
    import pandas as pd

    secs = {"hf_greedy": [4.0, 5.0, 6.0], "hf_prompt_lookup": [2.0, 3.0, 2.5], "hf_compiled": [3.0, 4.0, 5.0],
            "hf_greedy_mtp": [1.0, 1.0, 1.0], "greedy_kv": [3.5, 4.5, 5.5], "prompt_lookup": [1.0, 2.0, 2.0],
            "mtp_tree": [0.5, 0.5, 0.5]}
    base = {"hf_greedy_mtp": "hf_greedy_mtp", "mtp_tree": "hf_greedy_mtp"}
    per = pd.DataFrame([dict(method=m, prompt=i, new_tokens=100, seconds=s) for m, ss in secs.items()
                        for i, s in enumerate(ss)]).sample(frac=1, random_state=0)       # the csv's order is not relied on
    rows = [dict(method=m, baseline=base.get(m, "hf_greedy"), tokens_per_s=300 / sum(ss)) for m, ss in secs.items()]
    peer, sp = E.best_peer_speedups(rows, per)
    assert peer == "hf_prompt_lookup"                          # the MTP model's faster HF generate is not a peer
    assert set(sp) == {"hf_greedy", "hf_compiled", "greedy_kv", "prompt_lookup"}
    assert sp["prompt_lookup"].value == pytest.approx(7.5 / 5.0)
    assert sp["prompt_lookup"].lo > 1 and sp["hf_greedy"].hi < 1
    assert E.best_peer_speedups([r for r in rows if not r["method"].startswith("hf_")], per) == (None, {})
    with pytest.raises(ValueError, match="different prompts"):
        E.best_peer_speedups(rows, per[~((per.method == "greedy_kv") & (per.prompt == 0))])


def test_drafter_scaling_figure_takes_families_with_different_numbers_of_heads(tmp_path):
    """MEDUSA-1 with 4 heads beside MTP modules with 3 (no head-4 value): the figure is drawn, one line per measure."""
    from multitoken import plots

    df = pd.DataFrame([{"variant": v, "text": t, "train_tokens": n, "first_token": 0.3, "tau": 1.4,
                        "head1_top1": 0.3, "head2_top1": 0.2, "head3_top1": 0.1, "head4_top1": h4}
                       for v, h4 in (("medusa", 0.05), ("mtp_seq", None)) for t in ("self-distilled", "reference")
                       for n in (100, 1000)])
    assert plots.drafter_scaling(df, tmp_path).saved.exists()
