"""The compiled step (``fast="compiled"``): one inductor graph per step size over a fixed-capacity cache, weights
frozen. It must return what the eager engine returns, token for token, whatever the drafts; recompile for weights
that changed; share graphs between models of equal weights; decode steps the ladder lacks without them; and say
what it refuses."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from multitoken import wrap_model_with_medusa
from multitoken.core import compiled
from multitoken.core.backbones import backbone_of
from multitoken.decoding import precompile, speculative_generate
from multitoken.decoding.engine import EXACT_STEP, _FixedChain, _step_inputs
from multitoken.decoding.drafters import Draft, RowDrafter
from multitoken.decoding.trees import chain
from multitoken.evaluation import Method, benchmark_decoding

VOCAB = 64


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      eos_token_id=None, bos_token_id=None, initializer_range=0.1)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    return m


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=256, initializer_range=0.1,
                     bos_token_id=None, eos_token_id=None, pad_token_id=0)
    m = GPT2LMHeadModel(cfg).eval()
    m.generation_config.eos_token_id = None
    return m


class Known(RowDrafter):
    """The known greedy continuation, ``depth`` drafts a step, the last one wrong every third step."""

    def __init__(self, reference, depth):
        self.ref, self.depth, self.name, self.n = reference.tolist(), depth, "known", 0

    def propose_row(self, model, ctx, j, x0, history, limit):
        k = min(self.depth, limit)
        if k < 1:
            return chain(0), None
        self.n += 1
        toks = [self.ref[i] if i < len(self.ref) else 0 for i in range(len(history), len(history) + k)]
        if self.n % 3 == 0:
            toks[-1] = (toks[-1] + 1) % VOCAB
        return chain(k), torch.tensor(toks)


@pytest.fixture(autouse=True, scope="module")
def quick_compile():
    """The kernels as compiled without timing inductor's own C++ GEMM against ATen's (minutes saved; what is tested
    here is the engine around the graphs; the benchmark checks every output of the timed configuration)."""
    compiled.AUTOTUNE[0] = False
    yield
    compiled.AUTOTUNE[0] = True


def prompt(seed=0, length=16):
    return torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", [llama, gpt2])
def test_compiled_steps_return_what_the_eager_engine_returns(family):
    model = family()
    for i in range(2):
        x = prompt(i)
        ref, _ = speculative_generate(model, x, 24, tree="none")
        got, _ = speculative_generate(model, x, 24, tree="none", fast="compiled")
        assert torch.equal(got, ref), f"greedy, prompt {i}"
        spec, st = speculative_generate(model, x, 24, drafter=Known(ref[0], 4), fast="compiled")
        assert torch.equal(spec, ref), f"chain of 4 (padded to 5 tokens a step), prompt {i}"
        assert st["mean_accepted_length"] > 1.5
        if family is llama:                   # steps of 2-5 tokens, padded to 3 or 5
            xx = torch.cat([x, x], 1)
            assert torch.equal(speculative_generate(model, xx, 24, drafter="prompt_lookup", fast="compiled")[0],
                               speculative_generate(model, xx, 24, tree="none")[0]), f"prompt lookup, prompt {i}"


def test_medusa_trees_and_models_of_equal_weights_share_the_graphs():
    base = llama()
    medusa = wrap_model_with_medusa(llama(), num_medusa_heads=2).eval()
    x = prompt(3)
    ref, _ = speculative_generate(base, x, 20, tree="none")
    spent = precompile(base, x.shape[1], 20, largest=5)
    before = compiled.COMPILE_S[0]
    for tree in ("medusa:4", "chain"):
        assert torch.equal(speculative_generate(medusa, x, 20, tree=tree, fast="compiled")[0], ref), tree
    assert compiled.COMPILE_S[0] == before, "MEDUSA-1's frozen backbone has the base model's weights: no compiling"
    assert spent >= 0 and precompile(base, x.shape[1], 20, largest=5) == 0.0       # done once


def test_weights_changed_after_compiling_are_the_ones_decoded():
    model = llama()                                  # the graphs of these weights may exist: they must not be used
    x = prompt(4)
    first = speculative_generate(model, x, 20, tree="none", fast="compiled")[0]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.7)                                                 # training after an evaluation, in place
    ref = speculative_generate(model, x, 20, tree="none")[0]
    assert not torch.equal(ref, first)
    assert torch.equal(speculative_generate(model, x, 20, tree="none", fast="compiled")[0], ref)


class Wide(RowDrafter):
    """40 drafts a step (none where fewer tokens are left): larger than every compiled step size."""
    name = "wide"

    def propose_row(self, model, ctx, j, x0, history, limit):
        if limit < 40:
            return chain(0), None
        return chain(40), torch.full((40,), x0, dtype=torch.long)


def test_a_step_larger_than_every_compiled_size_decodes_without_a_graph():
    model = llama(seed=0)
    x = prompt(5)
    ref = speculative_generate(model, x, 100, tree="none")[0]
    assert torch.equal(speculative_generate(model, x, 100, drafter=Wide(), fast="compiled")[0], ref)


@pytest.mark.parametrize("tree", ["none", "chain:2", "medusa:4"])
def test_a_compiled_batch_keeps_its_shape_and_every_row_equals_its_own_generate(tree):
    """Rows of different lengths, padded left or right, some ending at EOS long before the others: the batch keeps
    its shape (finished rows are masked no-ops), and each row is what HF ``generate`` gives it alone."""
    from conftest import EOS, PAD
    from test_batched import alone, get, padded
    model = get("llama-medusa")
    prompts = [torch.randint(2, 24, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 4, 10)]
    ids, mask = padded(prompts, ["left", "right", "left", "right"])
    got, st = speculative_generate(model, ids, 30, tree=tree, attention_mask=mask, fast="compiled", batched=True,
                                   eos_token_id=EOS, pad_token_id=PAD)
    assert st["batched"] == "masked"
    graphs = compiled.compiled_of(backbone_of(model))
    assert any(key[0] == len(prompts) for key in graphs.caches), "the batch decoded into a compiled cache of 4 rows"
    refs = [alone(model, p[None], 30).tolist() for p in prompts]
    assert len({len(r) for r in refs}) > 1, "rows that end at different steps"
    for b, ref in enumerate(refs):
        row = got[b, ids.shape[1]:].tolist()
        assert row[: len(ref)] == ref and set(row[len(ref):]) <= {PAD}, f"row {b}"


def test_what_compiled_steps_refuse():
    model = llama(seed=0)
    x = prompt(6)
    with pytest.raises(ValueError, match="one of the compiled step sizes"):
        speculative_generate(model, x, 4, tree="none", fast="compiled", step_tokens=4)
    with pytest.raises(ValueError, match="positive number of tokens"):
        speculative_generate(model, x, 4, tree="none", step_tokens=0)
    with pytest.raises(ValueError, match="every step holds 5 tokens"):
        speculative_generate(model, x, 12, drafter=_FixedChain(8), fast="compiled", step_tokens=5)
    with pytest.raises(ValueError, match="fast must be"):
        speculative_generate(model, x, 4, tree="none", fast="yes")


def test_a_padded_step_sees_the_prefix_its_tree_and_nothing_past_the_step():
    x0, L, width, cap = [7], [10], 12, 32
    draft = Draft([chain(2)], torch.tensor([[3, 4]]))
    step, pos, mask = _step_inputs(x0, draft, L, width, torch.device("cpu"), pad_to=4, capacity=cap)
    assert step.tolist() == [[7, 3, 4, 7, 7]] and pos.tolist() == [[10, 11, 12, 10, 10]]
    m = mask[0, 0]
    assert m.shape == (5, cap)
    assert m[:, :10].all() and not m[:, 10:width].any() and not m[:, width + 5:].any()   # junk slots unseen
    own = m[:, width: width + 5]
    assert own[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril())                  # the chain, causal
    assert own[3:].equal(torch.eye(5, dtype=torch.bool)[3:])                             # padding: itself only


def test_the_benchmark_reports_compilation_apart_from_decoding(monkeypatch):
    import multitoken.evaluation as E
    monkeypatch.setattr(E, "PRECOMPILE_LARGEST", 1)                # greedy steps only: one graph
    model = llama()
    prompts = [prompt(i, 12)[0] for i in range(2)]
    meths = [Method.hf("hf_greedy", model), Method.engine("greedy_kv", model, "none", baseline="hf_greedy"),
             Method.engine("compiled", model, "none", baseline="hf_greedy", fast="compiled")]
    rows, _ = benchmark_decoding(meths, prompts, 12, warmup=1, reference="greedy_kv")
    by = {r["method"]: r for r in rows}
    assert by["compiled"]["identical_to_greedy"] == 1.0
    assert by["greedy_kv"]["compile_s"] == 0 and by["hf_greedy"]["compile_s"] == 0
    assert by["compiled"]["compile_s"] >= 0 and "compile_s" in by["compiled"]


def test_heads_with_caches_of_their_own_decode_into_fixed_capacity_caches_too():
    """An MTP model with transformer heads keeps a cache per head beside the trunk's: every cache is a fixed-capacity
    one, masked alike."""
    from conftest import mtp
    model = mtp(head_type="transformer")
    x = torch.randint(2, 24, (1, 10), generator=torch.Generator().manual_seed(0))
    ref = speculative_generate(model, x, 20, tree="none", eos_token_id=-1)[0]
    assert torch.equal(speculative_generate(model, x, 20, tree="chain", fast="compiled", eos_token_id=-1)[0], ref)


@pytest.mark.parametrize("family", [llama, gpt2])
def test_exact_bf16_compiled_speculation_returns_the_compiled_greedy_token_for_token(family):
    """bf16, a compiled step: every step (greedy's too) runs the one graph of ``EXACT_STEP`` tokens, so speculation
    (a chain of 4 with rejections, prompt lookup, a MEDUSA-1 tree) returns what the compiled greedy decoding returns."""
    model = family(seed=1).to(torch.bfloat16)
    for i in range(2):
        x = prompt(i)
        greedy, _ = speculative_generate(model, x, 24, tree="none", fast="compiled")      # exact: the bf16 default
        spec, st = speculative_generate(model, x, 24, drafter=Known(greedy[0], 4), fast="compiled")
        assert torch.equal(spec, greedy), f"chain of 4, prompt {i}"
        assert st["mean_accepted_length"] > 1.5
        xx = torch.cat([x, x], 1)
        assert torch.equal(speculative_generate(model, xx, 24, drafter="prompt_lookup", fast="compiled")[0],
                           speculative_generate(model, xx, 24, tree="none", fast="compiled")[0]), f"lookup {i}"
    medusa = wrap_model_with_medusa(family(seed=1), num_medusa_heads=2).eval().to(torch.bfloat16)
    x = prompt(7)
    assert torch.equal(speculative_generate(medusa, x, 24, tree="medusa:4", fast="compiled")[0],
                       speculative_generate(medusa, x, 24, tree="none", fast="compiled")[0])


class Logged(Known):
    """:class:`Known`, keeping each step's history length and drafts."""

    def __init__(self, reference, depth):
        super().__init__(reference, depth)
        self.steps = []

    def propose_row(self, model, ctx, j, x0, history, limit):
        tree, toks = super().propose_row(model, ctx, j, x0, history, limit)
        self.steps.append((len(history), toks.tolist() if toks is not None else []))
        return tree, toks


@pytest.mark.parametrize("fast", [True, "compiled"])
def test_an_exact_step_computes_a_position_alike_wherever_it_sits_in_the_step(monkeypatch, fast):
    """bf16, exact (the default): every step of a row, greedy's included, has one shape (``EXACT_STEP`` tokens), and
    the logits of every committed position are bit-identical between the greedy decoding (each position at row 0 of
    its step) and a speculation that computed it as a draft at another row. Kernels may pick their algorithm by the
    row count (oneDNN's bf16 products do on SmolLM2 on an AVX-512 BF16 CPU): one shape for all is what makes the
    equality hold there."""
    from multitoken.core import fastpath
    model = llama(seed=2).to(torch.bfloat16)
    unembed_w = model.get_output_embeddings().weight
    x = prompt(8)
    rows, linear = [], fastpath.linear
    monkeypatch.setattr(fastpath, "linear", lambda m, h: rows.append(linear(m, h)) or rows[-1]
                        if m.weight is unembed_w else linear(m, h))
    greedy, _ = speculative_generate(model, x, 20, tree="none", fast=fast)
    assert len(rows) == 20 and all(r.shape[1] == EXACT_STEP for r in rows[1:])      # one shape every step
    ref = [r[0, 0] for r in rows[1:]]                    # step n: the position of new token n (rows[0]: the prefill)
    rows.clear()
    drafter = Logged(greedy[0], 4)
    assert torch.equal(speculative_generate(model, x, 20, drafter=drafter, fast=fast)[0], greedy)
    steps = rows[1:]
    assert len(steps) == len(drafter.steps) and all(r.shape[1] == EXACT_STEP for r in steps)
    hist, seen = greedy[0, x.shape[1]:].tolist(), 0
    for r, (h, toks) in zip(steps, drafter.steps):
        n = h - x.shape[1] - 1                           # the step's root is new token n
        for k in range(len(toks) + 1):                   # rows 0..k hold positions n..n+k while the drafts are right
            if k and toks[k - 1] != hist[n + k]:
                break
            assert torch.equal(r[0, k], ref[n + k]), f"position {n + k} at row {k}"
            seen += k > 0
    assert seen > 6                                      # positions met at rows other than 0


def _cache_counts():
    from torch._dynamo.utils import counters
    return {k: counters["inductor"][k] for k in ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")}


def _forget_compiled():
    """What a new process starts without: no graph in memory (the disk cache stays)."""
    compiled._STATES.clear()
    compiled._UNEMBED.clear()
    torch._dynamo.reset()


def test_a_later_process_loads_the_compiled_step_from_disk_and_other_weights_do_not(monkeypatch, tmp_path):
    """Frozen steps go to inductor's FX graph cache (their oneDNN-packed weights included), keyed by a digest of the
    weights: equal weights load the graph compiled before, weights of the same shapes but other values compile their
    own, and both decode what the eager engine decodes."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    _forget_compiled()
    assert compiled.persistent()
    x = prompt(9)

    def decode(model):
        before = _cache_counts()
        got = speculative_generate(model, x, 12, tree="none", fast="compiled")[0]
        assert torch.equal(got, speculative_generate(model, x, 12, tree="none")[0])
        return {k: v - before[k] for k, v in _cache_counts().items()}

    first = decode(llama(seed=0))
    assert first["fxgraph_cache_miss"] == 2 and first["fxgraph_cache_bypass"] == 0, first   # the step, the unembedding
    _forget_compiled()
    again = decode(llama(seed=0))
    assert again["fxgraph_cache_hit"] == 2 and again["fxgraph_cache_miss"] == 0, again
    _forget_compiled()
    other = decode(llama(seed=1))
    assert other["fxgraph_cache_miss"] == 2 and other["fxgraph_cache_hit"] == 0, other
    _forget_compiled()


def test_without_the_cache_hooks_steps_compile_in_every_process_and_decode_alike(monkeypatch):
    """Another PyTorch may lack the private hooks :func:`compiled.persistent` takes: it then says so (False) and
    changes nothing; the steps still compile and decode what the eager engine decodes."""
    monkeypatch.setattr(compiled, "PERSISTENT", [None])
    monkeypatch.setattr(compiled, "_HOOKS", ("CacheabilityValidator.check_tensor", "FxGraphCachePickler.no_such_hook"))
    assert compiled.persistent() is False and compiled.PERSISTENT == [False]
    _forget_compiled()
    model, x = llama(seed=3), prompt(10)
    assert torch.equal(speculative_generate(model, x, 12, tree="none", fast="compiled")[0],
                       speculative_generate(model, x, 12, tree="none")[0])
    _forget_compiled()
