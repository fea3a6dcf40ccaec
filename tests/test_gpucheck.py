"""make gpu-check's pieces on the CPU (the whole dry run is the last step of `make test`)."""
import pytest
import torch

from conftest import EOS, PAD, V, medusa
from multitoken import gpucheck
from multitoken.decoding import speculative_generate


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_the_perfect_drafter_is_lossless_and_accepts_its_whole_chain(depth):
    model = medusa(initializer_range=0.4, seed=4)
    ids = torch.randint(2, V, (1, 5), generator=torch.Generator().manual_seed(depth))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                         eos_token_id=[], pad_token_id=PAD)
    out, st = speculative_generate(model, ids, 40, drafter=gpucheck.PerfectDrafter(ref[0], depth), eos_token_id=[])
    assert torch.equal(out, ref)
    assert st["forward_passes"] == 1 + -(-(40 - 1) // (depth + 1))   # prefill, then depth + 1 tokens per step


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_check_says_so_and_fails(capsys, tmp_path):
    assert gpucheck.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_targets_are_met_only_where_the_measurement_clears_them():
    rows = [dict(method="medusa_chain", dtype="bfloat16", speedup_vs_hf_greedy=3.4, speedup_lo=2.9, speedup_hi=3.8,
                 tokens_per_s=1600.0, identical_tokens=0.995, identical_to_greedy=0.5),
            dict(method="mtp_chain", dtype="bfloat16", speedup_vs_hf_greedy=5.0, speedup_lo=4.0, speedup_hi=6.0,
                 tokens_per_s=2500.0, identical_tokens=0.9, identical_to_greedy=0.0),      # too lossy to count
            dict(method="medusa_chain", dtype="float32", speedup_vs_hf_greedy=2.0, speedup_lo=1.8, speedup_hi=2.2,
                 tokens_per_s=900.0, identical_tokens=1.0, identical_to_greedy=1.0)]
    train = [dict(config="mtp4_efficient", step_vs_ntp=1.15, peak_vs_ntp=1.2)]
    t = gpucheck.targets(rows, train, dry=False)
    assert t["speedup_vs_hf"]["method"] == "medusa_chain" and t["speedup_vs_hf"]["met"] is False   # lo 2.9 < 3
    assert t["tokens_per_s"]["met"] is True and t["identical_fp32"]["met"] is True
    assert t["identical_tokens_bf16"] == dict(target=0.99, value=0.9, met=False)
    assert t["mtp4_step_vs_ntp"]["met"] is True and t["mtp4_peak_vs_ntp"]["met"] is False
