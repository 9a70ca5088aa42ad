#!/usr/bin/env bash
# One-shot setup on a fresh machine: pinned dependencies (torch 2.13.0 CPU from local disk where
# available), DeepSpeed without its CUDA op builds, and zephyr_fast in editable mode.
# Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if python -c "import zephyr_kernels, zephyr_fast, deepspeed, trl, liger_kernel, cut_cross_entropy, pytest_benchmark" 2>/dev/null \
   && [ "$(python -c 'import torch;print(torch.__version__.split("+")[0])')" = "2.13.0" ]; then
  exit 0
fi
export DS_BUILD_OPS=0
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .
