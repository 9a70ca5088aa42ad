"""``impl="torch"``: the pure-PyTorch chunked LM-head path (CPU, and machines without Triton).

Only one fp32 logits block is alive at a time (``_BLOCK_BYTES``, 6 MiB by default); it is turned
*in place* into ``exp``, probabilities and then ``dlogits``.  Ignored rows are dropped before any
matmul.  Everything runs under ``torch.no_grad``; autograd lives in the Functions that call this.

Passes:

* ``stats`` tiles the **vocabulary** (``(rows, Vc)`` blocks, rows in blocks of up to
  ``_ROW_BLOCK``) and accumulates the log-sum-exp online.  It also records, per row and per vocab
  tile of ``_TILE`` columns, the largest logit (``Stats.tile_max``, ``(N, ceil(V/_TILE))`` fp32 —
  1 MiB at N=4096, V=32000): after the pass, ``tile_max - lse`` bounds every probability of the tile.
* ``grads`` (gradient filtering).  A row's probabilities below ``ε = u / V`` (``u`` the unit
  roundoff of the input dtype) add up to at most ``u``: below the rounding of that row's gradient.
  A (row, tile) whose bound is under ``ε`` therefore carries no gradient and is skipped.  When few
  (row, tile) pairs remain — a trained model's softmax is peaked — the gradient pass recomputes only
  those tiles for only those rows (gathered GEMMs), so DPO costs about one dense GEMM instead of
  four; with a flat softmax everything is active and the dense vocab-tiled pass runs (each
  ``dW[v0:v1]`` slice written by one GEMM per row block).  CCE (Wijmans et al. 2024,
  arXiv:2411.09009) filters the same way at a fixed threshold; ``ε`` here is tied to the dtype and V.
* ``fused(coef_fn=...)`` tiles **rows** (``(c, V)`` blocks) so a loss whose gradient is known from
  the row's own ``lse`` (cross-entropy) finishes in a single pass: 3 GEMMs instead of 4.  When the
  vocabulary is so large that fewer than ``_MIN_FUSED_ROWS`` rows fit a block, it runs ``stats`` +
  filtered ``grads`` instead.

Gradient coefficients.  Every loss here has a logit gradient of the form

    dL/dz[r, v] = A[r] · p[r, v] + B[r] · [v == t_r] + C[r]

(``p = softmax(z)``): token log-prob with upstream ``g`` is ``A=-g, B=g``; its ``lse`` adds
``A += g_lse``; cross-entropy with label smoothing ε and z-loss λ is ``A = w(1 + 2λ·lse), B = -w(1-ε),
C = -wε/V``.  Filtering applies to the ``A·p`` term; ``B`` is a gather/scatter on the target column
and a non-zero ``C`` (dense by nature) keeps the dense pass.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch

from zephyr_kernels.backend_common import Stats, alloc_grads, filter_eps, token_and_segment_logps

# fp32 logits-block budget: small against the dW + dX floor (74 MB at the CPU benchmark shape),
# large enough that the GEMMs run near BLAS peak.
_BLOCK_BYTES = int(os.environ.get("ZEPHYR_KERNELS_CHUNK_BYTES", 6 << 20))
_ROW_BLOCK = 1024
# vocab tile of the gradient filter (columns); vocab chunks of the stats pass are multiples of it
_TILE = 512
# above this fraction of active (row, tile) pairs the dense gradient pass is cheaper
_SPARSE_MAX_ACTIVE = 0.4
# the row-tiled single pass needs at least this many rows per block to keep its GEMMs efficient
_MIN_FUSED_ROWS = 256
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


def _chain(p, th, temperature):
    """Chain rule of the logit transform applied in place: ``· (1 - tanh²) / T`` or ``· 1/T``."""
    if th is not None:  # d/dx [cap·tanh(x/cap)] = 1 - tanh², then the 1/T of the temperature
        p.mul_(th.square_().neg_().add_(1.0).mul_(1.0 / temperature))
    elif temperature != 1.0:
        p.mul_(1.0 / temperature)
    return p


def _probs_to_dlogits(p, col, B, C, th, temperature):
    """``p ← A·p`` must already be applied; adds ``B`` at column ``col`` and ``C``, then chain rule."""
    p.scatter_add_(1, col[:, None], B[:, None])
    if C is not None:
        p.add_(C[:, None])
    return _chain(p, th, temperature)


def _row_blocks(targets, ignore_index):
    idx_all = _valid_index(targets, ignore_index)
    for i in range(0, idx_all.numel(), _ROW_BLOCK):
        yield idx_all[i : i + _ROW_BLOCK]


def _vocab_chunks(n_rows, V):
    vc = max(_TILE, min(V, _BLOCK_BYTES // (4 * max(n_rows, 1))) // _TILE * _TILE)
    for v0 in range(0, V, vc):
        yield v0, min(V, v0 + vc)


def _tile_max(z):
    """``(rows, ceil(width/_TILE))`` maxima of a ``(rows, width)`` block whose start is tile-aligned."""
    r, w = z.shape
    full = w // _TILE * _TILE
    parts = [z[:, :full].reshape(r, -1, _TILE).amax(2)] if full else []
    if full < w:
        parts.append(z[:, full:].amax(1, keepdim=True))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


@torch.no_grad()
def stats(hidden, weight, bias, targets, *, ignore_index, temperature, softcap, need_zsum=False,
          segment_ids=None, num_segments=None) -> Stats:
    """Statistics pass (vocab-tiled, online log-sum-exp); see :class:`Stats`."""
    N, V = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, tgt = torch.zeros(N, **f32), torch.zeros(N, **f32)
    zsum = torch.zeros(N, **f32) if need_zsum else None
    tmax = torch.full((N, -(-V // _TILE)), float("-inf"), **f32)
    # Σ_v z is linear in h unless softcapped: one GEMV instead of a pass over every logits block
    linear_zsum = need_zsum and softcap is None
    w_sum = _column_sum(weight, bias, temperature) if linear_zsum else None
    for idx in _row_blocks(targets, ignore_index):
        h, t = hidden.index_select(0, idx), targets.index_select(0, idx)
        m = torch.full((idx.numel(),), float("-inf"), **f32)
        s, tz, zs = (torch.zeros(idx.numel(), **f32) for _ in range(3))
        tm = []
        for v0, v1 in _vocab_chunks(idx.numel(), V):
            z, _ = _logits(h, weight[v0:v1], None if bias is None else bias[v0:v1], temperature, softcap)
            inside = (t >= v0) & (t < v1)
            tz += torch.where(inside, z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1), 0.0)
            if need_zsum and not linear_zsum:
                zs += z.sum(1)
            tm.append(_tile_max(z))
            m_new = torch.maximum(m, tm[-1].amax(1))
            s.mul_(torch.exp(m - m_new)).add_(z.sub_(m_new[:, None]).clamp_min_(_EXP_FLOOR).exp_().sum(1))
            m = m_new
        lse.index_copy_(0, idx, s.log_().add_(m))
        tgt.index_copy_(0, idx, tz)
        tmax.index_copy_(0, idx, torch.cat(tm, 1))
        if need_zsum:
            zsum.index_copy_(0, idx, h.float() @ w_sum[0] + w_sum[1] if linear_zsum else zs)
    logp, seg = token_and_segment_logps(tgt, lse, targets, ignore_index, segment_ids, num_segments)
    return Stats(lse, tgt, zsum, logp, seg, tmax)


def _column_sum(weight, bias, temperature):
    """``(Σ_v W_v / T (D,) fp32, Σ_v b_v / T)``: ``Σ_v z[r, v] = h_r · first + second``."""
    return weight.float().sum(0) / temperature, 0.0 if bias is None else bias.float().sum() / temperature


def _filter_log_eps(dtype, V):
    return math.log(filter_eps(dtype, V))


def _active_tiles(tile_max, lse, idx, dtype, V):
    """``(n_valid, n_tiles)`` bool: (row, tile) pairs that may hold a probability above ``ε``."""
    return (tile_max.index_select(0, idx) - lse.index_select(0, idx)[:, None]) > _filter_log_eps(dtype, V)


@torch.no_grad()
def grads(hidden, weight, bias, targets, lse, A, B, C=None, *, ignore_index, temperature, softcap,
          need_dx=True, need_dw=True, need_db=False, stats: Optional[Stats] = None):
    """Gradient pass given the forward's ``lse (N,)`` and coefficients ``A, B, C (N,)``.

    With the forward's ``stats`` (tile maxima and target logits) and no ``C``, (row, tile) pairs
    without gradient are skipped (module docstring).  Returns fp32 ``dx (N, D)``, ``dw (V, D)``,
    ``db (V,)`` (None where not requested).
    """
    if stats is not None and stats.tile_max is not None and C is None:
        idx = _valid_index(targets, ignore_index)
        active = _active_tiles(stats.tile_max, lse, idx, hidden.dtype, weight.shape[0])
        # one host read per call (CPU path: free) decides which pass is cheaper
        if float(active.float().mean()) <= _SPARSE_MAX_ACTIVE:
            return _sparse_grads(hidden, weight, bias, targets, lse, stats.tgt, A, B, idx, active,
                                 temperature=temperature, softcap=softcap,
                                 need_dx=need_dx, need_dw=need_dw, need_db=need_db)
    return _dense_grads(hidden, weight, bias, targets, lse, A, B, C, ignore_index=ignore_index,
                        temperature=temperature, softcap=softcap,
                        need_dx=need_dx, need_dw=need_dw, need_db=need_db)


def _dense_grads(hidden, weight, bias, targets, lse, A, B, C, *, ignore_index, temperature, softcap,
                 need_dx, need_dw, need_db):
    """Vocab-tiled gradient pass over every (row, column) of the valid rows."""
    V = weight.shape[0]
    dx, dw, db = alloc_grads(hidden, weight, need_dx, need_dw, need_db)
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
            _accumulate(p, h32, w_c, v0, v1, dxc, dw, db)
        if dx is not None:
            dx.index_copy_(0, idx, dxc)
    return dx, dw, db


def _dz_w(dz, w):
    """``dz @ w`` in fp32: ``dz`` (fp32) is cast to a low-precision ``w``'s dtype for the GEMM."""
    return dz @ w if w.dtype == torch.float32 else (dz.to(w.dtype) @ w).float()


def _accumulate(dz, h32, w_c, v0, v1, dxc, dw, db):
    """``db[v0:v1] += Σ dz``, ``dW[v0:v1] += dzᵀ h``, ``dxc += dz W[v0:v1]`` for one logits block."""
    if db is not None:
        db[v0:v1] += dz.sum(0)
    if dw is not None:
        dw[v0:v1].addmm_(dz.t(), h32)
    if dxc is not None:
        dxc.addmm_(dz, w_c) if w_c.dtype == torch.float32 else dxc.add_(dz.to(w_c.dtype) @ w_c)


def _sparse_grads(hidden, weight, bias, targets, lse, tgt, A, B, idx, active, *, temperature, softcap,
                  need_dx, need_dw, need_db):
    """Filtered gradient pass: ``A·p`` on active (row, tile) pairs only, each tile one GEMM over the
    rows that need it, accumulated straight into the gradient buffers (no per-call copies of the
    valid rows: this path must stay within the memory of the dense one).

    The target column is taken out of those GEMMs and handled by gather/scatter with
    ``A·exp(tgt - lse) + B``, from the forward's own target logit: where ``p_t ≈ 1`` its gradient
    ``g(1 - p_t)`` cancels, and a recomputed logit (another GEMM shape, other rounding) would leave
    an error of one ulp of the logit instead of the true, tiny value.
    """
    V = weight.shape[0]
    dx, dw, db = alloc_grads(hidden, weight, need_dx, need_dw, need_db)
    lse_v, tgt_v, A_v, B_v = (x.float().index_select(0, idx) for x in (lse, tgt, A, B))
    th_t = None if softcap is None else tgt_v * (temperature / softcap)  # tanh of the target logit
    b = _chain(A_v * (tgt_v - lse_v).clamp_min(_EXP_FLOOR).exp() + B_v, th_t, temperature)
    for i in range(0, idx.numel(), _ROW_BLOCK):  # the target column, a row block at a time
        rows, t, b_i = idx[i : i + _ROW_BLOCK], targets.index_select(0, idx[i : i + _ROW_BLOCK]), b[i : i + _ROW_BLOCK]
        if dx is not None:
            dx.index_put_((rows,), b_i[:, None] * weight.index_select(0, t).float(), accumulate=True)
        # index_put_(accumulate=True), not index_add_: see the note on dx below
        if dw is not None:
            dw.index_put_((t,), b_i[:, None] * hidden.index_select(0, rows).float(), accumulate=True)
        if db is not None:
            db.index_put_((t,), b_i, accumulate=True)
    for j, sel in _tile_rows(active):
        v0, v1 = j * _TILE, min(V, (j + 1) * _TILE)
        rows = idx.index_select(0, sel)
        hr, w_c, t_r = hidden.index_select(0, rows), weight[v0:v1], targets.index_select(0, rows)
        z, th = _logits(hr, w_c, None if bias is None else bias[v0:v1], temperature, softcap)
        p = z.sub_(lse_v.index_select(0, sel)[:, None]).clamp_min_(_EXP_FLOOR).exp_()
        p.mul_(A_v.index_select(0, sel)[:, None])
        col = (t_r - v0).clamp(0, v1 - v0 - 1)[:, None]
        outside = ((t_r < v0) | (t_r >= v1))[:, None]
        p.scatter_(1, col, p.gather(1, col) * outside)  # the target column is handled above
        dz = _chain(p, th, temperature)
        _accumulate(dz, hr.float() if dw is not None else None, w_c, v0, v1, None, dw, db)
        if dx is not None:
            # index_put_ (rows are unique): CPU index_add_ of a few rows is ~1000x slower with 2 threads
            dx.index_put_((rows,), _dz_w(dz, w_c), accumulate=True)
    return dx, dw, db


def _tile_rows(active):
    """``(tile j, rows (k,) int64)`` for every tile with at least one active row."""
    tiles = active.any(0).nonzero().squeeze(1).tolist()  # CPU path: host reads are free
    for j in tiles:
        yield j, active[:, j].nonzero().squeeze(1)


@torch.no_grad()
def fused(hidden, weight, bias, targets, *, ignore_index, temperature, softcap, need_zsum=False,
          coef_fn: Optional[Callable] = None, need_dx=False, need_dw=False, need_db=False):
    """Statistics and — when ``coef_fn(idx, lse_c, zsum_c) -> (A, B, C)`` is given — gradients.

    Row-tiled single pass while ``_MIN_FUSED_ROWS`` rows of ``V`` logits fit the block budget, else
    :func:`stats` + filtered :func:`grads`.  Returns ``(lse, tgt, zsum, dx, dw, db)`` (gradients fp32
    or None)."""
    V = weight.shape[0]
    c = min(_ROW_BLOCK, _BLOCK_BYTES // (4 * V))
    if coef_fn is None or c < _MIN_FUSED_ROWS:
        st = stats(hidden, weight, bias, targets, ignore_index=ignore_index, temperature=temperature,
                   softcap=softcap, need_zsum=need_zsum)
        if coef_fn is None:
            return st.lse, st.tgt, st.zsum, None, None, None
        A, B, C = (None if x is None else x.float().expand_as(st.lse) for x in coef_fn(slice(None), st.lse, st.zsum))
        dx, dw, db = grads(hidden, weight, bias, targets, st.lse, A, B, C, ignore_index=ignore_index,
                           temperature=temperature, softcap=softcap, need_dx=need_dx, need_dw=need_dw,
                           need_db=need_db, stats=st)
        return st.lse, st.tgt, st.zsum, dx, dw, db
    return _row_tiled(hidden, weight, bias, targets, c, ignore_index=ignore_index, temperature=temperature,
                      softcap=softcap, need_zsum=need_zsum, coef_fn=coef_fn,
                      need_dx=need_dx, need_dw=need_dw, need_db=need_db)


def _row_tiled(hidden, weight, bias, targets, c, *, ignore_index, temperature, softcap, need_zsum, coef_fn,
               need_dx, need_dw, need_db):
    """Single pass over ``(c, V)`` row blocks: statistics, coefficients and gradients (3 GEMMs)."""
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, tgt = torch.zeros(N, **f32), torch.zeros(N, **f32)
    zsum = torch.zeros(N, **f32) if need_zsum else None
    dx, dw, db = alloc_grads(hidden, weight, need_dx, need_dw, need_db)
    idx_all = _valid_index(targets, ignore_index)
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
            dx.index_copy_(0, idx, _dz_w(p, weight))
    return lse, tgt, zsum, dx, dw, db
