#!/usr/bin/env bash
# The main job on a fresh machine: setup, then dSFT -> reference log-probs -> dDPO -> MT-Bench
# generations on the bundled sample data with a tiny Mistral-architecture model (CPU, or a GPU if
# present). Writes outputs/demo/ (summary.json, demo.png, the models). Extra args go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python -m zephyr_fast.demo "$@"
