#!/usr/bin/env bash
# The README's test command: setup, then the CPU test suite (Triton kernels through the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python -m pytest tests -q -ra "$@"
