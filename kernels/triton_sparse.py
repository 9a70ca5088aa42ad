"""Block-sparse gradient GEMMs for the CUDA chunked path: ``dX = dz W`` and ``dW = dzᵀ h`` that skip
the tiles of ``dz`` holding nothing but zeros (CCE-style gradient filtering, Wijmans et al. 2024,
arXiv:2411.09009).

With a trained model's softmax almost every probability lies below ``ε = u / V`` (``u`` the unit
roundoff of the input dtype); together such entries of a row add up to at most ``u`` relative to
its gradient, below that gradient's own rounding.  The epilogue that forms ``dz``
(``triton_chunked._row_grad_kernel`` with ``FILTER``) writes them as exact zeros and raises a flag
for every ``(BLOCK_M rows × BLOCK_K columns)`` tile of ``dz`` that keeps a non-zero — the target
column always does.  The two GEMMs here then run only over flagged tiles, so their cost follows the
softmax's support instead of ``rows × V``; on a flat softmax every tile is flagged and they are
ordinary tiled GEMMs.  The flags live on the device: nothing is read back (no host sync).

Shapes: ``dz: (M, K)`` in the input dtype (``K`` = the columns of one logits block), ``flags:
(cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)) int32``, ``w: (K, D)``, ``h: (M, D)``; outputs are written or
accumulated (``ACCUMULATE``) in their own dtype from an fp32 accumulator.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from zephyr_kernels.triton_common import interpreting, precision_flags


def tiles() -> tuple:
    """``(BLOCK_M, BLOCK_K, BLOCK_D, num_warps)``: the flag tile (rows × columns) and the output width.

    ``ZEPHYR_KERNELS_SPARSE_TILES="M,K,D,warps"`` overrides (the GPU check sweeps it)."""
    env = os.environ.get("ZEPHYR_KERNELS_SPARSE_TILES")
    if env:
        m, k, d, w = (int(x) for x in env.split(","))
        return m, k, d, w
    if interpreting():
        return 16, 64, 32, 1
    return 64, 64, 128, 4


@triton.jit
def _mma(a, b, acc, TRANS_A: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``acc + op(a) @ b`` with ``op`` = transpose when ``TRANS_A``; fp32 products for fp32 inputs (IEEE)
    and for the interpreter (UPCAST: its bf16 dot is wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if TRANS_A:
        a = tl.trans(a)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _dx_kernel(
    DZ, stride_dz, W, stride_w, OUT, stride_o, FLAGS, n_kt, M, K, D,
    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``OUT[M, D] (+)= DZ[M, K] @ W[K, D]`` over the flagged ``(BLOCK_M, BLOCK_K)`` tiles of DZ."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    rmask, dmask = rows < M, dd < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for kt in range(0, n_kt):
        if tl.load(FLAGS + pid_m * n_kt + kt) != 0:
            ks = kt * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
            kmask = ks < K
            a = tl.load(DZ + rows[:, None] * stride_dz + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(W + ks[:, None] * stride_w + dd[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
            acc = _mma(a, b, acc, False, UPCAST, IEEE)
    ptr = OUT + rows[:, None] * stride_o + dd[None, :]
    omask = rmask[:, None] & dmask[None, :]
    if ACCUMULATE:
        acc += tl.load(ptr, mask=omask, other=0.0).to(tl.float32)
    tl.store(ptr, acc.to(OUT.dtype.element_ty), mask=omask)


@triton.jit
def _dw_kernel(
    DZ, stride_dz, H, stride_h, OUT, stride_o, FLAGS, n_kt, n_mt, M, K, D,
    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``OUT[K, D] (+)= DZ[M, K]ᵀ @ H[M, D]`` over the flagged ``(BLOCK_M, BLOCK_K)`` tiles of DZ."""
    pid_k = tl.program_id(0)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    kmask, dmask = ks < K, dd < D
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for mt in range(0, n_mt):
        if tl.load(FLAGS + mt * n_kt + pid_k) != 0:
            rows = mt * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
            rmask = rows < M
            a = tl.load(DZ + rows[:, None] * stride_dz + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(H + rows[:, None] * stride_h + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            acc = _mma(a, b, acc, True, UPCAST, IEEE)
    ptr = OUT + ks[:, None] * stride_o + dd[None, :]
    omask = kmask[:, None] & dmask[None, :]
    if ACCUMULATE:
        acc += tl.load(ptr, mask=omask, other=0.0).to(tl.float32)
    tl.store(ptr, acc.to(OUT.dtype.element_ty), mask=omask)


def new_flags(rows: int, cols: int, device) -> torch.Tensor:
    """Zeroed ``(cdiv(rows, BLOCK_M), cdiv(cols, BLOCK_K)) int32`` tile flags for one logits block."""
    bm, bk, _, _ = tiles()
    return torch.zeros(triton.cdiv(rows, bm), triton.cdiv(cols, bk), dtype=torch.int32, device=device)


def dx(dz: torch.Tensor, w: torch.Tensor, flags: torch.Tensor, out: torch.Tensor, *, accumulate: bool) -> torch.Tensor:
    """``out (M, D) (+)= dz (M, K) @ w (K, D)`` skipping unflagged tiles; returns ``out``."""
    (M, K), D = dz.shape, w.shape[1]
    bm, bk, bd, warps = tiles()
    if M and D:
        _dx_kernel[(triton.cdiv(M, bm), triton.cdiv(D, bd))](
            dz, dz.stride(0), w, w.stride(0), out, out.stride(0), flags, flags.shape[1], M, K, D,
            ACCUMULATE=accumulate, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, num_warps=warps, **precision_flags(dz.dtype),
        )
    return out


def dw(dz: torch.Tensor, h: torch.Tensor, flags: torch.Tensor, out: torch.Tensor, *, accumulate: bool) -> torch.Tensor:
    """``out (K, D) (+)= dzᵀ (K, M) @ h (M, D)`` skipping unflagged tiles; returns ``out``."""
    (M, K), D = dz.shape, h.shape[1]
    bm, bk, bd, warps = tiles()
    if K and D:
        _dw_kernel[(triton.cdiv(K, bk), triton.cdiv(D, bd))](
            dz, dz.stride(0), h, h.stride(0), out, out.stride(0), flags, flags.shape[1], flags.shape[0], M, K, D,
            ACCUMULATE=accumulate, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, num_warps=warps, **precision_flags(dz.dtype),
        )
    return out
