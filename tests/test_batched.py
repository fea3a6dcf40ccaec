"""The step loop on a batch: every row of a batch equals its own decode, whatever the padding and the drafter."""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import EOS, PAD, V, VARIANTS, medusa, medusa_draft, mtp
from test_decoding import Oracle, assert_two_token_distribution, six_token_model
from multitoken import wrap_model_with_medusa, wrap_model_with_mtp
from multitoken import decoding
from multitoken.decoding import drafters, engine
from multitoken.decoding import speculative_generate


def _llama(vocab=V, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.4,
                                        **kw)).eval()


MODELS = {f"mtp-{i}": (lambda i=i: mtp(**VARIANTS[i], num_predict_tokens=4, initializer_range=0.4, seed=i))
          for i in range(len(VARIANTS))}
MODELS["medusa"] = lambda: medusa(initializer_range=0.4, seed=99)
MODELS["medusa-draft-vocab"] = lambda: medusa_draft(initializer_range=0.4, seed=98)
MODELS["llama-medusa"] = lambda: wrap_model_with_medusa(_llama(seed=1), num_medusa_heads=3).eval()
MODELS["llama-mtp-transformer"] = lambda: wrap_model_with_mtp(_llama(seed=2), num_predict_tokens=3,
                                                              head_type="transformer").eval()
MODELS["llama-plain"] = lambda: _llama(seed=3)
_cache = {}


def get(name):
    if name not in _cache:
        _cache[name] = MODELS[name]()
    return _cache[name]


def alone(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=EOS, pad_token_id=PAD)[0, ids.shape[1]:]


def padded(prompts, sides):
    W = max(len(p) for p in prompts)
    ids, mask = torch.full((len(prompts), W), PAD), torch.zeros(len(prompts), W, dtype=torch.long)
    for b, (p, side) in enumerate(zip(prompts, sides)):
        sl = slice(W - len(p), W) if side == "left" else slice(0, len(p))
        ids[b, sl], mask[b, sl] = p, 1
    return ids, mask


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(MODELS)), tree=st.sampled_from([None, "chain:1", "medusa:9", "none"]),
       lens=st.lists(st.integers(1, 10), min_size=1, max_size=6), n=st.integers(1, 30),
       sides=st.lists(st.sampled_from(["left", "right"]), min_size=6, max_size=6), seed=st.integers(0, 10 ** 6))
def test_every_row_of_a_random_batch_equals_its_own_generate(name, tree, lens, n, sides, seed):
    model = get(name)
    tree = tree if getattr(model, "num_heads", 0) else "none"
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, V, (k,), generator=g) for k in lens]
    ids, mask = padded(prompts, sides)
    out, stats = speculative_generate(model, ids, n, tree=tree, attention_mask=mask)
    assert stats["batched"] == (len(prompts) > 1 and name not in ("mtp-10", "mtp-11"))  # seq. modules: row by row
    for b, p in enumerate(prompts):
        ref, got = alone(model, p[None], n), out[b, ids.shape[1]:]
        assert torch.equal(got[: len(ref)], ref), (b, got, ref)
        assert (got[len(ref):] == PAD).all()


class BatchOracle(drafters.Heads):
    """Heads that propose each row's true greedy continuation at a random sibling slot (or miss), for a whole batch
    at once: exercises per-row acceptance of several tokens, EOS inside a draft, rows leaving the batch, and each
    row's non-contiguous KV compaction. ``refs``: each row's prompt and greedy continuation."""

    def __init__(self, tree, refs, hit=0.85, seed=0):
        super().__init__(tree)
        self.refs, self.hit, self.rng = refs, hit, random.Random(seed)

    def propose(self, model, view):
        t = self.tree.truncate(max(view.limits))
        k, tt = t.max_topk, t.on("cpu")
        top = torch.zeros(len(view.rows), t.depth, k, dtype=torch.long)
        for i, (b, history) in enumerate(zip(view.rows, view.histories)):
            ref = self.refs[b]
            for d in range(t.depth):                                         # head d + 1 drafts ref[len(history) + d]
                right = int(ref[len(history) + d]) if len(history) + d < len(ref) else 0
                row = self.rng.sample([tok for tok in range(V) if tok != right], k)
                if self.rng.random() < self.hit:
                    r = self.rng.random()
                    row[min(k - 1, 0 if r < 0.6 else 1 if r < 0.85 else self.rng.randrange(k))] = right
                top[i, d] = torch.tensor(row)
        return drafters.Draft([t.truncate(limit) for limit in view.limits],
                              top[:, tt.depths - 1, tt.last_idx] if len(t) else None)


@pytest.mark.parametrize("seed", range(6))
def test_oracle_drafts_accept_many_tokens_per_row_and_stay_exact(seed):
    model = medusa(num_medusa_heads=4, initializer_range=0.4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, V, (k,), generator=g) for k in (4, 1, 7, 3, 5)]
    ids, mask = padded(prompts, ["left", "right", "left", "right", "left"])
    for n in (5, 17, 40):
        refs = [torch.cat([p, alone(model, p[None], n)]) for p in prompts]
        for tree in ("chain", "medusa:30", "medusa:63"):
            oracle = BatchOracle(decoding.parse_tree(tree, model.num_heads), refs, seed=seed)
            out, stats = speculative_generate(model, ids, n, tree=tree, attention_mask=mask, drafter=oracle)
            assert stats["batched"]
            for b, p in enumerate(prompts):
                ref = refs[b][len(p):]
                assert torch.equal(out[b, ids.shape[1]: ids.shape[1] + len(ref)], ref)
            if min(len(r) - len(p) for r, p in zip(refs, prompts)) > 8:
                assert stats["mean_accepted_length"] > 1.5


@pytest.mark.parametrize("name", ["medusa", "mtp-2", "llama-plain"])
def test_finished_rows_leave_the_batch(name):
    """A row that ends early stops costing compute: the loop's row-steps fall short of forwards x batch, the rows
    that go on stay exact, and each keeps drafting from its own state (a row's drafts are what they are alone: the
    batch accepts as many drafts as its rows do one by one)."""
    model = get(name)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, V, (5,), generator=g) for _ in range(8)]
    ids = torch.stack(prompts)
    lengths = [len(alone(model, p[None], 40)) for p in prompts]
    assert min(lengths) < max(lengths)  # some rows end (EOS) before others: the premise of the test
    tree = "medusa:9" if getattr(model, "num_heads", 0) else "none"
    out, stats = speculative_generate(model, ids, 40, tree=tree)
    assert stats["row_steps"] < (stats["forward_passes"] - 1) * len(prompts)
    rows = [speculative_generate(model, p[None], 40, tree=tree)[1] for p in prompts]
    assert stats["head_hits"] == [sum(h) for h in zip(*(r["head_hits"] for r in rows))]
    for b, p in enumerate(prompts):
        ref = alone(model, p[None], 40)
        assert torch.equal(out[b, 5: 5 + len(ref)], ref)


@pytest.mark.parametrize("name", ["medusa", "llama-plain"])
def test_finished_rows_kept_as_masked_no_ops_give_the_same_tokens_at_full_cost(name):
    """The alternative to leaving (``batched="masked"``): finished rows stay in the batch, computed and discarded;
    every row's tokens and accepted drafts are the same as when they leave, and every step costs the whole batch."""
    model = get(name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (8, 5), generator=g)
    tree = "medusa:9" if getattr(model, "num_heads", 0) else "none"
    drop, sd = speculative_generate(model, ids, 40, tree=tree)
    kept, sk = speculative_generate(model, ids, 40, tree=tree, batched="masked")
    assert torch.equal(drop, kept)
    assert sk["head_hits"] == sd["head_hits"] and sk["head_tries"] == sd["head_tries"]
    assert sk["row_steps"] == (sk["forward_passes"] - 1) * len(ids) > sd["row_steps"]
    with pytest.raises(ValueError, match="finished"):
        engine._decode(model, list(ids), 4, decoding.Sampling(), drafters.Heads(decoding.parse_tree("none", 0)),
                         {EOS}, 64, decoding.StepStats(), finished="keep")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_sampling_keeps_each_rows_distribution(family):
    """First two tokens of 3000 identical rows sampled in one batch vs the exact p(x1) p(x2 | x1), chi-square."""
    model = six_token_model(family)
    ids = torch.tensor([[2, 3, 1]])
    T, P = 1.3, 0.9
    out, stats = speculative_generate(model, ids.repeat(3000, 1), 2, temperature=T, top_p=P, tree="medusa:8",
                                      generator=torch.Generator().manual_seed(0), eos_token_id=[])
    assert stats["batched"]
    assert_two_token_distribution(model, ids, T, P, torch.bincount(out[:, 3] * 6 + out[:, 4], minlength=36).float())


def test_bad_batches_fail_clearly():
    model = get("medusa")
    ids = torch.randint(2, V, (3, 6))
    with pytest.raises(ValueError, match="only 0"):
        speculative_generate(model, ids, 4, attention_mask=torch.full((3, 6), 2))
    with pytest.raises(ValueError, match="does not match"):
        speculative_generate(model, ids, 4, attention_mask=torch.ones(3, 5, dtype=torch.long))
    empty = torch.ones(3, 6, dtype=torch.long)
    empty[1] = 0
    with pytest.raises(ValueError, match="empty prompt"):
        speculative_generate(model, ids, 4, attention_mask=empty)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :3] = 0                                     # the longest row (6) + 59 overflows the context of 64
    with pytest.raises(ValueError, match="overflows the context"):
        speculative_generate(model, ids, 59, attention_mask=mask)
    with pytest.raises(ValueError, match="row by row"):
        speculative_generate(get("mtp-10"), ids, 4, batched=True)


def test_batched_answers_equal_row_by_row_answers():
    """generate_responses(engine="speculative"): left-padded batches of the engine, each text the row's own."""
    from multitoken.evaluation import generate_responses

    class Tok:
        pad_token_id, eos_token_id = PAD, EOS

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(t)) for t in ids if not (skip_special_tokens and int(t) in (PAD, EOS)))

    model = get("medusa")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, V, (k,), generator=g) for k in (3, 9, 5, 1, 7, 4, 6)]
    alone, _ = generate_responses(model, Tok(), prompts, 20, tree="medusa:9")
    batched, stats = generate_responses(model, Tok(), prompts, 20, tree="medusa:9", batch_size=3, engine="speculative")
    assert batched == alone and [s["batched"] for s in stats] == [True, True, False]  # a last chunk of 1 row
    plain, stats = generate_responses(model, Tok(), prompts, 20, tree="none", batch_size=3, engine="speculative")
    assert plain == alone and all(s["mean_accepted_length"] == 1 for s in stats)      # run_quality's batched path
    with pytest.raises(ValueError, match="engine"):
        generate_responses(model, Tok(), prompts, 20, batch_size=3, engine="vllm")
