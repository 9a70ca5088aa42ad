#!/usr/bin/env bash
# One-shot setup on a fresh machine: pinned dependencies (torch 2.13.0 CPU from local disk where
# available), DeepSpeed without its CUDA op builds, and zephyr_fast in editable mode.
# Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# Skip only when everything is installed AND the editable install points at *this* checkout
# (another clone's editable install would otherwise be tested instead of this one).
here="$(pwd -P)"
if [ "$(cd / && python -c 'import zephyr_kernels, zephyr_fast, deepspeed, trl, liger_kernel, cut_cross_entropy, pytest_benchmark, tensorboard, lm_eval, torch, os, importlib.util; assert importlib.util.find_spec("alpaca_eval")
print(torch.__version__.split("+")[0], os.path.dirname(os.path.realpath(zephyr_kernels.__file__)), os.path.dirname(os.path.realpath(zephyr_fast.__file__)))' 2>/dev/null | tail -n 1)" \
   = "2.13.0 $here/kernels $here/zephyr_fast" ]; then
  exit 0
fi
export DS_BUILD_OPS=0
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .
