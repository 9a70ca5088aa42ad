"""Pure-PyTorch chunked LM-head path (CPU, and machines without Triton).

Only one fp32 logits block is alive at a time (``_BLOCK_BYTES``, 8 MiB by default); it is turned
*in place* into ``exp``, probabilities and then ``dlogits``.  Ignored rows are dropped before any
matmul.  Everything runs under ``torch.no_grad``; autograd lives in the Functions that call this.

Two tilings:

* ``stats`` / ``grads`` tile the **vocabulary** (``(rows, Vc)`` blocks, rows in blocks of up to
  ``_ROW_BLOCK``): the log-sum-exp is accumulated online across vocab chunks, and in the gradient
  pass each ``dW[v0:v1]`` slice is written by one GEMM per row block instead of re-streaming the
  whole ``(V, D)`` accumulator once per row chunk — the DPO / generic-backward path.
* ``fused(coef_fn=...)`` tiles **rows** (``(c, V)`` blocks) so a loss whose gradient is known from
  the row's own ``lse`` (cross-entropy) finishes in a single pass: 3 GEMMs instead of 4.

Gradient coefficients.  Every loss here has a logit gradient of the form

    dL/dz[r, v] = A[r] · p[r, v] + B[r] · [v == t_r] + C[r]

(``p = softmax(z)``): token log-prob with upstream ``g`` is ``A=-g, B=g``; its ``lse`` adds
``A += g_lse``; cross-entropy with label smoothing ε and z-loss λ is ``A = w(1 + 2λ·lse), B = -w(1-ε),
C = -wε/V``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

# fp32 logits-block budget: small against the dW + dX floor (74 MB at the CPU benchmark shape),
# large enough that the GEMMs run near BLAS peak.
_BLOCK_BYTES = int(os.environ.get("ZEPHYR_KERNELS_CHUNK_BYTES", 6 << 20))
_ROW_BLOCK = 1024
# exp() of very negative fp32 inputs takes a ~7x slower path on CPU; e^-87 ≈ 1.6e-38 is 0 for us.
_EXP_FLOOR = -87.0


def _valid_index(targets, ignore_index):
    # nonzero() syncs on CUDA; this path is the CPU / no-Triton fallback where that is free, and
    # the compaction is what makes ignored rows cost no matmul work.
    return (targets != ignore_index).nonzero().squeeze(1)


def _logits(h, weight, bias, temperature, softcap):
    """fp32 transformed logits ``h W^T (+ b)`` of one block, plus ``tanh`` values when softcapping."""
    if h.dtype == torch.float32:
        z = h @ weight.t()
    else:
        # low-precision inputs: the GEMM runs in the input dtype (fp32 accumulation inside BLAS);
        # upcasting W would copy the (V, D) matrix per block.
        z = (h @ weight.t()).float()
    if bias is not None:
        z += bias.float()
    th = None
    if softcap is not None:
        th = z.div_(softcap).tanh_()
        z = th * (softcap / temperature)
    elif temperature != 1.0:
        z.mul_(1.0 / temperature)
    return z, th


def _probs_to_dlogits(p, col, B, C, th, temperature):
    """``p ← A·p`` must already be applied; adds ``B`` at column ``col`` and ``C``, then chain rule."""
    p.scatter_add_(1, col[:, None], B[:, None])
    if C is not None:
        p.add_(C[:, None])
    if th is not None:  # d/dx [cap·tanh(x/cap)] = 1 - tanh², then the 1/T of the temperature
        p.mul_(th.square_().neg_().add_(1.0).mul_(1.0 / temperature))
    elif temperature != 1.0:
        p.mul_(1.0 / temperature)
    return p


def _alloc_grads(hidden, weight, need_dx, need_dw, need_db):
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (
        torch.zeros(N, D, **f32) if need_dx else None,
        torch.zeros(V, D, **f32) if need_dw else None,
        torch.zeros(V, **f32) if need_db else None,
    )


def _row_blocks(targets, ignore_index):
    idx_all = _valid_index(targets, ignore_index)
    for i in range(0, idx_all.numel(), _ROW_BLOCK):
        yield idx_all[i : i + _ROW_BLOCK]


def _vocab_chunks(n_rows, V):
    vc = max(64, min(V, _BLOCK_BYTES // (4 * max(n_rows, 1))))
    for v0 in range(0, V, vc):
        yield v0, min(V, v0 + vc)


@torch.no_grad()
def stats(hidden, weight, bias, targets, *, ignore_index, temperature, softcap, need_zsum=False,
          segment_ids=None, num_segments=None):
    """Statistics pass (vocab-tiled, online log-sum-exp).

    Returns ``(lse, tgt, zsum, logp, seg)``: ``(N,)`` fp32 log-sum-exp, transformed target logit,
    sum of logits over V (or None), token log-prob — all 0 on ignored rows — and per-segment sums
    ``(S,)`` (or None).  Same contract as :func:`zephyr_kernels.triton_kernels.stats`.
    """
    N, V = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, tgt = torch.zeros(N, **f32), torch.zeros(N, **f32)
    zsum = torch.zeros(N, **f32) if need_zsum else None
    for idx in _row_blocks(targets, ignore_index):
        h, t = hidden.index_select(0, idx), targets.index_select(0, idx)
        m = torch.full((idx.numel(),), float("-inf"), **f32)
        s, tz, zs = (torch.zeros(idx.numel(), **f32) for _ in range(3))
        for v0, v1 in _vocab_chunks(idx.numel(), V):
            z, _ = _logits(h, weight[v0:v1], None if bias is None else bias[v0:v1], temperature, softcap)
            inside = (t >= v0) & (t < v1)
            tz += torch.where(inside, z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1), 0.0)
            if need_zsum:
                zs += z.sum(1)
            m_new = torch.maximum(m, z.amax(1))
            s.mul_(torch.exp(m - m_new)).add_(z.sub_(m_new[:, None]).clamp_min_(_EXP_FLOOR).exp_().sum(1))
            m = m_new
        lse.index_copy_(0, idx, s.log_().add_(m))
        tgt.index_copy_(0, idx, tz)
        if need_zsum:
            zsum.index_copy_(0, idx, zs)
    return (lse, tgt, zsum) + token_and_segment_logps(tgt, lse, targets, ignore_index, segment_ids, num_segments)


def token_and_segment_logps(tgt, lse, targets, ignore_index, segment_ids, num_segments):
    """``(logp (N,), seg (S,) or None)`` from the statistics pass; shared by the chunked backends."""
    logp = torch.where(targets != ignore_index, tgt - lse, 0.0)
    seg = None
    if segment_ids is not None:
        seg = torch.zeros(num_segments, dtype=torch.float32, device=lse.device).index_add_(0, segment_ids, logp)
    return logp, seg


@torch.no_grad()
def grads(hidden, weight, bias, targets, lse, A, B, C=None, *, ignore_index, temperature, softcap,
          need_dx=True, need_dw=True, need_db=False):
    """Gradient pass (vocab-tiled) given the forward's ``lse (N,)`` and coefficients ``A, B, C (N,)``.

    Returns fp32 ``dx (N, D)``, ``dw (V, D)``, ``db (V,)`` (None where not requested).
    """
    V = weight.shape[0]
    dx, dw, db = _alloc_grads(hidden, weight, need_dx, need_dw, need_db)
    for idx in _row_blocks(targets, ignore_index):
        h, t = hidden.index_select(0, idx), targets.index_select(0, idx)
        h32 = h.float() if need_dw else None
        lse_b, A_b, B_b = (x.float().index_select(0, idx) for x in (lse, A, B))
        C_b = None if C is None else C.float().index_select(0, idx)
        dxc = torch.zeros(idx.numel(), hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_dx else None
        for v0, v1 in _vocab_chunks(idx.numel(), V):
            w_c = weight[v0:v1]
            z, th = _logits(h, w_c, None if bias is None else bias[v0:v1], temperature, softcap)
            p = z.sub_(lse_b[:, None]).clamp_min_(_EXP_FLOOR).exp_().mul_(A_b[:, None])
            inside = (t >= v0) & (t < v1)
            col = (t - v0).clamp(0, v1 - v0 - 1)
            _probs_to_dlogits(p, col, torch.where(inside, B_b, 0.0), C_b, th, temperature)
            if db is not None:
                db[v0:v1] += p.sum(0)
            if dw is not None:
                dw[v0:v1].addmm_(p.t(), h32)
            if dxc is not None:
                dxc.addmm_(p, w_c) if w_c.dtype == torch.float32 else dxc.add_(p.to(w_c.dtype) @ w_c)
        if dx is not None:
            dx.index_copy_(0, idx, dxc)
    return dx, dw, db


@torch.no_grad()
def fused(hidden, weight, bias, targets, *, ignore_index, temperature, softcap, need_zsum=False,
          coef_fn: Optional[Callable] = None, need_dx=False, need_dw=False, need_db=False):
    """Statistics and — when ``coef_fn(idx, lse_c, zsum_c) -> (A, B, C)`` is given — gradients in
    one row-tiled pass.  Returns ``(lse, tgt, zsum, dx, dw, db)`` (gradients fp32 or None)."""
    if coef_fn is None:
        lse, tgt, zsum, _, _ = stats(hidden, weight, bias, targets, ignore_index=ignore_index,
                                     temperature=temperature, softcap=softcap, need_zsum=need_zsum)
        return lse, tgt, zsum, None, None, None
    N, V = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, tgt = torch.zeros(N, **f32), torch.zeros(N, **f32)
    zsum = torch.zeros(N, **f32) if need_zsum else None
    dx, dw, db = _alloc_grads(hidden, weight, need_dx, need_dw, need_db)
    idx_all = _valid_index(targets, ignore_index)
    c = max(8, min(_ROW_BLOCK, _BLOCK_BYTES // (4 * V)))
    for i in range(0, idx_all.numel(), c):
        idx = idx_all[i : i + c]
        h, t = hidden.index_select(0, idx), targets.index_select(0, idx)
        z, th = _logits(h, weight, bias, temperature, softcap)
        tgt.index_copy_(0, idx, z.gather(1, t[:, None]).squeeze(1))
        zs = z.sum(1) if need_zsum else None
        if need_zsum:
            zsum.index_copy_(0, idx, zs)
        m = z.amax(1)
        s = z.sub_(m[:, None]).clamp_min_(_EXP_FLOOR).exp_().sum(1)
        lse_c = s.log().add_(m)
        lse.index_copy_(0, idx, lse_c)
        A, B, C = coef_fn(idx, lse_c, zs)
        p = z.mul_((A / s)[:, None])
        _probs_to_dlogits(p, t, B, C, th, temperature)
        if db is not None:
            db += p.sum(0)
        if dw is not None:
            dw.addmm_(p.t(), h.float())
        if dx is not None:
            dx.index_copy_(0, idx, p @ weight if weight.dtype == torch.float32 else (p.to(weight.dtype) @ weight).float())
    return lse, tgt, zsum, dx, dw, db
