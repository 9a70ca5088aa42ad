"""Liger-Kernel-compatible DPO module for users who *do* have reference hidden states.

``LigerCompatibleFusedLinearDPOLoss`` takes the call of
``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss``: a padded ``(2B, T, D)`` batch whose first
``B`` rows are the chosen sequences and last ``B`` the rejected ones (targets aligned with inputs,
``ignore_index`` on prompt/padding), plus optional reference hidden states / weight.  It packs the
batch (no padding rows reach the matmuls), computes reference log-probs without grad through the
same fused kernel, and runs :func:`zephyr_kernels.fused_linear_dpo_loss` — so it never builds the
``(2B·T, V)`` log-softmax that Liger's chunked DPO does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from zephyr_kernels.dpo import fused_linear_dpo_loss
from zephyr_kernels.losses import check_dpo_args
from zephyr_kernels.linear_logprobs import linear_logprobs


def _pack_preference(target: torch.Tensor):
    """``(2B, T)`` targets → flat targets ``(2B·T,)`` and segment ids (chosen b → 2b, rejected b → 2b+1)."""
    two_b, T = target.shape
    if two_b % 2:
        raise ValueError(f"target must have an even batch dimension (chosen then rejected), got {two_b}")
    b = two_b // 2
    row = torch.arange(two_b, device=target.device)
    seg_of_row = torch.where(row < b, 2 * row, 2 * (row - b) + 1)
    return target.reshape(-1), seg_of_row.repeat_interleave(T)


class LigerCompatibleFusedLinearDPOLoss(nn.Module):
    """Same constructor knobs and call as ``LigerFusedLinearDPOLoss`` (sigmoid / hinge / ipo / robust).

    Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
    nll_loss, chosen_rewards, rejected_rewards))`` like Liger; the logits means are over
    non-ignored tokens (Liger averages over every position, padding included) and the rewards are
    batch means.  ``ref_chosen_logps`` / ``ref_rejected_logps`` may be passed instead of
    ``ref_input``.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
                 compute_nll_loss: bool = False, use_ref_model: bool = True, average_log_prob: bool = False,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, impl: str = "auto"):
        super().__init__()
        check_dpo_args(beta, loss_type, label_smoothing, "mean")
        if average_log_prob:
            raise ValueError("average_log_prob=True is not supported: DPO here uses summed sequence log-probs")
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.compute_nll_loss, self.use_ref_model = compute_nll_loss, use_ref_model
        self.loss_type, self.label_smoothing, self.impl = loss_type, label_smoothing, impl

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
                ref_chosen_logps: Optional[torch.Tensor] = None,
                ref_rejected_logps: Optional[torch.Tensor] = None):
        flat_t, seg = _pack_preference(target)
        hidden = _input.reshape(-1, _input.shape[-1])
        P = target.shape[0] // 2
        if ref_chosen_logps is None:
            if self.use_ref_model and ref_input is not None:
                with torch.no_grad():
                    _, ref = linear_logprobs(
                        ref_input.reshape(-1, ref_input.shape[-1]),
                        ref_weight if ref_weight is not None else lin_weight, flat_t, bias=ref_bias,
                        ignore_index=self.ignore_index, segment_ids=seg, num_segments=2 * P, impl=self.impl,
                    )
                ref_chosen_logps, ref_rejected_logps = ref[0::2], ref[1::2]
            else:  # Liger without a reference model: ref log-probs are 0
                ref_chosen_logps = ref_rejected_logps = hidden.new_zeros(P, dtype=torch.float32)
        loss, m = fused_linear_dpo_loss(
            hidden, lin_weight, flat_t, seg, ref_chosen_logps, ref_rejected_logps, bias,
            beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            rpo_alpha=self.alpha if self.compute_nll_loss else None, ignore_index=self.ignore_index,
            impl=self.impl,
        )
        aux = (m["logps/chosen"], m["logps/rejected"], m["logits/chosen"], m["logits/rejected"],
               m["nll_loss"], m["rewards/chosen"], m["rewards/rejected"])
        return loss, aux
