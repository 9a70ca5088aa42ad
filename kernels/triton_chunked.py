"""``impl="triton"``, the CUDA fast path: cuBLAS GEMMs over row chunks + fused Triton epilogues, in a bounded workspace.

The fully tiled kernels in :mod:`zephyr_kernels.triton_tiled` hold no workspace at all, but their
backward accumulates ``dX`` and ``dW`` with fp32 atomics from every (row block × vocab block) tile,
which measured 34 TFLOP/s on an H200 (N=8192, D=4096, V=32000 bf16) against ~600 for cuBLAS.  This
backend keeps the property that matters — the ``(N, V)`` logits never exist — while letting
tensor-core GEMMs do the matmul work:

* rows are taken in place, ``c`` at a time (views, no gathered copies), where ``c · V`` fp32 logits
  (plus their low-precision gradient copy) fit in ``ZEPHYR_KERNELS_WORKSPACE_BYTES`` (128 MiB by
  default); no host sync: the epilogue kernels recognise an ignored row by its target on the device
  and write zeros for it, so one fwd+bwd call can be captured in a CUDA graph.  Ignored rows
  therefore still cost GEMM work here; the trainer hands over compacted rows (host-known indices
  from packing), so in training there are none;
* ``z = h_c W^T (+ b)`` is one cuBLAS GEMM into that workspace, written in fp32;
* ``_row_stats_kernel`` reads the chunk once: online log-sum-exp of the transformed logits
  (softcap, temperature), the target logit, and optionally ``Σ_v z``;
* ``_row_grad_kernel`` turns the chunk into ``dL/dz = (A·p + B·onehot + C)·chain`` in the input
  dtype (the GEMM operand for the two products below);
* ``dX_c = dz W`` and ``dW += dz^T h_c`` are two more GEMMs (fp32 output for ``dW`` so the
  accumulation over chunks is not rounded to bf16).

Cross-entropy therefore costs 3 GEMMs (gradients in the forward), DPO / generic backward 4.  With
``ZEPHYR_KERNELS_FILTER=1`` the gradient epilogue drops probabilities below ``u / V`` and flags the
tiles of ``dz`` that keep a non-zero; ``dX`` and ``dW`` then run as block-sparse Triton GEMMs over
those tiles only (:mod:`zephyr_kernels.triton_sparse`).  The
same code runs on CPU tensors under ``TRITON_INTERPRET=1`` (tests), with torch's CPU matmul.
Same contract (``stats`` / ``grads`` / ``fused``, :mod:`zephyr_kernels.backend_common`) as
:mod:`zephyr_kernels.torch_chunked`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from zephyr_kernels import triton_sparse
from zephyr_kernels.backend_common import Stats, alloc_grads, filter_eps, token_and_segment_logps
from zephyr_kernels.triton_common import interpreting, tanh

_WORKSPACE_BYTES = int(os.environ.get("ZEPHYR_KERNELS_WORKSPACE_BYTES", 128 << 20))
# gradient filtering (triton_sparse): off until the GPU check has measured it against the dense GEMMs
_FILTER = os.environ.get("ZEPHYR_KERNELS_FILTER", "0") == "1"
# row chunks up to which cross-entropy takes the single pass (3 GEMMs, dW accumulated per chunk)
_SINGLE_PASS_CHUNKS = 4


@triton.jit
def _row_stats_kernel(
    Z, stride_z, T, LSE, TGT, ZSUM, ignore_index, V, inv_temp, softcap,
    SOFTCAP: tl.constexpr, HAS_ZSUM: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # an ignored row (decided on the device from its target: no host sync) gets zeros
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row)
    if t == ignore_index:
        tl.store(LSE + row, 0.0)
        tl.store(TGT + row, 0.0)
        if HAS_ZSUM:
            tl.store(ZSUM + row, 0.0)
        return
    z_row = Z + row * stride_z
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    zs = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            z = softcap * tanh(z / softcap)
        z = z * inv_temp
        if HAS_ZSUM:
            zs += tl.sum(tl.where(mask, z, 0.0), 0)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    zt = tl.load(z_row + t, mask=(t >= 0) & (t < V), other=0.0).to(tl.float32)  # out of range: no target logit
    if SOFTCAP:
        zt = softcap * tanh(zt / softcap)
    tl.store(LSE + row, m + tl.log(s))
    tl.store(TGT + row, zt * inv_temp)
    if HAS_ZSUM:
        tl.store(ZSUM + row, zs)


@triton.jit
def _row_grad_kernel(
    Z, stride_z, DZ, T, LSE, CA, CB, CC, ignore_index, V, col0, inv_temp, softcap,
    FLAGS, n_kt, flag_rows, eps,
    SOFTCAP: tl.constexpr, HAS_C: tl.constexpr, FILTER: tl.constexpr, FLAG_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Z holds vocab columns [col0, col0 + V) of each row: the whole vocabulary in a row chunk, or
    # one vocab slice of every row in the vocab-tiled gradient pass.  FILTER: probabilities below
    # eps become exact zeros and every (flag_rows x FLAG_K) tile of dz keeping a non-zero is flagged
    # in FLAGS (see triton_sparse).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    t = tl.load(T + row)
    if t == ignore_index:  # an ignored row: no gradient
        tl.store(DZ + row * stride_z + cols, tl.zeros((BLOCK_V,), tl.float32).to(DZ.dtype.element_ty), mask=mask)
        return
    ptr = Z + row * stride_z + cols
    z = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        th = tanh(z / softcap)
        z = softcap * th
    p = tl.exp(z * inv_temp - tl.load(LSE + row))
    if FILTER:
        p = tl.where(p < eps, 0.0, p)
    dz = tl.load(CA + row) * p + tl.where(cols + col0 == t, tl.load(CB + row), 0.0)
    if HAS_C:
        dz += tl.load(CC + row)
    dz = dz * inv_temp
    if SOFTCAP:
        dz = dz * (1.0 - th * th)
    # DZ is the GEMM operand for dX / dW, in the input dtype (may alias Z when that is fp32)
    tl.store(DZ + row * stride_z + cols, dz.to(DZ.dtype.element_ty), mask=mask)
    if FILTER:
        nz = tl.max(tl.reshape(tl.where(mask & (dz != 0.0), 1, 0), (BLOCK_V // FLAG_K, FLAG_K)), 1)
        kt = tl.program_id(1) * (BLOCK_V // FLAG_K) + tl.arange(0, BLOCK_V // FLAG_K)
        tl.atomic_max(FLAGS + (row // flag_rows) * n_kt + kt, nz, mask=(kt < n_kt) & (nz > 0))


def _block_v(V: int) -> int:
    if interpreting():
        return min(triton.next_power_of_2(V), 1024)
    return min(triton.next_power_of_2(V), 4096)


def _chunk_rows(width: int, dtype: torch.dtype) -> int:
    """Rows of ``width`` columns that fit the workspace (at least 16): fp32 logits plus, for
    low-precision inputs, their ``dz`` copy in the input dtype."""
    per = 4 + (0 if dtype == torch.float32 else torch.empty((), dtype=dtype).element_size())
    return max(16, _WORKSPACE_BYTES // (max(width, 1) * per))


def _chunks(N, V, dtype):
    c = _chunk_rows(V, dtype)
    for i in range(0, N, c):
        yield i, min(N, i + c)


def _logits(h, weight, bias):
    """``(c, V)`` raw fp32 logits: the GEMM accumulates in fp32 and we keep that precision (a bf16
    workspace would round every logit by up to 2^-8 relative: ~1e-2 on a log-prob)."""
    z = _mm32(h, weight.t())
    if bias is not None:
        z += bias.float()
    return z


@functools.lru_cache(maxsize=None)
def _has_out_dtype_mm(device_type: str) -> bool:
    if device_type != "cuda":
        return False
    try:
        a = torch.zeros(2, 2, device="cuda", dtype=torch.bfloat16)
        out = torch.zeros(2, 2, device="cuda")
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        return True
    except (RuntimeError, TypeError):
        return False


def _acc_mm(out32, a, b):
    """``out32 += a @ b`` accumulated in fp32 without a full-size low-precision temporary."""
    if a.dtype == torch.float32:
        out32.addmm_(a, b)
    elif _has_out_dtype_mm(a.device.type):
        torch.addmm(out32, a, b, out_dtype=torch.float32, out=out32)
    else:
        out32.add_(a @ b)


def _mm32(a, b):
    if a.dtype == torch.float32:
        return a @ b
    if _has_out_dtype_mm(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _launch_stats(z, t, ignore_index, temperature, softcap, lse, tgt, zsum):
    """Row statistics of an fp32 logits block ``z (c, V)`` with targets ``t (c,)``, written into the
    ``(c,)`` fp32 slices ``lse``, ``tgt`` and ``zsum`` (or None); ignored rows get zeros."""
    c, V = z.shape
    if c:
        _row_stats_kernel[(c,)](
            z, z.stride(0), t, lse, tgt, zsum if zsum is not None else lse, ignore_index, V, 1.0 / temperature,
            float(softcap or 1.0), SOFTCAP=softcap is not None, HAS_ZSUM=zsum is not None, BLOCK_V=_block_v(V),
            num_warps=8,
        )


def _launch_grad(z, t, lse, A, B, C, ignore_index, temperature, softcap, dtype, col0=0, flags=None, eps=0.0):
    """``dL/dz`` of an fp32 logits block, returned in ``dtype`` (in place when that is fp32).

    With ``flags`` (:func:`triton_sparse.new_flags` of the block) the probabilities below ``eps``
    are dropped and the tiles of ``dz`` that keep a non-zero are flagged (no ``C`` allowed)."""
    c, V = z.shape
    # The interpreter's fp32 -> bf16 store truncates where CUDA rounds to nearest even; there the
    # kernel writes fp32 and torch does the (correctly rounded) cast, so tests see GPU numerics.
    cast_after = dtype != torch.float32 and interpreting()
    dz = z if dtype == torch.float32 or cast_after else torch.empty(z.shape, dtype=dtype, device=z.device)
    flag_rows, flag_k, _, _ = triton_sparse.tiles()
    if flags is not None and C is not None:
        raise ValueError("gradient filtering needs C = 0 (a dense C term reaches every column)")
    if c:
        bv = max(_block_v(V), flag_k) if flags is not None else _block_v(V)
        _row_grad_kernel[(c, triton.cdiv(V, bv))](
            z, z.stride(0), dz, t, lse, A.float().contiguous(), B.float().contiguous(),
            (C if C is not None else A).float().contiguous(), ignore_index, V, col0, 1.0 / temperature,
            float(softcap or 1.0), flags if flags is not None else t,
            0 if flags is None else flags.shape[1], flag_rows, float(eps),
            SOFTCAP=softcap is not None, HAS_C=C is not None, FILTER=flags is not None, FLAG_K=flag_k,
            BLOCK_V=bv, num_warps=8,
        )
    return dz.to(dtype) if cast_after else dz


def _apply_grads(dz, h, weight, dx_c, dw, db, flags=None):
    """``db += Σ dz``, ``dW += dzᵀ h`` (fp32), ``dx_c += dz W`` (the chunk's zeroed fp32 rows of dX) —
    block-sparse given ``flags``."""
    if db is not None:
        db += dz.float().sum(0)
    if dw is not None:
        if flags is None:
            _acc_mm(dw, dz.t(), h)
        else:
            triton_sparse.dw(dz, h, flags, dw, accumulate=True)
    if dx_c is not None:
        if flags is None:
            _acc_mm(dx_c, dz, weight)
        else:
            triton_sparse.dx(dz, weight, flags, dx_c, accumulate=True)


def _filtering(C) -> bool:
    """Filter this pass: the knob is on and no dense ``C`` term (label smoothing) reaches every column."""
    return _FILTER and C is None


@torch.no_grad()
def stats(hidden, weight, bias, targets, *, ignore_index, temperature, softcap, need_zsum=False,
          segment_ids=None, num_segments=None):
    """Statistics pass. Returns ``(lse, tgt, zsum, logp, seg)`` like :func:`zephyr_kernels.torch_chunked.stats`."""
    N, V = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, tgt = torch.zeros(N, **f32), torch.zeros(N, **f32)
    zsum = torch.zeros(N, **f32) if need_zsum else None
    for i0, i1 in _chunks(N, V, hidden.dtype):
        z = _logits(hidden[i0:i1], weight, bias)
        _launch_stats(z, targets[i0:i1], ignore_index, temperature, softcap, lse[i0:i1], tgt[i0:i1],
                      None if zsum is None else zsum[i0:i1])
    return Stats(lse, tgt, zsum, *token_and_segment_logps(tgt, lse, targets, ignore_index, segment_ids, num_segments))


@torch.no_grad()
def grads(hidden, weight, bias, targets, lse, A, B, C=None, *, ignore_index, temperature, softcap,
          need_dx=True, need_dw=True, need_db=False, stats=None):
    """Gradient pass given ``lse`` and per-row coefficients. Returns ``(dx, dw, db)``: ``dx`` and
    ``db`` fp32, ``dw`` in the weight's dtype (rounded once from the GEMM's fp32 accumulator).

    Vocab-tiled: each slice ``W[v0:v1]`` meets every row in one GEMM, so ``dW[v0:v1]`` is
    written once (fp32 accumulation inside the GEMM, K = rows) instead of read-modify-written once
    per row chunk — at V=128k that accumulator is 2 GB of fp32 traffic per chunk.  ``dX`` (rows × D)
    is the fp32 accumulator instead, far smaller than ``dW`` for LM-head shapes.
    """
    V = weight.shape[0]
    dx, _, db = alloc_grads(hidden, weight, need_dx, False, need_db)
    # each dW slice comes out of one GEMM that accumulates in fp32 and rounds once, so it can be
    # written in the weight's dtype directly: no (V, D) fp32 buffer beside the gradient
    dw = torch.zeros_like(weight) if need_dw else None
    if not (need_dx or need_dw or need_db):
        return dx, dw, db
    n = hidden.shape[0]
    if n == 0:
        return dx, dw, db
    # every row meets every slice (ignored rows too: their dz is written as zeros on the device, which
    # costs GEMM work but no host sync); dX accumulates over the slices in place, in fp32
    vc = max(128, _chunk_rows(n, hidden.dtype) // 128 * 128)  # vocab slice: n × vc fits the workspace
    filt = _filtering(C)
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        w_c = weight[v0:v1]
        z = _logits(hidden, w_c, None if bias is None else bias[v0:v1])
        flags = triton_sparse.new_flags(n, v1 - v0, hidden.device) if filt else None
        dz = _launch_grad(z, targets, lse, A, B, C, ignore_index, temperature, softcap, hidden.dtype, col0=v0,
                          flags=flags, eps=filter_eps(hidden.dtype, V))
        if db is not None:
            db[v0:v1] = dz.float().sum(0)
        if dw is not None:
            if filt:
                triton_sparse.dw(dz, hidden, flags, dw[v0:v1], accumulate=False)
            else:
                torch.mm(dz.t(), hidden, out=dw[v0:v1])
        if dx is not None:
            if filt:
                triton_sparse.dx(dz, w_c, flags, dx, accumulate=True)
            else:
                _acc_mm(dx, dz, w_c)
    return dx, dw, db


@torch.no_grad()
def fused(hidden, weight, bias, targets, *, ignore_index, temperature, softcap, need_zsum=False,
          coef_fn=None, need_dx=False, need_dw=False, need_db=False):
    """Statistics and, given ``coef_fn(idx, lse_c, zsum_c) -> (A, B, C)``, gradients in one pass
    over each chunk (3 GEMMs for cross-entropy).  Returns ``(lse, tgt, zsum, dx, dw, db)``."""
    if coef_fn is None:
        lse, tgt, zsum, *_ = stats(hidden, weight, bias, targets, ignore_index=ignore_index,
                                     temperature=temperature, softcap=softcap, need_zsum=need_zsum)
        return lse, tgt, zsum, None, None, None
    N, V = hidden.shape[0], weight.shape[0]
    if need_dw and N > _SINGLE_PASS_CHUNKS * _chunk_rows(V, hidden.dtype):
        # Many row chunks would each read-modify-write the (V, D) fp32 dW accumulator; past a few,
        # recomputing the logits once in a vocab-tiled gradient pass (4 GEMMs, dW written once) is
        # cheaper than 3 GEMMs plus that traffic.  (N counts ignored rows too: no host sync here.)
        lse, tgt, zsum, *_ = stats(hidden, weight, bias, targets, ignore_index=ignore_index,
                                     temperature=temperature, softcap=softcap, need_zsum=need_zsum)
        A, B, C = coef_fn(slice(None), lse, zsum)
        dx, dw, db = grads(hidden, weight, bias, targets, lse, _rows(A, lse), _rows(B, lse),
                           None if C is None else _rows(C, lse), ignore_index=ignore_index,
                           temperature=temperature, softcap=softcap,
                           need_dx=need_dx, need_dw=need_dw, need_db=need_db)
        return lse, tgt, zsum, dx, dw, db
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, tgt = torch.zeros(N, **f32), torch.zeros(N, **f32)
    zsum = torch.zeros(N, **f32) if need_zsum else None
    dx, dw, db = alloc_grads(hidden, weight, need_dx, need_dw, need_db)
    for i0, i1 in _chunks(N, V, hidden.dtype):
        h, t = hidden[i0:i1], targets[i0:i1]
        z = _logits(h, weight, bias)
        l_c, zs_c = lse[i0:i1], None if zsum is None else zsum[i0:i1]
        _launch_stats(z, t, ignore_index, temperature, softcap, l_c, tgt[i0:i1], zs_c)
        if need_dx or need_dw or need_db:
            A, B, C = coef_fn(slice(i0, i1), l_c, zs_c)
            flags = triton_sparse.new_flags(i1 - i0, V, hidden.device) if _filtering(C) else None
            dz = _launch_grad(z, t, l_c, _rows(A, l_c), _rows(B, l_c), None if C is None else _rows(C, l_c),
                              ignore_index, temperature, softcap, hidden.dtype, flags=flags,
                              eps=filter_eps(hidden.dtype, V))
            _apply_grads(dz, h, weight, None if dx is None else dx[i0:i1], dw, db, flags)
    return lse, tgt, zsum, dx, dw, db


def _rows(x, like):
    """Coefficients may come back as scalars (a mean-reduced loss): broadcast to one per row."""
    return x.float().expand_as(like) if x.dim() == 0 else x
