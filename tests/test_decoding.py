import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from conftest import EOS, PAD, V, VARIANTS, medusa, medusa_draft, mtp
from multitoken import wrap_model_with_mtp
from multitoken.decoding import speculative_generate, target_probs
from multitoken.decoding.trees import Tree, chain, fitted_tree, medusa_tree, parse_tree
from multitoken.core.heads import Features

MODELS = {f"mtp-{i}": (lambda i=i: mtp(**VARIANTS[i], num_predict_tokens=4, initializer_range=0.4, seed=i))
          for i in range(len(VARIANTS))}
MODELS["medusa"] = lambda: medusa(initializer_range=0.4, seed=99)
MODELS["medusa-draft-vocab"] = lambda: medusa_draft(initializer_range=0.4, seed=98)
_cache = {}


def get(name):
    if name not in _cache:
        _cache[name] = MODELS[name]()
    return _cache[name]


def hf(model, ids, n, mask=None):
    return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=n,
                          do_sample=False, eos_token_id=EOS, pad_token_id=PAD)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(MODELS)), tree=st.sampled_from([None, "chain:1", "medusa:9", "none"]),
       plen=st.integers(1, 10), n=st.integers(1, 40), seed=st.integers(0, 10 ** 6))
def test_greedy_equals_hf_generate(name, tree, plen, n, seed):
    model = get(name)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (1, plen), generator=g)
    out, stats = speculative_generate(model, ids, n, tree=tree)
    assert torch.equal(out, hf(model, ids, n))
    assert stats["new_tokens"] == out.shape[1] - plen and stats["forward_passes"] >= 1


@pytest.mark.parametrize("name", ["mtp-0", "mtp-3", "mtp-9", "medusa"])
def test_batch_of_two_with_padding_matches_each_row(name):
    model = get(name)
    a, b = torch.randint(2, V, (1, 7)), torch.randint(2, V, (1, 3))
    batch = torch.full((2, 7), PAD)
    mask = torch.zeros(2, 7, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 4:], mask[1, 4:] = b[0], 1          # left padding
    out, _ = speculative_generate(model, batch, 25, tree="medusa:6", attention_mask=mask)
    for row, ids in ((0, a), (1, b)):
        ref = hf(model, ids, 25)[0, ids.shape[1]:]
        got = out[row, 7:]
        assert torch.equal(got[: len(ref)], ref)
        assert (got[len(ref):] == PAD).all()


class Oracle:
    """Heads that propose the true greedy continuation at a random sibling slot (or miss): exercises acceptance of
    several tokens, EOS inside a draft, max_new_tokens mid-draft and non-contiguous KV compaction."""

    def __init__(self, model, ref, plen, hit=0.85, seed=0):
        self.m, self.ref, self.plen, self.hit, self.rng = model, ref, plen, hit, random.Random(seed)
        self.num_heads, self.config, self.generation_config = model.num_heads, model.config, model.generation_config
        self.backbone, self.training = model.backbone, False

    def parameters(self):
        return self.m.parameters()

    def eval(self):
        pass

    def train(self, mode=True):
        pass

    def spec_new_cache(self):
        self.caches = self.m.spec_new_cache()
        return self.caches

    def spec_forward(self, *a):
        return self.m.spec_forward(*a)

    def spec_propose(self, ctx, j, x0, tree):
        done = self.caches[0].get_seq_length() - self.plen          # tokens generated before x0
        dev = self.m.device
        top = torch.zeros(self.num_heads, tree.max_topk, dtype=torch.long, device=dev)
        for d in range(self.num_heads):
            i = self.plen + done + d + 1
            right = int(self.ref[i]) if i < len(self.ref) else 0
            row = self.rng.sample([t for t in range(V) if t != right], tree.max_topk)
            if self.rng.random() < self.hit:  # like a real head: mostly its top-1, sometimes its top-2 or lower
                r = self.rng.random()
                row[min(tree.max_topk - 1, 0 if r < 0.6 else 1 if r < 0.85 else self.rng.randrange(tree.max_topk))] = right
            top[d] = torch.tensor(row, device=dev)
        tt = tree.on(dev)
        return top[tt.depths - 1, tt.last_idx]


@pytest.mark.parametrize("seed", range(12))
def test_oracle_drafts_accept_many_tokens_and_stay_exact(seed):
    model = medusa(num_medusa_heads=4, initializer_range=0.4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (1, 4), generator=g)
    for n in (5, 17, 40):
        ref = hf(model, ids, n)[0]
        for tree in ("chain", "medusa:30", "medusa:63"):
            out, stats = speculative_generate(Oracle(model, ref, 4, seed=seed), ids, n, tree=tree)
            assert torch.equal(out[0], ref)
            if len(ref) - 4 > 8:
                assert stats["mean_accepted_length"] > 1.5


def test_kv_cache_after_a_tree_step_equals_a_fresh_forward():
    model = mtp(head_type="transformer", num_predict_tokens=4, initializer_range=0.4)
    ids = torch.randint(2, V, (1, 6))
    ref = hf(model, ids, 30)[0]
    import multitoken.decoding.engine as D

    seen = {}
    orig = D._compact

    def spy(caches, L, W, keeps):
        width = orig(caches, L, W, keeps)
        (l,), (keep,) = L, keeps
        seen["len"] = l + len(keep)
        seen["noncontiguous"] = seen.get("noncontiguous", False) or keep != list(range(len(keep)))
        seen["caches"] = [[(l.keys.clone(), l.values.clone()) for l in c.layers] for c in caches]
        return width

    D._compact = spy
    try:
        o = Oracle(model, ref, 6, hit=1.0)
        speculative_generate(o, ids, 12, tree="medusa:20")
    finally:
        D._compact = orig
    text = ref[: seen["len"]].view(1, -1)
    fresh = model.spec_new_cache()
    model.spec_forward(text, fresh)
    assert seen["noncontiguous"]  # an accepted path that was not the first branch: KV gathered, not cropped
    assert len(seen["caches"]) == 1 + model.num_heads  # trunk + one cache per transformer head
    for c_step, c_fresh in zip(seen["caches"], fresh):
        for (k, v), b in zip(c_step, c_fresh.layers):
            torch.testing.assert_close(k, b.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v, b.values, atol=1e-5, rtol=1e-4)


def test_tree_mask_and_ancestry():
    t = Tree(((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))
    assert t.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert t.parents == [0, 0, 0, 1, 1, 2, 3]
    anc = t.ancestors.int()
    assert anc[6].tolist() == [1, 1, 0, 1, 0, 0, 1]      # (0,0,0) sees root, (0,), (0,0), itself
    assert anc[5].tolist() == [1, 0, 1, 0, 0, 1, 0]      # (1,0) sees root, (1,), itself
    assert anc.sum(1).tolist() == [1, 2, 2, 3, 3, 3, 4]
    assert chain(3).is_chain and chain(3).depth == 3 and len(medusa_tree(63)) == 63
    assert t.truncate(1).paths == ((0,), (1,))
    with pytest.raises(ValueError, match="no parent"):
        Tree(((0, 1),))
    f = fitted_tree([[0.6, 0.2, 0.1], [0.4, 0.1, 0.05]], budget=4)
    assert set(f.paths) == {(0,), (0, 0), (1,), (2,)}  # greedy by path products: .6, .24, .2, .1 (beats .06 of (0, 1))


def test_bad_input_fails_before_any_work():
    model = get("medusa")
    ids = torch.randint(2, V, (1, 5))
    for kw, match in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
                      (dict(tree="bushy"), "unknown tree"), (dict(tree="chain:5"), "deeper than")]:
        with pytest.raises(ValueError, match=match):
            speculative_generate(model, ids, 5, **kw)
    with pytest.raises(ValueError, match="longer than the context"):
        speculative_generate(model, torch.randint(2, V, (1, 70)), 1)
    with pytest.raises(ValueError, match="overflows the context"):
        speculative_generate(model, ids, 60)
    with pytest.raises(ValueError, match="deeper than"):
        parse_tree([(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)], 3)


def _llama_medusa_of_six_tokens():
    from multitoken import wrap_model_with_medusa

    torch.manual_seed(3)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         bos_token_id=5, eos_token_id=5, pad_token_id=0, initializer_range=0.5))
    return wrap_model_with_medusa(llama.eval(), num_medusa_heads=3).eval()


def six_token_model(family):
    return (medusa(vocab_size=6, initializer_range=0.5, seed=3, eos_token_id=5, bos_token_id=5) if family == "gpt2"
            else _llama_medusa_of_six_tokens())


def assert_two_token_distribution(model, ids, T, P, counts):
    """``counts`` (36,) of sampled first-two-token pairs vs the exact p(x1) p(x2 | x1): chi-square, and nothing
    outside the top-p nucleus."""
    with torch.no_grad():
        p1 = target_probs(model(ids).logits[0, -1], T, P)
        nxt = torch.cat([ids.repeat(6, 1), torch.arange(6).view(6, 1)], 1)
        p2 = target_probs(model(nxt).logits[:, -1], T, P)
    exact, N = (p1.view(6, 1) * p2).flatten(), counts.sum()
    keep = exact * N >= 5
    chi2 = (((counts - exact * N) ** 2) / (exact * N))[keep].sum().item()
    assert counts[~keep].sum() <= max(10, 3 * (exact[~keep] * N).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 4 * (2 * dof) ** 0.5, (chi2, dof)   # ~ p > 0.001
    assert counts[exact == 0].sum() == 0                      # nothing outside the top-p nucleus


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_speculative_sampling_keeps_the_distribution(family):
    """First two tokens: empirical joint of speculative sampling vs the exact p(x1) p(x2 | x1), chi-square."""
    torch.manual_seed(0)
    model = six_token_model(family)
    ids = torch.tensor([[2, 3, 1]])
    T, P = 1.3, 0.9
    g = torch.Generator().manual_seed(0)
    N, counts = 3000, torch.zeros(36)
    for _ in range(N):
        out, _ = speculative_generate(model, ids, 2, temperature=T, top_p=P, tree="medusa:8", generator=g,
                                      eos_token_id=[])
        counts[out[0, 3] * 6 + out[0, 4]] += 1
    assert_two_token_distribution(model, ids, T, P, counts)


def test_wrapped_llama_decodes_losslessly():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)).eval()
    model = wrap_model_with_mtp(llama, num_predict_tokens=3, head_type="linear").eval()
    for s in range(4):
        ids = torch.randint(2, V, (1, 3 + s))
        ref = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                             eos_token_id=EOS, pad_token_id=PAD)
        for tree in ("chain", "medusa:6"):
            assert torch.equal(speculative_generate(model, ids, 20, tree=tree)[0], ref)


@pytest.mark.parametrize("kw", [dict(head_type="transformer", num_trunk_layers=1), dict(head_type="mlp")])
@pytest.mark.parametrize("layout", ["row", "transposed", "packed"])
def test_lean_forward_equals_transformers(kw, layout, monkeypatch):
    """The decoding loop's lean GPT-2 forward (backbones.lean_block) gives transformers' logits, head states and KV cache:
    prefill, then a tree-masked verification step on top of the cache; with every matmul layout."""
    from multitoken.core import fastpath

    monkeypatch.setattr(fastpath, "_layout", lambda *a: layout)

    from multitoken.core.backbones import GPT2Backbone

    model = mtp(**kw, num_predict_tokens=3, initializer_range=0.4)
    blk = model.transformer.h[0]
    assert model.backbone.lean_ok(blk) and not model.backbone.lean_ok(model.train().transformer.h[0])
    model.eval()
    ids, tree = torch.randint(2, V, (1, 7)), medusa_tree(6, 2)
    step = torch.randint(2, V, (1, len(tree) + 1))
    pos = 7 + torch.cat([torch.zeros(1, dtype=torch.long), tree.depths_t]).view(1, -1)
    mask = torch.cat([torch.ones(len(tree) + 1, 7, dtype=torch.bool), tree.ancestors], 1)[None, None]

    def run():
        caches = model.spec_new_cache()
        prefill, ctx0 = model.spec_forward(ids, caches)
        tree_step, ctx1 = model.spec_forward(step, caches, pos, mask)
        plain, ctx2 = model.spec_forward(step[:, :3], caches)  # several new tokens, no mask: causal after the cache
        states = [s for c in (ctx0, ctx1, ctx2) for s in (c.states or [c.h0])]
        return [prefill, tree_step, plain, *states, *[t for c in caches for l in c.layers for t in (l.keys, l.values)]]

    with torch.no_grad():
        fast = run()
        monkeypatch.setattr(GPT2Backbone, "lean_ok", lambda self, block: False)
        slow = run()
    assert len(fast) == len(slow) > 4
    for x, y in zip(fast, slow):  # float32 rounding: the transposed product sums in another order
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fastpath_matmul_layouts_agree_and_follow_weight_updates(dtype, monkeypatch):
    """Every layout computes the module's own product (bf16 where this CPU packs bf16, else its fallback); a weight
    changed after its transposed or packed copy was made is read anew (training after an evaluation)."""
    from multitoken.core import fastpath
    from transformers.pytorch_utils import Conv1D

    conv, lin = Conv1D(24, 16).to(dtype), torch.nn.Linear(16, 24).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    with torch.no_grad():
        for layout in fastpath.LAYOUTS:
            monkeypatch.setattr(fastpath, "_layout", lambda *a: layout)
            for rows in (1, 2, 5, 40):
                x = torch.randn(rows, 16, dtype=dtype)
                torch.testing.assert_close(fastpath.matmul(x.view(1, rows, 16), conv.weight, conv.bias),
                                           conv(x.view(1, rows, 16)), **tol)
                torch.testing.assert_close(fastpath.linear(lin, x), lin(x), **tol)
            for mod in (conv, lin):
                mod.weight.mul_(2.0)          # the cached copies (transposed, packed) must follow the parameter
            x = torch.randn(5, 16, dtype=dtype)                        # a row count whose copies exist already
            torch.testing.assert_close(fastpath.matmul(x, conv.weight, conv.bias), conv(x), **tol)
            torch.testing.assert_close(fastpath.linear(lin, x), lin(x), **tol)


@pytest.mark.parametrize("failure", [AttributeError, RuntimeError])
def test_packed_layout_falls_back_when_the_private_op_is_missing(failure, monkeypatch):
    """The packing ops are private: where one is missing (another build) or refuses (a CPU without the instructions),
    no packed layout is timed or chosen, and a recorded "packed" choice replayed there computes the plain product."""
    from multitoken.core import fastpath

    def gone(*a, **k):
        raise failure("no such op here")
    for ns, op in ((torch.ops.mkl, "_mkl_reorder_linear_weight"), (torch.ops.mkldnn, "_reorder_linear_weight")):
        monkeypatch.setattr(ns, op, gone)
    lin = torch.nn.Linear(16, 24)
    for dt in (torch.float32, torch.bfloat16):
        assert fastpath._pack(lin.weight.detach().to(dt), 3) is None
        assert set(fastpath._layout_seconds(3, 16, 24, dt, reps=1)) == {"row", "transposed"}
    monkeypatch.setattr(fastpath, "_LAYOUT", {})
    fastpath.use_layout_choices([dict(rows=3, in_features=16, out_features=24, dtype="float32", layout="packed")])
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(fastpath.linear(lin, x), lin(x))
    assert lin.weight.__dict__["_fastpath_packed"][1] == {3: None}   # it asked for a packed copy, got none, went on


def test_packed_layout_is_used_where_the_cpu_offers_it(monkeypatch):
    """Where this build has MKL (the CPU wheels do), the packed layout really runs the packed fp32 kernel."""
    from multitoken.core import fastpath

    if not torch._C.has_mkl:
        pytest.skip("this PyTorch build has no MKL")
    calls = []
    real = torch.ops.mkl._mkl_linear
    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(fastpath, "_layout", lambda *a: "packed")
    lin, x = torch.nn.Linear(16, 24), torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(fastpath.linear(lin, x), lin(x))
    assert calls == [4]


def test_decoding_context_routes_linears_and_restores_them(monkeypatch):
    """Inside ``decoding(model)`` a model's nn.Linear layers compute through fastpath.matmul (outside autograd);
    ``fast=False`` forces the row-major product everywhere; both undo themselves, nested or not."""
    from multitoken.core import fastpath

    seen = []
    monkeypatch.setattr(fastpath, "_layout", lambda m, k, n, dt: seen.append((m, k, n)) or "transposed")
    net = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    x = torch.randn(2, 8)
    with torch.no_grad():
        ref = net(x)
        assert seen == []
        with fastpath.decoding(net):
            with fastpath.decoding(net):
                torch.testing.assert_close(net(x), ref)
            assert seen == [(2, 8, 12), (2, 12, 4)]
            torch.testing.assert_close(net(x), ref)               # the inner exit left the outer's routing
            assert len(seen) == 4
            with fastpath.decoding(net, fast=False):
                torch.testing.assert_close(fastpath.linear(net[0], x), net[0](x))
                assert len(seen) == 4                            # row-major: no layout asked
        net(x)
        assert len(seen) == 4 and all("forward" not in m.__dict__ for m in net)
    with fastpath.decoding(net):
        net(x).sum().backward()                                  # autograd: the usual product, gradients flow
    assert len(seen) == 4 and net[0].weight.grad is not None


def test_layout_choice_is_timed_once_per_shape_recorded_and_replayed(monkeypatch):
    from multitoken.core import fastpath

    monkeypatch.setattr(fastpath, "_LAYOUT", {})
    calls = []
    monkeypatch.setattr(fastpath, "_layout_seconds",
                        lambda m, k, n, dt: calls.append((m, k, n)) or dict(row=2.0, transposed=1.0, packed=1.5))
    assert fastpath._layout(3, 16, 24, torch.float32) == fastpath._layout(3, 16, 24, torch.float32) == "transposed"
    assert calls == [(3, 16, 24)]                                    # timed once, then remembered
    rec = fastpath.layout_choices()
    assert rec == [dict(rows=3, in_features=16, out_features=24, dtype="float32", layout="transposed")]
    monkeypatch.setattr(fastpath, "_LAYOUT", {})
    fastpath.use_layout_choices(rec)                                 # another process: the same layout, not retimed
    assert fastpath._layout(3, 16, 24, torch.float32) == "transposed" and calls == [(3, 16, 24)]
    monkeypatch.setattr(fastpath, "_LAYOUT", {})                     # a file written before the packed layout
    fastpath.use_layout_choices([dict(rows=2, in_features=16, out_features=24, dtype="float32", transposed=False)])
    assert fastpath._layout(2, 16, 24, torch.float32) == "row" and len(calls) == 1


class Forced(dict):
    """A layout-choice table that answers ``value`` for every shape (both ways of a product get tested)."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return self.value


def test_heads_unembedding_layout_is_timed_once_per_shape_and_takes_the_faster(monkeypatch):
    from multitoken.core import fastpath

    monkeypatch.setattr(fastpath, "_PER_HEAD_FASTER", {})
    calls = []

    def fake_time(f, reps=10):                  # per head, then batched: per head faster, then slower
        calls.append(f)
        return [1.0, 2.0, 2.0, 1.0][len(calls) - 1]

    monkeypatch.setattr(fastpath, "_time", fake_time)
    ws = [torch.randn(24, 8) for _ in range(3)]
    x, stacked = torch.randn(3, 2, 8), torch.stack([2 * w.mT for w in ws])   # twice: the two paths tell apart
    per_head = torch.stack([x[s] @ w.T for s, w in enumerate(ws)])
    for _ in range(2):
        torch.testing.assert_close(fastpath.heads_unembed(x, stacked, ws), per_head)
    assert len(calls) == 2 and fastpath._PER_HEAD_FASTER == {(3, 2, 8, 24, torch.float32): True}
    x = torch.randn(3, 5, 8)                                                  # another row count: timed again
    torch.testing.assert_close(fastpath.heads_unembed(x, stacked, ws), torch.bmm(x, stacked))
    assert len(calls) == 4 and fastpath._PER_HEAD_FASTER[(3, 5, 8, 24, torch.float32)] is False


@pytest.mark.parametrize("per_head", [True, False], ids=["per-head-unembedding", "batched-unembedding"])
def test_medusa_batched_drafting_equals_one_head_at_a_time(per_head, monkeypatch):
    """Medusa drafts with all heads stacked into batched matmuls; the logits must equal running each head alone,
    also after the weights change (the stacked copy is rebuilt), with either layout of the heads' unembeddings."""
    from multitoken.core import fastpath

    monkeypatch.setattr(fastpath, "_PER_HEAD_FASTER", Forced(per_head))
    model = medusa(medusa_num_layers=2, initializer_range=0.4)
    ctx = Features(torch.randn(1, 5, model.config.n_embd))
    for _ in range(2):
        with torch.no_grad():
            for p in model.medusa_heads.parameters():
                p.copy_(torch.randn_like(p) * 0.3)  # fresh heads start as the identity; make every layer count
        for j in (0, 4):
            h0 = ctx.h0[:, j: j + 1]
            alone = torch.stack([model._head_logits(s, model._head_step(s, h0, h0, None))[0, 0]
                                 for s in range(1, model.num_heads + 1)])
            torch.testing.assert_close(model.spec_head_logits(ctx, j), alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(head_type="mlp"), dict(head_type="mlp", head_own_unembedding=True),
                                dict(head_type="linear", head_own_unembedding=True)], ids=str)
@pytest.mark.parametrize("per_head", [True, False], ids=["per-head-unembedding", "batched-unembedding"])
def test_mtp_batched_drafting_equals_one_head_at_a_time(kw, per_head, monkeypatch):
    """Position-wise MTP heads draft in batched matmuls too; equal to running each head alone, also after the weights
    change, with either layout of the heads' own unembeddings."""
    from multitoken.core import fastpath

    monkeypatch.setattr(fastpath, "_PER_HEAD_FASTER", Forced(per_head))
    model = mtp(**kw, num_predict_tokens=4, initializer_range=0.4)
    assert model._batchable()
    ctx = Features(torch.randn(1, 5, model.config.n_embd))
    for _ in range(2):
        with torch.no_grad():
            for p in [*model.mtp_heads.parameters(), *model.mtp_unembed.parameters()]:
                p.copy_(torch.randn_like(p) * 0.3)
        for j in (0, 4):
            h0 = ctx.h0[:, j: j + 1]
            alone = torch.stack([model._head_logits(s, model._head_step(s, h0, h0, None))[0, 0]
                                 for s in range(1, model.num_heads + 1)])
            torch.testing.assert_close(model.spec_head_logits(ctx, j), alone, atol=1e-5, rtol=1e-5)


def test_layout_timings_cover_every_shape_and_row_count():
    from multitoken.core import fastpath

    real = fastpath._layout_seconds
    seen = []

    def fake(m, k, n, dtype=torch.float32, reps=10):
        seen.append((m, k, n, reps))
        return dict(row=m * 1e-6 * reps, transposed=2 * m * 1e-6 * reps)   # known seconds for reps products
    mp = pytest.MonkeyPatch()
    mp.setattr(fastpath, "_layout_seconds", fake)
    try:
        t = fastpath.layout_timings([(8, 16), (16, 8)], rows=(1, 3), reps=50)
    finally:
        mp.undo()
    assert [(r["in_features"], r["out_features"], r["rows"]) for r in t] == [(8, 16, 1), (8, 16, 3), (16, 8, 1),
                                                                            (16, 8, 3)]
    assert [r["row_us"] for r in t] == pytest.approx([1, 3, 1, 3])   # microseconds per product
    assert [r["transposed_us"] for r in t] == pytest.approx([2, 6, 2, 6]) and all(x[3] == 50 for x in seen)
    secs = real(4, 32, 64, reps=3)                                    # and the real timer times something
    assert {"row", "transposed"} <= set(secs) and all(v > 0 for v in secs.values())


def test_growing_cache_equals_dynamic_cache_and_compacts_in_place():
    """The engine's cache appends into a buffer that doubles (no copy of the whole cache per step) and the KV
    compaction moves the kept slots in place; the tensors it holds equal transformers' DynamicCache's."""
    from multitoken.core.backbones import GrowingCache
    import multitoken.decoding.engine as D

    g, d = GrowingCache(), DynamicCache()
    gen = torch.Generator().manual_seed(0)
    for n in (7, 1, 3, 90, 2):
        kv = torch.randn(1, 2, n, 4, generator=gen), torch.randn(1, 2, n, 4, generator=gen)
        a, b = g.update(*kv, 0), d.update(*kv, 0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    buf = g.layers[0]._buf[0].data_ptr()
    D._compact([g], [95], 95, [[0, 2, 4]])            # keep step positions 0, 2, 4 after a 95-token prefix
    keys = d.layers[0].keys
    want = torch.cat([keys[..., :95, :], keys[..., [95, 97, 99], :]], -2)
    assert torch.equal(g.layers[0].keys, want) and g.get_seq_length() == 98
    g.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), 0)
    assert g.layers[0]._buf[0].data_ptr() == buf and g.get_seq_length() == 99   # the same buffer, appended in place
    D._compact([d], [95], 95, [[0, 2, 4]])            # plain DynamicCache layers compact the same way
    assert torch.equal(d.layers[0].keys, want)


def test_growing_cache_keeps_its_capacity_when_rows_leave_the_batch():
    """The batched loop drops finished rows by reassigning each layer's keys/values (index_select): the next update
    copies them into a buffer of the capacity they need, and does not double it per reassignment (31 rows leaving
    a batch of 32 one by one once asked for 2^31 slots: 28 GB on SmolLM2)."""
    from multitoken.core.backbones import GrowingCache

    g = GrowingCache()
    g.update(torch.randn(16, 2, 10, 4), torch.randn(16, 2, 10, 4), 0)
    for rows in range(15, 0, -1):
        layer = g.layers[0]
        keep = torch.arange(rows)                                                   # a row leaves, as in batched
        layer.keys, layer.values = layer.keys.index_select(0, keep), layer.values.index_select(0, keep)
        g.update(torch.randn(rows, 2, 1, 4), torch.randn(rows, 2, 1, 4), 0)
    assert g.get_seq_length() == 25 and g.layers[0]._buf[0].shape == (1, 2, 64, 4)   # MIN_CAPACITY, not 64 x 2^15
    layer = g.layers[0]                       # reassigned to more rows than the buffer has: copied into a new one
    layer.keys, layer.values = torch.cat([layer.keys] * 2), torch.cat([layer.values] * 2)
    g.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4), 0)
    assert g.layers[0].keys.shape == (2, 2, 26, 4) and g.layers[0].keys[:, :, -1].eq(1).all()


def test_generation_settings_the_engine_does_not_apply_are_refused_by_name():
    model = get("medusa")
    ids = torch.randint(2, V, (1, 5))
    gc = model.generation_config
    try:
        gc.repetition_penalty = 1.3
        with pytest.raises(ValueError, match=r"repetition_penalty=1\.3.*generate\(\) applies"):
            speculative_generate(model, ids, 5)
        gc.repetition_penalty, gc.top_k = None, 50
        assert torch.equal(speculative_generate(model, ids, 5)[0], hf(model, ids, 5))   # greedy: top-k is moot
        with pytest.raises(ValueError, match="top_k=50"):
            speculative_generate(model, ids, 5, temperature=0.8)
        gc.top_k, gc.no_repeat_ngram_size = None, 0                                      # the neutral value passes
        speculative_generate(model, ids, 5)
    finally:
        gc.repetition_penalty = gc.top_k = gc.no_repeat_ngram_size = None
