"""The fp32 oracle of the kernel tests: full ``(N, V)`` logits, ``log_softmax`` and ``gather``.

For tests only — these materialise every logit and are what the fused paths must
reproduce.  The logit transform is the one all implementations share::

    z = x W^T + b                      (fp32)
    z = softcap * tanh(z / softcap)    (if softcap, as in Gemma-2)
    z = z / temperature
"""

from __future__ import annotations

from typing import Optional

import torch


def reference_logits(hidden, weight, bias=None, temperature=1.0, softcap=None):
    """``hidden: (N, D)``, ``weight: (V, D)``, ``bias: (V,)`` → fp32 logits ``(N, V)``."""
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def reference_linear_logprobs(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    segment_ids=None,
    num_segments: Optional[int] = None,
    return_lse: bool = False,
):
    """Same contract as :func:`zephyr_kernels.linear_logprobs`; differentiable by plain autograd."""
    z = reference_logits(hidden, weight, bias, temperature, softcap)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(z, dim=-1)
    logp = (z.gather(1, safe[:, None]).squeeze(1) - lse) * valid
    out = [logp]
    if segment_ids is not None:
        seg = torch.zeros(num_segments, dtype=torch.float32, device=hidden.device)
        out.append(seg.index_add(0, segment_ids, logp))
    if return_lse:
        out.append(lse * valid)
    return out[0] if len(out) == 1 else tuple(out)


def reference_cross_entropy(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
):
    """Token cross-entropy ``(1-ε)(lse - z_t) + ε(lse - mean_v z_v) + z_loss·lse²`` over non-ignored rows.

    ``reduction="mean"`` divides by the number of non-ignored rows (0 when there are none, where
    ``F.cross_entropy`` would return NaN).
    """
    z = reference_logits(hidden, weight, bias, temperature, softcap)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(z, dim=-1)
    loss = (1.0 - label_smoothing) * (lse - z.gather(1, safe[:, None]).squeeze(1))
    if label_smoothing:
        loss = loss + label_smoothing * (lse - z.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = loss * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)
