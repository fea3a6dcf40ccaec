"""Sequential transformer modules (DeepSeek-V3 MTP modules, FastMTP's shared module): training and drafting."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from conftest import EOS, PAD, V, mtp
from test_decoding import hf
from multitoken.decoding import modules, speculative_generate
from multitoken.decoding.trees import Tree

SEQ = dict(head_type="transformer", sequential=True)


def seq(share=False, n=4, seed=0, **kw):
    """A random module model. M starts as [I, 0] (the token ignored), so it is drawn at random too."""
    model = mtp(**SEQ, share_weights_across_steps=share, num_predict_tokens=n, initializer_range=0.4, seed=seed, **kw)
    with torch.no_grad():
        for head in model.mtp_heads:
            head.combine.weight.normal_(0, 0.5)
    return model


def teacher_forced(model, ids, upto):
    """Module states h_1..h_upto over every position of ``ids``, each module one causal pass (the training path)."""
    h0 = model.transformer(ids).last_hidden_state
    states = [h0]
    for k in range(1, upto + 1):
        states.append(model._head_step(k, states[-1], h0, ids))
    return states


@pytest.mark.parametrize("share", [False, True])
def test_module_k_at_i_reads_tokens_up_to_i_plus_k_only(share):
    model = seq(share)
    ids = torch.randint(2, V, (2, 14))
    base = teacher_forced(model, ids, 3)
    for j in (5, 9, 13):
        ids2 = ids.clone()
        ids2[:, j] = (ids2[:, j] + 1) % V
        other = teacher_forced(model, ids2, 3)
        for k in (1, 2, 3):
            torch.testing.assert_close(base[k][:, : j - k], other[k][:, : j - k])   # positions i < j - k unchanged
            assert not torch.allclose(base[k][:, j - k:], other[k][:, j - k:])     # i = j - k reads t_j


@pytest.mark.parametrize("share", [False, True])
def test_teacher_forced_pass_equals_the_step_by_step_recurrence(share):
    """One pass per module over the sequence == feeding each module one position at a time through its KV cache."""
    model = seq(share)
    ids = torch.randint(2, V, (1, 12))
    full = teacher_forced(model, ids, 3)
    T = ids.shape[1]
    caches = [DynamicCache() for _ in range(3)]
    wte = model.transformer.wte
    for i in range(T - 3):               # positions whose tokens t_{i+k} all exist
        h = full[0][:, i: i + 1]
        for k in (1, 2, 3):
            h = model._head_step(k, h, None, None, cache=caches[k - 1], token_emb=wte(ids[:, i + k: i + k + 1]))
            torch.testing.assert_close(h, full[k][:, i: i + 1], atol=1e-4, rtol=1e-4)


def naive_draft(model, text, tree):
    """Reference drafting with no cache: node p at depth k is module k's top-(p[-1]) at the last position of a
    teacher-forced run over ``text`` (t_0..t_L, t_L the token the model chose) followed by the parent's drafts."""
    L = text.numel() - 1
    tokens = {}
    for p in tree.paths:
        drafts = torch.tensor([tokens[p[:d]] for d in range(1, len(p))], dtype=torch.long, device=text.device)
        ids = torch.cat([text, drafts]).view(1, -1)
        h0 = model.transformer(ids[:, :L]).last_hidden_state
        h = h0
        for k in range(1, len(p) + 1):
            h = model._head_step(k, h, h0, ids[:, : L + k])
        tokens[p] = int(model.head_token_ids(model._head_logits(len(p), h[:, -1]).topk(p[-1] + 1).indices[0, -1]))
    return torch.tensor([tokens[p] for p in tree.paths], device=text.device)


class Spy:
    """Records, at every drafting step, the committed text, the drafts, and copies of the module caches."""

    def __init__(self, model):
        self.m, self.steps = model, []

    def __call__(self, model, caches, tree):
        text = caches.tokens.clone()
        before = [[(l.keys.clone(), l.values.clone()) for l in c.layers] for c in caches.modules]
        seen = list(caches.seen)
        out = self.propose(model, caches, tree)
        after = [[(l.keys.clone(), l.values.clone()) for l in c.layers] for c in caches.modules]
        self.steps.append(dict(text=text, tree=tree, drafts=out.clone(), before=before, seen_before=seen,
                               after=after, seen=list(caches.seen)))
        return out


def spied_decode(model, tree, monkeypatch):
    """30 tokens after a random 5-token prompt, every drafting step recorded (:class:`Spy`); the output must equal
    HF ``generate``'s. Returns (output, stats, spy)."""
    spy = Spy(model)
    spy.propose = modules.propose
    monkeypatch.setattr(modules, "propose", spy)
    ids = torch.randint(2, V, (1, 5))
    out, stats = speculative_generate(model, ids, 30, tree=tree)
    assert torch.equal(out, hf(model, ids, 30))
    return out, stats, spy


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("tree", ["chain", "medusa:20"])
def test_drafts_and_module_caches_equal_a_fresh_run_over_the_accepted_text(share, tree, monkeypatch):
    model = seq(share, seed=3)
    out, stats, spy = spied_decode(model, tree, monkeypatch)
    assert len(spy.steps) > 3
    with torch.inference_mode():  # the recorded tensors are inference tensors
        for s in spy.steps:
            text = s["text"]
            assert torch.equal(text, out[0, : text.numel()])                   # committed text is the output so far
            assert torch.equal(s["drafts"], naive_draft(model, text, s["tree"]))
            # after drafting, module k holds exactly the committed positions 0..L-k, equal to a fresh forward
            L = text.numel() - 1
            states = teacher_forced(model, text.view(1, -1), s["tree"].depth)   # true states where tokens are true
            for k in range(1, s["tree"].depth + 1):
                seen = s["seen"][k - 1]
                assert seen == max(0, L - k + 1)
                fresh = DynamicCache()
                model._head_step(k, states[k - 1][:, :seen], None, None, cache=fresh,
                                 token_emb=model.transformer.wte(text[k: seen + k]).unsqueeze(0))
                for (key, val), lay in zip(s["after"][k - 1], fresh.layers):
                    assert key.shape[-2] == seen
                    torch.testing.assert_close(key, lay.keys, atol=1e-5, rtol=1e-4)
                    torch.testing.assert_close(val, lay.values, atol=1e-5, rtol=1e-4)
    grew = [b["text"].numel() - a["text"].numel() for a, b in zip(spy.steps, spy.steps[1:])]
    assert min(grew) >= 1 and max(grew) >= 2     # some step accepted drafts: the states were rebuilt after that too
    assert stats["forward_passes"] == len(spy.steps) + 1          # the prefill, then one drafted step each


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(share=st.booleans(), n=st.integers(2, 5), tree=st.sampled_from([None, "chain:1", "medusa:9", "medusa:30"]),
       plen=st.integers(1, 9), new=st.integers(1, 40), seed=st.integers(0, 10 ** 6))
def test_decoding_equals_hf_generate(share, n, tree, plen, new, seed):
    model = seq(share, n=n, seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (1, plen), generator=g)
    out, _ = speculative_generate(model, ids, new, tree=tree if tree is None or n > 2 or tree != "medusa:30" else None)
    assert torch.equal(out, hf(model, ids, new))


@pytest.mark.parametrize("share", [False, True])
def test_batch_of_two_with_padding(share):
    model = seq(share, seed=5)
    a, b = torch.randint(2, V, (1, 7)), torch.randint(2, V, (1, 2))
    batch, mask = torch.full((2, 7), PAD), torch.zeros(2, 7, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 5:], mask[1, 5:] = b[0], 1
    out, _ = speculative_generate(model, batch, 25, tree="medusa:12", attention_mask=mask)
    for row, ids in ((0, a), (1, b)):
        ref = hf(model, ids, 25)[0, ids.shape[1]:]
        assert torch.equal(out[row, 7: 7 + len(ref)], ref)


def test_tree_deeper_than_the_modules_is_refused_before_any_work():
    model = seq(n=3)
    with pytest.raises(ValueError, match="deeper than the model's 2 heads"):
        speculative_generate(model, torch.tensor([[3, 4]]), 5, tree="chain:3")
    with pytest.raises(ValueError, match="deeper than the model's 2 heads"):
        speculative_generate(model, torch.tensor([[3, 4]]), 5, tree=Tree(((0,), (0, 0), (0, 0, 0))))


@pytest.mark.parametrize("tree", ["chain", "medusa:20"])
def test_modules_over_a_draft_vocabulary_draft_its_tokens_and_stay_lossless(tree, monkeypatch):
    """Modules over a draft vocabulary (rows of the shared LM head) draft token ids of it, the naive reference's."""
    model = seq(seed=3, mtp_draft_vocab=12)
    g = torch.Generator().manual_seed(1)
    model.set_draft_vocab(torch.cat([torch.tensor([EOS]), 2 + torch.randperm(V - 2, generator=g)[:11]]))
    _, _, spy = spied_decode(model, tree, monkeypatch)
    with torch.inference_mode():
        for s in spy.steps:
            assert torch.isin(s["drafts"], model.draft_ids).all()
            assert torch.equal(s["drafts"], naive_draft(model, s["text"], s["tree"]))
