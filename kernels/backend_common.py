"""What every backend (``torch_chunked``, ``triton_chunked``, ``triton_tiled``) shares, torch only (no Triton):
the result of a statistics pass, the fp32 gradient buffers, the gradient filter's bound and the token /
segment log-probs taken from a pass's statistics.

Every backend implements the same contract on ``hidden (N, D)``, ``weight (V, D)``, ``bias (V,)`` or None
and ``targets (N,) int64`` (``ignore_index`` on ignored rows):

* ``stats(...) -> Stats`` — the statistics pass;
* ``grads(..., lse, A, B, C=None) -> (dX (N, D), dW (V, D), db (V,))`` fp32 (None where not needed) for the
  logit gradient ``dL/dz = A·p + B·onehot(target) + C`` per row (``p = softmax(z)``);
* ``fused(..., coef_fn=None) -> (lse, tgt, zsum, dX, dW, db)`` — statistics and, given ``coef_fn(idx, lse,
  zsum) -> (A, B, C)``, the gradients in the same pass where they follow from the row's own statistics
  (cross-entropy).

:mod:`zephyr_kernels.dispatch` picks the backend.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Stats(NamedTuple):
    """Result of a statistics pass (every backend): fp32, 0 on ignored rows.

    ``lse, tgt, logp``: ``(N,)`` log-sum-exp, transformed target logit, token log-prob;
    ``zsum``: ``(N,)`` Σ_v z or None; ``seg``: ``(S,)`` per-segment log-prob sums or None;
    ``tile_max``: ``(N, ceil(V/_TILE))`` largest transformed logit per vocab tile (torch path only,
    else None) — the gradient filter's input.
    """

    lse: torch.Tensor
    tgt: torch.Tensor
    zsum: Optional[torch.Tensor]
    logp: torch.Tensor
    seg: Optional[torch.Tensor]
    tile_max: Optional[torch.Tensor] = None


def alloc_grads(hidden, weight, need_dx, need_dw, need_db):
    """Zeroed fp32 ``(dX (N, D), dW (V, D), db (V,))``, None for each one not needed."""
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (
        torch.zeros(N, D, **f32) if need_dx else None,
        torch.zeros(V, D, **f32) if need_dw else None,
        torch.zeros(V, **f32) if need_db else None,
    )


def token_and_segment_logps(tgt, lse, targets, ignore_index, segment_ids, num_segments):
    """``(logp (N,), seg (S,) or None)`` from the statistics pass; shared by the chunked backends."""
    logp = torch.where(targets != ignore_index, tgt - lse, 0.0)
    seg = None
    if segment_ids is not None:
        seg = torch.zeros(num_segments, dtype=torch.float32, device=lse.device).index_add_(0, segment_ids, logp)
    return logp, seg


def filter_eps(dtype, V) -> float:
    """``ε = u / V``: probabilities at or below it sum to at most the unit roundoff ``u`` of ``dtype``."""
    return torch.finfo(dtype).eps / 2.0 / V
