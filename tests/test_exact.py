"""Exact bf16 speculation: each position is computed with the same arithmetic whatever else shares its step
(invariant attention, one product layout per weight), so the engine's bf16 speculation returns token for token what
its bf16 greedy decoding returns, on every family, for chains, trees, rejections and padded batches."""
import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from multitoken import wrap_model_with_medusa
from multitoken.core import fastpath
from multitoken.core.backbones import backbone_of, invariant_attention
from multitoken.decoding import speculative_generate
from multitoken.decoding.drafters import RowDrafter
from multitoken.decoding.trees import chain

VOCAB = 96


def llama(seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      eos_token_id=None, bos_token_id=None, initializer_range=0.05)
    m = LlamaForCausalLM(cfg).eval().to(dtype)
    m.generation_config.eos_token_id = None
    return m


def gpt2(seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256, initializer_range=0.05,
                     bos_token_id=None, eos_token_id=None, pad_token_id=0)
    m = GPT2LMHeadModel(cfg).eval().to(dtype)
    m.generation_config.eos_token_id = None
    return m


class Noisy(RowDrafter):
    """The known greedy continuation as a chain of ``depth`` drafts, its last token wrong in a seeded third of the
    steps: long accepted runs, partial acceptances and rejections."""

    def __init__(self, reference, depth, seed=0):
        self.ref, self.depth, self.name, self.rng = reference.tolist(), depth, "noisy", random.Random(seed)

    def propose_row(self, model, ctx, j, x0, history, limit):
        k = min(self.depth, limit)
        if k < 1:
            return chain(0), None
        toks = [self.ref[i] if i < len(self.ref) else 0 for i in range(len(history), len(history) + k)]
        if self.rng.random() < 1 / 3:
            toks[-1] = (toks[-1] + 1) % VOCAB
        return chain(k), torch.tensor(toks)


def prompts(n, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (1, length), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", [llama, gpt2])
def test_invariant_attention_computes_attention(family):
    """In fp32 the invariant attention gives SDPA's states (to rounding) for a prefill, a tree-masked step on top of
    the cache and a causal multi-token step."""
    model = family(dtype=torch.float32)
    bb = backbone_of(model)
    ids, step = torch.randint(1, VOCAB, (1, 9)), torch.randint(1, VOCAB, (1, 4))
    pos = torch.tensor([[9, 10, 10, 11]])                                  # a root, two siblings, a grandchild
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    mask = torch.cat([torch.ones(4, 9, dtype=torch.bool), tree], 1)[None, None]

    def run():
        cache = bb.new_cache()
        out = [bb.trunk(ids, cache)[1], bb.trunk(step, cache, pos, mask=mask)[1]]
        cache.crop(-4)
        return out + [bb.trunk(step[:, :3], cache)[1]]
    with torch.no_grad():
        ref = run()
        with invariant_attention(model):
            got = run()
    assert model.config._attn_implementation == "sdpa"                     # restored
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [llama, gpt2])
def test_a_step_of_several_tokens_equals_one_token_steps_bit_for_bit(family):
    """bf16: the states of 3- and 5-token steps equal those of one-token steps exactly."""
    model = family()
    bb = backbone_of(model)
    x = torch.randint(1, VOCAB, (1, 50), generator=torch.Generator().manual_seed(1))
    res = {}
    with torch.inference_mode(), fastpath.decoding(model, invariant=True), invariant_attention(model):
        for step in (1, 3, 5):
            cache = bb.new_cache()
            bb.trunk(x[:, :20], cache)
            res[step] = torch.cat([bb.trunk(x[:, t: t + step], cache)[1] for t in range(20, 50, step)], 1)
    assert torch.equal(res[3], res[1]) and torch.equal(res[5], res[1])


@pytest.mark.parametrize("family", [llama, gpt2])
def test_bf16_speculation_equals_the_engines_bf16_greedy(family):
    model = family()
    for i, x in enumerate(prompts(8)):
        greedy, _ = speculative_generate(model, x, 40, tree="none")
        spec, st = speculative_generate(model, x, 40, drafter=Noisy(greedy[0], 4, seed=i))
        assert torch.equal(spec, greedy), f"prompt {i}"
        assert st["mean_accepted_length"] > 1.5                              # the drafts were mostly taken
        lookup, _ = speculative_generate(model, torch.cat([x, x], 1), 40, drafter="prompt_lookup")
        assert torch.equal(lookup, speculative_generate(model, torch.cat([x, x], 1), 40, tree="none")[0])


def test_bf16_tree_speculation_and_padded_batches_equal_greedy():
    """A MEDUSA-1 tree of random heads (many rejections, sibling branches) and a padded batch with prompt lookup."""
    model = wrap_model_with_medusa(llama(seed=2, dtype=torch.float32), num_medusa_heads=3).eval().to(torch.bfloat16)
    xs = prompts(5, seed=3)
    for x in xs:
        greedy, _ = speculative_generate(model, x, 32, tree="none")
        for tree in ("medusa:8", "chain"):
            assert torch.equal(speculative_generate(model, x, 32, tree=tree)[0], greedy)
    plain = llama(seed=4)
    lens = [12, 20, 16]
    batch = torch.zeros(3, 20, dtype=torch.long)
    mask = torch.zeros(3, 20, dtype=torch.long)
    for b, (n, x) in enumerate(zip(lens, prompts(3, seed=5))):
        row = torch.cat([x[0, : n // 2], x[0, : n - n // 2]])                 # repeats: the lookup finds matches
        batch[b, 20 - n:], mask[b, 20 - n:] = row, 1                         # left-padded, as a tokenizer pads
    greedy, _ = speculative_generate(plain, batch, 24, tree="none", attention_mask=mask)
    spec, st = speculative_generate(plain, batch, 24, drafter="prompt_lookup", attention_mask=mask)
    assert st["batched"] and torch.equal(spec, greedy)
    for b in range(3):                                                       # and each row alone
        alone, _ = speculative_generate(plain, batch[b: b + 1, 20 - lens[b]:], 24, tree="none")
        assert torch.equal(alone[0, lens[b]:], greedy[b, 20:])


def test_invariant_mode_takes_the_row_major_product_for_every_row_count(monkeypatch):
    """Layouts round differently and the transposed bf16 product depends on the row count (SmolLM2's MLP: a one-row
    and a five-row product of the same input differed); invariant mode asks for no layout and multiplies row-major."""
    asked = []
    monkeypatch.setattr(fastpath, "_layout", lambda m, k, n, dt: asked.append(m) or "transposed")
    lin = torch.nn.Linear(16, 8)
    with torch.no_grad(), fastpath.decoding(lin, invariant=True):
        for rows in (1, 3, 40):
            x = torch.randn(rows, 16)
            assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert asked == []
    with torch.no_grad(), fastpath.decoding(lin):
        for rows in (1, 3, 40):
            lin(torch.randn(rows, 16))
    assert asked == [1, 3]                                          # per row count; 40 rows: the usual product


def test_a_bf16_benchmark_gives_every_engine_method_one_shape_and_each_equals_the_engines_greedy():
    """Methods drafting up to 12 nodes (a hybrid's budget) beside the greedy decoding: ``one_shape`` gives them all
    13-token steps (the default 9 would refuse the hybrid), and every output equals the engine's greedy; fp32 methods
    are left as they are."""
    from multitoken.evaluation import Method as M, benchmark_decoding, one_shape

    model = wrap_model_with_medusa(llama(seed=2, dtype=torch.float32), num_medusa_heads=3).eval().to(torch.bfloat16)
    meths = one_shape([M.hf("hf_greedy", model), M.engine("greedy_kv", model, "none", baseline="hf_greedy"),
                       M.engine("chain", model, "chain", baseline="hf_greedy"),
                       M.engine("hybrid", model, "medusa:8", "hybrid:4:12", "hf_greedy")])
    assert [m.step_tokens for m in meths] == [None, 13, 13, 13]
    rows, _ = benchmark_decoding(meths, [p[0] for p in prompts(3, seed=6)], 16, warmup=0, reference="greedy_kv")
    assert all(r["identical_to_greedy_kv"] == 1 for r in rows if r["method"] != "hf_greedy")
    fp32 = [M.engine("greedy_kv", llama(dtype=torch.float32), "none")]
    assert one_shape(fp32)[0] is fp32[0]
