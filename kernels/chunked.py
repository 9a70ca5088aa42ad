"""Pure-PyTorch chunked LM-head path (CPU, and machines without Triton).

Rows are processed ``chunk`` at a time; the only ``(chunk, V)`` block alive is the fp32 logits of
the current chunk, which is turned *in place* into ``exp``, then probabilities, then ``dlogits`` —
so the peak beyond the outputs is one block (``chunk · V · 4`` bytes) plus small per-row vectors.
Ignored rows are dropped before any matmul.  Everything runs under ``torch.no_grad``; autograd is
provided by the Functions in :mod:`zephyr_kernels.linear_logprobs`.

Gradient coefficients.  Every loss here has a logit gradient of the form

    dL/dz[r, v] = A[r] · p[r, v] + B[r] · [v == t_r] + C[r]

(``p = softmax(z)``): token log-prob with upstream ``g`` is ``A=-g, B=g``; its ``lse`` adds
``A += g_lse``; cross-entropy with label smoothing ε and z-loss λ is ``A = w(1 + 2λ·lse), B = -w(1-ε),
C = -wε/V``.  Backends take ``(A, B, C)`` per row (or a ``coef_fn`` that derives them from the
chunk's own ``lse``, which lets CE finish in a single pass).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

# (chunk, V) fp32 block budget: 16 MiB keeps the transient well under a quarter of the dW+dX
# floor at the CPU benchmark shape while keeping matmuls large enough to run near BLAS peak.
_BLOCK_BYTES = int(os.environ.get("ZEPHYR_KERNELS_CHUNK_BYTES", 16 << 20))


def _chunk_rows(V: int) -> int:
    return max(8, min(4096, _BLOCK_BYTES // (4 * V)))


def _valid_index(targets, ignore_index):
    # nonzero() syncs on CUDA; this path is the CPU / no-Triton fallback where that is free, and
    # the compaction is what makes ignored rows cost no matmul work.
    return (targets != ignore_index).nonzero().squeeze(1)


def _logits(h_c, weight, bias, temperature, softcap):
    """fp32 ``(c, V)`` transformed logits of one chunk, plus ``tanh`` values when softcapping."""
    if h_c.dtype == torch.float32:
        z = h_c @ weight.t()
    else:
        # low-precision inputs: the matmul runs in the input dtype (fp32 accumulation inside
        # BLAS); upcasting W would copy the whole (V, D) matrix per chunk.
        z = (h_c @ weight.t()).float()
    if bias is not None:
        z += bias.float()
    th = None
    if softcap is not None:
        th = z.div_(softcap).tanh_()
        z = th * (softcap / temperature)
    elif temperature != 1.0:
        z.mul_(1.0 / temperature)
    return z, th


def _grads_from_probs(p, h_c, t_c, weight, th, temperature, softcap, A, B, C, dx, dw, db, idx):
    """Turn the probability block ``p`` into dlogits in place and accumulate dX / dW / db."""
    p.mul_(A[:, None])
    p.scatter_add_(1, t_c[:, None], B[:, None])
    if C is not None:
        p.add_(C[:, None])
    if th is not None:  # d/dx [cap·tanh(x/cap)] = 1 - tanh², then the 1/T of the temperature
        p.mul_(th.square_().neg_().add_(1.0).mul_(1.0 / temperature))
    elif temperature != 1.0:
        p.mul_(1.0 / temperature)
    if db is not None:
        db += p.sum(0)
    if dw is not None:
        dw.addmm_(p.t(), h_c.float())
    if dx is not None:
        if weight.dtype == torch.float32:
            dx.index_copy_(0, idx, p @ weight)
        else:
            dx.index_copy_(0, idx, (p.to(weight.dtype) @ weight).float())


def _alloc_grads(hidden, weight, need_dx, need_dw, need_db):
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (
        torch.zeros(N, D, **f32) if need_dx else None,
        torch.zeros(V, D, **f32) if need_dw else None,
        torch.zeros(V, **f32) if need_db else None,
    )


@torch.no_grad()
def fused(
    hidden,
    weight,
    bias,
    targets,
    *,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    need_zsum: bool = False,
    coef_fn: Optional[Callable] = None,
    need_dx: bool = False,
    need_dw: bool = False,
    need_db: bool = False,
):
    """One pass over the vocab per chunk.

    Returns ``(lse, tgt, zsum, dx, dw, db)``: ``lse, tgt (N,) fp32`` (transformed target logit),
    ``zsum (N,)`` (sum of logits over V, for label smoothing) or None, all 0 on ignored rows; and,
    when ``coef_fn(idx, lse_c, zsum_c) -> (A, B, C)`` is given, fp32 gradients ``dx (N, D)``,
    ``dw (V, D)``, ``db (V,)`` (None where not requested).
    """
    N = hidden.shape[0]
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, tgt = torch.zeros(N, **f32), torch.zeros(N, **f32)
    zsum = torch.zeros(N, **f32) if need_zsum else None
    dx, dw, db = _alloc_grads(hidden, weight, need_dx, need_dw, need_db) if coef_fn else (None,) * 3
    idx_all = _valid_index(targets, ignore_index)
    c = _chunk_rows(V)
    for i in range(0, idx_all.numel(), c):
        idx = idx_all[i : i + c]
        h_c, t_c = hidden.index_select(0, idx), targets.index_select(0, idx)
        z, th = _logits(h_c, weight, bias, temperature, softcap)
        tgt.index_copy_(0, idx, z.gather(1, t_c[:, None]).squeeze(1))
        if zsum is not None:
            zsum.index_copy_(0, idx, z.sum(1))
        m = z.amax(1)
        z.sub_(m[:, None]).exp_()
        s = z.sum(1)
        lse_c = s.log().add_(m)
        lse.index_copy_(0, idx, lse_c)
        if coef_fn is not None:
            A, B, C = coef_fn(idx, lse_c, None if zsum is None else zsum.index_select(0, idx))
            z.div_(s[:, None])
            _grads_from_probs(z, h_c, t_c, weight, th, temperature, softcap, A, B, C, dx, dw, db, idx)
    return lse, tgt, zsum, dx, dw, db


@torch.no_grad()
def grads(
    hidden,
    weight,
    bias,
    targets,
    lse,
    A,
    B,
    C=None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    need_dx: bool = True,
    need_dw: bool = True,
    need_db: bool = False,
):
    """Gradient pass given the forward's ``lse (N,)`` and per-row coefficients ``A, B, C (N,)``."""
    V = weight.shape[0]
    dx, dw, db = _alloc_grads(hidden, weight, need_dx, need_dw, need_db)
    idx_all = _valid_index(targets, ignore_index)
    c = _chunk_rows(V)
    for i in range(0, idx_all.numel(), c):
        idx = idx_all[i : i + c]
        h_c, t_c = hidden.index_select(0, idx), targets.index_select(0, idx)
        z, th = _logits(h_c, weight, bias, temperature, softcap)
        z.sub_(lse.index_select(0, idx)[:, None]).exp_()
        C_c = None if C is None else C.index_select(0, idx)
        _grads_from_probs(
            z, h_c, t_c, weight, th, temperature, softcap,
            A.index_select(0, idx), B.index_select(0, idx), C_c, dx, dw, db, idx,
        )
    return dx, dw, db


def stats(hidden, weight, bias, targets, *, ignore_index, temperature, softcap, need_zsum=False,
          segment_ids=None, num_segments=None):
    """Same contract as :func:`zephyr_kernels.triton_kernels.stats`: ``(lse, tgt, zsum, logp, seg)``."""
    lse, tgt, zsum, *_ = fused(hidden, weight, bias, targets, ignore_index=ignore_index,
                               temperature=temperature, softcap=softcap, need_zsum=need_zsum)
    logp = torch.where(targets != ignore_index, tgt - lse, 0.0)
    seg = None
    if segment_ids is not None:
        seg = torch.zeros(num_segments, dtype=torch.float32, device=hidden.device)
        seg.index_add_(0, segment_ids, logp)
    return lse, tgt, zsum, logp, seg
