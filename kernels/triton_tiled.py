"""``impl="triton_tiled"``: fully tiled Triton kernels for the fused LM head: an online-log-sum-exp statistics pass and a gradient pass.

Neither kernel writes ``(N, V)`` logits.  Rows arrive through ``order`` — a permutation that puts
the non-ignored rows first — and ``n_valid`` is read *on the device*, so programs whose row block
lies past it exit before any matmul work and no host sync is needed to compact.

* ``_stats_kernel`` — grid ``(cdiv(N, BLOCK_N),)``: each program sweeps every vocab tile of its
  row block, computing ``z = x W^T (+ b)``, softcap and temperature, and keeps a running max /
  sum (online log-sum-exp), the target logit and optionally ``Σ_v z``.  Token log-probs are
  written per row and summed per segment with fp32 atomics.
* ``_grad_kernel`` — grid ``(cdiv(N, BLOCK_N), cdiv(V, BLOCK_V))``: recomputes one logit tile,
  forms ``dz = A·p + B·onehot + C`` (with the softcap / temperature chain rule), and accumulates
  ``dX += dz W`` and ``dW += dz^T X`` in fp32 with atomics, ``BLOCK_D`` columns at a time.

``UPCAST`` / ``IEEE`` (the interpreter's fp32 operands, exact fp32 products): :mod:`zephyr_kernels.triton_common`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zephyr_kernels.backend_common import Stats
from zephyr_kernels.triton_common import interpreting, precision_flags, tanh


@triton.jit
def _row_block(ORDER, start, n_valid, BLOCK_N: tl.constexpr):
    """Original row indices (int64) of compacted rows ``start .. start+BLOCK_N`` and their mask."""
    offs = start + tl.arange(0, BLOCK_N)
    row_mask = offs < n_valid
    return tl.load(ORDER + offs, mask=row_mask, other=0).to(tl.int64), row_mask


@triton.jit
def _logit_tile(
    H, W, Bias, rows, row_mask, cols, col_mask, D, stride_h, stride_w, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Returns ``(z, th)``: transformed logits ``(BLOCK_N, BLOCK_V)`` fp32 and tanh values (softcap)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        h = tl.load(H + rows[:, None] * stride_h + dd[None, :], mask=row_mask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + dd[None, :], mask=col_mask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:  # fp32 inputs: exact fp32 products, not TF32
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    th = acc
    if SOFTCAP:
        th = tanh(acc / softcap)
        acc = th * softcap
    return acc * inv_temp, th


@triton.jit
def _stats_kernel(
    H, W, Bias, T, ORDER, NVALID, LSE, TGT, ZSUM, LOGP, SEG, SEGOUT,
    V, D, S, stride_h, stride_w, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ZSUM: tl.constexpr, HAS_SEG: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_valid = tl.load(NVALID)
    start = tl.program_id(0) * BLOCK_N
    if start < n_valid:
        rows, row_mask = _row_block(ORDER, start, n_valid, BLOCK_N)
        tgt = tl.load(T + rows, mask=row_mask, other=0)
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        tz = tl.zeros((BLOCK_N,), tl.float32)
        zs = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            col_mask = cols < V
            z, th = _logit_tile(
                H, W, Bias, rows, row_mask, cols, col_mask, D, stride_h, stride_w, inv_temp, softcap,
                HAS_BIAS, SOFTCAP, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_D,
            )
            z = tl.where(col_mask[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
            m = m_new
            tz += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
            if HAS_ZSUM:
                zs += tl.sum(tl.where(col_mask[None, :], z, 0.0), 1)
        lse = m + tl.log(s)
        logp = tz - lse
        tl.store(LSE + rows, lse, mask=row_mask)
        tl.store(TGT + rows, tz, mask=row_mask)
        tl.store(LOGP + rows, logp, mask=row_mask)
        if HAS_ZSUM:
            tl.store(ZSUM + rows, zs, mask=row_mask)
        if HAS_SEG:
            seg = tl.load(SEG + rows, mask=row_mask, other=0)
            # out-of-range ids are dropped rather than written out of bounds
            tl.atomic_add(SEGOUT + seg, logp, mask=row_mask & (seg >= 0) & (seg < S))


@triton.jit
def _grad_kernel(
    H, W, Bias, T, ORDER, NVALID, LSE, CA, CB, CC, DX, DW, DB,
    V, D, stride_h, stride_w, inv_temp, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_C: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_valid = tl.load(NVALID)
    start = tl.program_id(0) * BLOCK_N
    if start < n_valid:
        rows, row_mask = _row_block(ORDER, start, n_valid, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z, th = _logit_tile(
            H, W, Bias, rows, row_mask, cols, col_mask, D, stride_h, stride_w, inv_temp, softcap,
            HAS_BIAS, SOFTCAP, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
        tgt = tl.load(T + rows, mask=row_mask, other=0)
        a = tl.load(CA + rows, mask=row_mask, other=0.0)
        b = tl.load(CB + rows, mask=row_mask, other=0.0)
        p = tl.exp(z - lse[:, None])
        dz = a[:, None] * p + tl.where(cols[None, :] == tgt[:, None], b[:, None], 0.0)
        if HAS_C:
            dz += tl.load(CC + rows, mask=row_mask, other=0.0)[:, None]
        dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0) * inv_temp
        if SOFTCAP:
            dz = dz * (1.0 - th * th)
        if COMPUTE_DB:
            tl.atomic_add(DB + cols, tl.sum(dz, 0), mask=col_mask)
        if UPCAST:
            dzc = dz
        else:
            dzc = dz.to(H.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            if COMPUTE_DX:
                w = tl.load(W + cols[:, None] * stride_w + dd[None, :], mask=col_mask[:, None] & dmask[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                if IEEE:
                    dx = tl.dot(dzc, w, input_precision="ieee")
                else:
                    dx = tl.dot(dzc, w)
                tl.atomic_add(DX + rows[:, None] * D + dd[None, :], dx, mask=row_mask[:, None] & dmask[None, :])
            if COMPUTE_DW:
                h = tl.load(H + rows[:, None] * stride_h + dd[None, :], mask=row_mask[:, None] & dmask[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                if IEEE:
                    dw = tl.dot(tl.trans(dzc), h, input_precision="ieee")
                else:
                    dw = tl.dot(tl.trans(dzc), h)
                tl.atomic_add(DW + cols[:, None] * D + dd[None, :], dw, mask=col_mask[:, None] & dmask[None, :])


def _blocks(V: int, D: int):
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps): H100-sized tiles, tiny ones for the interpreter."""
    if interpreting():
        # numpy executes each tile op; wide vocab tiles keep the python loop short for V > 64k
        return 16, (64 if V <= 4096 else 1024), 16, 1
    return 64, 128, 64, 8


def _compact(targets, ignore_index):
    """Stable permutation with valid rows first, and their count as a device tensor (no sync)."""
    ignored = (targets == ignore_index).to(torch.int8)
    order = torch.argsort(ignored, stable=True).to(torch.int32)
    n_valid = (ignored.numel() - ignored.sum(dtype=torch.int32)).reshape(1)
    return order, n_valid


def _flags(hidden, bias, softcap):
    return dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, **precision_flags(hidden.dtype))


def stats(hidden, weight, bias, targets, *, ignore_index, temperature, softcap, need_zsum=False,
          segment_ids=None, num_segments=None):
    """Returns ``(lse, tgt, zsum, logp, seg)`` — all fp32, 0 on ignored rows; ``seg (S,)`` or None."""
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, tgt, logp = (torch.zeros(N, **f32) for _ in range(3))
    zsum = torch.zeros(N, **f32) if need_zsum else lse
    has_seg = segment_ids is not None
    seg = torch.zeros(num_segments, **f32) if has_seg else lse
    order, n_valid = _compact(targets, ignore_index)
    bn, bv, bd, warps = _blocks(V, D)
    if N:
        _stats_kernel[(triton.cdiv(N, bn),)](
            hidden, weight, bias if bias is not None else lse, targets, order, n_valid,
            lse, tgt, zsum, logp, segment_ids if has_seg else targets, seg,
            V, D, num_segments if has_seg else 0, hidden.stride(0), weight.stride(0), 1.0 / temperature, float(softcap or 1.0),
            HAS_ZSUM=need_zsum, HAS_SEG=has_seg, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd,
            num_warps=warps, **_flags(hidden, bias, softcap),
        )
    return Stats(lse, tgt, zsum if need_zsum else None, logp, seg if has_seg else None)


def grads(hidden, weight, bias, targets, lse, A, B, C=None, *, ignore_index, temperature, softcap,
          need_dx=True, need_dw=True, need_db=False, stats=None):
    """Gradient pass: fp32 ``dx (N, D)``, ``dw (V, D)``, ``db (V,)`` (None where not requested)."""
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dx = torch.zeros(N, D, **f32) if need_dx else None
    dw = torch.zeros(V, D, **f32) if need_dw else None
    db = torch.zeros(V, **f32) if need_db else None
    order, n_valid = _compact(targets, ignore_index)
    bn, bv, bd, warps = _blocks(V, D)
    if N and (need_dx or need_dw or need_db):
        _grad_kernel[(triton.cdiv(N, bn), triton.cdiv(V, bv))](
            hidden, weight, bias if bias is not None else lse, targets, order, n_valid, lse,
            A.float().contiguous(), B.float().contiguous(), (C if C is not None else A).float().contiguous(),
            dx if need_dx else lse, dw if need_dw else lse, db if need_db else lse,
            V, D, hidden.stride(0), weight.stride(0), 1.0 / temperature, float(softcap or 1.0),
            HAS_C=C is not None, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps, **_flags(hidden, bias, softcap),
        )
    return dx, dw, db


def fused(hidden, weight, bias, targets, *, ignore_index, temperature, softcap, need_zsum=False,
          coef_fn=None, need_dx=False, need_dw=False, need_db=False):
    """Same contract as :func:`zephyr_kernels.torch_chunked.fused`: stats pass, coefficients, grad pass."""
    lse, tgt, zsum, *_ = stats(hidden, weight, bias, targets, ignore_index=ignore_index,
                                 temperature=temperature, softcap=softcap, need_zsum=need_zsum)
    dx = dw = db = None
    if coef_fn is not None:
        A, B, C = coef_fn(slice(None), lse, zsum)
        dx, dw, db = grads(hidden, weight, bias, targets, lse, A, B, C, ignore_index=ignore_index,
                           temperature=temperature, softcap=softcap,
                           need_dx=need_dx, need_dw=need_dw, need_db=need_db)
    return lse, tgt, zsum, dx, dw, db
