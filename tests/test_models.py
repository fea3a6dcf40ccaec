import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import EOS, PAD, V, VARIANTS, medusa, mtp, tiny
from multitoken import MedusaConfig, MedusaGPT2, MTPConfig, MultiTokenGPT2, wrap_model_with_mtp
from huggingface_hub.errors import StrictDataclassError

from multitoken.core.heads import loss_weights, warmup_factor
from multitoken.core.heads import Features

CONFIG_ERRORS = (ValueError, StrictDataclassError)  # HF's strict configs wrap our ValueError, message kept


def perturb_check(model, seq_offset):
    """Changing token j never changes LM logits before j, nor head-k logits before j - seq_offset(k)."""
    torch.manual_seed(1)
    ids = torch.randint(2, V, (2, 12))
    out = model(ids, output_head_logits=True)
    for j in (4, 8, 11):
        ids2 = ids.clone()
        ids2[:, j] = (ids2[:, j] + 1) % V
        out2 = model(ids2, output_head_logits=True)
        torch.testing.assert_close(out.logits[:, :j], out2.logits[:, :j])
        assert not torch.allclose(out.logits[:, j:], out2.logits[:, j:])
        for k, (a, b) in enumerate(zip(out.head_logits, out2.head_logits), 1):
            cut = j - seq_offset(k)
            torch.testing.assert_close(a[:, :cut], b[:, :cut])


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_causality_every_head_design(v):
    model = mtp(**v, initializer_range=0.2)
    # sequential heads are teacher-forced: head k at t reads token t+k (never t+k+1, the one it predicts)
    perturb_check(model, (lambda k: k) if v["sequential"] else (lambda k: 0))


def test_causality_with_eager_attention_and_trunk_cut():
    perturb_check(mtp(head_type="transformer", attn_implementation="eager"), lambda k: 0)
    perturb_check(mtp(head_type="mlp", num_trunk_layers=1), lambda k: 0)


def test_n1_is_gpt2_exactly():
    model = mtp(num_predict_tokens=1)
    ref = GPT2LMHeadModel(GPT2Config(**tiny())).eval()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, V, (2, 10))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    lab = ids.clone()
    torch.testing.assert_close(model(ids, labels=lab).loss, ref(ids, labels=lab).loss)


@pytest.mark.parametrize("v", VARIANTS[::2], ids=str)
def test_save_pretrained_round_trip(tmp_path, v):
    model = mtp(**v)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = MultiTokenGPT2.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, V, (1, 9))
    a, b = model(ids, output_head_logits=True), again(ids, output_head_logits=True)
    torch.testing.assert_close(a.logits, b.logits)
    for x, y in zip(a.head_logits, b.head_logits):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("v", [VARIANTS[i] for i in (0, 1, 2, 5, 8, 10, 11)], ids=str)
def test_memory_efficient_gradients_equal_naive(v):
    ids = torch.randint(2, V, (2, 11))
    labels = ids.clone()
    labels[:, :3] = -100
    grads, losses, totals = [], [], []
    for eff in (False, True):
        model = mtp(**v, memory_efficient_loss=eff, num_predict_tokens=4, initializer_range=0.1).train()
        out = model(ids, labels=labels)
        (out.loss * 0.7).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        losses.append(out.step_losses)
        totals.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)   # every head's loss, both ways
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_loss_weighting_schemes_and_warmup():
    assert loss_weights("uniform", 3) == [1.0, 1.0, 1.0]
    assert loss_weights("linear", 4) == [1.0, 0.75, 0.5, 0.25]
    assert loss_weights("exponential", 3, beta=0.5) == [1.0, 0.5, 0.25]
    assert sum(loss_weights("exponential", 3, beta=0.5, normalize=True)) == pytest.approx(1.0)
    assert loss_weights("primary_aux", 3, beta=0.5, lam=0.3) == [1.0, 0.3, 0.15]
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weights("cosine", 3)
    assert [warmup_factor(s, 4) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    model = mtp(mtp_warmup_steps=10, loss_weighting="primary_aux", loss_lambda=0.5)
    model.set_training_step(5)
    assert model.loss_weights() == [1.0, 0.25, 0.2]
    ids = torch.randint(0, V, (1, 8))
    model.set_training_step(0)
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss)  # auxiliaries fully warmed down at step 0


@pytest.mark.parametrize("kw,match", [
    (dict(num_predict_tokens=0), "num_predict_tokens"), (dict(head_type="rnn"), "unknown head_type"),
    (dict(loss_weighting="cosine"), "unknown loss_weighting"), (dict(num_trunk_layers=0), "branch off after 1..1"),
    (dict(num_trunk_layers=2), "branch off after 1..1 of the model's 2 layers"),
    (dict(layout="thesis", sequential=True, head_type="transformer", num_trunk_layers=1), "layer split"),
])
def test_bad_mtp_config(kw, match):
    with pytest.raises(CONFIG_ERRORS, match=match):
        MTPConfig(**tiny(**kw))


def test_bad_medusa_config():
    with pytest.raises(CONFIG_ERRORS, match="num_medusa_heads"):
        MedusaConfig(**tiny(num_medusa_heads=0))


def test_medusa_logits_equal_base_and_backbone_gets_no_gradient(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(**tiny())).eval()
    base.save_pretrained(tmp_path)
    model = MedusaGPT2.from_base(str(tmp_path), num_medusa_heads=3, medusa_num_layers=2).freeze_backbone()
    ids = torch.randint(0, V, (2, 10))
    assert torch.equal(model.eval()(ids).logits, base(ids).logits)
    blocks = model.medusa_heads[0].blocks
    assert blocks[0].linear is not blocks[1].linear and blocks[0].linear.weight.abs().max() == 0
    torch.testing.assert_close(model.medusa_heads[1].unembed.weight, base.lm_head.weight)
    model.train()(ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("medusa_heads"))
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("medusa_heads"))
    model.save_pretrained(tmp_path / "m")
    again = MedusaGPT2.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(again.medusa_heads[2].unembed.weight, model.medusa_heads[2].unembed.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing"):
        MedusaGPT2.from_base(str(tmp_path / "empty"))


def test_mtp_from_pretrained_gpt2_copies_trunk_and_inits_heads(tmp_path):
    from multitoken.training import build_mtp_model

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(**tiny())).eval()
    base.save_pretrained(tmp_path)

    class Tok:
        eos_token_id, pad_token_id = EOS, PAD

        def __len__(self):
            return V

    model = build_mtp_model(Tok(), 3, base_model=str(tmp_path), head_type="transformer").eval()
    ids = torch.randint(0, V, (1, 8))
    torch.testing.assert_close(model(ids).logits, base(ids).logits)
    for p, q in zip(model.mtp_heads[1].block.parameters(), base.transformer.h[-1].parameters()):
        torch.testing.assert_close(p, q)


def test_wrap_tiny_llama_trains_and_is_causal():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD))
    model = wrap_model_with_mtp(llama, num_predict_tokens=3, head_type="mlp").eval()
    ids = torch.randint(2, V, (2, 10))
    out = model(ids, labels=ids, output_head_logits=True)
    assert out.step_losses.shape == (3,) and len(out.head_logits) == 2
    torch.testing.assert_close(out.logits, llama(ids).logits)
    out.loss.backward()
    assert model.mtp_heads[0].fc.weight.grad is not None
    ids2 = ids.clone()
    ids2[:, 6] = (ids2[:, 6] + 1) % V
    out2 = model(ids2, output_head_logits=True)
    torch.testing.assert_close(out.head_logits[1][:, :6], out2.head_logits[1][:, :6])
    g = wrap_model_with_mtp(GPT2LMHeadModel(GPT2Config(**tiny())), num_predict_tokens=2)
    assert g(ids).logits.shape == (2, 10, V)


def _draft_pair(k=10, seed=0):
    """A MEDUSA-1 model over the whole vocabulary and its twin whose heads cover only ``k`` random tokens (EOS
    among them): same blocks, the unembeddings' rows of those tokens."""
    from multitoken.core.medusa import frequent_tokens

    full = medusa(initializer_range=0.4, seed=seed)
    with torch.no_grad():
        for p in full.medusa_heads.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([EOS]), 2 + torch.randperm(V - 2, generator=g)[: k - 1]]).sort().values
    draft = MedusaGPT2(MedusaConfig(**tiny(num_medusa_heads=3, medusa_draft_vocab=k))).eval()
    sd = {n: (t[ids] if n.endswith("unembed.weight") else t) for n, t in full.state_dict().items()}
    draft.load_state_dict({**sd, "draft_ids": ids})
    assert torch.equal(frequent_tokens([ids[None]], k), ids)
    return full, draft, ids


def test_draft_vocabulary_heads_are_the_full_heads_restricted_to_it():
    """Heads over a draft vocabulary: their logits are the full heads' on those tokens, and what they draft (top-k,
    one row or a batch) is token ids of that vocabulary, the full heads' ranking among them."""
    full, draft, ids = _draft_pair()
    h0 = torch.randn(3, 5, full.config.n_embd)
    for s in range(1, 4):
        torch.testing.assert_close(draft._head_logits(s, draft._head_step(s, h0, h0, None)),
                                   full._head_logits(s, full._head_step(s, h0, h0, None))[..., ids])
    ctx = Features(h0[:1])
    want = ids[torch.stack([full._head_logits(s, full._head_step(s, h0[:1, 2:3], h0[:1, 2:3], None))[0, 0, ids]
                            for s in range(1, 4)]).topk(4, -1).indices]
    assert torch.equal(draft.spec_head_topk(ctx, 2, 4), want)
    rows = draft.spec_head_topk_rows(Features(h0), torch.tensor([2, 0, 4]), 4)            # (B, S, k)
    assert torch.equal(rows[0], want) and torch.isin(rows, ids).all()


def test_draft_vocabulary_loss_skips_and_accuracy_misses_targets_outside_it():
    import torch.nn.functional as F

    full, draft, ids = _draft_pair()
    x = torch.randint(2, V, (2, 12))
    h = draft.backbone.trunk(x)[1]
    # targets: head 1's own drafts on every other position (hits), tokens outside the vocabulary on the rest
    labels = x.clone()
    outside = torch.tensor([t for t in range(2, V) if t not in ids])
    labels[:, 2:] = ids[draft._head_logits(1, draft._head_step(1, h, h, None))[:, :10].argmax(-1)]
    labels[:, 3::2] = outside[torch.randint(0, len(outside), labels[:, 3::2].shape)]
    labels[:, :2] = -100
    out = draft(input_ids=x, labels=labels)
    lut = torch.full((V,), -1)
    lut[ids] = torch.arange(len(ids))
    for s in range(1, 4):
        lg = draft._head_logits(s, draft._head_step(s, h, h, None))[:, : 12 - s - 1]
        tg = labels[:, s + 1:]
        inv = (tg >= 0) & torch.isin(tg, ids)
        assert inv.any() and ((tg >= 0) & ~inv).any()                 # both kinds of target occur
        torch.testing.assert_close(out.step_losses[s], F.cross_entropy(lg[inv], lut[tg[inv]]))
        hits = (ids[lg.argmax(-1)] == tg) & (tg >= 0)
        assert s > 1 or hits.any()
        torch.testing.assert_close(out.step_accuracy[s], hits.sum() / (tg >= 0).sum())


def test_draft_vocabulary_survives_a_round_trip_and_bad_ones_are_refused(tmp_path):
    from multitoken import wrap_model_with_medusa
    from multitoken.core.medusa import frequent_tokens
    from multitoken.core.pretrained import load_model

    _, draft, ids = _draft_pair()
    draft.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert torch.equal(again.draft_ids, ids)
    x = torch.randint(2, V, (1, 8))
    assert torch.equal(again.spec_head_topk(Features(again.backbone.trunk(x)[0]), 7, 3),
                       draft.spec_head_topk(Features(draft.backbone.trunk(x)[0]), 7, 3))
    base = GPT2LMHeadModel(GPT2Config(**tiny())).eval()
    wrapped = wrap_model_with_medusa(base, 2, draft_vocab=ids)
    torch.testing.assert_close(wrapped.medusa_heads[1].unembed.weight, base.lm_head.weight[ids])
    for bad in (torch.tensor([1, 1, 2, 3, 4, 5, 6, 7, 8, 9]), torch.tensor([1, 2]), torch.arange(V - 9, V + 1)):
        with pytest.raises(ValueError, match="draft vocabulary"):
            draft.set_draft_vocab(bad)
    with pytest.raises(CONFIG_ERRORS, match="medusa_draft_vocab"):
        MedusaConfig(**tiny(medusa_draft_vocab=V + 1))
    # the most frequent targets, ties to the lower id, EOS always in; fewer when fewer occur
    labels = [torch.tensor([[5, 5, 5, 7, 7, 3, -100, 9]]), torch.tensor([9, 2])]
    assert frequent_tokens(labels, 3).tolist() == [5, 7, 9]
    assert frequent_tokens(labels, 3, always=[EOS]).tolist() == [1, 5, 7]
    assert frequent_tokens(labels, 50).tolist() == [2, 3, 5, 7, 9]
    with pytest.raises(ValueError, match="no labelled token"):
        frequent_tokens([torch.tensor([-100])], 3)


def test_head_topk_accuracy_counts_draft_vocabulary_ranks_as_token_ids():
    """Over every rank of a draft vocabulary of k tokens, a head's top-k accuracies add up to its targets inside
    that vocabulary over head 1's targets (ranks compared as token ids, not as indices into the vocabulary)."""
    from multitoken.pipeline import head_topk_accuracy

    _, draft, ids = _draft_pair()
    x = torch.randint(2, V, (4, 16), generator=torch.Generator().manual_seed(1))
    batch = dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x)
    acc = head_topk_accuracy(draft, [batch], k=len(ids))
    for d in range(1, 4):
        tg = x[:, d + 1:]
        n = x[:, 2:].numel()                                           # every head over head 1's targets
        torch.testing.assert_close(sum(acc[d - 1]), float(torch.isin(tg, ids).sum()) / n)


def test_a_draft_vocabulary_narrower_than_the_tree_is_refused_and_fitted_trees_stay_inside_it():
    """Heads over 3 tokens cannot rank a 4th: the engine refuses a tree asking for their top-4 with a clear error,
    head top-k accuracy ranks only 3, and the tree fitted from it decodes (and equals greedy)."""
    from multitoken.decoding import speculative_generate
    from multitoken.pipeline import head_topk_accuracy
    from multitoken.decoding.trees import fitted_tree

    _, draft, ids = _draft_pair(k=3)
    x = torch.randint(2, V, (2, 8), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="top-4 but the heads predict over a draft vocabulary of 3 tokens"):
        speculative_generate(draft, x[:1], 4, tree=[(3,)])
    acc = head_topk_accuracy(draft, [dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x)], k=8)
    assert [len(row) for row in acc] == [3, 3, 3]
    tree = fitted_tree(acc, 30)
    assert tree.max_topk <= 3 and len(tree.paths) > 3
    out, _ = speculative_generate(draft, x[:1], 6, tree=tree)
    ref = draft.generate(x[:1], max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(x[:1]),
                         eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out, ref)


def _mtp_draft_pair(variant, k=10, seed=0):
    """An MTP model of head design ``variant`` over the whole vocabulary (heads drawn at random) and its twin whose
    heads predict over ``k`` random tokens (EOS among them): the same weights, the shared LM head's rows."""
    full = mtp(**variant, initializer_range=0.4, seed=seed)
    with torch.no_grad():
        for n, p in full.named_parameters():
            if full.is_head_parameter(n):
                p.add_(torch.randn_like(p) * 0.3)
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([EOS]), 2 + torch.randperm(V - 2, generator=g)[: k - 1]]).sort().values
    draft = MultiTokenGPT2(MTPConfig(**tiny(**variant, num_predict_tokens=3, mtp_draft_vocab=k))).eval()
    draft.load_state_dict({**full.state_dict(), "draft_ids": ids})
    return full, draft, ids


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_mtp_heads_over_a_draft_vocabulary_are_the_full_heads_restricted_to_it(variant, monkeypatch):
    """MTP heads over a draft vocabulary (rows of the shared LM head): their logits are the full heads' on those
    tokens, training and eval; what they draft, one row or a batch, is only those tokens; decoding stays lossless."""
    from test_decoding import hf
    from multitoken.decoding import drafters, speculative_generate

    full, draft, ids = _mtp_draft_pair(variant)
    ids_in = torch.randint(2, V, (2, 7))
    h0 = full.transformer(ids_in).last_hidden_state
    for s in range(1, 3):
        h = full._head_step(s, h0, h0, ids_in)
        torch.testing.assert_close(draft._head_logits(s, h), full._head_logits(s, h)[..., ids])
        draft.train()
        torch.testing.assert_close(draft._head_logits(s, h), full._head_logits(s, h)[..., ids])
        draft.eval()
    seen = []
    propose = drafters.Heads.propose
    monkeypatch.setattr(drafters.Heads, "propose", lambda self, m, view: seen.append(propose(self, m, view)) or seen[-1])
    batch, mask = ids_in.clone(), torch.ones_like(ids_in)
    mask[1, :4] = 0
    for rows, kw in ((batch[:1], {}), (batch, dict(attention_mask=mask))):
        out, _ = speculative_generate(draft, rows, 12, tree="medusa:6", **kw)
        for r in range(len(rows)):
            keep = kw["attention_mask"][r].bool() if kw else torch.ones(rows.shape[1], dtype=torch.bool)
            ref = hf(draft, rows[r: r + 1, keep], 12)[0, int(keep.sum()):]
            assert torch.equal(out[r, rows.shape[1]: rows.shape[1] + len(ref)], ref)
    drafted = [d.tokens for d in seen if d.tokens is not None]
    if not (variant["sequential"] and variant["head_type"] == "transformer"):       # the modules draft apart
        assert drafted and all(torch.isin(t[t >= 0], ids).all() for t in drafted)


def test_mtp_draft_vocabulary_is_checked_and_saved(tmp_path):
    with pytest.raises(CONFIG_ERRORS, match="mtp_draft_vocab"):
        MTPConfig(**tiny(num_predict_tokens=3, mtp_draft_vocab=V + 1))
    with pytest.raises(CONFIG_ERRORS, match="head_own_unembedding"):
        MTPConfig(**tiny(num_predict_tokens=3, mtp_draft_vocab=4, head_own_unembedding=True))
    _, draft, ids = _mtp_draft_pair(dict(head_type="mlp"), k=6)
    with pytest.raises(ValueError, match="distinct ids"):
        draft.set_draft_vocab(torch.tensor([1, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="mtp_draft_vocab > 0"):
        mtp().set_draft_vocab(ids)
    draft.save_pretrained(tmp_path)
    back = MultiTokenGPT2.from_pretrained(tmp_path).eval()
    assert torch.equal(back.draft_ids, ids)
    labels = torch.tensor([[-100, int(ids[2]), int(ids[0])] + [t for t in range(V) if t not in ids.tolist()][:1]])
    assert back.head_labels(labels).tolist() == [[-100, 2, 0, -1]]
