"""``scripts/upstream/run.sh`` -- how the upstream test files are run against zephyr_kernels
(kernels/README.md) -- on stand-in checkouts laid out as Liger-Kernel's and ml-cross-entropy's, whose test
files import exactly what the real ones import: the script rewrites those imports (and only them) to
``zephyr_kernels``, turns CCE's CUDA device and skip off, seeds CCE's CPU draws, runs ``torch.compile`` eagerly,
and leaves the checkout untouched."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "upstream" / "run.sh"

REPORT = """
import json, os
import torch

def report(**extra):
    names = {k: v for k, v in globals().items() if k in NAMES}
    out = {k: getattr(getattr(v, "__self__", v), "__module__") for k, v in names.items()}  # a bound apply: its class
    out["compile"] = "wrapped" if hasattr(torch.compile, "__wrapped__") else "plain"
    out.update(extra)
    with open(os.environ["ZF_UPSTREAM_OUT"], "a") as f:
        f.write(json.dumps(out) + "\\n")
"""

LIGER_DPO = """\
from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction
from liger_kernel.chunked_loss.functional import liger_fused_linear_dpo
NAMES = ("LigerFusedLinearDPOLoss", "LigerFusedLinearDPOFunction", "liger_fused_linear_dpo")
""" + REPORT + """
def test_names():
    report()
"""

LIGER_CE = """\
from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction
from liger_kernel.transformers.functional import CrossEntropyOutput
from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
NAMES = ("LigerFusedLinearCrossEntropyFunction", "CrossEntropyOutput", "liger_fused_linear_cross_entropy",
         "LigerFusedLinearCrossEntropyLoss")
""" + REPORT + """
def test_names():
    report()
"""

CCE = """\
import pytest
from cut_cross_entropy import linear_cross_entropy
from cut_cross_entropy.constants import IGNORE_INDEX
NAMES = ("linear_cross_entropy",)
""" + REPORT + """
skip_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Test requires CUDA")

@skip_no_cuda
def test_names():
    torch.cuda.manual_seed(0)
    report(draw=torch.randn(3, device="cuda").tolist(), ignore=IGNORE_INDEX)
"""


def _write(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _run(suite, checkout, tmp_path):
    out = tmp_path / "out.jsonl"
    before = {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()}
    r = subprocess.run(["bash", str(SCRIPT), suite, str(checkout)], capture_output=True, text=True,
                       env={**os.environ, "ZF_UPSTREAM_OUT": str(out)}, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()} == before  # the checkout untouched
    return [json.loads(line) for line in out.read_text().splitlines()], r.stdout


@pytest.mark.parametrize("suite", ["liger", "liger-modules"])
def test_liger_imports_are_rewritten(tmp_path, suite):
    checkout = _write(tmp_path / "Liger-Kernel", {"test/__init__.py": "", "test/chunked_loss/__init__.py": "",
                                                  "test/chunked_loss/test_dpo_loss.py": LIGER_DPO,
                                                  "test/transformers/test_fused_linear_cross_entropy.py": LIGER_CE})
    (dpo, ce), stdout = _run(suite, checkout, tmp_path)
    functions = {"LigerFusedLinearDPOFunction", "liger_fused_linear_dpo", "LigerFusedLinearCrossEntropyFunction"}
    for name, module in {**dpo, **ce}.items():
        if name == "compile":
            assert module == "wrapped"  # eager_compile plugin
        elif suite == "liger-modules" and name in functions:
            assert module.startswith("liger_kernel."), (name, module)
        else:
            assert module.startswith("zephyr_kernels."), (name, module)
    changed = [line for line in stdout.splitlines() if line.startswith(("+from", "-from"))]
    assert len(changed) == 2 * (7 if suite == "liger" else 4)  # each rewritten import: its - and + line


def test_cce_imports_device_skip_and_seed(tmp_path):
    import torch

    checkout = _write(tmp_path / "ml-cross-entropy", {
        "tests/test_cce_loss_forward.py": CCE, "tests/test_cce_loss_backward.py": CCE,
        "cut_cross_entropy/__init__.py": "linear_cross_entropy = 'CCE, not zephyr'\n",
        "cut_cross_entropy/constants.py": "IGNORE_INDEX = -100\n"})
    rows, _ = _run("cce", checkout, tmp_path)
    assert len(rows) == 2  # neither file skipped: skip_no_cuda is off
    torch.manual_seed(0)
    want = torch.randn(3).tolist()
    for row in rows:
        assert row["linear_cross_entropy"].startswith("zephyr_kernels.")
        assert row["compile"] == "wrapped" and row["ignore"] == -100  # CCE's own helpers still import
        assert row["draw"] == want  # torch.cuda.manual_seed(0) seeded the CPU draw


def test_a_wrong_checkout_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "cce", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"{tmp_path}: no tests/test_cce_loss_forward.py (is this a checkout of the right repository?)")
    r = subprocess.run(["bash", str(SCRIPT), "other", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("usage:")
