#!/usr/bin/env bash
# make gpu-check: a ~10-minute GPU benchmark in one call (lib/multitoken/gpucheck.py says what it measures).
# GPU_PY: the Python to run it with (make gpu-check: the workbook's .venv; default here: python3, any Python with
# torch and CUDA). On a machine without a registry whose transformers is older than the pinned one, the wheels
# `make gpu-wheels` put in .whl/ (git-ignored) are installed into /tmp/site first.
# GPU_CHECK_DRY=1 runs the same check on the CPU at a toy size (make test does). OUT: the output folder.
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
