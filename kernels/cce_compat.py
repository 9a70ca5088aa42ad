"""Cut Cross-Entropy's call on :func:`zephyr_kernels.linear_cross_entropy` (Wijmans et al. 2024,
"Cut Your Losses in Large-Vocabulary Language Models", arXiv:2411.09009).

``from cut_cross_entropy import linear_cross_entropy`` → ``from zephyr_kernels import
linear_cross_entropy`` with nothing else changed: CCE's positional order ``(e (..., D), c (V, D),
targets (...), bias, ignore_index, softcap, reduction, shift, return_lse, filter_eps, accum_e_fp32,
accum_c_fp32, filter_e_grad, filter_c_grad, impl, vocab_parallel_options)``, any leading dimensions,
CCE's output shapes. How each CCE option maps:

* ``impl``: every ``cce*`` preset → zephyr's fused default (``"auto"``), ``"torch_compile"`` → the plain
  torch path (:data:`zephyr_kernels.dispatch.CCE_IMPLS`); zephyr's own names are accepted too.
* ``filter_eps``: ``"auto"``, ``"high"`` and ``None`` are accepted and all mean zephyr's own filter,
  which drops only probabilities below ``u / V`` (they sum below the row's rounding; see
  ``kernels/README.md``); a numeric threshold is refused.
* ``accum_e_fp32`` / ``accum_c_fp32``: zephyr always accumulates dE / dC in fp32, so both values are
  accepted. ``filter_e_grad`` / ``filter_c_grad``: accepted (the filter above is below rounding).
* ``vocab_parallel_options``: refused (no vocabulary-parallel path).
* ``return_lse=True``: ``(loss, lse)`` with ``lse`` differentiable (CCE adds its z-loss from it); runs
  :func:`zephyr_kernels.linear_logprobs` with ``return_lse`` (statistics forward, gradient pass in the
  backward) instead of the single-pass cross-entropy.
"""

from __future__ import annotations

import torch

from zephyr_kernels.dispatch import canonical_impl
from zephyr_kernels.linear_logprobs import linear_logprobs

FILTER_EPS = ("auto", "high", None)


def cce_options(impl, filter_eps, accum_e_fp32, accum_c_fp32, filter_e_grad, filter_c_grad,
                vocab_parallel_options) -> str:
    """The zephyr impl for CCE's options, or a one-line refusal naming the option that cannot be honoured."""
    if vocab_parallel_options is not None:
        raise NotImplementedError("vocab_parallel_options is not supported by zephyr_kernels (no vocabulary-parallel path)")
    if filter_eps not in FILTER_EPS:
        raise ValueError(f"filter_eps={filter_eps!r} is not supported: zephyr filters gradients only below rounding "
                         f"(u / V); pass one of {FILTER_EPS}")
    for name, flag in (("accum_e_fp32", accum_e_fp32), ("accum_c_fp32", accum_c_fp32),
                       ("filter_e_grad", filter_e_grad), ("filter_c_grad", filter_c_grad)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    return canonical_impl(impl)


def shift_inputs(hidden: torch.Tensor, targets: torch.Tensor, shift):
    """CCE's ``shift``: position ``i`` of ``hidden (..., T, D)`` predicts ``targets[..., i + shift]``;
    returns ``hidden[..., :T-shift, :]`` and ``targets[..., shift:]`` (views)."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden (..., D) and targets (...) disagree on the leading dimensions: "
                         f"{tuple(hidden.shape)} and {tuple(targets.shape)}")
    shift = int(shift)
    if shift == 0:
        return hidden, targets
    if targets.dim() == 0 or not 0 <= shift < targets.size(-1):
        raise ValueError(f"Shift must be in the range [0, {targets.size(-1) if targets.dim() else 0}). Got {shift}.")
    return hidden[..., : targets.size(-1) - shift, :], targets[..., shift:]


def cce_with_lse(hidden, weight, targets, bias, *, ignore_index, reduction, temperature, softcap, label_smoothing,
                 z_loss, impl, shape):
    """CCE's ``return_lse=True`` on flat inputs: ``(loss, lse)``, ``lse`` shaped ``shape`` (0 where ignored)."""
    if label_smoothing or z_loss:
        raise ValueError("return_lse=True takes neither label_smoothing nor z_loss (add the z-loss from the "
                         "returned lse, as CCE users do)")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    logp, lse = linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                temperature=temperature, softcap=softcap, return_lse=True, impl=impl)
    nll = -logp
    if reduction == "none":
        return nll.view(shape), lse.view(shape)
    loss = nll.sum()
    if reduction == "mean":
        loss = loss / (targets != ignore_index).sum().clamp(min=1)
    return loss, lse.view(shape)
