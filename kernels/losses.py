"""DPO-family pair losses on sequence log-probs: ``dpo_loss`` (used by every fused DPO entry point).

With the implicit reward ``r(y) = β (log π(y|x) - log π_ref(y|x))`` and the margin
``Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))``, per pair:

* ``sigmoid`` — DPO (Rafailov et al. 2023, arXiv:2305.18290): ``-log σ(βΔ)``; with label smoothing
  ε it is conservative DPO (cDPO, Mitchell 2023): ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)``.
* ``hinge`` — SLiC-HF (Zhao et al. 2023, arXiv:2305.10425): ``max(0, 1 - βΔ)``.
* ``ipo`` — IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): ``(Δ - 1/(2β))²``; as in TRL, when
  completion lengths are given each log-ratio is divided by its sequence's token count first.
* ``robust`` — rDPO (Chowdhury et al. 2024, arXiv:2403.00409):
  ``(-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)``, ε in [0, 0.5).
* ``rpo_alpha`` — RPO (Pang et al. 2024, arXiv:2404.19733) adds ``α · NLL(chosen)``, the mean
  negative log-likelihood per chosen token.

``reduction="mean"`` averages over pairs; ``"sum"`` sums (and scales the RPO term by P) so a caller can
divide by the global pair count across micro-batches and ranks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
METRIC_KEYS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected",
)


def check_dpo_args(beta, loss_type, label_smoothing, reduction):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    hi = 0.5 if loss_type == "robust" else 1.0
    if not 0.0 <= label_smoothing < hi:
        raise ValueError(f"label_smoothing must lie in [0, {hi}) for loss_type={loss_type!r}, got {label_smoothing}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    rpo_alpha: Optional[float] = None,
    chosen_nll: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
):
    """DPO-family loss of ``P`` pairs (formulas and papers in the module docstring).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``(P,)``
            summed sequence log-probs (any float dtype; computed in fp32).
        rpo_alpha: weight of the RPO NLL term; requires ``chosen_nll`` (0-d, mean NLL per chosen token).
        chosen_lengths, rejected_lengths: optional ``(P,)`` completion token counts; used by ``ipo``
            for TRL's per-token normalisation.
    Returns:
        ``(loss, metrics)``: fp32 0-d loss and a dict of detached 0-d tensors named as TRL logs them
        (means over pairs, or sums with ``reduction="sum"``).
    """
    check_dpo_args(beta, loss_type, label_smoothing, reduction)
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.float(), ref_rejected_logps.float()
    if not (pc.shape == pr.shape == rc.shape == rr.shape) or pc.dim() != 1:
        raise ValueError(
            "policy/ref chosen/rejected logps must all be (P,); got "
            f"{[tuple(t.shape) for t in (pc, pr, rc, rr)]}"
        )
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    if loss_type == "ipo" and chosen_lengths is not None:
        chosen_ratio = chosen_ratio / chosen_lengths.float().clamp(min=1.0)
        rejected_ratio = rejected_ratio / rejected_lengths.float().clamp(min=1.0)
    delta = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta) * (1.0 - eps)
        if eps:
            losses = losses - F.logsigmoid(-beta * delta) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:  # robust
        losses = (-(1.0 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1.0 - 2.0 * eps)
    reduce = torch.mean if reduction == "mean" else torch.sum
    loss = reduce(losses)
    if rpo_alpha is not None:
        if chosen_nll is None:
            raise ValueError("rpo_alpha needs chosen_nll (mean NLL per chosen token)")
        scale = 1.0 if reduction == "mean" else pc.numel()
        loss = loss + rpo_alpha * scale * chosen_nll.float()
    with torch.no_grad():
        chosen_rewards = beta * (pc - rc)
        rejected_rewards = beta * (pr - rr)
        metrics = {
            "rewards/chosen": reduce(chosen_rewards),
            "rewards/rejected": reduce(rejected_rewards),
            "rewards/accuracies": reduce((chosen_rewards > rejected_rewards).float()),
            "rewards/margins": reduce(chosen_rewards - rejected_rewards),
            "logps/chosen": reduce(pc),
            "logps/rejected": reduce(pr),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
