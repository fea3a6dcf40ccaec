"""What a second process pays to compile the engine's steps: run it twice with the same inductor cache directory.

    TORCHINDUCTOR_CACHE_DIR=/tmp/multitoken_inductor .venv/bin/python scripts/compile_cache.py   # cold
    TORCHINDUCTOR_CACHE_DIR=/tmp/multitoken_inductor .venv/bin/python scripts/compile_cache.py   # warm

Each run decodes one GSM8K-like prompt of the installed SmolLM2 (fp32) with the compiled step, greedy and prompt
lookup of 4 tokens (the 1- and 5-token graphs and the unembedding), and prints the seconds spent compiling, whether
both decodings agree, and inductor's FX graph cache counters: on a CPU the frozen graphs hold weights packed by
oneDNN, which the cache cannot store (its bypass reason: "mkldnn tensors unpickleable"), so only the generated C++
kernels and the autotuning choices are found again."""
import json
import time

import torch
from torch._dynamo.utils import counters

from multitoken.core import compiled as C
from multitoken.core.pretrained import load
from multitoken.decoding import speculative_generate

t0 = time.perf_counter()
torch.set_num_threads(2)
model, tok = load("smollm2-135m-instruct")
model.eval()
ids = tok("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
          return_tensors="pt").input_ids
with torch.no_grad():
    lookup, _ = speculative_generate(model, ids, 16, drafter="prompt_lookup:4", fast="compiled")
    greedy, _ = speculative_generate(model, ids, 16, fast="compiled")
fx = {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")}
print(json.dumps(dict(compile_s=round(C.COMPILE_S[0], 1), process_s=round(time.perf_counter() - t0, 1),
                      same=bool(torch.equal(lookup, greedy)), fx_graph_cache=fx)))
