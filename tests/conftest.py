import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

from multitoken import MedusaConfig, MedusaGPT2, MTPConfig, MultiTokenGPT2  # noqa: E402

V, EOS, PAD = 24, 1, 0


def tiny(**kw):
    base = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64, bos_token_id=EOS, eos_token_id=EOS,
                pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base.update(kw)
    return base


def mtp(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return MultiTokenGPT2(MTPConfig(**tiny(**{"num_predict_tokens": 3, **kw}))).eval()


def medusa(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return MedusaGPT2(MedusaConfig(**tiny(**{"num_medusa_heads": 3, **kw}))).eval()


def medusa_draft(k=10, **kw):
    """MEDUSA-1 heads over a draft vocabulary of ``k`` tokens (EOS and a seeded random choice of the others)."""
    model = medusa(medusa_draft_vocab=k, **kw)
    g = torch.Generator().manual_seed(k)
    model.set_draft_vocab(torch.cat([torch.tensor([EOS]), 2 + torch.randperm(V - 2, generator=g)[: k - 1]]))
    return model


# every head design the workbook offers
VARIANTS = [dict(head_type=h, sequential=s, share_weights_across_steps=sh)
            for h in ("linear", "mlp", "transformer", "shared_lm_head")
            for s in (False, True) for sh in (False, True)]


@pytest.fixture(scope="session")
def records():
    from multitoken.synthetic import generate_records

    return generate_records(400, seed=3)
