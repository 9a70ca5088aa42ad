#!/usr/bin/env bash
# zephyr_fast GPU check: bf16 correctness of every Triton kernel, then the full-size GPU benchmarks
# (fused LM head at N=8192 D=4096 V=32000/128256, ~1B Mistral packed vs padded + DPO step).
#
# On any CUDA machine with torch + triton + transformers (+ pytest, for its skip exception):
#     OUT=/path/to/results bash benchmarks/gpu_check.sh
# Here, without a GPU (tiny shapes, Triton interpreter — exercises every path up to the CUDA calls):
#     OUT=/tmp/gpu_smoke bash benchmarks/gpu_check.sh --cpu-smoke
# Nothing is installed or downloaded: the repo is put on PYTHONPATH (kernels/ as zephyr_kernels).
# Optional anchors: pure-Python wheels in ./.whl/ are installed to /tmp/site (no index, no deps) if
# that folder does not exist yet; /tmp/site is added to PYTHONPATH when present. Missing anchors are
# skipped with the reason. Finishes in < 8 minutes (global guard 450 s inside, hard timeout 480 s).
# Results in $OUT: gpu.json (for `python -m benchmarks.report benchmarks/results/latest.json gpu.json`),
# correctness.json, gpu_check.md (Markdown fragment), gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT="${OUT:-$REPO/benchmarks/results/gpu_check}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1

SHIM="$(mktemp -d)"
ln -s "$REPO/kernels" "$SHIM/zephyr_kernels"
if [ -d "$REPO/.whl" ] && [ ! -d /tmp/site ] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install --no-deps --no-index --target /tmp/site "$REPO"/.whl/*.whl >/dev/null 2>&1 \
    || echo "gpu_check: could not install .whl/ wheels; anchors that need them will be skipped"
fi
PYTHONPATH="$REPO:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/site ] && PYTHONPATH="$PYTHONPATH:/tmp/site"
export PYTHONPATH

if [[ " $* " == *" --cpu-smoke "* ]]; then
  export TRITON_INTERPRET=1   # Triton kernels run through the CPU interpreter (tiny shapes only)
else
  unset TRITON_INTERPRET      # never time the interpreter on a GPU
fi

timeout 480 python3 -m benchmarks.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
rm -rf "$SHIM"
echo "gpu_check: exit $rc; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
