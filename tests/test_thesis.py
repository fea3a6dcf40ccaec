"""The thesis' own designs (multitoken.thesis): its layout, its leak, its loops, its collator and timing protocol."""
import itertools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import EOS, PAD, V, tiny
from multitoken import MultiTokenGPT2
from multitoken import evaluation as E
from multitoken import thesis as TH
from multitoken.decoding import speculative_generate


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**tiny(n_layer=5, initializer_range=0.4))).eval()


def hf(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=EOS, pad_token_id=PAD)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_thesis_layout_equals_a_hand_written_forward_through_its_blocks(base, n):
    """trunk = blocks 0..L-n, head 1 = block L-n+1, head k = block L-n+k (the last one again past the end); all
    through the shared ln_f and the tied unembedding."""
    model = TH.from_gpt2(base, n).eval()
    L, T = 5, 5 - n + 1
    ids = torch.randint(2, V, (2, 9), generator=torch.Generator().manual_seed(n))
    tr = base.transformer
    h = tr.wte(ids) + tr.wpe(torch.arange(9))[None]
    for blk in tr.h[:T]:
        h = blk(h)
    unembed = lambda x: base.lm_head(tr.ln_f(x))  # noqa: E731
    out = model(ids, output_head_logits=True)
    torch.testing.assert_close(out.logits, unembed(tr.h[T](h)))
    for k, lg in enumerate(out.head_logits, 1):
        torch.testing.assert_close(lg, unembed(tr.h[min(T + k, L - 1)](h)))
    assert model.config.n_layer == L - n + 2 and model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_thesis_layout_is_causal_round_trips_and_decodes_losslessly(base, tmp_path):
    model = TH.from_gpt2(base, 4).eval()
    ids = torch.randint(2, V, (1, 12), generator=torch.Generator().manual_seed(1))
    moved = ids.clone()
    moved[0, 8:] = (moved[0, 8:] + 3) % V
    a, b = model(ids, output_head_logits=True), model(moved, output_head_logits=True)
    torch.testing.assert_close(a.logits[:, :8], b.logits[:, :8])
    for x, y in zip(a.head_logits, b.head_logits):
        torch.testing.assert_close(x[:, :8], y[:, :8])
    model.save_pretrained(tmp_path / "t")
    again = MultiTokenGPT2.from_pretrained(tmp_path / "t").eval()
    assert again.config.layout == "thesis"
    torch.testing.assert_close(again(ids).logits, a.logits)
    for plen, n in ((3, 25), (7, 40)):
        p = ids[:, :plen]
        ref = hf(model, p, n)
        for tree in ("chain", "medusa:12"):
            assert torch.equal(speculative_generate(model, p, n, tree=tree)[0], ref), tree


def test_leak_switch_lets_the_past_see_the_future_and_the_default_does_not(base):
    ids = torch.randint(2, V, (1, 10), generator=torch.Generator().manual_seed(2))
    later = ids.clone()
    later[0, 7] = (later[0, 7] + 1) % V
    leaky, causal = TH.from_gpt2(base, 3, leak=True).eval(), TH.from_gpt2(base, 3).eval()
    assert (leaky(ids).logits[0, :7] - leaky(later).logits[0, :7]).abs().max() > 1e-3
    torch.testing.assert_close(causal(ids).logits[0, :7], causal(later).logits[0, :7])
    # cached decoding stays causal either way: the leak lives in full-sequence forwards, where the thesis had it
    assert torch.equal(speculative_generate(leaky, ids, 12)[0], hf(leaky, ids, 12))


def test_bad_thesis_configs(base):
    for n in (1, 6):
        with pytest.raises(ValueError, match=r"num_predict_tokens must be between 2 and the number of layers \(5\)"):
            TH.thesis_mtp_config(base.config, n)
    from multitoken import MTPConfig

    with pytest.raises(Exception, match="applies to layout='thesis' only"):
        MTPConfig(**tiny(), num_predict_tokens=3, thesis_padding_only_mask=True)
    with pytest.raises(Exception, match="thesis.from_lm"):
        MTPConfig(**tiny(), num_predict_tokens=3, layout="thesis", head_type="mlp")
    cfg = TH.thesis_mtp_config(base.config, 3, leak=True)
    cfg._attn_implementation = "eager"
    with pytest.raises(ValueError, match="under SDPA attention.*'eager'"):
        MultiTokenGPT2(cfg)


def test_thesis_mtp_loop_equals_head1_greedy_when_causal_and_overshoots(base):
    model = TH.from_gpt2(base, 4).eval()
    ids = torch.randint(2, V, (1, 5), generator=torch.Generator().manual_seed(3))
    out, st = TH.thesis_mtp_generate(model, ids, 30)
    new = out[0, 5:]
    assert 30 <= len(new) <= 33 and st["forward_passes"] == 2 * st["cycles"]
    ref = hf(model, ids, len(new))[0, 5:]
    stop = next((i + 1 for i, t in enumerate(ref.tolist()) if t == EOS), len(ref))
    assert torch.equal(new[:stop], ref[:stop])      # greedy up to greedy's EOS, which the loop ignores


def test_thesis_medusa_loop_keeps_what_typical_acceptance_keeps_on_context_free_branches():
    """One cycle of the thesis' Medusa loop against an independent computation of its rule: the backbone's token,
    then every combination of the heads' top-k as a branch, scored by the backbone on the branch alone (no prompt),
    the branch keeping the longest prefix of tokens with p >= max(eps, threshold * exp(-entropy)) appended."""
    from conftest import medusa

    for seed in range(3):
        model = medusa(num_medusa_heads=3, initializer_range=0.4, seed=seed)
        ids = torch.randint(2, V, (1, 6), generator=torch.Generator().manual_seed(seed))
        out, st = TH.thesis_medusa_generate(model, ids, 1 + 3, branching=(3, 2, 2), threshold=0.2, epsilon=1e-4)
        with torch.no_grad():
            o = model(ids, output_head_logits=True)
            x0 = int(o.logits[0, -1].argmax())
            tops = [h[0, -1].topk(k).indices.tolist() for h, k in zip(o.head_logits, (3, 2, 2))]
            best, keep = None, -1
            for combo in itertools.product(*tops):
                branch = torch.tensor([[x0, *combo]])
                logp = torch.log_softmax(model(branch).logits[0].float(), -1)
                ent = -(logp.exp() * logp).sum(-1)
                k = 0
                while k < 3 and logp[k, combo[k]].exp() >= max(1e-4, 0.2 * float(torch.exp(-ent[k]))):
                    k += 1
                if k > keep:
                    best, keep = [x0, *combo[:k]], k
        assert out[0, 6:6 + len(best)].tolist() == best, seed               # its first cycle, exactly
    ref = hf(model, ids, 25)[0, 6:].tolist()
    full, _ = TH.thesis_medusa_generate(model, ids, 25)
    assert full[0, 6] == ref[0]                                           # the backbone's own token comes first


def test_thesis_collator_scores_padding_as_eos():
    batch = TH.ThesisCollator(EOS)([{"input_ids": [5, 6, 7, 8], "prompt_len": 2}, {"input_ids": [5, 9], "prompt_len": 1}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, EOS, EOS]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, EOS, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_protocol_times_the_thesis_way_with_intervals_over_prompts(monkeypatch):
    """Known times: the baseline takes 2 s per call and emits 10 tokens; the method 1 s (3 s on prompt 2) and emits
    20. Table 1's time ratio = mean baseline time / mean method time; tokens/s ratio apart; the interval resamples the
    3 prompts (so it spans the slow prompt), and the methods run in a fresh order per call."""
    order = []

    def fake_timed(fn, ids, dev):
        seq, st = fn(ids)
        name, prompt = st["name"], int(ids[0, 0])
        order.append(name)
        return seq, st, (2.0 if name == "base" else 3.0 if prompt == 2 else 1.0)

    monkeypatch.setattr(TH, "timed", fake_timed)

    def method(name, n_out):
        loop = lambda model, ids, n: (torch.cat([ids, torch.zeros(1, n_out, dtype=torch.long)], 1), {"name": name})  # noqa: E731
        return E.Method.loop(name, loop, torch.nn.Linear(1, 1))
    prompts = [torch.tensor([i, 7, 7]) for i in range(3)]
    rows = {r["method"]: r for r in TH.protocol([method("base", 10), method("fast", 20)], prompts,
                                                runs=4, new_tokens=10, warmup_tokens=2, baseline="base")}
    f = rows["fast"]
    assert f["calls"] == 12 and f["prompts"] == 3 and f["mean_s_per_call"] == pytest.approx(5 / 3)
    assert f["speedup_time_ratio"] == pytest.approx(2.0 / (5 / 3))          # 1.2
    assert f["speedup_tps"] == pytest.approx((20 / (5 / 3)) / (10 / 2.0))  # 2.4: twice the tokens per call
    assert f["speedup_time_lo"] == pytest.approx(2 / 3) and f["speedup_time_hi"] == pytest.approx(2.0)  # all slow / fast
    assert rows["base"]["speedup_time_lo"] == rows["base"]["speedup_time_hi"] == 1.0
    calls = order[2:]                                                      # after the two warm-ups
    pairs = {tuple(calls[i: i + 2]) for i in range(0, len(calls), 2)}
    assert pairs == {("base", "fast"), ("fast", "base")}                    # the order is drawn, not fixed


def test_thesis_loops_read_medusa_heads_through_their_draft_vocabulary():
    """A MEDUSA-1 model whose draft vocabulary is the whole vocabulary in another order is the same model: the
    thesis' loops must decode the same tokens with it (they map the heads' indices to token ids)."""
    from conftest import medusa
    from multitoken import MedusaConfig, MedusaGPT2

    full = medusa(initializer_range=0.4, seed=5)
    with torch.no_grad():
        for p in full.medusa_heads.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(5))
    same = MedusaGPT2(MedusaConfig(**tiny(num_medusa_heads=3, medusa_draft_vocab=V))).eval()
    same.load_state_dict({**{n: (t[perm] if n.endswith("unembed.weight") else t) for n, t in full.state_dict().items()},
                          "draft_ids": perm})
    ids = torch.randint(2, V, (1, 6), generator=torch.Generator().manual_seed(6))
    assert torch.equal(TH.thesis_mtp_generate(same, ids, 20)[0], TH.thesis_mtp_generate(full, ids, 20)[0])
    kw = dict(branching=(3, 2, 2), threshold=0.2, epsilon=1e-4)
    assert torch.equal(TH.thesis_medusa_generate(same, ids, 20, **kw)[0],
                       TH.thesis_medusa_generate(full, ids, 20, **kw)[0])
    # and the engine drafts the same tokens with it: the same output in the same number of steps, one row or a batch
    for tree in ("chain", "medusa:6"):
        a, sa = speculative_generate(same, ids, 20, tree=tree)
        b, sb = speculative_generate(full, ids, 20, tree=tree)
        assert torch.equal(a, b) and sa["forward_passes"] == sb["forward_passes"]
        batch = torch.cat([ids, ids.flip(1)])
        a, sa = speculative_generate(same, batch, 20, tree=tree, batched=True)
        b, sb = speculative_generate(full, batch, 20, tree=tree, batched=True)
        assert torch.equal(a, b) and sa["mean_accepted_length"] == sb["mean_accepted_length"]


def test_each_arm_trains_in_a_part_of_its_own_so_an_interrupted_stage_resumes_after_it(monkeypatch):
    from multitoken import ledger

    cfg = {"model_name": "m", "thesis_epochs": 1, "thesis_lr": 1e-4, "thesis_batch_size": 2, "thesis_grad_accum": 1,
           "thesis_eval_steps": 1, "seed": 0, "cpu_bf16": False, "thesis_mtp_n": 2}
    monkeypatch.setattr(ledger.PL, "paths", lambda cfg: {"results": __import__("pathlib").Path("/nonexistent")})
    monkeypatch.setattr(ledger.PL, "loaders", lambda cfg: (None, None, "tok", None))
    monkeypatch.setattr(ledger.PL, "device", lambda cfg: "cpu")
    monkeypatch.setattr(ledger, "thesis_loaders", lambda cfg, tok: ("tr", "va"))
    monkeypatch.setattr(ledger.P, "load_model", lambda base: "ntp-model")
    monkeypatch.setattr(ledger.TH, "from_lm", lambda base, n, leak: f"mtp-model leak={leak}")
    monkeypatch.setattr(ledger, "_arm_dir", lambda cfg, arm: arm)
    trained, parts = [], []
    monkeypatch.setattr(ledger.T, "fit_model", lambda model, *a, **k: trained.append(model))

    def keep(cfg_, key, fn):                      # the arm before the interruption was kept: not trained again
        parts.append(key)
        return None if key == "arm_ntp" else fn()
    ledger.train_arms(cfg, keep=keep)
    assert parts == ["arm_ntp", "arm_thesis_mtp", "arm_thesis_mtp_leak"]
    assert trained == ["mtp-model leak=False", "mtp-model leak=True"]


def test_perplexity_verdict_says_when_the_thesis_arms_are_untrained():
    from multitoken import ledger

    def ppl(ntp, causal, leak):
        return {a: {"workbook_recipe": {"value": v, "lo": v, "hi": v}}
                for a, v in zip(ledger.ARMS, (ntp, causal, leak))}
    note = ledger.untrained_arms(ppl(1.88, 1056.0, 4243.0), 14)
    assert "14 optimizer steps" in note and "1,056.0 (causal)" in note and "4,243.0 (with the leak)" in note
    assert "1.88" in note
    only_leak = ledger.untrained_arms(ppl(1.88, 2.0, 4243.0), 14)
    assert "causal" not in only_leak and "with the leak" in only_leak
    assert ledger.untrained_arms(ppl(1.88, 2.0, 2.1), 14) == ""
