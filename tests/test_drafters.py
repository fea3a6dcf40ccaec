"""Drafters as objects: prompt lookup and the hybrid of heads and lookup decode exactly what the model decodes alone
(greedy equals HF ``generate``, sampling keeps the distribution), and bad proposals are refused."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import EOS, PAD, V, VARIANTS, medusa, medusa_draft, mtp, tiny
from multitoken.decoding import drafters
from multitoken.decoding import speculative_generate
from multitoken.decoding.trees import Tree, chain, medusa_tree
from test_decoding import assert_two_token_distribution, hf, six_token_model
from multitoken.decoding import target_probs

_models = {}


def get(name):
    if name not in _models:
        torch.manual_seed(7)
        _models[name] = {
            "plain-gpt2": lambda: GPT2LMHeadModel(GPT2Config(**tiny(initializer_range=0.4))).eval(),
            "mtp": lambda: mtp(**VARIANTS[1], num_predict_tokens=3, initializer_range=0.4, seed=3),
            "medusa": lambda: medusa(initializer_range=0.4, seed=5),
            "medusa-draft-vocab": lambda: medusa_draft(initializer_range=0.4, seed=6),
        }[name]()
    return _models[name]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["plain-gpt2", "mtp", "medusa", "medusa-draft-vocab"]),
       drafter=st.sampled_from(["prompt_lookup", "prompt_lookup:1", "prompt_lookup:7", "hybrid", "hybrid:2",
                                "hybrid:3:4", "hybrid:2:1"]),
       tree=st.sampled_from([None, "chain:1", "medusa:6"]), plen=st.integers(1, 12), n=st.integers(1, 40),
       seed=st.integers(0, 10 ** 6))
def test_lookup_and_hybrid_greedy_equal_hf_generate(name, drafter, tree, plen, n, seed):
    model = get(name)
    if name == "plain-gpt2" and (drafter.startswith("hybrid") or tree):
        drafter, tree = "prompt_lookup", None                      # no heads: lookup alone
    ids = torch.randint(2, 8, (1, plen), generator=torch.Generator().manual_seed(seed))  # few tokens: n-grams repeat
    out, stats = speculative_generate(model, ids, n, tree=tree, drafter=drafter)
    assert torch.equal(out, hf(model, ids, n))
    assert stats["drafter"] == drafters.make(drafter, chain(model.num_heads if hasattr(model, "num_heads") else 0)).name \
        or tree is not None


def lookup_passes(prompt: list, greedy: list, lookup) -> int:
    """Forward passes lookup decoding takes to emit ``greedy`` after ``prompt``, by hand: each step drafts the
    lookup of the history so far (the model's last token included) and keeps the drafts that match."""
    out, passes, n = greedy[:1], 1, len(greedy)
    while len(out) < n:
        prop, passes = lookup.lookup(prompt + out, n - len(out)), passes + 1
        k = next((i for i, t in enumerate(prop) if t != greedy[len(out) + i]), len(prop))
        out += greedy[len(out): len(out) + k]
        if len(out) < n:
            out.append(greedy[len(out)])
    return passes


def test_lookup_drafts_keep_exactly_the_tokens_that_match_the_models_own_continuation():
    """The engine drafts from the row's history with the model's last token in it and keeps each matching draft: the
    number of forward passes equals the hand count, and it is below one pass per token where the output repeats."""
    model = get("plain-gpt2")
    for seed in range(4):
        ids = torch.randint(2, 8, (1, 6), generator=torch.Generator().manual_seed(seed))
        ref, alone = speculative_generate(model, ids, 50, tree="none", eos_token_id=[])
        out, st = speculative_generate(model, ids, 50, drafter="prompt_lookup:4", eos_token_id=[])
        assert torch.equal(out, ref) and alone["forward_passes"] == 50
        want = lookup_passes(ids[0].tolist(), ref[0, 6:].tolist(), drafters.PromptLookup(4))
        assert st["forward_passes"] == want, seed
    assert want < 50


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["plain-gpt2", "mtp", "medusa", "medusa-draft-vocab"]),
       drafter=st.sampled_from(["prompt_lookup", "prompt_lookup:2", "hybrid", "hybrid:6", "hybrid:4:5"]),
       lens=st.lists(st.integers(1, 9), min_size=2, max_size=5), n=st.integers(1, 30), left=st.booleans(),
       seed=st.integers(0, 10 ** 6))
def test_a_padded_batch_decodes_each_row_as_alone_with_lookup_and_hybrid(name, drafter, lens, n, left, seed):
    """The rows of a batch advance together, each with its own tree (a lookup finds a match in one row and not in
    another): every row equals its own HF generate, and the batch drafts and accepts exactly what its rows do alone."""
    model = get(name)
    tree = None if name == "plain-gpt2" else "medusa:6"
    drafter = "prompt_lookup" if name == "plain-gpt2" else drafter
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 8, (k,), generator=g) for k in lens]              # few tokens: n-grams repeat
    W = max(lens)
    batch, mask = torch.full((len(lens), W), PAD), torch.zeros(len(lens), W, dtype=torch.long)
    for b, p in enumerate(prompts):
        sl = slice(W - len(p), W) if left else slice(0, len(p))
        batch[b, sl], mask[b, sl] = p, 1
    out, st = speculative_generate(model, batch, n, tree=tree, attention_mask=mask, drafter=drafter)
    assert st["batched"] is True
    alone = [speculative_generate(model, p[None], n, tree=tree, drafter=drafter)[1] for p in prompts]
    for b, p in enumerate(prompts):
        ref = hf(model, p[None], n)[0, len(p):]
        assert torch.equal(out[b, W: W + len(ref)], ref) and (out[b, W + len(ref):] == PAD).all()
    tries = [sum(c) for c in zip(*(a["head_tries"] + [0] * (len(st["head_tries"]) - len(a["head_tries"]))
                                   for a in alone))]
    assert st["head_tries"] == tries and st["row_steps"] == sum(a["row_steps"] for a in alone)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hybrid_sampling_keeps_the_distribution(family):
    """First two tokens under the hybrid drafter: empirical joint vs the exact p(x1) p(x2 | x1), chi-square."""
    torch.manual_seed(0)
    model = six_token_model(family)
    ids = torch.tensor([[2, 3, 1, 2, 3]])                          # the lookup proposes 1, 2, 3 after "2 3"
    T, P = 1.3, 0.9
    g = torch.Generator().manual_seed(0)
    N, counts = 3000, torch.zeros(36)
    for _ in range(N):
        out, _ = speculative_generate(model, ids, 2, temperature=T, top_p=P, tree="medusa:4", generator=g,
                                      eos_token_id=[], drafter="hybrid:2")
        counts[out[0, 5] * 6 + out[0, 6]] += 1
    assert_two_token_distribution(model, ids, T, P, counts)


def test_prompt_lookup_takes_the_earliest_match_of_the_longest_ngram():
    pl = drafters.PromptLookup(num_tokens=3, max_ngram=2)
    assert pl.lookup([5, 6, 7, 8, 9, 5, 6, 1, 5, 6]) == [7, 8, 9]        # "5 6" first at 0 (not at 5)
    assert pl.lookup([5, 6, 7, 8, 9, 5, 6, 1, 5, 6], limit=1) == [7]
    assert pl.lookup([4, 6, 7, 3, 1, 9, 7]) == [3, 1, 9]                  # no "9 7" before: the 1-gram "7"
    assert pl.lookup([1, 2, 3, 4]) == [] and pl.lookup([3]) == [] and pl.lookup([]) == []
    assert pl.lookup([2, 2]) == [2]                                       # a match right before the tail
    with pytest.raises(ValueError, match="num_tokens >= 1"):
        drafters.PromptLookup(num_tokens=0)


class FixedHeads(drafters.Heads):
    """Heads that draft fixed tokens for their tree (no model needed)."""

    def __init__(self, tree, tokens):
        super().__init__(tree)
        self.tokens = tokens

    def propose(self, model, view):
        t = self.tree.truncate(view.limits[0])
        return drafters.Draft([t], torch.tensor([self.tokens[: len(t)]]))


def pair(draft):
    return draft.trees, draft.tokens


def one_row(history, limit):
    """What a drafter sees for one row whose tokens so far are ``history``."""
    return drafters.View(None, torch.zeros(1, dtype=torch.long), history[-1:], [history], [limit], [0])


def test_hybrid_merges_shared_prefixes_and_branches_where_the_proposals_part():
    model = torch.nn.Linear(1, 1)                                          # only its device is read
    heads = FixedHeads(Tree(((0,), (1,), (0, 0), (0, 0, 0))), [8, 3, 4, 9])   # node order: (0,) (1,) (0,0) (0,0,0)
    hy = drafters.Hybrid(heads, drafters.PromptLookup(3, 1))
    (t,), cand = pair(hy.propose(model, one_row([7, 8, 4, 5, 7], 4)))             # lookup after "7": 8 4 5
    got = dict(zip(t.paths, cand[0].tolist()))
    assert got == {(0,): 8, (1,): 3, (0, 0): 4, (0, 0, 0): 9, (0, 0, 1): 5} and t.depth == 3
    (t,), cand = pair(hy.propose(model, one_row([6, 2, 6], 4)))                    # lookup "2 6" shares nothing: a branch
    assert dict(zip(t.paths, cand[0].tolist()))[(2,)] == 2 and len(t) == 6
    (t,), cand = pair(hy.propose(model, one_row([1, 2, 3], 4)))                    # no match: the heads' tree alone
    assert t is heads.tree and cand[0].tolist() == [8, 3, 4, 9]


class Bad(drafters.RowDrafter):
    name = "bad"

    def __init__(self, tokens, tree=None):
        self.tokens, self.tree = tokens, tree

    def propose_row(self, model, ctx, j, x0, history, limit):
        return self.tree or chain(len(self.tokens)), torch.tensor(self.tokens)


class TooFewTrees:
    name = "too few"

    def propose(self, model, view):
        return drafters.Draft([chain(1)], torch.tensor([[2]]))


def test_bad_drafters_and_drafter_settings_are_refused():
    model, ids = get("medusa"), torch.randint(2, 8, (1, 5))
    with pytest.raises(ValueError, match=f"token {V + 3} outside the model's vocabulary of {V}"):
        speculative_generate(model, ids, 10, drafter=Bad([2, V + 3]))
    with pytest.raises(ValueError, match="token -1 outside"):
        speculative_generate(model, ids, 10, drafter=Bad([-1]))
    with pytest.raises(ValueError, match=r"proposed \(1,\) tokens for a tree of 2 nodes"):
        speculative_generate(model, ids, 10, drafter=Bad([2], tree=chain(2)))
    with pytest.raises(ValueError, match="a tree 3 deep where 2 tokens are left"):
        speculative_generate(model, ids, 3, drafter=Bad([2, 3, 4]))
    out, _ = speculative_generate(model, ids, 10, drafter=Bad([], tree=Tree(())))   # an empty proposal: greedy
    assert torch.equal(out, hf(model, ids, 10))
    with pytest.raises(ValueError, match="unknown drafter 'lookahead'"):
        speculative_generate(model, ids, 10, drafter="lookahead")
    with pytest.raises(ValueError, match="unknown drafter 'hybrid:x'"):
        speculative_generate(model, ids, 10, drafter="hybrid:x")
    with pytest.raises(ValueError, match="needs a propose"):
        speculative_generate(model, ids, 10, drafter=object())
    with pytest.raises(ValueError, match="proposed 1 trees for 2 rows"):
        speculative_generate(model, ids.repeat(2, 1), 10, drafter=TooFewTrees())
    seq = mtp(head_type="transformer", sequential=True, num_predict_tokens=2)
    with pytest.raises(ValueError, match="they draft alone, not in a hybrid"):
        speculative_generate(seq, ids, 10, drafter="hybrid")
    with pytest.raises(ValueError, match="keeps one row's state"):
        speculative_generate(seq, ids.repeat(2, 1), 10, batched=True)
    out, st = speculative_generate(seq, ids.repeat(2, 1), 10, drafter="prompt_lookup")   # the modules need not draft
    assert st["batched"] and torch.equal(out[0], hf(seq, ids, 10)[0]) and torch.equal(out[0], out[1])
    assert medusa_tree(8).name == "medusa8"


def exact_second_and_third(model, ids, T, P):
    """The exact distribution (36,) of the 2nd and 3rd sampled tokens after ``ids`` (six-token vocabulary), the 1st
    summed out: sum over x1 of p(x1) p(x2 | x1) p(x3 | x1, x2)."""
    with torch.no_grad():
        p1 = target_probs(model(ids).logits[0, -1], T, P)                                    # (6,)
        one = torch.cat([ids.repeat(6, 1), torch.arange(6).view(6, 1)], 1)
        p2 = target_probs(model(one).logits[:, -1], T, P)                                    # (6, 6)
        two = torch.cat([one.repeat_interleave(6, 0), torch.arange(6).repeat(6).view(36, 1)], 1)
        p3 = target_probs(model(two).logits[:, -1], T, P).view(6, 6, 6)
    return (p1.view(6, 1, 1) * p2.view(6, 6, 1) * p3).sum(0).flatten()


def test_batched_sampling_with_trees_that_differ_by_row_keeps_each_rows_distribution():
    """Two prompts x 2000 rows in one batch under the hybrid drafter: the lookup matches in some rows and not in
    others, so the rows' trees differ and are padded; for each prompt the 2nd and 3rd tokens (decided by the tree's
    root and first-level nodes) follow the exact distribution (chi-square)."""
    model = six_token_model("gpt2")
    a, b = torch.tensor([[2, 3, 1, 2, 3]]), torch.tensor([[4, 0, 5, 1, 2]])
    T, P, N = 1.3, 0.9, 2000
    out, st = speculative_generate(model, torch.cat([a.repeat(N, 1), b.repeat(N, 1)]), 3, temperature=T,
                                   top_p=P, tree="medusa:4", generator=torch.Generator().manual_seed(0),
                                   eos_token_id=[], drafter="hybrid:2")
    assert st["batched"] and st["mean_accepted_length"] > 1.2
    for ids, rows in ((a, out[:N]), (b, out[N:])):
        exact, counts = exact_second_and_third(model, ids, T, P), torch.bincount(rows[:, 6] * 6 + rows[:, 7],
                                                                                 minlength=36).float()
        keep = exact * N >= 5
        chi2 = (((counts - exact * N) ** 2) / (exact * N))[keep].sum().item()
        dof = int(keep.sum()) - 1
        assert chi2 < dof + 4 * (2 * dof) ** 0.5, (chi2, dof)
        assert counts[exact == 0].sum() == 0


def test_a_trees_first_nodes_follow_its_growth_order():
    full = medusa_tree(20)
    for m in (0, 1, 5, 12, 20, 30):
        assert set(full.first(m).paths) == set(medusa_tree(min(m, 20)).paths) if m else len(full.first(m)) == 0
    assert full.truncate(2).first(3).paths == tuple(sorted([p for p in full.grown if len(p) <= 2][:3],
                                                            key=lambda p: (len(p), p)))
    odd = Tree(((0, 0), (0,), (1,)))                          # given child first: not a growth order, depth order kept
    assert odd.grown == odd.paths and len(odd.first(2)) == 2


def test_a_hybrids_node_budget_gives_the_heads_least_likely_nodes_to_the_lookup():
    model = torch.nn.Linear(1, 1)
    tree = medusa_tree(6)                                     # grown: (0,) (0,0) (1,) (0,1) (0,0,0) (1,0)
    heads = FixedHeads(tree, [10 + i for i in range(6)])
    hy = drafters.Hybrid(heads, drafters.PromptLookup(3, 1), budget=5)
    (t,), cand = pair(hy.propose(model, one_row([7, 8, 4, 5, 7], 4)))      # lookup 8 4 5: 3 nodes, heads keep 2
    got = dict(zip(t.paths, cand[0].tolist()))
    heads_kept = {p for p in t.paths if got[p] >= 10}
    assert len(t) == 5 and heads_kept == set(tree.grown[:2])
    (t,), cand = pair(hy.propose(model, one_row([1, 2, 3], 4)))            # no match: the heads' first 5
    assert set(t.paths) == set(tree.grown[:5])
    assert drafters.make("hybrid:3:12", tree).budget == 12 and drafters.make("hybrid:3:12", tree).name.endswith("@12")
    with pytest.raises(ValueError, match="budget must be >= 1"):
        drafters.Hybrid(heads, drafters.PromptLookup(), budget=0)
    with pytest.raises(ValueError, match="unknown drafter 'heads:2'"):
        drafters.make("heads:2", tree)
