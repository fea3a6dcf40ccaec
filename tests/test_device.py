"""Device and dtype: the engine makes nothing on torch's default device; bad device/dtype settings fail first;
the head-wise loss leaves the RNG where the plain loss does; bf16 divergences are found and explained."""
import pandas as pd
import pytest
import torch

from conftest import EOS, PAD, V, VARIANTS, medusa, mtp
from multitoken import evaluation as E
from multitoken import pipeline
from multitoken.decoding import speculative_generate
from multitoken.utils import resolve_device, resolve_dtype


def hf(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=EOS, pad_token_id=PAD)


MODELS = [("medusa", lambda: medusa(initializer_range=0.4, seed=5))] + [
    (f"mtp-{v['head_type']}-seq{int(v['sequential'])}-share{int(v['share_weights_across_steps'])}",
     lambda v=v: mtp(**v, num_predict_tokens=4, initializer_range=0.4, seed=7)) for v in VARIANTS]


@pytest.mark.parametrize("name,make", MODELS, ids=[m[0] for m in MODELS])
def test_engine_makes_nothing_on_the_default_device(name, make):
    """With torch's default device set to 'meta', any tensor the decoding loop made without naming the model's
    device would be a meta tensor, and mixing it with the CPU model's tensors raises. The outputs must still equal
    HF greedy (computed before), for chains, trees and sampling."""
    model = make()
    ids = torch.randint(2, V, (1, 6), generator=torch.Generator().manual_seed(1))
    refs = {n: hf(model, ids, n) for n in (1, 9, 30)}
    torch.set_default_device("meta")
    try:
        for n, ref in refs.items():
            for tree in ("chain", "medusa:9", "none"):
                out, stats = speculative_generate(model, ids, n, tree=tree)
                assert out.device.type == "cpu" and torch.equal(out, ref), (n, tree)
        out, _ = speculative_generate(model, ids, 12, temperature=0.9, top_p=0.9, tree="medusa:6",
                                      generator=torch.Generator(device="cpu").manual_seed(0))
        assert out.device.type == "cpu" and out.shape[1] <= ids.shape[1] + 12
    finally:
        torch.set_default_device(None)


def test_generator_on_another_device_is_refused():
    model = medusa().to("meta")  # the check comes before any computation, so a meta model is enough
    with pytest.raises(ValueError, match="generator is on cpu but the model on meta"):
        speculative_generate(model, torch.tensor([[3, 4]]), 4, temperature=1.0, generator=torch.Generator())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_fails_before_any_work():
    with pytest.raises(RuntimeError, match="no CUDA device.*device: cpu"):
        pipeline.config(device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA"):
        resolve_device("cuda:0")


def test_bad_device_and_dtype():
    with pytest.raises(ValueError, match="inference_dtype: .float8. is not one of .float32., .bfloat16., .float16."):
        pipeline.config(inference_dtype="float8")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("mps")
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_device("cpu").type == "cpu"


def _two_steps(model, batch):
    torch.manual_seed(123)
    losses = []
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
    return losses, torch.get_rng_state()


@pytest.mark.parametrize("v", [dict(head_type="mlp"), dict(head_type="transformer"),
                               dict(head_type="linear", sequential=True)], ids=["mlp", "transformer", "sequential"])
def test_headwise_loss_leaves_the_rng_where_the_naive_loss_does(v):
    """With dropout on, the head-wise loss recomputes each head under the dropout masks of its first run. Afterwards
    the RNG must stand where the plain loss leaves it, or the next step reuses old masks (it was rewound)."""
    batch = {"input_ids": torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"].clone()
    out = {}
    for eff in (True, False):
        model = mtp(**v, resid_pdrop=0.3, embd_pdrop=0.1, attn_pdrop=0.2, memory_efficient_loss=eff, seed=3).train()
        model.memory_efficient_loss = eff
        out[eff] = _two_steps(model, batch)
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)   # same masks on both steps, so same losses
    assert torch.equal(out[True][1], out[False][1])


def test_first_divergence_reports_position_and_gap():
    model = medusa(initializer_range=0.4, seed=2)
    prompt = torch.tensor([5, 6, 7])
    greedy = hf(model, prompt.view(1, -1), 8)[0, 3:].tolist()
    other = greedy[:4] + [(greedy[4] + 1) % V] + greedy[5:]
    per = pd.DataFrame([{"method": "hf", "prompt": 0, "seq": greedy}, {"method": "x", "prompt": 0, "seq": other}])
    (d,) = E.first_divergences(model, [prompt], per, "x", "hf")
    logits = model(torch.tensor([[5, 6, 7] + greedy[:4]])).logits[0, -1]
    top = logits.topk(2).values
    assert d["position"] == 4 and d["greedy_token"] == greedy[4] and d["greedy_is_argmax"]
    assert d["top2_gap"] == pytest.approx(float(top[0] - top[1]), rel=1e-5)
    per.loc[1, "seq"] = list(greedy)
    assert E.first_divergences(model, [prompt], per, "x", "hf") == []


def test_bf16_engine_runs_in_the_models_dtype():
    """In bf16 the engine runs (on the CPU here) and its identical-token fraction against HF greedy in the same
    dtype is what the benchmark reports; fp32 stays exact."""
    model = mtp(head_type="mlp", num_predict_tokens=4, initializer_range=0.4, seed=11)
    ids = torch.randint(2, V, (1, 5), generator=torch.Generator().manual_seed(4))
    m16 = mtp(head_type="mlp", num_predict_tokens=4, initializer_range=0.4, seed=11).to(torch.bfloat16)
    out, _ = speculative_generate(m16, ids, 20)
    ref = hf(m16, ids, 20)
    frac = E._identical_tokens(out[0, 5:].tolist(), ref[0, 5:].tolist())
    assert next(m16.parameters()).dtype == torch.bfloat16 and out.shape[1] == ref.shape[1] == 25
    assert frac >= 0.75                                 # bf16 rounds verification differently; most tokens agree
    assert torch.equal(speculative_generate(model, ids, 20)[0], hf(model, ids, 20))
    assert E._identical_tokens([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75 and E._identical_tokens([1, 2], [1, 2, 3]) == 2 / 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("profile", ["gpu", "thesis", "thesis_recipe"])
def test_gpu_profiles_refuse_a_cpu_only_machine_unless_asked(profile):
    with pytest.raises(RuntimeError, match="no CUDA device"):
        pipeline.profile_config(profile)
    assert pipeline.device(pipeline.profile_config(profile, device="cpu")).type == "cpu"


def test_gpu_profile_pads_the_vocabulary_to_gpt2s():
    from multitoken.training import _fresh_config
    cfg = pipeline.profile_config("gpu", device="cpu")
    tok = type("Tok", (), {"__len__": lambda self: 8192, "eos_token_id": 0, "pad_token_id": 1})()
    c = _fresh_config(tok, pipeline.model_config(cfg))
    assert (c.vocab_size, c.n_layer, c.n_embd, c.n_head, c.n_positions) == (50257, 12, 768, 12, 1024)
