"""The other MTP systems' usage examples (docs/OTHER_SYSTEMS.md) run as written on the workbook, a tiny model in place of
theirs; each test then checks that what the example prints is true."""
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import EOS, PAD, V
from multitoken import (MTPConfig, MTPTrainer, PerformanceTracker, SpeculativeDecoder, get_mtp_weight, pipeline,
                        wrap_model_with_mtp)
from multitoken.core.heads import loss_weights, shifted_ce
from multitoken.compat.interfaces import effective_data, nanochat_weights


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
                                        initializer_range=0.3)).eval()


def test_the_mtp_accelerator_example_runs_as_written(capsys):
    import copy

    your_model, your_tokenizer = tiny_llama(), None
    baseline_model = copy.deepcopy(your_model)
    base_opt = torch.optim.Adam(baseline_model.parameters())
    g = torch.Generator().manual_seed(0)
    dataloader = [{"input_ids": torch.randint(2, V, (4, 16), generator=g)} for _ in range(3)]
    num_epochs = 2

    def regular_training_step(batch):
        out = baseline_model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        out.loss.backward()
        base_opt.step()
        base_opt.zero_grad()
        return out.loss.item()

    input_ids = torch.randint(2, V, (1, 6), generator=g)
    model = your_model
    # ---- the example, as written ----------------------------------------------------------------------------------
    trainer = MTPTrainer(model=your_model, tokenizer=your_tokenizer, mtp_sequence_length=4)
    optimizer = torch.optim.Adam(model.parameters())
    tracker = PerformanceTracker()
    for epoch in range(num_epochs):
        start_time = time.time()
        for batch in dataloader:
            baseline_loss = regular_training_step(batch)
            tracker.track_training('baseline', epoch, baseline_loss, time.time() - start_time)
            mtp_loss = trainer.train_step(batch, optimizer)
            tracker.track_training('mtp', epoch, mtp_loss, time.time() - start_time)
    summary = tracker.get_summary()
    print(f"Training loss reduction: {summary['training']['loss_reduction']}")

    decoder = SpeculativeDecoder(model=your_model, tokenizer=your_tokenizer, draft_steps=4)
    tracker = PerformanceTracker()
    start_time = time.time()
    baseline_output = your_model.generate(input_ids, max_length=100)
    tracker.track_inference('baseline', len(baseline_output), time.time() - start_time)
    start_time = time.time()
    mtp_output = decoder.generate(input_ids, max_length=100)
    tracker.track_inference('mtp', len(mtp_output), time.time() - start_time)
    summary = tracker.get_summary()
    print(f"Inference speedup: {summary['inference']['speedup']}")
    # ---- what it printed is true ------------------------------------------------------------------------------------
    printed = capsys.readouterr().out
    assert trainer.model.num_heads == 3 and decoder.model is trainer.model  # the decoder found the trainer's heads
    assert torch.equal(mtp_output, baseline_output)                     # exactly greedy generate(max_length=100)
    assert len(set(map(id, trainer.model.mtp_heads.parameters())) & {id(p) for g in optimizer.param_groups
                                                                      for p in g["params"]}) > 0  # heads trained
    said = dict(line.split(": ") for line in printed.strip().splitlines())
    t_base, t_mtp = (tracker.inference[n]["seconds"] for n in ("baseline", "mtp"))
    assert float(said["Inference speedup"]) == pytest.approx(t_base / t_mtp)   # tokens as it counts them: 1 each
    assert float(said["Training loss reduction"]) == pytest.approx((baseline_loss - mtp_loss) / baseline_loss)


def test_the_accelerator_trains_its_heads_with_an_optimizer_over_either_model():
    for over_wrapped in (False, True):
        base = tiny_llama(1)
        trainer = MTPTrainer(base, None, mtp_sequence_length=3, head_type="mlp")
        params = trainer.model.parameters() if over_wrapped else base.parameters()
        opt = torch.optim.SGD(params, lr=0.5)
        head0 = trainer.model.mtp_heads[0].out.weight.clone()      # zero-initialised: moves at the first step
        trunk0 = base.model.layers[0].mlp.up_proj.weight.clone()
        trainer.train_step(torch.randint(2, V, (2, 12)), opt)
        assert not torch.equal(trainer.model.mtp_heads[0].out.weight, head0)
        assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, trunk0)   # shared with the wrapped model


def test_a_plain_model_without_heads_is_told_how_to_add_them():
    with pytest.raises(ValueError, match=r"no multi-token heads.*MTPTrainer\(model, tokenizer.*wrap_model_with_mtp"):
        SpeculativeDecoder(tiny_llama(2), None, draft_steps=4)


def test_the_olmo_core_example_runs_as_written(capsys):
    model = tiny_llama(3)
    input_ids = torch.randint(2, V, (2, 14))
    labels = input_ids.clone()
    # ---- the example, as written (imports from multitoken) -------------------------------------------------------
    mtp_config = MTPConfig(
        num_predict_tokens=4,             # 4 future tokens (the paper's optimum)
        mtp_head_type="transformer",      # "transformer", "mlp" or "shared_lm_head"
        share_weights_across_steps=True,  # FastMTP: one head reused at every step
        loss_weight_decay=0.5,            # exponential decay β
        mtp_loss_weight=0.5,              # total weight of the MTP loss
    )
    model = wrap_model_with_mtp(model, mtp_config)
    outputs = model(input_ids, labels=labels)
    total_loss = outputs.loss             # main_loss + mtp_loss
    mtp_loss = outputs.mtp_loss
    for k, loss in outputs.mtp_step_losses.items():
        print(f"{k}: {loss:.4f}")

    generated, stats = model.mtp_decoder.generate(input_ids[:1], max_new_tokens=100, temperature=0.7, top_p=0.9)
    print(f"Speedup: {stats['speedup']:.2f}x")
    print(f"Acceptance rate: {stats['avg_acceptance_rate']:.2%}")

    def get_mtp_weight_theirs(step, warmup_steps=1000, target_weight=0.5):   # warm-up: MTP loss ramps up linearly
        if step < warmup_steps:
            return target_weight * (step / warmup_steps)
        return target_weight
    # ---- what it printed is true, and the loss is theirs -----------------------------------------------------------
    out = capsys.readouterr().out.splitlines()
    assert model.config.head_type == "transformer" and model.config.share_weights_across_steps
    assert len(model.mtp_heads) == 1 and model.num_heads == 3        # n = 4 counts the next token: K = 3 steps
    ces = [float(shifted_ce(lg, labels, k + 2)[0]) for k, lg in enumerate(model(input_ids, output_head_logits=True)
                                                                         .head_logits)]
    alpha = [0.5 ** (k - 1) / sum(0.5 ** (j - 1) for j in (1, 2, 3)) for k in (1, 2, 3)]
    torch.testing.assert_close(float(mtp_loss), 0.5 * sum(a * c for a, c in zip(alpha, ces)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(float(total_loss), float(outputs.lm_loss) + float(mtp_loss), rtol=1e-6, atol=1e-6)
    assert out[:3] == [f"step_{k}: {c:.4f}" for k, c in enumerate(ces, 1)]
    assert out[3] == f"Speedup: {stats['speedup']:.2f}x" and stats["speedup"] > 0 and stats["lookahead"] == 3
    hits, tries = sum(stats["head_hits"]), sum(stats["head_tries"])
    assert out[4] == f"Acceptance rate: {hits / tries:.2%}"
    assert generated.shape[1] > input_ids.shape[1]
    assert all(get_mtp_weight(s, 1000, 0.5) == get_mtp_weight_theirs(s) for s in (0, 10, 999, 1000, 5000))


def test_olmo_core_weights_for_four_steps_are_its_numbers():
    """K = 4 steps, β = 0.5: α = 0.533, 0.267, 0.133, 0.067 (num_predict_tokens=5: the next token plus 4)."""
    w = loss_weights("olmo", 5, beta=0.5, lam=1.0)
    assert w[0] == 1.0 and [round(x, 3) for x in w[1:]] == [0.533, 0.267, 0.133, 0.067]
    assert MTPConfig(num_predict_tokens=5, loss_weight_decay=0.5).loss_weighting == "olmo"


@pytest.mark.parametrize("kw,match", [(dict(hed_type="mlp"), "did you mean 'head_type'"),
                                      (dict(mtp_head_typ="mlp"), "did you mean 'mtp_head_type'"),
                                      (dict(acceptance_threshold=0.9), "no threshold"),
                                      (dict(mtp_frobnicate=1), "unknown MTP field 'mtp_frobnicate'")])
def test_olmo_config_typos_and_unsupported_fields_fail_by_name(kw, match):
    from huggingface_hub.errors import StrictDataclassError

    with pytest.raises((ValueError, StrictDataclassError), match=match):
        MTPConfig(num_predict_tokens=4, **kw)


def test_nanochat_config_maps_onto_the_profile_and_its_arithmetic_holds():
    """use_mtp / mtp_n_tokens = 3 / mtp_weight = 0.2 as profile fields; its weights 1, 0.5, 0.25, 0.125 and its
    "1.75x effective data" for 3 tokens."""
    assert nanochat_weights(4) == [1.0, 0.5, 0.25, 0.125] and effective_data(3) == 1.75
    cfg = pipeline.config(use_mtp=True, mtp_n_tokens=3, mtp_weight=0.2)
    assert cfg["mtp_n"] == 3
    w = loss_weights(cfg["mtp_weighting"], cfg["mtp_n"], cfg["mtp_beta"], cfg["mtp_lambda"])
    assert w == pytest.approx(nanochat_weights(3, mtp_weight=0.2)) and w == pytest.approx([1.0, 0.1, 0.05])
    assert pipeline.config(use_mtp=False)["mtp_n"] == 1
