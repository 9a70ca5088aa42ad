"""Liger-Kernel drop-in DPO: ``LigerFusedLinearDPOLoss`` with Liger's whole constructor and call, and
``LigerFusedLinearDPOFunction`` / ``liger_fused_linear_dpo`` with Liger's ``apply`` call.

``from zephyr_kernels import LigerFusedLinearDPOLoss`` replaces
``from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss`` with nothing else changed (and likewise
``liger_kernel.chunked_loss.dpo_loss.LigerFusedLinearDPOFunction``,
``liger_kernel.chunked_loss.functional.liger_fused_linear_dpo``):

* constructor, in Liger 0.8's positional order: ``(ignore_index, beta, alpha, compute_nll_loss,
  compiled, use_ref_model, average_log_prob, chunk_size, loss_type, label_smoothing, discopop_tau)``;
  ``compiled`` and ``chunk_size`` are Liger's execution knobs (torch.compile, pairs per chunk) and
  change no number — accepted and recorded, nothing else; ``impl`` is keyword-only extra;
* call ``(lin_weight (V, D), _input (2B, T, D), target (2B, T), bias=None, ref_input=None,
  ref_weight=None, ref_bias=None)``: the first ``B`` rows are the chosen sequences, the last ``B``
  the rejected ones, ``ignore_index`` on prompt / padding (another layout, e.g. flattened rows, is refused in one line);
* ``LigerFusedLinearDPOFunction.apply(_input, weight, target, bias, ref_input, ref_weight, ref_bias,
  ignore_index, beta, compute_nll_loss, compiled, use_ref_model, average_log_prob, chunk_size, loss_type,
  label_smoothing, discopop_tau, alpha)`` — Liger's positional order and defaults (``alpha`` last) — and
  ``liger_fused_linear_dpo`` (the same call) run the module with those options;
* returns ``(loss, (chosen_logps (B,), rejected_logps (B,), chosen_logits_mean, rejected_logits_mean,
  nll_loss, chosen_rewards (B,), rejected_rewards (B,)))`` with Liger's definitions — the logits
  means over every position of the chosen / rejected rows (padding included), the rewards
  ``β (logp - ref_logp)`` per pair.

Semantics, where zephyr promises Liger's behaviour and where it deliberately differs:

* Liger's loss types (``sigmoid, hinge, exo_pair, nca_pair, robust, bco_pair, sppo_hard, apo_zero,
  apo_down, discopop``) give Liger's numbers; zephyr's other TRL types (``ipo``, ``aot``, ...,
  :data:`zephyr_kernels.LOSS_TYPES`) are accepted as extensions. Refusals Liger also makes carry
  Liger's text: an unknown ``loss_type`` (``Unsupported loss_type: ...``), ``exo_pair`` without
  ``label_smoothing > 0``, ``robust`` outside ``[0.0, 0.5)``.
* ``label_smoothing`` with ``loss_type="sigmoid"`` is **conservative DPO** (cDPO, Mitchell 2023), TRL's
  math ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)``; Liger ignores ε for ``sigmoid`` (it gives plain DPO).
  With a type that uses no ε (``hinge``, ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``apo_*``,
  ``discopop``) Liger ignores a non-zero ε silently; zephyr refuses it in one line.

Unlike Liger it never builds the ``(2B·T, V)`` log-softmax: padding rows are dropped before any
matmul, the reference log-probs go through the same fused kernel without grad, and the policy
loss through :func:`zephyr_kernels.fused_linear_dpo_loss`.  Precomputed reference log-probs may
be passed instead of ``ref_input`` (``ref_chosen_logps`` / ``ref_rejected_logps``, keyword only).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from zephyr_kernels.dpo import DPOOptions, fused_dpo
from zephyr_kernels.losses import LOSS_TYPES, REFUSED_LOSS_TYPES, loss_types_of
from zephyr_kernels.linear_logprobs import linear_logprobs


def _check_shapes(_input: torch.Tensor, target: torch.Tensor, ref_input: Optional[torch.Tensor]) -> None:
    """Liger's layout, or one line: ``_input (2B, T, D)`` and ``ref_input (2B, T, D_ref)`` over ``target (2B, T)``,
    an even batch dimension (the chosen rows, then the rejected ones)."""
    for name, x in (("_input", _input), ("ref_input", ref_input)):
        if x is not None and (target.dim() != 2 or x.dim() != 3 or tuple(x.shape[:2]) != tuple(target.shape)):
            raise ValueError(f"{name} must be (2B, T, D) over target (2B, T) -- the chosen rows, then the rejected "
                             f"ones -- got {name} {tuple(x.shape)} and target {tuple(target.shape)}")
    if target.shape[0] % 2:
        raise ValueError(f"target must have an even batch dimension (chosen then rejected), got {target.shape[0]}")


def _pack_preference(target: torch.Tensor):
    """``(2B, T)`` targets (checked by :func:`_check_shapes`) → flat targets ``(2B·T,)`` and segment ids
    (chosen b → 2b, rejected b → 2b+1)."""
    two_b, T = target.shape
    b = two_b // 2
    row = torch.arange(two_b, device=target.device)
    seg_of_row = torch.where(row < b, 2 * row, 2 * (row - b) + 1)
    return target.reshape(-1), seg_of_row.repeat_interleave(T)


def _logits_means(hidden3, weight, bias):
    """Liger's ``chosen/rejected_logits_mean``: the mean logit over every position and vocab entry of
    the first / second half of the rows, from ``Σ_v z = h · Σ_v W_v (+ Σ b)`` (no logits built)."""
    with torch.no_grad():
        w_sum = weight.float().sum(0)
        row_sums = hidden3.float() @ w_sum + (0.0 if bias is None else bias.float().sum())
        b, V = hidden3.shape[0] // 2, weight.shape[0]
        scale = 1.0 / (b * hidden3.shape[1] * V)
        return row_sums[:b].sum() * scale, row_sums[b:].sum() * scale


def check_liger_dpo_args(loss_type, label_smoothing):
    """The refusals Liger makes at construction, with Liger's text (zephyr's own checks follow)."""
    names = loss_types_of(loss_type)
    for name in names:
        if name not in LOSS_TYPES:
            why = f" ({REFUSED_LOSS_TYPES[name]})" if name in REFUSED_LOSS_TYPES else ""
            raise ValueError(f"Unsupported loss_type: {name}. Supported types are: {LOSS_TYPES}{why}")
    if "exo_pair" in names and label_smoothing <= 0.0:
        raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair'. The EXO paper recommends 1e-3.")
    if "robust" in names and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. Got {label_smoothing}.")


class LigerFusedLinearDPOLoss(nn.Module):
    """Drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss`` (module docstring).

    ``label_smoothing`` with ``loss_type="sigmoid"`` is TRL's cDPO (``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)``),
    where Liger ignores it; with loss types that use no ε zephyr refuses a non-zero value where Liger
    ignores it. Every other option gives Liger's numbers; Liger's own refusals carry Liger's text."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
                 compute_nll_loss: bool = False, compiled: bool = True, use_ref_model: bool = True,
                 average_log_prob: bool = False, chunk_size: int = 1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, discopop_tau: float = 0.05, *, impl: str = "auto"):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        check_liger_dpo_args(loss_type, label_smoothing)
        self.opts = DPOOptions(beta=float(beta), loss_type=loss_type, label_smoothing=float(label_smoothing),
                               rpo_alpha=float(alpha) if compute_nll_loss else None,
                               discopop_tau=float(discopop_tau), average_log_prob=bool(average_log_prob))
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.compute_nll_loss, self.use_ref_model = compute_nll_loss, use_ref_model
        self.average_log_prob, self.loss_type, self.label_smoothing = average_log_prob, loss_type, label_smoothing
        self.discopop_tau, self.compiled, self.chunk_size, self.impl = discopop_tau, compiled, chunk_size, impl

    def _ref_logps(self, flat_t, seg, P, lin_weight, ref_input, ref_weight, ref_bias):
        if not self.use_ref_model:  # Liger without a reference model: reference log-probs are 0
            zero = flat_t.new_zeros(P, dtype=torch.float32)
            return zero, zero
        if ref_input is None:
            raise ValueError("use_ref_model=True needs ref_input (or pass ref_chosen_logps / ref_rejected_logps)")
        with torch.no_grad():
            _, ref = linear_logprobs(
                ref_input.reshape(-1, ref_input.shape[-1]), ref_weight if ref_weight is not None else lin_weight,
                flat_t, bias=ref_bias, ignore_index=self.ignore_index, segment_ids=seg, num_segments=2 * P,
                impl=self.impl,
            )
            if self.average_log_prob:
                counts = torch.zeros(2 * P, device=ref.device).index_add_(
                    0, seg, (flat_t != self.ignore_index).float())
                ref = ref / counts.clamp(min=1.0)
        return ref[0::2], ref[1::2]

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
                ref_chosen_logps: Optional[torch.Tensor] = None, ref_rejected_logps: Optional[torch.Tensor] = None):
        _check_shapes(_input, target, ref_input)
        flat_t, seg = _pack_preference(target)
        P = target.shape[0] // 2
        if ref_chosen_logps is None:
            ref_chosen_logps, ref_rejected_logps = self._ref_logps(flat_t, seg, P, lin_weight, ref_input,
                                                                   ref_weight, ref_bias)
        loss, m, logps = fused_dpo(_input.reshape(-1, _input.shape[-1]), lin_weight, flat_t, seg,
                                   ref_chosen_logps, ref_rejected_logps, bias, self.opts,
                                   ignore_index=self.ignore_index, impl=self.impl)
        chosen, rejected = logps[0::2], logps[1::2]
        logits_c, logits_r = _logits_means(_input, lin_weight, bias)
        nll = m["nll_loss"] if self.compute_nll_loss else torch.zeros((), device=loss.device)
        return loss, (chosen, rejected, logits_c, logits_r, nll,
                      self.beta * (chosen - ref_chosen_logps.float()), self.beta * (rejected - ref_rejected_logps.float()))


class LigerFusedLinearDPOFunction:
    """Drop-in for ``liger_kernel.chunked_loss.dpo_loss.LigerFusedLinearDPOFunction``: the same ``apply`` call
    (Liger's positional order and defaults, module docstring) and outputs, through
    :class:`LigerFusedLinearDPOLoss`; autograd runs through zephyr's own Functions."""

    @staticmethod
    def apply(_input, weight, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
              ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = False, compiled: bool = True,
              use_ref_model: bool = True, average_log_prob: bool = False, chunk_size: int = 1,
              loss_type: str = "sigmoid", label_smoothing: float = 0.0, discopop_tau: float = 0.05,
              alpha: float = 1.0):
        loss_fn = LigerFusedLinearDPOLoss(ignore_index, beta, alpha, compute_nll_loss, compiled, use_ref_model,
                                          average_log_prob, chunk_size, loss_type, label_smoothing, discopop_tau)
        return loss_fn(weight, _input, target, bias, ref_input, ref_weight, ref_bias)


liger_fused_linear_dpo = LigerFusedLinearDPOFunction.apply
