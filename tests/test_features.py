"""Heads trained on cached features: the frozen backbone runs once, its states feed every epoch of the heads.
The loss on cached states is the model's own training loss (same value, same gradients), the feature file round-trips,
a backbone that would train is refused, and training on features lowers the heads' loss and saves a whole model."""
import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from multitoken import MedusaGPT2, MultiTokenGPT2
from multitoken import data as D
from multitoken import training as T
from multitoken.core.medusa import wrap_model_with_medusa
from multitoken.core.models import wrap_model_with_mtp

MC = dict(n_layer=2, n_embd=48, n_head=2, n_positions=160)


@pytest.fixture(scope="module")
def loaders():
    return D.preprocess_data(model_name=None, max_seq_len=160, max_examples=80, source="synthetic", vocab_size=400,
                             train_batch_size=8, val_batch_size=8, n_positions=160)


def _heads(kind, tok):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **MC))
    if kind == "medusa":
        model = wrap_model_with_medusa(base, 2, 1, freeze=False)
    else:  # DeepSeek-V3's MTP modules on the frozen model (the workbook's mtp_seq)
        model = wrap_model_with_mtp(base, num_predict_tokens=3, head_type="transformer", sequential=True,
                                    memory_efficient_loss=False)
    return model.freeze_backbone()


@pytest.mark.parametrize("kind", ["medusa", "mtp_seq"])
def test_the_loss_on_cached_states_is_the_models_own_loss_with_the_same_gradients(loaders, kind):
    tr, _, tok = loaders
    model = _heads(kind, tok).train()
    batch = next(iter(tr))
    feats = T.cache_head_features(model, [batch], dtype=torch.float32)
    on = T.HeadsOnFeatures(model).train()
    cached = on(**feats.collate([feats[i] for i in range(len(feats))]))
    own = model(input_ids=batch["input_ids"], attention_mask=(batch["input_ids"] != tok.pad_token_id).long(),
                labels=batch["labels"])
    torch.testing.assert_close(cached.step_losses, own.step_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.step_accuracy, own.step_accuracy)
    heads = [p for p in model.parameters() if p.requires_grad]
    g_cached = torch.autograd.grad(cached.loss, heads)
    g_own = torch.autograd.grad(own.loss if kind == "medusa" else own.mtp_loss, heads)
    for a, b in zip(g_cached, g_own):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_feature_set_round_trips_and_stores_bf16_states(loaders, tmp_path):
    _, va, tok = loaders
    model = _heads("medusa", tok)
    feats = T.cache_head_features(model, va)
    assert feats.flat["h0"].dtype == torch.bfloat16 and len(feats) == len(va.dataset)
    assert feats[3]["input_ids"].tolist() == va.dataset[3]["input_ids"]  # unpadded, in the loader's order
    feats.save(tmp_path / "f.safetensors")
    back = T.FeatureSet.load(tmp_path / "f.safetensors")
    assert all(torch.equal(back.flat[k], feats.flat[k]) for k in feats.flat) and back.num_tokens == feats.num_tokens
    with pytest.raises(ValueError, match=r"missing \['h0'\]"):
        T.FeatureSet({k: v for k, v in feats.flat.items() if k != "h0"})


def test_a_backbone_that_would_train_is_refused(loaders, tmp_path):
    tr, va, tok = loaders
    model = _heads("medusa", tok)
    model.lm_head.weight.requires_grad_(True)
    feats = T.cache_head_features(model, [next(iter(tr))])
    with pytest.raises(ValueError, match=r"cached features need a frozen backbone, but 1 of its parameters train \(transformer.wte.weight\)"):
        T.train_heads_on_features(model, feats, feats, tok, tmp_path / "m")


@pytest.mark.parametrize("kind", ["medusa", "mtp_seq"])
def test_heads_trained_on_features_learn_and_save_a_whole_model(loaders, tmp_path, kind):
    tr, va, tok = loaders
    model = _heads(kind, tok)
    before = {k: v.clone() for k, v in model.state_dict().items() if "heads" not in k and "unembed" not in k}
    train, val = T.cache_head_features(model, tr), T.cache_head_features(model, va)
    everything = val.collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        untrained = T.HeadsOnFeatures(model)(**everything).step_losses
    trained, _ = T.train_heads_on_features(model, train, val, tok, tmp_path / kind, log_csv=tmp_path / "log.csv",
                                           batch_size=8, num_train_epochs=6, learning_rate=3e-3, eval_steps=10,
                                           logging_steps=10)
    with torch.no_grad():
        now = T.HeadsOnFeatures(trained.eval())(**everything).step_losses
    assert (now[1:] < untrained[1:] - 0.15).all() and now[0] == untrained[0]  # heads learnt; next token untouched
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["eval_head1_acc"].dropna().iloc[-1] > 0
    assert log["head0_loss"].dropna().nunique() > 1          # the frozen model's next-token numbers, per batch
    for k, v in before.items():
        assert torch.equal(trained.state_dict()[k], v), k        # the backbone did not move
    cls = MedusaGPT2 if kind == "medusa" else MultiTokenGPT2
    saved = cls.from_pretrained(str(tmp_path / kind / "final"))
    for k, v in trained.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k


def test_a_profile_trains_its_frozen_model_heads_on_features_cached_once_per_model_and_text(tmp_path, monkeypatch):
    from multitoken import __main__ as cli
    from multitoken import pipeline, plots
    from test_training import _ntp_of_a_profile

    params = _ntp_of_a_profile(tmp_path, monkeypatch, profile="feat", max_new_tokens=12, medusa_max_examples=16,
                               mtpseq_n=3, medusa_heads=2, medusa_features=True, mtpseq_features=True,
                               medusa_epochs=3, mtpseq_draft_vocab=8)
    passes = []
    real = T.cache_head_features
    monkeypatch.setattr(T, "cache_head_features", lambda *a, **k: passes.append(1) or real(*a, **k))
    assert cli.main(["train", "--variant", "medusa", "-f", str(params)]) == 0
    assert cli.main(["train", "--variant", "mtp_seq", "-f", str(params)]) == 0
    assert len(passes) == 4                                      # train and validation, per variant (other states)
    cfg = pipeline.profile_config(str(params))
    ntp, med = pipeline.load_variant(cfg, "ntp"), pipeline.load_variant(cfg, "medusa")
    seq = pipeline.load_variant(cfg, "mtp_seq")       # its modules over (at most) the 8 most frequent targets and EOS
    assert 0 < seq.draft_ids.numel() == seq.config.mtp_draft_vocab <= 8
    assert ntp.config.eos_token_id in seq.draft_ids.tolist()
    ids = torch.randint(3, 60, (1, 9))
    torch.testing.assert_close(med(ids).logits, ntp(ids).logits)  # the frozen NTP model's next token
    log = pd.read_csv(tmp_path / "runs" / "feat" / "results" / "medusa_train_log.csv")
    assert log["step"].max() == 2 and {"eval_head0_loss", "eval_head2_acc"} <= set(log.columns)  # max_steps
    assert cli.main(["train", "--variant", "medusa", "-f", str(params), "--set", "medusa_lr=0.01"]) == 0
    assert len(passes) == 4                                      # the same model and text: the cached states
    assert cli.main(["train", "--variant", "medusa", "-f", str(params), "--set", "medusa_max_examples=12"]) == 0
    assert len(passes) == 5                                      # other training text: its states anew
    with pytest.raises(ValueError, match="mtpseq_features: true needs mtpseq_freeze: true"):
        cli.main(["train", "--variant", "mtp_seq", "-f", str(params), "--set", "mtpseq_freeze=false"])


@pytest.mark.parametrize("kind", ["medusa", "mtp_seq"])
def test_teacher_forced_hits_on_cached_states_are_the_heads_top1(loaders, kind):
    from multitoken import pipeline

    _, va, tok = loaders
    model = _heads(kind, tok)
    for p in model.parameters():                        # heads that hit sometimes: perturbed away from their init
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    hits = T.head_hits(model, T.cache_head_features(model, va, dtype=torch.float32), batch_size=5)
    top1 = [row[0] for row in pipeline.head_topk_accuracy(model, va, k=1, max_batches=len(va))]
    torch.testing.assert_close(hits.float().mean(0), torch.tensor(top1), rtol=0, atol=1e-6)
    # the same hits through the model's own forward over the loader: what the MTP controls' τ is computed with
    assert torch.equal(T.loader_head_hits(model, va), hits)


def test_acceptance_counts_the_run_of_leading_hits():
    hits = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    acc = T.acceptance(hits)
    assert acc["per_head_top1"] == [0.75, 0.75, 0.75] and acc["first_token"] == 0.75
    assert acc["tau"] == 1 + (2 + 0 + 3 + 1) / 4 and acc["positions"] == 4


def test_a_profile_measures_its_drafters_against_training_tokens(tmp_path, monkeypatch):
    from multitoken import __main__ as cli
    from multitoken import pipeline, plots
    from test_training import _ntp_of_a_profile

    params = _ntp_of_a_profile(tmp_path, monkeypatch, profile="scal", max_new_tokens=12, medusa_max_examples=16,
                               mtpseq_n=3, medusa_heads=2, medusa_features=True, mtpseq_features=True,
                               drafter_scaling_tokens=[40, 10 ** 9], drafter_scaling_reference=True)
    for v in ("medusa", "mtp_seq"):
        assert cli.main(["train", "--variant", v, "-f", str(params)]) == 0
    cfg = pipeline.profile_config(str(params))
    df = pipeline.run_drafter_scaling(cfg)
    # 10**9: more than there is, so "all" for the model's own text; the reference text only at the sizes asked for
    assert list(zip(df.variant, df.text)) == [("medusa", "self-distilled")] * 2 + [("medusa", "reference")] + [
        ("mtp_seq", "self-distilled")] * 2 + [("mtp_seq", "reference")]
    assert (df[df.text == "reference"].train_tokens == 40).all()
    prep = pipeline.loaders(cfg)[3]
    ref = pipeline.distill_prompts(cfg, prep)["train"]       # the distilled prompts, with their reference solutions
    assert len(ref) == 16 and ref["query"] == prep["raw"]["train"]["query"][:16]
    assert ref["response"] == prep["raw"]["train"]["response"][:16]
    tok = prep["tokenizer"]

    def texts(split):
        fs = T.FeatureSet.load(tmp_path / "runs" / "scal" / "data" / "features" / "medusa" / f"{split}.safetensors")
        return [tok.decode(ex["labels"][ex["labels"] != -100]) for ex in fs]
    start = ref["response"][0][:25]
    assert any(start in t for t in texts("reference")) and not any(start in t for t in texts("train"))
    assert plots.drafter_scaling(df, tmp_path).saved.exists()
    df = df[df.text == "self-distilled"]
    small, full = df.train_tokens.iloc[0], df.train_tokens.iloc[1]
    assert 40 <= small < full and set(df.columns) >= {"first_token", "tau", "head1_top1", "head2_top1"}
    assert ((df.tau >= 1) & (df.tau <= 3) & df.first_token.between(0, 1)).all()
    assert (df.first_token == df.head1_top1).all()
    saved = pipeline.load_variant(cfg, "medusa")                 # the stage's model: its own row
    val = pipeline.head_features(cfg, saved, pipeline.distilled_loaders(cfg, *pipeline.loaders(cfg)[3:1:-1])[1],
                                 "medusa", "validation")
    assert T.acceptance(T.head_hits(saved, val))["tau"] == df.tau.iloc[1]
    assert (tmp_path / "runs" / "scal" / "results" / "drafter_scaling.csv").exists()


def test_the_first_n_head1_targets_take_the_leading_examples_that_hold_them():
    labs = [[-100, -100, 5, 6, -100], [-100, 7, 8, 9], [1, 2, 3]]             # head-1 targets: 2, 2, 1
    assert [T.head1_targets(x) for x in labs] == [2, 2, 1]
    assert T.head1_targets(torch.tensor(labs[1])) == 2
    assert [T.leading_examples(labs, n) for n in (0, 1, 2, 3, 4, 5, 99)] == [0, 1, 1, 2, 2, 3, 3]
    n = sum(len(x) for x in labs)
    feats = T.FeatureSet({"input_ids": torch.arange(n), "labels": torch.tensor(sum(labs, [])),
                          "h0": torch.zeros(n, 2), "lm_nll": torch.zeros(n), "lm_hit": torch.zeros(n, dtype=torch.bool),
                          "offsets": torch.tensor([0, 5, 9, 12])})
    assert feats.num_tokens == 5 and len(feats.first(3)) == 2 and feats.first(3).num_tokens == 4
    assert len(feats.first(99)) == 3
