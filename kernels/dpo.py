"""Fused DPO from packed hidden states: ``fused_linear_dpo_loss`` / ``FusedLinearDPOLoss``.

The per-pair loss formulas (and their papers) live in :mod:`zephyr_kernels.losses`; this module
turns packed policy hidden states plus precomputed reference log-probs into that loss and its
gradients without building ``(N, V)`` logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from zephyr_kernels.dispatch import backend, check_inputs
from zephyr_kernels.losses import LOSS_TYPES, METRIC_KEYS, check_dpo_args, dpo_loss  # noqa: F401


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
        st = be.stats(hidden, weight, bias, labels, need_zsum=True, segment_ids=segment_ids,
                      num_segments=2 * P, **cfg)
        lse, zsum, seg = st.lse, st.zsum, st.seg
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
            ctx.grads = be.grads(hidden, weight, bias, labels, lse, -g_row, g_row, None, need_dx=need[0],
                                 need_dw=need[1], need_db=need[2], stats=st, **cfg)
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
    check_dpo_args(beta, loss_type, label_smoothing, reduction)
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
        check_dpo_args(beta, loss_type, label_smoothing, reduction)
        self.kw = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha,
                       ignore_index=ignore_index, reduction=reduction, impl=impl)

    def forward(self, hidden, weight, labels, segment_ids, ref_chosen_logps, ref_rejected_logps, bias=None):
        return fused_linear_dpo_loss(hidden, weight, labels, segment_ids, ref_chosen_logps,
                                     ref_rejected_logps, bias, **self.kw)
