"""Triton helpers shared by the Triton backends (``triton_chunked``, ``triton_tiled``) and the block-sparse
gradient GEMMs (``triton_sparse``): the portable ``tanh`` of the logit soft-cap, whether the kernels run in the
CPU interpreter, and the matmul precision flags that follow from it.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``UPCAST`` converts operands to fp32 before ``tl.dot``: the
interpreter's bf16 dot is wrong.  On CUDA, bf16/fp16 operands go to ``tl.dot`` natively; fp32 operands (and the
interpreter's) use IEEE fp32 products (``IEEE``), not TF32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tanh from exp: portable across the CUDA backend and the interpreter (no libdevice).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def precision_flags(dtype: torch.dtype) -> dict:
    """``UPCAST`` / ``IEEE`` constexprs of a kernel whose ``tl.dot`` operands have ``dtype``."""
    up = interpreting()
    return dict(UPCAST=up, IEEE=up or dtype == torch.float32)
