#!/usr/bin/env bash
# The main job on a fresh machine: setup, then dSFT -> AIF (generate, judge with a locally served
# model, binarise) -> reference log-probs -> dDPO -> MT-Bench answers and grading on the bundled
# sample data with tiny Mistral-architecture models (CPU, or a GPU if present). Writes outputs/demo/
# (summary.json, demo.png, aif/, mt_bench/ with report.json + radar.png, the models). Extra args go
# to the demo (--fast: a smoke test). See docs/AIF.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python -m zephyr_fast.demo "$@"
