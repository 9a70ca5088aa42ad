"""kernels/ layout (issue 22): backends named after the impl they serve, shared helpers in their own modules (no
backend imports another backend or anyone's private helper), the oracle beside the tests, a small public API."""

import ast
import importlib
import pathlib

import pytest

import zephyr_kernels
from zephyr_kernels import dispatch

KERNELS = pathlib.Path(zephyr_kernels.__file__).parent
BACKENDS = {"torch": "torch_chunked", "triton": "triton_chunked", "triton_tiled": "triton_tiled"}


def _imports(path):
    """``[(module, [names])]`` of the ``zephyr_kernels`` imports in ``path`` (``import zephyr_kernels.x`` too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zephyr_kernels"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("zephyr_kernels")]
    return out


def test_every_impl_has_the_backend_named_after_it():
    assert set(BACKENDS) == set(dispatch.IMPLS) - {"auto"}
    assert dispatch.backend("torch", "cpu").__name__ == "zephyr_kernels.torch_chunked"
    assert {k: v.rsplit(".", 1)[1] for k, v in dispatch._TRITON_MODULES.items()} == {
        k: v for k, v in BACKENDS.items() if k != "torch"}
    for module in BACKENDS.values():
        assert (KERNELS / f"{module}.py").is_file(), module


def test_no_private_helper_or_backend_crosses_modules():
    for path in sorted(KERNELS.glob("*.py")):
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{path.name} imports private {private} from {module}"
            if path.stem in BACKENDS.values():  # a backend uses the shared modules, never another backend
                others = {f"zephyr_kernels.{b}" for b in BACKENDS.values()} - {f"zephyr_kernels.{path.stem}"}
                imported = {module} | {f"{module}.{n}" for n in names}
                assert not imported & others, f"{path.name} imports {imported & others}"


def test_the_oracle_lives_beside_the_tests():
    assert not (KERNELS / "reference.py").exists()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("zephyr_kernels.reference")
    from tests.kernels import oracle

    assert callable(oracle.reference_linear_logprobs) and callable(oracle.reference_cross_entropy)


def test_public_api_is_the_losses_the_drop_ins_and_the_patches():
    assert sorted(zephyr_kernels.__all__) == sorted([
        "linear_logprobs", "linear_cross_entropy", "dpo_loss", "fused_linear_dpo_loss", "FusedLinearDPOLoss",
        "LigerFusedLinearCrossEntropyLoss", "liger_fused_linear_cross_entropy", "CrossEntropyOutput",
        "LigerFusedLinearCrossEntropyFunction", "LigerFusedLinearDPOLoss", "LigerFusedLinearDPOFunction",
        "liger_fused_linear_dpo", "patch", "patch_trl", "IMPLS", "LOSS_TYPES", "check_dpo_args"])
    for name in ("FusedLinearCrossEntropyLoss", "LigerCompatibleFusedLinearDPOLoss", "CCE_IMPLS", "resolve"):
        assert not hasattr(zephyr_kernels, name), name
