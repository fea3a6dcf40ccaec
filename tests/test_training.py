import math

import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from multitoken import data as D
from multitoken import training as T
from multitoken import MedusaGPT2, MultiTokenGPT2


@pytest.fixture(scope="module")
def loaders():
    return D.preprocess_data(model_name=None, max_seq_len=160, max_examples=120, source="synthetic", vocab_size=400,
                             train_batch_size=8, val_batch_size=8, n_positions=160)


MC = dict(n_layer=2, n_embd=48, n_head=2, n_positions=160)


def test_ntp_validation_loss_falls_and_log_is_written(tmp_path, loaders):
    tr, va, tok = loaders
    log = tmp_path / "ntp_train_log.csv"
    model, trainer = T.train_standard_gpt2(tr, va, tok, tmp_path / "ntp", num_train_epochs=3, learning_rate=3e-3,
                                           model_config=MC, log_csv=log, eval_steps=15, logging_steps=5)
    df = pd.read_csv(log)
    ev = df.eval_loss.dropna()
    assert len(ev) >= 2 and ev.iloc[-1] < 0.95 * ev.iloc[0]  # validation loss falls
    assert {"step", "train_loss", "eval_loss", "elapsed_s", "tokens_per_s"} <= set(df.columns)
    assert (df.tokens_per_s.dropna() > 0).all() and df.train_loss.dropna().gt(0).all()
    assert (tmp_path / "ntp" / "final" / "model.safetensors").exists()


def test_resume_continues_the_step_count(tmp_path, loaders):
    tr, va, tok = loaders
    kw = dict(model_config=MC, eval_steps=4, logging_steps=2, save_steps=4, learning_rate=1e-3)
    T.train_standard_gpt2(tr, va, tok, tmp_path / "r", max_steps=4, **kw)
    ckpt = tmp_path / "r" / "checkpoint-4"
    assert ckpt.exists()
    _, trainer = T.train_standard_gpt2(tr, va, tok, tmp_path / "r", max_steps=8, resume_from_checkpoint=str(ckpt),
                                       **kw)
    assert trainer.state.global_step == 8
    steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert min(steps) <= 4 and max(steps) == 8


def test_from_pretrained_path_on_a_local_directory(tmp_path, loaders):
    """Same code as ``model_name="gpt2"`` on the hub, pointed at a save_pretrained directory."""
    tr, va, tok = loaders
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), **MC))
    base.save_pretrained(tmp_path / "base")
    model, _ = T.train_standard_gpt2(tr, va, tok, tmp_path / "ft", model_name=str(tmp_path / "base"), max_steps=2,
                                     eval_steps=2)
    assert model.config.n_layer == 2
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing"):
        T.train_standard_gpt2(tr, va, tok, tmp_path / "x", model_name=str(tmp_path / "broken"), max_steps=1)


def test_mtp_and_medusa_training_log_per_head_metrics(tmp_path, loaders):
    tr, va, tok = loaders
    model, _ = T.train_multi_token_gpt2(tr, va, tok, tmp_path / "mtp", num_tokens_to_predict=3, model_config=MC,
                                        max_steps=6, eval_steps=3, logging_steps=3, gradient_accumulation_steps=2,
                                        log_csv=tmp_path / "mtp.csv", learning_rate=3e-3,
                                        mtp=dict(head_type="linear", mtp_warmup_steps=4))
    df = pd.read_csv(tmp_path / "mtp.csv")
    assert {"head0_loss", "head2_acc", "eval_head1_acc"} <= set(df.columns)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), **MC))
    base.save_pretrained(tmp_path / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    med, _ = T.train_medusa(str(tmp_path / "base"), tr, va, tok, tmp_path / "med", num_medusa_heads=2, max_steps=4,
                            eval_steps=2, logging_steps=2, log_csv=tmp_path / "med.csv")
    for k, v in before.items():  # frozen backbone: unchanged by training
        assert torch.equal(med.state_dict()[k], v), k
    assert "head2_loss" in pd.read_csv(tmp_path / "med.csv").columns
    # Trainer switches the KV cache off for training; saved models must generate with it (a baseline without a cache
    # would make every speedup look larger than it is)
    for d in ("mtp", "med"):
        saved = MedusaGPT2 if d == "med" else MultiTokenGPT2
        m = saved.from_pretrained(str(tmp_path / d / "final"))
        assert m.config.use_cache and m.generation_config.use_cache, d


def _ntp_of_a_profile(tmp_path, monkeypatch, **settings):
    """A profile file under ``tmp_path`` (60 synthetic records, 2 steps of training) with its data and NTP model made
    through the command line, the workbook's root moved to ``tmp_path``; returns the file's path."""
    import yaml

    from multitoken import __main__ as cli
    from multitoken import pipeline

    monkeypatch.setattr(pipeline, "repo_root", lambda: tmp_path)
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"max_examples": 60, "max_steps": 2, "eval_steps": 2, **settings}))
    assert cli.main(["data", "-f", str(params)]) == 0
    assert cli.main(["train", "--variant", "ntp", "-f", str(params)]) == 0
    return params


def test_cli_trains_a_variant(tmp_path, monkeypatch):
    _ntp_of_a_profile(tmp_path, monkeypatch, profile="clitest")
    assert (tmp_path / "runs" / "clitest" / "models" / "ntp" / "final" / "model.safetensors").exists()


def test_training_is_reproducible_whatever_ran_before(tmp_path, loaders):
    """Fresh weights are seeded by the run's seed, not by the process' RNG state (two identical commands trained
    different models before: eval loss 4.12 vs 4.64 after 20 cpu-profile steps)."""
    tr, va, tok = loaders
    kw = dict(model_config=MC, max_steps=3, eval_steps=3, logging_steps=3, learning_rate=3e-3)
    a, _ = T.train_standard_gpt2(tr, va, tok, tmp_path / "a", **kw)
    torch.rand(7)  # move the global RNG on
    b, _ = T.train_standard_gpt2(tr, va, tok, tmp_path / "b", **kw)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("engine", ["hf", "speculative"])
def test_self_distill_replaces_responses_with_the_models_greedy_text(loaders, engine):
    """Medusa's self-distillation: each response becomes the base model's own greedy continuation of the prompt
    (batched with left padding, by HF generate or the workbook's batched loop, equal to generating each prompt
    alone)."""
    tr, va, tok = loaders
    from multitoken.data import format_prompt
    from multitoken.synthetic import generate_records
    from datasets import Dataset

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, initializer_range=0.5,
                                       pad_token_id=tok.pad_token_id, **MC)).eval()
    with torch.no_grad():  # an untrained model: keep it from choosing special tokens (empty continuations)
        model.lm_head.weight[[tok.eos_token_id, tok.pad_token_id]] = 0.0
    ds = Dataset.from_list(generate_records(5, seed=1))
    out = T.self_distill(model, tok, ds, max_new_tokens=12, batch_size=3, engine=engine)
    assert out.column_names == ds.column_names and out["query"] == ds["query"]
    replaced = 0
    for q, ref, got in zip(ds["query"], ds["response"], out["response"]):
        ids = tok(format_prompt(q), return_tensors="pt").input_ids
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        text = tok.decode(alone[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert got == (text or ref)  # an empty continuation keeps the reference (no empty training examples)
        replaced += bool(text)
    assert replaced >= 3


def test_self_distill_skips_prompts_longer_than_the_context(loaders, caplog):
    """A record whose prompt does not fit the context (a user's own JSONL) is skipped with a count in the log;
    before, it crashed inside torch's embedding with 'index out of range'."""
    tr, va, tok = loaders
    from datasets import Dataset
    from multitoken.synthetic import generate_records

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, **MC)).eval()
    recs = generate_records(4, seed=2)
    recs[1] = dict(recs[1], query=" ".join(["many words"] * 200))       # far over n_positions=160 tokens
    with caplog.at_level("WARNING"):
        out = T.self_distill(model, tok, Dataset.from_list(recs), max_new_tokens=8, batch_size=2)
    assert len(out) == 3 and recs[1]["query"] not in out["query"]
    assert "skipped 1 of 4 records" in caplog.text
    with pytest.raises(ValueError, match="every prompt is longer than the context"):
        T.self_distill(model, tok, Dataset.from_list([recs[1]]), max_new_tokens=8)


def test_mtp_modules_on_a_frozen_backbone_share_the_cached_self_distillation(tmp_path, monkeypatch):
    """mtp_seq: DeepSeek-V3 modules on the frozen NTP model, trained on its own greedy continuations, which are
    generated once per NTP checkpoint and reused (MEDUSA-1 reads the same files)."""
    from multitoken import __main__ as cli
    from multitoken import pipeline

    params = _ntp_of_a_profile(tmp_path, monkeypatch, profile="seqtest", max_new_tokens=12, medusa_max_examples=16,
                               mtpseq_n=3)
    calls = []
    real = T.self_distill
    monkeypatch.setattr(T, "self_distill", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cli.main(["train", "--variant", "mtp_seq", "-f", str(params)]) == 0
    assert len(calls) == 2                                       # train and validation, generated once
    assert cli.main(["train", "--variant", "medusa", "-f", str(params)]) == 0
    assert len(calls) == 2                                       # reused from the cache
    cfg = pipeline.profile_config(str(params))
    ntp, seq = pipeline.load_variant(cfg, "ntp"), pipeline.load_variant(cfg, "mtp_seq")
    assert seq.config.sequential and seq.config.head_type == "transformer" and seq.num_heads == 2
    for (n, p), q in zip(ntp.named_parameters(), seq.transformer.parameters()):
        torch.testing.assert_close(p, q, msg=n) if n.startswith("transformer.") else None
    ids = torch.randint(3, 60, (1, 9))
    torch.testing.assert_close(seq(ids).logits, ntp(ids).logits)  # frozen: the base model's next-token logits
    heads_moved = any(not torch.equal(h.block.attn.c_attn.weight, ntp.transformer.h[-1].attn.c_attn.weight)
                      for h in seq.mtp_heads)
    assert heads_moved                                           # the modules themselves trained
    # co-trained instead of frozen: the backbone learns the same self-distilled text too
    assert cli.main(["train", "--variant", "mtp_seq", "-f", str(params), "--set", "mtpseq_freeze=false"]) == 0
    cotrained = pipeline.load_variant(cfg, "mtp_seq")
    assert not torch.equal(cotrained.transformer.h[0].attn.c_attn.weight, ntp.transformer.h[0].attn.c_attn.weight)
    assert len(calls) == 2
    # a new NTP checkpoint invalidates the cached continuations
    assert cli.main(["train", "--variant", "ntp", "-f", str(params), "--set", "ntp_lr=0.001"]) == 0
    assert cli.main(["train", "--variant", "mtp_seq", "-f", str(params)]) == 0
    assert len(calls) == 4


def test_freeze_backbone_needs_a_base_model(loaders):
    tr, va, tok = loaders
    with pytest.raises(ValueError, match="needs a base_model"):
        T.train_multi_token_gpt2(tr, va, tok, "/tmp/x", num_tokens_to_predict=2, model_config=MC, freeze_backbone=True)


def test_answers_cover_the_first_answer_examples_and_perplexity_every_problem(tmp_path, monkeypatch):
    """run_quality: perplexity on all ``eval_examples`` problems, answers (accuracy, BLEU, right answers) on the first
    ``answer_examples`` of them only, since answering costs ~100x a teacher-forced pass."""
    import pandas as pd

    from multitoken import evaluation as E
    from multitoken import pipeline

    params = _ntp_of_a_profile(tmp_path, monkeypatch, profile="anstest", eval_examples=6, answer_examples=2,
                               max_new_tokens=8)
    asked = []
    real = E.generate_responses
    monkeypatch.setattr(E, "generate_responses", lambda m, t, prompts, *a, **k: asked.append(len(prompts)) or real(
        m, t, prompts, *a, **k))
    cfg = pipeline.profile_config(str(params))
    q, _ = pipeline.run_quality(cfg, {"ntp": pipeline.load_variant(cfg, "ntp")})
    n = q["ntp"]
    assert asked == [2] and (n["n_eval"], n["n_ppl"], n["n_answers"]) == (6, 6, 2)
    hits = pd.read_csv(tmp_path / "runs/anstest/results/answers_per_problem.csv")["ntp"]
    assert len(hits) == 2 and n["correct"] == hits.sum() and n["accuracy"]["value"] == hits.mean()
    nll = pd.read_csv(tmp_path / "runs/anstest/results/nll_per_problem.csv")       # every problem's answer NLL
    assert len(nll) == 6 and (nll.tokens > 0).all()
    assert math.exp((nll.ntp * nll.tokens).sum() / nll.tokens.sum()) == pytest.approx(n["perplexity"]["value"])
    kept = {}                          # each variant a part of its own: a resumed stage answers only the rest

    def keep(cfg, key, fn):
        kept[key] = kept[key] if key in kept else fn()
        return kept[key]
    models = {v: pipeline.load_variant(cfg, "ntp") for v in ("base", "ntp")}
    first = pipeline.run_quality(cfg, models, keep=keep)[0]
    assert list(kept) == ["quality_base", "quality_ntp"] and asked == [2, 2, 2]
    monkeypatch.setattr(E, "generate_responses", lambda *a, **k: pytest.fail("answered again"))
    assert pipeline.run_quality(cfg, models, keep=keep)[0] == first
    monkeypatch.setattr(E, "generate_responses", lambda m, t, prompts, *a, **k: asked.append(len(prompts)) or real(
        m, t, prompts, *a, **k))
    everything = pipeline.run_quality(pipeline.profile_config(str(params), answer_examples=None),
                                      {"ntp": pipeline.load_variant(cfg, "ntp")})[0]["ntp"]
    assert asked == [2, 2, 2, 6] and everything["n_answers"] == 6 and everything["perplexity"] == n["perplexity"]


def _base_dir(tmp_path, tok):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **MC))
    base.save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def _trunk(model):
    return {n.removeprefix("model."): p for n, p in model.named_parameters() if n.startswith("transformer.")}


def test_mtp_with_its_heads_weighted_zero_trains_the_trunk_exactly_as_ntp(tmp_path, loaders):
    """The control that separates "MTP's heads change the model" from "this recipe changes it": λ = 0."""
    tr, va, tok = loaders
    base = _base_dir(tmp_path, tok)
    common = dict(max_steps=4, eval_steps=4, logging_steps=4, learning_rate=1e-3, gradient_accumulation_steps=2)
    ntp, _ = T.train_standard_gpt2(tr, va, tok, tmp_path / "ntp", model_name=base, **common)
    zero, _ = T.train_multi_token_gpt2(tr, va, tok, tmp_path / "mtp0", num_tokens_to_predict=3, base_model=base,
                                       mtp=dict(head_type="linear", loss_weighting="primary_aux", loss_lambda=0.0,
                                                memory_efficient_loss=False), **common)
    moved = [n for n, p in _trunk(ntp).items() if not torch.equal(p, GPT2LMHeadModel.from_pretrained(base)
                                                                   .state_dict()[n])]
    assert moved                                                   # NTP trained
    for n, p in _trunk(ntp).items():
        torch.testing.assert_close(_trunk(zero)[n], p, rtol=0, atol=1e-7, msg=n)


def test_heads_first_then_jointly_and_a_smaller_trunk_learning_rate(tmp_path, loaders):
    tr, va, tok = loaders
    base = _base_dir(tmp_path, tok)
    start = {n: p.clone() for n, p in GPT2LMHeadModel.from_pretrained(base).named_parameters()}
    kw = dict(num_tokens_to_predict=3, base_model=base, mtp=dict(head_type="linear"), eval_steps=10,
              logging_steps=10, learning_rate=1e-3, gradient_accumulation_steps=1)
    only_heads, _ = T.train_multi_token_gpt2(tr, va, tok, tmp_path / "a", heads_first_steps=3, max_steps=3, **kw)
    assert all(torch.equal(p, start[n]) for n, p in _trunk(only_heads).items())        # 3 steps: heads only
    assert any(not torch.equal(p, q) for p, q in zip(only_heads.mtp_heads.parameters(),
                                                     T.build_mtp_model(tok, 3, base, head_type="linear")
                                                     .mtp_heads.parameters()))
    then_all, _ = T.train_multi_token_gpt2(tr, va, tok, tmp_path / "b", heads_first_steps=3, max_steps=5, **kw)
    assert any(not torch.equal(p, start[n]) for n, p in _trunk(then_all).items())      # then jointly
    assert all(p.requires_grad for p in then_all.parameters())
    slow, trainer = T.train_multi_token_gpt2(tr, va, tok, tmp_path / "c", trunk_lr_scale=0.1, max_steps=3, **kw)
    groups = trainer.optimizer.param_groups                       # lr ends at 0 (cosine): the schedule's base
    is_head = [[slow.is_head_parameter(n) for n, q in slow.named_parameters() if any(q is p for p in g["params"])]
               for g in groups]
    head_lr = {g["initial_lr"] for g, h in zip(groups, is_head) if all(h)}
    trunk_lr = {g["initial_lr"] for g, h in zip(groups, is_head) if not any(h)}
    assert all(all(h) or not any(h) for h in is_head) and head_lr == {1e-3} and len(trunk_lr) == 1 and trunk_lr.pop() == pytest.approx(1e-4)


def test_mtp_controls_train_beside_the_recipe_and_the_selected_run_is_what_mtp_loads(tmp_path, monkeypatch):
    from multitoken import __main__ as cli
    from multitoken import pipeline

    params = _ntp_of_a_profile(tmp_path, monkeypatch, profile="ctl", ntp_lr=3e-3, mtp_lr=3e-3, mtp_n=3,
                               mtp_weighting="primary_aux", mtp_lambda=0.5, mtp_memory_efficient=False,
                               mtp_select=True, mtp_controls={"lambda0": {"mtp_lambda": 0.0},
                                                             "slow_trunk": {"mtp_trunk_lr_scale": 0.1},
                                                             "n2": {"mtp_n": 2}})
    assert cli.main(["train", "--variant", "mtp", "-f", str(params)]) == 0
    cfg = pipeline.profile_config(str(params))
    df = pipeline.run_mtp_controls(cfg).set_index("run")
    assert list(df.index) == ["recipe", "lambda0", "n2", "slow_trunk"]                 # the file's order
    assert list(df.heads_train) == [True, False, True, True] and pd.isna(df.head2_top1["n2"])
    ntp = pipeline.load_variant(cfg, "ntp")
    nll, ntok = __import__("multitoken").evaluation.token_nll(ntp, pipeline.loaders(cfg)[1])
    assert df.val_perplexity["lambda0"] == pytest.approx(float(torch.tensor(sum(nll) / sum(ntok)).exp()), rel=1e-5)
    chosen = __import__("json").loads((tmp_path / "runs/ctl/results/mtp_selection.json").read_text())
    assert chosen["run"] == df[df.heads_train].val_perplexity.idxmin() and "lambda0" not in chosen["among"]
    mtp = pipeline.load_variant(cfg, "mtp")
    saved = pipeline.mtp_run_dir(cfg, chosen["run"]) / "final"
    assert pipeline.train_log(cfg, "mtp").name == (                  # the curves and step times of the run measured
        "mtp_train_log.csv" if chosen["run"] == "recipe" else f"mtp_{chosen['run']}_train_log.csv")
    assert pipeline.train_log(cfg, "mtp").exists()
    assert torch.equal(mtp.lm_head.weight, MultiTokenGPT2.from_pretrained(str(saved)).lm_head.weight)
    ev = pipeline.eval_set(cfg, *pipeline.loaders(cfg)[2:])
    nll, ntok = __import__("multitoken").evaluation.token_nll(ntp, ev["loader"])
    rows = pipeline._controls_quality(cfg, ev, {"ntp": {"nll": nll, "ntok": ntok}})
    assert list(rows) == ["recipe", "lambda0", "n2", "slow_trunk"] and "diff_vs_base" not in rows["recipe"]
    assert abs(rows["lambda0"]["diff_vs_ntp"]["value"]) < 1e-4 < abs(rows["recipe"]["diff_vs_ntp"]["value"])
    assert [r["measured_as_mtp"] for r in rows.values()] == [k == chosen["run"] for k in rows]
    assert all(1 <= r["tau_reference"] <= 1 + len(r["head_top1"]) - 1 for r in rows.values())
    assert rows["n2"]["first_token"] == pytest.approx(rows["n2"]["tau_reference"] - 1)   # one head: τ = 1 + its hits
    with pytest.raises(ValueError, match=r"no MTP control 'lambda'; the profile's mtp_controls: \['lambda0', 'n2'"):
        pipeline.train_variant(cfg, "mtp", control="lambda")


def test_an_interrupted_self_distillation_resumes_after_its_last_saved_part(tmp_path, monkeypatch):
    from multitoken import pipeline

    params = _ntp_of_a_profile(tmp_path, monkeypatch, profile="dist", max_new_tokens=8, medusa_max_examples=20,
                               distill_batch=1)                                # parts of 8 prompts: 3 train parts
    cfg = pipeline.profile_config(str(params))
    _, _, tok, prep = pipeline.loaders(cfg)
    calls, real = [], T.self_distill

    def distill(*a, **k):
        calls.append(len(a[2]))
        if len(calls) == 2 and not any(c == "resumed" for c in calls):
            raise KeyboardInterrupt                                          # killed in the second part
        return real(*a, **k)
    monkeypatch.setattr(T, "self_distill", distill)
    with pytest.raises(KeyboardInterrupt):
        pipeline.distilled_loaders(cfg, prep, tok)
    calls.append("resumed")
    train, val = pipeline.distilled_loaders(cfg, prep, tok)
    assert calls[:3] == [8, 8, "resumed"] and calls[3:5] == [8, 4]            # the first part was kept
    assert len(train.dataset) == 20 and not (tmp_path / "runs/dist/data/distilled/parts").exists()
    whole = [r["input_ids"] for r in train.dataset]
    import shutil

    shutil.rmtree(tmp_path / "runs/dist/data/distilled")
    again, _ = pipeline.distilled_loaders(cfg, prep, tok)                     # uninterrupted: the same text
    assert [r["input_ids"] for r in again.dataset] == whole
