"""CUDA: the engine equals HF generate on the GPU (fp32 exactly, bf16 nearly), on GPT-2 and through the wrappers on a
Llama, KV compaction there, the head-wise loss under bf16 autocast, and a short training run of every variant, the
MTP modules on a frozen backbone included. Needs no `datasets` (the GPU machine has none). Skipped on a machine without CUDA; run them on
a GPU with ``PYTHONPATH=lib python3 -m pytest -q tests/test_cuda.py``."""
import pytest
import torch

from conftest import EOS, PAD, V, VARIANTS, medusa, mtp
from multitoken.decoding import speculative_generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def hf(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=EOS, pad_token_id=PAD)


MODELS = {"medusa": lambda: medusa(initializer_range=0.4, seed=9),
          **{f"mtp-{i}": (lambda i=i: mtp(**VARIANTS[i], num_predict_tokens=4, initializer_range=0.4, seed=i))
             for i in (0, 2, 4, 6, 10, 11)}}  # ..., 10/11: DeepSeek-V3 modules, FastMTP's shared module


def test_module_drafts_and_caches_on_cuda_equal_a_fresh_run(monkeypatch):
    """The sequential modules' drafting state on the GPU: every draft equals the no-cache reference."""
    from test_sequential import Spy, naive_draft, seq

    model = seq(seed=3).to(CUDA)
    from multitoken.decoding import modules

    spy = Spy(model)
    spy.propose = modules.propose
    monkeypatch.setattr(modules, "propose", spy)
    ids = torch.randint(2, V, (1, 5), generator=torch.Generator().manual_seed(0)).to(CUDA)
    out, _ = speculative_generate(model, ids, 30, tree="medusa:20")
    assert torch.equal(out, hf(model, ids, 30)) and len(spy.steps) > 3
    with torch.inference_mode():
        for s in spy.steps:
            assert torch.equal(s["drafts"], naive_draft(model, s["text"], s["tree"]))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_engine_equals_hf_generate_on_cuda_fp32(name):
    model = MODELS[name]().to(CUDA)
    g = torch.Generator().manual_seed(0)
    for plen, n in ((1, 30), (5, 45), (9, 12)):
        ids = torch.randint(2, V, (1, plen), generator=g).to(CUDA)
        ref = hf(model, ids, n)
        for tree in ("chain", "medusa:9", "medusa:30", "none"):
            out, _ = speculative_generate(model, ids, n, tree=tree)
            assert out.device.type == "cuda" and torch.equal(out, ref), (name, tree, plen, n)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_engine_in_bf16_nearly_equals_hf_generate_in_bf16(name):
    """bf16 rounds a several-token verification differently from a one-token step, so near-ties can flip: most
    tokens must still agree (the benchmark reports the exact fractions and the gaps where they part)."""
    model = MODELS[name]().to(CUDA, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    same = total = 0
    for _ in range(6):
        ids = torch.randint(2, V, (1, 5), generator=g).to(CUDA)
        ref = hf(model, ids, 40)[0, 5:].tolist()
        out = speculative_generate(model, ids, 40, tree="medusa:9")[0][0, 5:].tolist()
        same += sum(a == b for a, b in zip(out, ref))
        total += max(len(out), len(ref))
    assert same / total >= 0.9


def test_kv_compaction_on_cuda_keeps_outputs_exact():
    from test_decoding import Oracle

    for seed in range(4):
        model = medusa(num_medusa_heads=4, initializer_range=0.4, seed=seed).to(CUDA)
        ids = torch.randint(2, V, (1, 4), generator=torch.Generator().manual_seed(seed)).to(CUDA)
        ref = hf(model, ids, 40)[0]
        for tree in ("chain", "medusa:30", "medusa:63"):
            out, stats = speculative_generate(Oracle(model, ref, 4, seed=seed), ids, 40, tree=tree)
            assert torch.equal(out[0], ref)


def test_headwise_loss_under_bf16_autocast_matches_naive():
    ids = torch.randint(2, V, (2, 11), device=CUDA)
    labels = ids.clone()
    labels[:, :3] = -100
    grads = []
    for eff in (False, True):
        model = mtp(**VARIANTS[2], memory_efficient_loss=eff, num_predict_tokens=4, initializer_range=0.1).to(CUDA)
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=labels).loss
        loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=5e-2, atol=5e-3, msg=n)


def _loaders():
    """Synthetic records as plain lists (the GPU machine has no `datasets`)."""
    from multitoken import data as D
    from multitoken.synthetic import generate_records

    recs = generate_records(200, seed=0)
    tok = D.build_tokenizer((D.format_prompt(r["query"]) + r["response"] for r in recs), vocab_size=400)
    enc = D.encode_examples([r["query"] for r in recs], [r["response"] for r in recs], tok, 128)
    ex = [dict(input_ids=i, labels=lab) for i, lab, p in zip(enc["input_ids"], enc["labels"], enc["prompt_len"])
          if p < len(lab)]
    return D.make_dataloader(ex[:160], tok, 8, shuffle=True), D.make_dataloader(ex[160:], tok, 8), tok


@pytest.mark.parametrize("variant", ["ntp", "mtp", "medusa", "mtp_seq"])
def test_twenty_training_steps_on_cuda(tmp_path, variant):
    from multitoken import training as T

    tr, va, tok = _loaders()
    mc = dict(n_layer=2, n_embd=64, n_head=2, n_positions=128)
    kw = dict(max_steps=20, eval_steps=10, logging_steps=5, learning_rate=3e-3, log_csv=tmp_path / "log.csv")
    if variant == "ntp":
        model, _ = T.train_standard_gpt2(tr, va, tok, tmp_path / "m", model_config=mc, **kw)
    elif variant == "mtp":
        model, _ = T.train_multi_token_gpt2(tr, va, tok, tmp_path / "m", 4, model_config=mc,
                                            mtp=dict(head_type="transformer"), gradient_accumulation_steps=1, **kw)
    else:
        base, _ = T.train_standard_gpt2(tr, va, tok, tmp_path / "b", model_config=mc, max_steps=2, eval_steps=2)
        if variant == "medusa":
            model, _ = T.train_medusa(tmp_path / "b" / "final", tr, va, tok, tmp_path / "m", num_medusa_heads=3, **kw)
        else:  # DeepSeek-V3 modules on the frozen backbone, with their head-wise loss
            model, _ = T.train_multi_token_gpt2(tr, va, tok, tmp_path / "m", 3, base_model=str(tmp_path / "b" / "final"),
                                                mtp=dict(head_type="transformer", sequential=True),
                                                freeze_backbone=True, gradient_accumulation_steps=1, **kw)
    import pandas as pd

    log = pd.read_csv(tmp_path / "log.csv")
    assert next(model.parameters()).device.type == "cuda"
    ev = log.eval_loss.dropna()
    assert len(ev) == 2 and ev.iloc[-1] < ev.iloc[0]
    assert (log.peak_mem_mb > 0).all()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
                                        initializer_range=0.4)).eval()


@pytest.mark.parametrize("kw", [None, dict(head_type="mlp"), dict(head_type="transformer"),
                                dict(head_type="transformer", sequential=True)],
                         ids=["medusa", "mlp", "transformer", "modules"])
def test_wrappers_on_a_llama_decode_like_generate_on_cuda(kw):
    from multitoken import wrap_model_with_medusa, wrap_model_with_mtp

    base = _tiny_llama().to(CUDA)
    model = wrap_model_with_medusa(base, 3) if kw is None else wrap_model_with_mtp(base, num_predict_tokens=4, **kw)
    assert next(model.parameters()).device.type == "cuda"
    g = torch.Generator().manual_seed(2)
    for plen, n in ((2, 30), (7, 25)):
        ids = torch.randint(2, V, (1, plen), generator=g).to(CUDA)
        ref = hf(base, ids, n)
        for tree in ("chain", "medusa:9"):
            assert torch.equal(speculative_generate(model.eval(), ids, n, tree=tree)[0], ref), (tree, plen)
