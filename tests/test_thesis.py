"""The thesis' own designs (multitoken.thesis): its layout, its leak, its loops, its collator and timing protocol."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import EOS, PAD, V, tiny
from multitoken import MultiTokenGPT2
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


def test_thesis_medusa_loop_runs_and_reports_whether_it_kept_greedy():
    from conftest import medusa

    model = medusa(num_medusa_heads=4, initializer_range=0.4, seed=4)
    ids = torch.randint(2, V, (1, 6), generator=torch.Generator().manual_seed(4))
    out, st = TH.thesis_medusa_generate(model, ids, 25)
    assert 1 <= st["new_tokens"] <= 25 and st["tokens_per_cycle"] >= 1
    ref = hf(model, ids, 25)[0, 6:].tolist()
    got = out[0, 6:].tolist()
    assert got[0] == ref[0]          # the backbone's own next token always comes first
    same = got == ref[: len(got)]
    # typical acceptance on context-free branches: on this random model it leaves greedy (it is not lossless)
    assert not same


def test_thesis_collator_scores_padding_as_eos():
    batch = TH.ThesisCollator(EOS)([{"input_ids": [5, 6, 7, 8], "prompt_len": 2}, {"input_ids": [5, 9], "prompt_len": 1}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, EOS, EOS]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, EOS, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_protocol_reports_both_speedups(base):
    model = TH.from_gpt2(base, 3).eval()
    prompts = [torch.randint(2, V, (4,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plain = lambda ids, n: (hf(model, ids, n), {})  # noqa: E731
    methods = {"ntp_generate": (plain, "cpu"), "thesis_mtp": (lambda ids, n: TH.thesis_mtp_generate(model, ids, n), "cpu")}
    rows = {r["method"]: r for r in TH.protocol(methods, prompts, runs=2, new_tokens=12, warmup_tokens=4)}
    b = rows["ntp_generate"]
    assert b["calls"] == 6 and b["speedup_time_ratio"] == pytest.approx(1.0) and b["speedup_tps"] == pytest.approx(1.0)
    t = rows["thesis_mtp"]
    assert t["tokens_per_call"] >= 12 and t["speedup_time_lo"] <= t["speedup_time_ratio"] <= t["speedup_time_hi"]
