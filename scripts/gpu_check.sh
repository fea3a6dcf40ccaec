#!/usr/bin/env bash
# make gpu-check: the GPU measurement in one call (lib/multitoken/gpucheck.py says what it measures).
# On a lent GPU (the device tool): python3 there has torch + CUDA but an older transformers and no registry, so the
# wheels `make gpu-wheels` put in .whl/ (git-ignored, carried with the tree) are installed into /tmp/site first.
# Here, on the CPU: GPU_CHECK_DRY=1 runs the same check at a toy size with the venv's python (make test does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "${GPU_CHECK_DRY:-0}" != 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=lib:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
set -o pipefail
"$PY" -m multitoken.gpucheck --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
