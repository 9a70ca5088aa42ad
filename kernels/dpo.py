"""Fused DPO from packed hidden states: ``fused_linear_dpo_loss`` / ``FusedLinearDPOLoss``.

The per-pair loss formulas (and their papers) live in :mod:`zephyr_kernels.losses`; this module
turns packed policy hidden states plus precomputed reference log-probs into that loss and its
gradients without building ``(N, V)`` logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from zephyr_kernels.dispatch import autocast_inputs, autocast_off, backend, check_inputs
from zephyr_kernels.losses import LOSS_TYPES, METRIC_KEYS, check_dpo_args, dpo_loss  # noqa: F401

AUX_KEYS = METRIC_KEYS + ("logits/chosen", "logits/rejected", "nll_loss")


@dataclass(frozen=True)
class DPOOptions:
    """The loss knobs of one fused DPO call, validated once when built (:func:`check_dpo_args`).

    ``average_log_prob``: the loss sees each sequence's mean token log-prob instead of its sum
    (Liger's / SimPO-style option; the RPO NLL is always per chosen token).
    """

    beta: float = 0.1
    loss_type: Union[str, Sequence[str]] = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: Optional[float] = None
    reduction: str = "mean"
    loss_weights: Optional[Sequence[float]] = None
    discopop_tau: float = 0.05
    average_log_prob: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False  # WPO's pair weights (zephyr_kernels.losses)

    def __post_init__(self):
        check_dpo_args(self.beta, self.loss_type, self.label_smoothing, self.reduction, self.loss_weights,
                       self.discopop_tau, self.f_divergence_type, self.use_weighting)

    def loss(self, pc, pr, rc, rr, counts, nll, pair_weights=None):
        """:func:`dpo_loss` on ``(P,)`` policy / reference log-probs with these options."""
        return dpo_loss(pc, pr, rc, rr, beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, rpo_alpha=self.rpo_alpha, chosen_nll=nll,
                        reduction=self.reduction, chosen_lengths=counts[0::2], rejected_lengths=counts[1::2],
                        loss_weights=self.loss_weights, discopop_tau=self.discopop_tau,
                        f_divergence_type=self.f_divergence_type,
                        f_alpha_divergence_coef=self.f_alpha_divergence_coef, pair_weights=pair_weights)


def wpo_weights(be, hidden, weight, bias, labels, segment_ids, seg, counts, cfg) -> torch.Tensor:
    """WPO's ``(P,)`` pair weights ``w(y_w)·w(y_l)``: per sequence ``exp(mean_t [log p_t - log Σ_v p_v²])``,
    where ``log p_t - log Σ_v p_v²`` is the token's log-prob at half the temperature minus ``log p_t``
    (``2z_t - lse(2z) - z_t + lse(z)``): one more statistics pass, no gradient."""
    half = dict(cfg, temperature=cfg["temperature"] / 2.0)
    seg_half = be.stats(hidden, weight, bias, labels, segment_ids=segment_ids, num_segments=seg.numel(), **half).seg
    w = torch.exp((seg_half - seg.detach()) / counts.clamp(min=1.0))
    return w[0::2] * w[1::2]


class FusedLinearDPOFunction(torch.autograd.Function):
    """Two passes, gradients in the forward: (1) log-sum-exp / target pass → per-segment log-probs;
    (2) DPO loss and its gradient per segment on ``(2P,)`` numbers; (3) gradient pass with the
    per-row upstream gradient — filtered on the torch path, see :mod:`zephyr_kernels.torch_chunked`.
    Backward only scales the stored gradients."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, labels, segment_ids, ref_chosen, ref_rejected, opts: DPOOptions,
                ignore_index, temperature, softcap, impl):
        be = backend(impl, hidden.device)
        P = ref_chosen.numel()
        cfg = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap)
        st = be.stats(hidden, weight, bias, labels, need_zsum=True, segment_ids=segment_ids,
                      num_segments=2 * P, **cfg)
        valid = (labels != ignore_index).float()
        counts = torch.zeros(2 * P, device=hidden.device).index_add_(0, segment_ids, valid)
        zsums = torch.zeros(2 * P, device=hidden.device).index_add_(0, segment_ids, st.zsum * valid)
        need = ctx.needs_input_grad[:3]
        pw = (wpo_weights(be, hidden, weight, bias, labels, segment_ids, st.seg, counts, cfg)
              if opts.use_weighting else None)
        with torch.enable_grad():
            seg = st.seg.detach().requires_grad_()
            logps = seg / counts.clamp(min=1.0) if opts.average_log_prob else seg
            nll = None if opts.rpo_alpha is None else -seg[0::2].sum() / counts[0::2].sum().clamp(min=1.0)
            loss, metrics = opts.loss(logps[0::2], logps[1::2], ref_chosen.detach().float(),
                                      ref_rejected.detach().float(), counts, nll, pw)
            g_seg = torch.autograd.grad(loss, seg)[0] if any(need) else None
        V = weight.shape[0]
        extra = [
            zsums[0::2].sum() / (counts[0::2].sum().clamp(min=1.0) * V),  # TRL logits/chosen
            zsums[1::2].sum() / (counts[1::2].sum().clamp(min=1.0) * V),  # TRL logits/rejected
            torch.zeros((), device=hidden.device) if nll is None else nll.detach(),
        ]
        aux = torch.stack([metrics[k] for k in METRIC_KEYS] + extra)
        ctx.grads = (None, None, None)
        if any(need):
            g_row = g_seg.index_select(0, segment_ids)
            ctx.grads = be.grads(hidden, weight, bias, labels, st.lse, -g_row, g_row, None, need_dx=need[0],
                                 need_dw=need[1], need_db=need[2], stats=st, **cfg)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        logps = logps.detach()
        ctx.mark_non_differentiable(aux, logps)
        return loss.detach(), aux, logps

    @staticmethod
    @autocast_off
    def backward(ctx, g, _aux, _logps):
        # the buffers are ours: scale in place rather than allocating another (V, D)
        out = tuple(None if d is None else d.mul_(g).to(dt) for d, dt in zip(ctx.grads, ctx.dtypes))
        ctx.grads = None
        return out + (None,) * 9


def check_ref_logps(ref_chosen_logps, ref_rejected_logps):
    if ref_chosen_logps.shape != ref_rejected_logps.shape or ref_chosen_logps.dim() != 1:
        raise ValueError(
            f"ref_chosen_logps / ref_rejected_logps must both be (P,), got "
            f"{tuple(ref_chosen_logps.shape)} and {tuple(ref_rejected_logps.shape)}"
        )


def fused_dpo(hidden, weight, labels, segment_ids, ref_chosen_logps, ref_rejected_logps, bias, opts: DPOOptions,
              *, ignore_index: int = -100, temperature: float = 1.0, softcap: Optional[float] = None,
              impl: str = "auto"):
    """:func:`fused_linear_dpo_loss` with prebuilt options; returns ``(loss, metrics, seq_logps)``
    where ``seq_logps (2P,)`` fp32 are the per-sequence log-probs the loss saw (detached)."""
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_inputs(hidden, weight, labels, bias, segment_ids, 2 * ref_chosen_logps.numel(), ignore_index)
    check_ref_logps(ref_chosen_logps, ref_rejected_logps)
    loss, aux, logps = FusedLinearDPOFunction.apply(
        hidden.contiguous(), weight.contiguous(), bias, labels.contiguous(), segment_ids.contiguous(),
        ref_chosen_logps, ref_rejected_logps, opts, ignore_index, float(temperature),
        None if softcap is None else float(softcap), impl,
    )
    return loss, dict(zip(AUX_KEYS, aux.unbind(0))), logps


def fused_linear_dpo_loss(
    hidden, weight, labels, segment_ids, ref_chosen_logps, ref_rejected_logps, bias=None, *,
    beta: float = 0.1, loss_type: Union[str, Sequence[str]] = "sigmoid", label_smoothing: float = 0.0,
    rpo_alpha: Optional[float] = None, ignore_index: int = -100, reduction: str = "mean",
    loss_weights: Optional[Sequence[float]] = None, discopop_tau: float = 0.05, temperature: float = 1.0,
    softcap: Optional[float] = None, impl: str = "auto", f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5, use_weighting: bool = False, average_log_prob: bool = False,
):
    """DPO-family loss straight from packed policy hidden states; reference log-probs come in as numbers.

    Args:
        hidden: ``(N, D)`` packed policy hidden states; weight: ``(V, D)``; bias: optional ``(V,)``.
        labels: ``(N,) int64`` shifted targets, ``ignore_index`` on prompt / padding rows.
        segment_ids: ``(N,) int64`` — ``2i`` for pair i's chosen tokens, ``2i+1`` for its rejected.
        ref_chosen_logps, ref_rejected_logps: ``(P,)`` precomputed reference sequence log-probs;
            ``num_segments = 2P`` comes from their shape (no host sync).
        beta, loss_type, label_smoothing, rpo_alpha, reduction, loss_weights, discopop_tau,
            f_divergence_type, f_alpha_divergence_coef: as :func:`zephyr_kernels.dpo_loss` (formulas
            and papers in :mod:`zephyr_kernels.losses`).
        use_weighting: WPO's pair weights (:func:`wpo_weights`; one more no-gradient pass).
        average_log_prob: the loss sees each sequence's mean token log-prob (sum / completion tokens)
            instead of its sum, for the policy *and* the reference: ``ref_*_logps`` are then means too (as
            Liger's option; a caller holding reference sums divides them by the same token counts).
        temperature, softcap: the LM head's logit transform (``softcap · tanh(z / softcap) / T``,
            Gemma 2's final-logit softcap), as in :func:`zephyr_kernels.linear_logprobs`.
    Returns:
        ``(loss, metrics)`` — metrics as :func:`dpo_loss`, plus ``logits/chosen``,
        ``logits/rejected`` (mean logit over completion tokens) and ``nll_loss`` (mean chosen-token
        NLL, 0 without ``rpo_alpha``).
    """
    opts = DPOOptions(beta=float(beta), loss_type=loss_type, label_smoothing=float(label_smoothing),
                      rpo_alpha=None if rpo_alpha is None else float(rpo_alpha), reduction=reduction,
                      loss_weights=loss_weights, discopop_tau=float(discopop_tau),
                      f_divergence_type=f_divergence_type, f_alpha_divergence_coef=float(f_alpha_divergence_coef),
                      use_weighting=bool(use_weighting), average_log_prob=bool(average_log_prob))
    loss, metrics, _ = fused_dpo(hidden, weight, labels, segment_ids, ref_chosen_logps, ref_rejected_logps,
                                 bias, opts, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                                 impl=impl)
    return loss, metrics


class FusedLinearDPOLoss(nn.Module):
    """``(hidden, weight, labels, segment_ids, ref_chosen_logps, ref_rejected_logps, bias=None)``
    → ``(loss, metrics)``; see :func:`fused_linear_dpo_loss`.  Options are validated once, here."""

    def __init__(self, beta: float = 0.1, loss_type: Union[str, Sequence[str]] = "sigmoid",
                 label_smoothing: float = 0.0, rpo_alpha: Optional[float] = None, ignore_index: int = -100,
                 reduction: str = "mean", loss_weights: Optional[Sequence[float]] = None,
                 discopop_tau: float = 0.05, temperature: float = 1.0, softcap: Optional[float] = None,
                 impl: str = "auto", f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                 use_weighting: bool = False, average_log_prob: bool = False):
        super().__init__()
        self.opts = DPOOptions(beta=float(beta), loss_type=loss_type, label_smoothing=float(label_smoothing),
                               rpo_alpha=None if rpo_alpha is None else float(rpo_alpha), reduction=reduction,
                               loss_weights=None if loss_weights is None else tuple(loss_weights),
                               discopop_tau=float(discopop_tau), f_divergence_type=f_divergence_type,
                               f_alpha_divergence_coef=float(f_alpha_divergence_coef),
                               use_weighting=bool(use_weighting), average_log_prob=bool(average_log_prob))
        self.ignore_index, self.impl = ignore_index, impl
        self.head = dict(temperature=float(temperature), softcap=None if softcap is None else float(softcap))

    def forward(self, hidden, weight, labels, segment_ids, ref_chosen_logps, ref_rejected_logps, bias=None):
        loss, metrics, _ = fused_dpo(hidden, weight, labels, segment_ids, ref_chosen_logps, ref_rejected_logps,
                                     bias, self.opts, ignore_index=self.ignore_index, impl=self.impl, **self.head)
        return loss, metrics
