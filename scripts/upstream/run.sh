#!/usr/bin/env bash
# The anchors' own upstream test files against zephyr_kernels, with only the imports' package changed
# (kernels/README.md, "Drop-in compatibility"). Nothing of theirs is kept here: their files are copied
# into a temporary folder, rewritten there, run, and deleted.
#
#   bash scripts/upstream/run.sh liger          LIGER_CHECKOUT [pytest args]   # every Liger import -> zephyr_kernels
#   bash scripts/upstream/run.sh liger-modules  LIGER_CHECKOUT [pytest args]   # the modules only (Liger's Functions kept)
#   bash scripts/upstream/run.sh cce            CCE_CHECKOUT   [pytest args]   # also device="cuda" -> "cpu", skip_no_cuda off
#
# LIGER_CHECKOUT: linkedin/Liger-Kernel (its test/ folder; liger_kernel itself is the installed package);
# CCE_CHECKOUT: apple/ml-cross-entropy (its tests/ and cut_cross_entropy/, whose helpers the tests import).
# Runner plugins (this folder): eager_compile (torch.compile -> backend="eager"), cpu_seed (CCE's
# torch.cuda.manual_seed seeds the CPU generator when there is no CUDA).
set -euo pipefail
usage="usage: bash scripts/upstream/run.sh liger|liger-modules|cce CHECKOUT [pytest args]"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
suite=$1 src=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rewrite() {  # rewrite FILE SED_ARGS...: FILE under $work, edited in place; the change is printed
  local f=$1
  shift
  sed -i -E "$@" "$work/run/$f"
  diff -u "$work/orig/$f" "$work/run/$f" | grep -E '^[-+][^-+]' || true
}
need() {  # need FILE...: each FILE in the checkout, or one line and exit 2
  for f in "$@"; do
    [ -f "$src/$f" ] || { echo "$src: no $f (is this a checkout of the right repository?)" >&2; exit 2; }
  done
}
case $suite in
liger|liger-modules)
  files=(test/chunked_loss/test_dpo_loss.py test/transformers/test_fused_linear_cross_entropy.py)
  need "${files[@]}"
  mkdir -p "$work/orig" && cp -r "$src/test" "$work/orig/test" && cp -r "$work/orig" "$work/run"
  dpo=(-e 's/^from liger_kernel\.chunked_loss import LigerFusedLinearDPOLoss$/from zephyr_kernels import LigerFusedLinearDPOLoss/')
  ce=(-e 's/^from liger_kernel\.transformers\.functional import (CrossEntropyOutput|liger_fused_linear_cross_entropy)$/from zephyr_kernels import \1/'
      -e 's/^from liger_kernel\.transformers\.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss$/from zephyr_kernels import LigerFusedLinearCrossEntropyLoss/')
  if [ "$suite" = liger ]; then
    dpo+=(-e 's/^from liger_kernel\.chunked_loss\.dpo_loss import LigerFusedLinearDPOFunction$/from zephyr_kernels import LigerFusedLinearDPOFunction/'
          -e 's/^from liger_kernel\.chunked_loss\.functional import liger_fused_linear_dpo$/from zephyr_kernels import liger_fused_linear_dpo/')
    ce+=(-e 's/^from liger_kernel\.ops import LigerFusedLinearCrossEntropyFunction$/from zephyr_kernels import LigerFusedLinearCrossEntropyFunction/')
  fi
  rewrite "${files[0]}" "${dpo[@]}"
  rewrite "${files[1]}" "${ce[@]}"
  plugins=(-p eager_compile)
  ;;
cce)
  files=(tests/test_cce_loss_forward.py tests/test_cce_loss_backward.py)
  need "${files[@]}" cut_cross_entropy/__init__.py
  mkdir -p "$work/orig" && cp -r "$src/tests" "$src/cut_cross_entropy" "$work/orig/" && cp -r "$work/orig" "$work/run"
  for f in "${files[@]}"; do
    rewrite "$f" -e 's/^from cut_cross_entropy import linear_cross_entropy$/from zephyr_kernels import linear_cross_entropy/' \
      -e 's/device="cuda"/device="cpu"/g' \
      -e 's/^skip_no_cuda = pytest\.mark\.skipif\(not torch\.cuda\.is_available\(\)/skip_no_cuda = pytest.mark.skipif(False/'
  done
  plugins=(-p eager_compile -p cpu_seed)
  ;;
*)
  echo "$usage" >&2
  exit 2
  ;;
esac
cd "$work/run"
PYTHONPATH="$here:$work/run${PYTHONPATH:+:$PYTHONPATH}" python -m pytest "${plugins[@]}" -p no:cacheprovider -q \
  "${files[@]}" "$@"
