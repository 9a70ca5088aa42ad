"""DPO losses: ``dpo_loss`` on sequence log-probs, and ``FusedLinearDPOLoss`` from packed hidden states.

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
from torch import nn

from zephyr_kernels.dispatch import backend, check_inputs

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
METRIC_KEYS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected",
)


def _check_dpo_args(beta, loss_type, label_smoothing, reduction):
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
    _check_dpo_args(beta, loss_type, label_smoothing, reduction)
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


class FusedLinearDPOFunction(torch.autograd.Function):
    """Two passes, gradients in the forward: (1) log-sum-exp / target pass → per-segment log-probs;
    (2) DPO loss and its gradient per segment on ``(2P,)`` numbers; (3) gradient pass with the
    per-row upstream gradient.  Backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, segment_ids, ref_chosen, ref_rejected, beta, loss_type,
                label_smoothing, rpo_alpha, ignore_index, reduction, impl):
        be = backend(impl, hidden.device)
        P = ref_chosen.numel()
        cfg = dict(ignore_index=ignore_index, temperature=1.0, softcap=None)
        lse, _, zsum, _, seg = be.stats(hidden, weight, bias, labels, need_zsum=True,
                                        segment_ids=segment_ids, num_segments=2 * P, **cfg)
        valid = (labels != ignore_index).float()
        counts = torch.zeros(2 * P, device=hidden.device).index_add_(0, segment_ids, valid)
        zsums = torch.zeros(2 * P, device=hidden.device).index_add_(0, segment_ids, zsum * valid)
        with torch.enable_grad():
            pc = seg[0::2].detach().requires_grad_()
            pr = seg[1::2].detach().requires_grad_()
            nll = None if rpo_alpha is None else -pc.sum() / counts[0::2].sum().clamp(min=1.0)
            loss, metrics = dpo_loss(
                pc, pr, ref_chosen.detach(), ref_rejected.detach(), beta=beta, loss_type=loss_type,
                label_smoothing=label_smoothing, rpo_alpha=rpo_alpha, chosen_nll=nll, reduction=reduction,
                chosen_lengths=counts[0::2], rejected_lengths=counts[1::2],
            )
            need = ctx.needs_input_grad[:3]
            if any(need):
                gc, gr = torch.autograd.grad(loss, (pc, pr))
        V = weight.shape[0]
        extra = [
            zsums[0::2].sum() / (counts[0::2].sum().clamp(min=1.0) * V),  # TRL logits/chosen
            zsums[1::2].sum() / (counts[1::2].sum().clamp(min=1.0) * V),  # TRL logits/rejected
            torch.zeros((), device=hidden.device) if nll is None else nll.detach(),
        ]
        aux = torch.stack([metrics[k] for k in METRIC_KEYS] + extra)
        ctx.grads = (None, None, None)
        if any(need):
            g_row = torch.stack([gc, gr], 1).reshape(-1).index_select(0, segment_ids)
            ctx.grads = be.grads(hidden, weight, bias, labels, lse, -g_row, g_row, None,
                                 need_dx=need[0], need_dw=need[1], need_db=need[2], **cfg)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(aux)
        return loss.detach(), aux

    @staticmethod
    def backward(ctx, g, _aux):
        # the buffers are ours: scale in place rather than allocating another (V, D)
        out = tuple(None if d is None else d.mul_(g).to(dt) for d, dt in zip(ctx.grads, ctx.dtypes))
        ctx.grads = None
        return out + (None,) * 11


def fused_linear_dpo_loss(
    hidden, weight, labels, segment_ids, ref_chosen_logps, ref_rejected_logps, bias=None, *,
    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
    rpo_alpha: Optional[float] = None, ignore_index: int = -100, reduction: str = "mean",
    impl: str = "auto",
):
    """DPO loss straight from packed policy hidden states; reference log-probs come in as numbers.

    Args:
        hidden: ``(N, D)`` packed policy hidden states; weight: ``(V, D)``; bias: optional ``(V,)``.
        labels: ``(N,) int64`` shifted targets, ``ignore_index`` on prompt / padding rows.
        segment_ids: ``(N,) int64`` — ``2i`` for pair i's chosen tokens, ``2i+1`` for its rejected.
        ref_chosen_logps, ref_rejected_logps: ``(P,)`` precomputed reference sequence log-probs;
            ``num_segments = 2P`` comes from their shape (no host sync).
    Returns:
        ``(loss, metrics)`` — metrics as :func:`dpo_loss`, plus ``logits/chosen``,
        ``logits/rejected`` (mean logit over completion tokens) and ``nll_loss`` (mean chosen-token
        NLL, 0 without ``rpo_alpha``).
    """
    check_inputs(hidden, weight, labels, bias, segment_ids, 2 * ref_chosen_logps.numel(), ignore_index)
    _check_dpo_args(beta, loss_type, label_smoothing, reduction)
    if ref_chosen_logps.shape != ref_rejected_logps.shape or ref_chosen_logps.dim() != 1:
        raise ValueError(
            f"ref_chosen_logps / ref_rejected_logps must both be (P,), got "
            f"{tuple(ref_chosen_logps.shape)} and {tuple(ref_rejected_logps.shape)}"
        )
    loss, aux = FusedLinearDPOFunction.apply(
        hidden.contiguous(), weight.contiguous(), bias, labels.contiguous(), segment_ids.contiguous(),
        ref_chosen_logps, ref_rejected_logps, float(beta), loss_type, float(label_smoothing),
        None if rpo_alpha is None else float(rpo_alpha), ignore_index, reduction, impl,
    )
    keys = METRIC_KEYS + ("logits/chosen", "logits/rejected", "nll_loss")
    return loss, dict(zip(keys, aux.unbind(0)))


class FusedLinearDPOLoss(nn.Module):
    """``(hidden, weight, labels, segment_ids, ref_chosen_logps, ref_rejected_logps, bias=None)``
    → ``(loss, metrics)``; see :func:`fused_linear_dpo_loss`."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 rpo_alpha: Optional[float] = None, ignore_index: int = -100, reduction: str = "mean",
                 impl: str = "auto"):
        super().__init__()
        _check_dpo_args(beta, loss_type, label_smoothing, reduction)
        self.kw = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha,
                       ignore_index=ignore_index, reduction=reduction, impl=impl)

    def forward(self, hidden, weight, labels, segment_ids, ref_chosen_logps, ref_rejected_logps, bias=None):
        return fused_linear_dpo_loss(hidden, weight, labels, segment_ids, ref_chosen_logps,
                                     ref_rejected_logps, bias, **self.kw)
