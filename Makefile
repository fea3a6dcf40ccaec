# The workbook's pipeline. Every target creates .venv/ itself when it is missing or requirements changed.
PROFILE ?= cpu
PY      := .venv/bin/python
STAMP   := .venv/.installed
KERNEL  := multitoken
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
OUTDIR  := runs/$(PROFILE)/notebooks
PAPERMILL = $(PY) -m papermill --cwd $(CURDIR) -k $(KERNEL) --log-output --progress-bar -f notebooks/params/$(PROFILE).yaml

.PHONY: all test notebook figures bench bench-train clean venv
all: $(STAMP)
	@mkdir -p $(OUTDIR)
	@set -e; for nb in $(NOTEBOOKS); do \
	  echo "== $$nb ($(PROFILE))"; \
	  $(PAPERMILL) $$nb $(OUTDIR)/$$(basename $$nb) || { echo "FAILED: $$nb (kept at $(OUTDIR)/$$(basename $$nb))"; exit 1; }; \
	done

venv: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (multitoken)" >/dev/null
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax --nbval-kernel-name $(KERNEL) -p no:cacheprovider $(NOTEBOOKS)

notebook: $(STAMP)
	@test -n "$(N)" || { echo "usage: make notebook N=01_train_ntp [PROFILE=cpu]"; exit 2; }
	@mkdir -p $(OUTDIR)
	$(PAPERMILL) notebooks/$(N).ipynb $(OUTDIR)/$(N).ipynb

figures: $(STAMP)
	$(PAPERMILL) notebooks/05_figures.ipynb $(OUTDIR)/05_figures.ipynb

bench: $(STAMP)
	$(PY) -m multitoken bench -f notebooks/params/$(PROFILE).yaml

bench-train: $(STAMP)
	$(PY) -m multitoken bench-train -f notebooks/params/$(PROFILE).yaml

clean:
	rm -rf runs/ .pytest_cache
