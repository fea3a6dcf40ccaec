"""Every head family on a second backbone family: a tiny random Llama (GQA, RoPE, tied embeddings), under SDPA and
eager attention. Heads are self-distilled for a few steps first, so drafts are really accepted (asserted)."""
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import EOS, PAD, V, VARIANTS, tiny
from test_models import perturb_check
from multitoken import MedusaLlama, MultiTokenLlama, thesis, wrap_model_with_medusa, wrap_model_with_mtp
from multitoken.core.backbones import GPT2Backbone, LlamaBackbone, backbone_of
from multitoken.decoding import speculative_generate

DESIGNS = {"medusa": None, **{d["head_type"] + "-seq" * d["sequential"] + "-shared" * d["share_weights_across_steps"]: d
                              for d in VARIANTS}}


def llama(attn="sdpa", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True,
                                initializer_range=0.3), **kw})
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def wrap(base, name):
    if name == "medusa":
        return wrap_model_with_medusa(base, num_medusa_heads=3)
    return wrap_model_with_mtp(base, num_predict_tokens=4, **DESIGNS[name]).freeze_backbone()


def hf(model, ids, n, eos=EOS, mask=None):
    return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=n,
                          do_sample=False, eos_token_id=eos, pad_token_id=PAD)


@functools.lru_cache(maxsize=None)
def trained(attn, name):
    """(heads on a frozen tiny Llama, that Llama), the heads trained 40 steps on the Llama's own greedy text."""
    base = llama(attn)
    model = wrap(base, name)
    g = torch.Generator().manual_seed(1)
    text = hf(base, torch.randint(2, V, (16, 4), generator=g), 28, eos=[])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(40):
        model(input_ids=text, labels=text).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), base


# eager attention matters where attention runs: the trunk (any design) and transformer heads / modules
EAGER = ["medusa", "linear", "transformer", "transformer-shared", "transformer-seq", "transformer-seq-shared"]


@pytest.mark.parametrize("attn,name", [("sdpa", n) for n in DESIGNS] + [("eager", n) for n in EAGER])
def test_every_head_family_decodes_like_generate_on_llama(attn, name):
    """Chain and tree, EOS inside the output and max_new_tokens mid-draft: token for token what generate returns."""
    model, base = trained(attn, name)
    assert model.config._attn_implementation == attn and isinstance(model.backbone, LlamaBackbone)
    g = torch.Generator().manual_seed(7)
    taus = []
    for s in range(4):
        ids = torch.randint(2, V, (1, 2 + 2 * s), generator=g)
        free = hf(base, ids, 30, eos=[])[0, ids.shape[1]:]
        for n, eos in ((30, EOS), (17, int(free[9]))):             # an EOS the output really reaches
            ref = hf(base, ids, n, eos=eos)
            for tree in ("chain", "medusa:9"):
                out, st = speculative_generate(model, ids, n, tree=tree, eos_token_id=eos)
                assert torch.equal(out, ref), (tree, n, eos)
                taus.append(st["mean_accepted_length"])
    assert max(taus) > 1.3, taus                                    # the drafts were really accepted


@pytest.mark.parametrize("name", ["medusa", "linear", "transformer", "transformer-seq"])
def test_batch_with_left_padding_matches_each_row_on_llama(name):
    model, base = trained("sdpa", name)
    a, b = torch.randint(2, V, (1, 7)), torch.randint(2, V, (1, 3))
    batch, mask = torch.full((2, 7), PAD), torch.zeros(2, 7, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 4:], mask[1, 4:] = b[0], 1
    out, _ = speculative_generate(model, batch, 25, tree="medusa:6", attention_mask=mask)
    for row, ids in ((0, a), (1, b)):
        ref = hf(base, ids, 25)[0, ids.shape[1]:]
        assert torch.equal(out[row, 7: 7 + len(ref)], ref)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_medusa_on_llama_keeps_the_base_logits_and_round_trips(attn, tmp_path):
    base = llama(attn)
    model = wrap_model_with_medusa(base, num_medusa_heads=3, medusa_num_layers=2)
    assert isinstance(model, MedusaLlama) and model.model.embed_tokens.weight is base.model.embed_tokens.weight
    ids = torch.randint(2, V, (2, 10))
    assert torch.equal(model.eval()(ids).logits, base(ids).logits)
    model.train()(ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("medusa_heads"))
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("medusa_heads"))
    model.eval().save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attn).eval()
    assert type(again) is MedusaLlama and again.config._attn_implementation == attn
    a, b = model(ids, output_head_logits=True), again(ids, output_head_logits=True)
    assert torch.equal(a.logits, b.logits) and all(torch.equal(x, y) for x, y in zip(a.head_logits, b.head_logits))


@pytest.mark.parametrize("name", [n for n in DESIGNS if n != "medusa"])
def test_every_mtp_design_on_llama_is_causal_and_round_trips(name, tmp_path):
    v = DESIGNS[name]
    model = wrap_model_with_mtp(llama(), num_predict_tokens=3, **v).eval()
    assert isinstance(model, MultiTokenLlama)
    perturb_check(model, (lambda k: k) if v["sequential"] else (lambda k: 0))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is MultiTokenLlama
    ids = torch.randint(2, V, (1, 9))
    a, b = model(ids, output_head_logits=True), again(ids, output_head_logits=True)
    assert torch.equal(a.logits, b.logits) and all(torch.equal(x, y) for x, y in zip(a.head_logits, b.head_logits))


def test_transformer_heads_are_the_familys_own_layer_initialised_from_the_last():
    base = llama()
    model = wrap_model_with_mtp(base, num_predict_tokens=3, head_type="transformer")
    head = model.mtp_heads[1].block
    assert isinstance(head, type(base.model.layers[-1])) and head.self_attn.layer_idx == 0
    for p, q in zip(head.parameters(), base.model.layers[-1].parameters()):
        assert torch.equal(p, q) and p is not q
    ids = torch.randint(2, V, (1, 8))
    torch.testing.assert_close(model.eval()(ids).logits, base(ids).logits)


def test_wrapped_model_shares_the_base_parameters():
    """An optimizer built over the base model before wrapping trains the wrapped model's backbone."""
    base = llama()
    opt = torch.optim.SGD(base.parameters(), lr=0.1)
    model = wrap_model_with_mtp(base, num_predict_tokens=3, head_type="mlp")
    ids = torch.randint(2, V, (2, 10))
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    model.train()(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)
    assert model.lm_head.weight is model.model.embed_tokens.weight   # still tied


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_thesis_layout_from_a_llama_is_causal_and_leaks_with_the_switch(attn):
    base = llama(attn, num_hidden_layers=4)
    model = thesis.from_lm(base, 3).eval()
    assert isinstance(model, MultiTokenLlama) and model.config.num_hidden_layers == 3
    assert model.config.num_trunk_layers == 2 and model.lm_head.weight is model.model.embed_tokens.weight
    for p, q in zip(model.mtp_heads[1].block.parameters(), base.model.layers[3].parameters()):
        assert torch.equal(p, q)
    perturb_check(model, lambda k: 0)
    ids = torch.randint(2, V, (1, 6))
    for tree in ("chain", "medusa:6"):
        assert torch.equal(speculative_generate(model, ids, 20, tree=tree)[0], hf(model, ids, 20))
    if attn == "sdpa":
        leaky = thesis.from_lm(base, 3, leak=True).eval()
        x = torch.randint(2, V, (1, 10))
        y = x.clone()
        y[0, 8] = (y[0, 8] + 1) % V
        assert not torch.allclose(leaky(x).logits[:, :8], leaky(y).logits[:, :8])   # the past sees the future
        torch.testing.assert_close(model(x).logits[:, :8], model(y).logits[:, :8])
    else:
        with pytest.raises(ValueError, match="under SDPA"):
            thesis.from_lm(base, 3, leak=True)


@pytest.mark.parametrize("kw", [dict(head_type="transformer"), dict(head_type="transformer", sequential=True)],
                         ids=["transformer", "modules"])
def test_gpt2_heads_under_eager_attention_decode_like_generate(kw):
    """GPT-2's blocks outside the lean forward (eager attention) get an additive mask, not the engine's bool one."""
    torch.manual_seed(3)
    base = GPT2LMHeadModel(GPT2Config(**tiny(initializer_range=0.4, attn_implementation="eager"))).eval()
    assert base.config._attn_implementation == "eager"
    model = wrap_model_with_mtp(base, num_predict_tokens=4, **kw).eval()
    assert not model.backbone.lean_ok(model.transformer.h[0]) and isinstance(model.backbone, GPT2Backbone)
    for s in range(3):
        ids = torch.randint(2, V, (1, 3 + s))
        for tree in ("chain", "medusa:9"):
            assert torch.equal(speculative_generate(model, ids, 25, tree=tree)[0], hf(base, ids, 25))


def test_bad_input_on_llama():
    base = llama()
    with pytest.raises(ValueError, match="longer than the context"):
        speculative_generate(base, torch.randint(2, V, (1, 100)), 1)
    with pytest.raises(ValueError, match="overflows the context"):
        speculative_generate(base, torch.randint(2, V, (1, 10)), 90)
    with pytest.raises(Exception, match="branch off after 1..2 of the model's 3 layers"):
        wrap_model_with_mtp(base, num_predict_tokens=3, num_trunk_layers=3)
    with pytest.raises(ValueError, match="unknown MTP field.*hed_type"):
        wrap_model_with_mtp(base, num_predict_tokens=3, hed_type="mlp")
    with pytest.raises(ValueError, match="no backbone adapter for Linear"):
        backbone_of(torch.nn.Linear(2, 2))
    base.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attention implementation 'flex_attention'"):
        speculative_generate(base, torch.randint(2, V, (1, 5)), 4)


def test_the_pipeline_runs_on_a_pretrained_llama_directory(tmp_path, monkeypatch):
    """A profile whose model_name is a local Llama directory (its own tokenizer, pad = EOS as SmolLM2's): data
    formatting uses that tokenizer and EOS, every variant trains and loads as its Llama face, the context is the
    model's, frozen heads keep the base logits, and a checkpoint of another family is refused."""
    import yaml

    from multitoken import __main__ as cli
    from multitoken import data as D
    from multitoken import pipeline
    from multitoken.synthetic import generate_records

    recs = generate_records(80, seed=2)
    tok = D.build_tokenizer((D.format_prompt(r["query"]) + r["response"] for r in recs), vocab_size=300)
    tok.pad_token = tok.eos_token                                   # as SmolLM2's: pad = EOS = end of turn
    base = llama(vocab_size=len(tok), max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    model_dir = tmp_path / "tiny-llama"
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    monkeypatch.setattr(pipeline, "repo_root", lambda: tmp_path)
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"profile": "llamatest", "model_name": str(model_dir), "max_examples": 60,
                                      "max_steps": 2, "eval_steps": 2, "max_new_tokens": 12, "medusa_max_examples": 8,
                                      "mtpseq_n": 3, "mtp_head_type": "transformer", "n_positions": 64,
                                      "max_seq_len": 300}))
    assert cli.main(["data", "-f", str(params)]) == 0
    for v in pipeline.VARIANTS:
        assert cli.main(["train", "--variant", v, "-f", str(params)]) == 0
    cfg = pipeline.config(**yaml.safe_load(params.read_text()))
    assert pipeline.context_size(cfg) == 512 and pipeline.family(cfg) == "llama"
    prep = pipeline.loaders(cfg)[3]
    assert prep["tokenizer"].pad_token_id == prep["tokenizer"].eos_token_id == tok.eos_token_id
    assert len(prep["tokenizer"]) == len(tok)                      # no token added: the embeddings keep their size
    ex = next(e for e in prep["tokenized"]["train"] if len(e["input_ids"]) < cfg["max_seq_len"])   # not truncated
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    models = {v: pipeline.load_variant(cfg, v) for v in pipeline.VARIANTS}
    assert [type(m).__name__ for m in models.values()] == ["LlamaForCausalLM", "MultiTokenLlama", "MedusaLlama",
                                                          "MultiTokenLlama"]
    ids = torch.randint(3, len(tok), (1, 9))
    for v in ("medusa", "mtp_seq"):
        assert torch.equal(models[v](ids).logits, models["ntp"](ids).logits)      # frozen backbones
        assert torch.equal(speculative_generate(models[v], ids, 12, tree="medusa:6")[0], hf(models["ntp"], ids, 12,
                                                                                            eos=tok.eos_token_id))
    with pytest.raises(ValueError, match="holds a llama checkpoint, but profile 'llamatest' names a gpt2 model"):
        pipeline.load_variant(dict(cfg, model_name=None), "ntp")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_length_bench_times_both_caches_and_leaves_the_adapter_as_it_was(family, monkeypatch):
    """make bench's length section: each length is timed with the engine's own cache and with transformers'
    DynamicCache (really used: counted), lengths past the context are left out, and the adapter is restored."""
    from multitoken import bench

    made = []

    class Counted(bench.DynamicCache):
        def __init__(self, *a, **k):
            made.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(bench, "DynamicCache", Counted)
    if family == "llama":                        # heads trained on this Llama's own text: drafts are accepted
        heads, model = trained("sdpa", "medusa")
    else:
        model = GPT2LMHeadModel(GPT2Config(**tiny())).eval()
        heads = wrap_model_with_medusa(model, num_medusa_heads=3)
    bb = backbone_of(model)
    ctx = bb.context_size
    with torch.no_grad():
        rows = bench.length_bench(model, ctx, lengths=(8, ctx - 16, ctx), prompt_len=16, repeats=1, heads=heads,
                                  tree="medusa:5")
    assert [r["new_tokens"] for r in rows] == [8, ctx - 16]
    assert all(r["growing_cache_tokens_per_s"] > 0 and r["dynamic_cache_tokens_per_s"] > 0 for r in rows)
    assert len(made) == 1 + len(rows)            # the warm-up and one run per length, not the speculation's
    assert "new_cache" not in bb.__dict__ and type(bb.new_cache()) is not Counted
    for r in rows:                               # the head model's own steps: tokens / steps = τ
        assert r["speculation_tree"] == "medusa:5" and r["speculation_tau"] >= 1
        steps = r["new_tokens"] / r["speculation_tokens_per_s"] * 1000 / r["speculation_ms_per_step"]
        assert abs(steps * r["speculation_tau"] - r["new_tokens"]) <= 0.05 * r["new_tokens"] + 1
    if family == "llama":
        assert rows[-1]["speculation_tau"] > 1   # the trained heads' drafts are accepted: speculation really ran


def test_batch_bench_rows_report_speculations_own_tau_and_identical_rows(monkeypatch):
    """make bench-batch's rows on a Llama with trained heads: every method decodes the same tokens as HF's batched
    greedy generate, the tree comes from the candidates, and the reported τ is batched speculation's own
    (tokens per row per step, recomputed here from the engine on the same chunks and tree)."""
    from multitoken import bench
    from multitoken import evaluation as E
    from multitoken.core import compiled

    monkeypatch.setattr(compiled, "AUTOTUNE", [False])                  # the graphs without timing GEMM kernels
    heads, base = trained("sdpa", "medusa")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, V, (n,), generator=g) for n in (3, 5, 4, 6)]
    val = [torch.randint(2, V, (4,), generator=g) for _ in range(2)]
    base.generation_config.eos_token_id = EOS
    with torch.no_grad():
        rows = bench.batch_rows(base, heads, prompts, val, sizes=(1, 2), new_tokens=12,
                                trees=("chain:1", "chain", "medusa:5"), rounds=1, pad=PAD,
                                compiled_trees=("chain:1", "chain"))
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        # the compiled step, the batch kept whole: same tokens, its tree chosen among its own candidates
        assert r["tree_compiled"] in ("chain:1", "chain")
        assert set(r["tree_compiled_validation_s"]) == {"chain:1", "chain"}
        assert r["compiled_identical_to_hf"] == r["no_drafts_compiled_identical_to_hf"] == len(prompts)
        assert r["compile_s"] > 0 and len(r["compiled_vs_hf"]) == 2, "new graphs for each batch size"
        assert r["tree"] in ("chain:1", "chain", "medusa:5") and set(r["tree_validation_s"]) == {"chain:1", "chain",
                                                                                                  "medusa:5"}
        assert r["batched_identical_to_rows"] and r["rows_identical_to_hf"] == len(prompts) == r["rows"]
        assert ("masked_identical" in r) == (r["batch"] > 1) and r.get("masked_identical", True)
        tokens = steps = 0
        with torch.no_grad():
            for i in range(0, len(prompts), r["batch"]):
                ids, mask = E._left_padded(prompts[i: i + r["batch"]], PAD)
                st = speculative_generate(heads, ids, 12, tree=r["tree"], attention_mask=mask, batched=True)[1]
                tokens, steps = tokens + st["new_tokens"], steps + st["new_tokens"] / st["mean_accepted_length"]
        assert r["spec_batched_tau"] == round(tokens / steps, 3) and r["spec_batched_tau"] > 1   # drafts accepted
    with pytest.raises(ValueError, match="pad token"):
        base.generation_config.pad_token_id = None
        bench.batch_rows(base, heads, prompts, val, sizes=(1,), new_tokens=4, trees=("chain",), rounds=1)
