"""Liger-Kernel drop-in fused linear cross-entropy: ``LigerFusedLinearCrossEntropyLoss``,
``liger_fused_linear_cross_entropy`` and ``LigerFusedLinearCrossEntropyFunction`` with Liger 0.8's whole
constructor, call and outputs.

``from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss`` (or ``...functional import
liger_fused_linear_cross_entropy, CrossEntropyOutput``, or ``liger_kernel.ops import
LigerFusedLinearCrossEntropyFunction``) → ``from zephyr_kernels import ...``.

Loss (PyTorch's ``F.cross_entropy`` with class weights ``w`` and label smoothing ε — Szegedy et al. 2016 —
plus PaLM's z-loss λ·lse², Chowdhery et al. 2022), per non-ignored token ``r``::

    ℓ_r = (1-ε) w_t (lse_r - z[r, t]) + (ε/V) Σ_v w_v (lse_r - z[r, v]),      ζ_r = λ · lse_r²

``mean`` divides Σℓ by Σ_r w_{t_r} (the token count without ``ce_weight``) and Σζ by the token count
(Liger's normalisation); ``z = softcap·tanh((h Wᵀ + b)/softcap)``. ``use_token_scaling`` multiplies each
token's ``ℓ_r + ζ_r`` by its detached ``p_r(t_r)`` (Liger's token scaling).

Every option, implemented (none refused except values Liger refuses too):

* no ``ce_weight``, no token scaling: zephyr's fused kernels (:func:`zephyr_kernels.cross_entropy.fused_ce`,
  no ``(N, V)`` logits).
* ``ce_weight`` or ``use_token_scaling``: a row-blocked PyTorch pass (:mod:`zephyr_kernels.rowwise_ce`,
  ``(rows, V)`` logits blocks of bounded size — Liger's own scheme) whose per-block math is PyTorch's.
* ``return_token_accuracy`` / ``return_predicted_tokens``: one extra no-grad row-blocked logits pass for
  the argmax (first maximal index, as Liger; ``-1`` and accuracy 0 on ignored tokens).
* ``accum_dtype``: ``None`` or ``torch.float32`` — zephyr accumulates dW / db in fp32 in both cases and
  returns them in the parameters' dtype (Liger's ``None`` accumulates bf16 parameters in bf16; zephyr's
  result is the more precise one); any other dtype is refused. ``chunk_mem_const`` (functional) is
  Liger's memory knob: validated as Liger does, changes no number.
* ``z_loss`` output: the z-loss share of the loss, in the input dtype (as Liger).
* ``LigerFusedLinearCrossEntropyFunction.apply``: Liger's positional order, always the 4-tuple ``(loss,
  z_loss, token_accuracy, predicted_tokens)`` (``None`` where not asked); its ``ce_impl`` / ``ce_mode`` pick
  one of Liger's own cross-entropy backends and only ``None`` is accepted (zephyr dispatches by ``impl``).

Extras, keyword-only: ``temperature`` (logits divided by it after the softcap) and ``impl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from zephyr_kernels.cross_entropy import REDUCTIONS, fused_ce
from zephyr_kernels.dispatch import autocast_inputs
from zephyr_kernels.rowwise_ce import argmax_tokens, rowwise_ce

ACCUM_DTYPES = (None, torch.float32)


@dataclass
class CrossEntropyOutput:
    """Liger's structured output (``liger_kernel.transformers.functional.CrossEntropyOutput``)."""

    loss: torch.Tensor
    z_loss: Optional[torch.Tensor] = None
    token_accuracy: Optional[torch.Tensor] = None
    predicted_tokens: Optional[torch.Tensor] = None


def check_liger_ce_args(label_smoothing, reduction, softcap, accum_dtype, flags=(), chunk_mem_const=1):
    """Liger's refusals, with Liger's text (it asserts; here they are ``ValueError``s), plus ``accum_dtype``."""
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum' or 'none'. Got: {reduction}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must greater than 0.0 or None. Got: {softcap}")
    if accum_dtype not in ACCUM_DTYPES:
        raise ValueError(f"accum_dtype={accum_dtype} is not supported: zephyr accumulates in float32 (None or torch.float32)")
    for name, flag in flags:
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False. Got: {flag}")
    if isinstance(chunk_mem_const, bool) or not isinstance(chunk_mem_const, int) or chunk_mem_const < 1:
        raise ValueError(f"chunk_mem_const must be a positive integer. Got: {chunk_mem_const!r}")


def _check_ce_weight(ce_weight, V):
    if ce_weight is not None and (ce_weight.shape != (V,) or not torch.is_floating_point(ce_weight)):
        raise ValueError(f"If given, weight has to be a floating point Tensor of size V={V}. "
                         f"Got: {tuple(ce_weight.shape)} {ce_weight.dtype}")


def _accuracy(pred, t, ignore_index, reduction):
    valid = t != ignore_index
    hit = ((pred == t) & valid).float()
    return hit if reduction == "none" else hit.sum() / valid.sum()


def liger_fused_linear_cross_entropy(
    input, weight, target, bias=None, ce_weight=None, ignore_index: int = -100, lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0, reduction: str = "mean", softcap: Optional[float] = None,
    return_z_loss: bool = False, accum_dtype=None, use_token_scaling: bool = False,
    return_token_accuracy: bool = False, return_predicted_tokens: bool = False, chunk_mem_const: int = 1,
    *, temperature: float = 1.0, impl: str = "auto",
):
    """Liger's functional (module docstring). ``input (..., D)``, ``weight (V, D)``, ``target (...)`` int64,
    ``bias (V,)``, ``ce_weight (V,)`` float. Returns the fp32 loss (scalar, or ``target``-shaped for
    ``"none"``), or a :class:`CrossEntropyOutput` when any ``return_*`` flag is set."""
    flags = (("return_z_loss", return_z_loss), ("return_token_accuracy", return_token_accuracy),
             ("return_predicted_tokens", return_predicted_tokens), ("use_token_scaling", use_token_scaling))
    check_liger_ce_args(label_smoothing, reduction, softcap, accum_dtype, flags, chunk_mem_const)
    _check_ce_weight(ce_weight, weight.shape[0])
    input, weight, bias = autocast_inputs(input, weight, bias)
    h, t = input.reshape(-1, input.shape[-1]), target.reshape(-1)
    opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                z_loss=lse_square_scale, temperature=temperature, softcap=softcap)
    if ce_weight is None and not use_token_scaling:
        loss, z = fused_ce(h, weight, t, bias, impl=impl, **opts)
    else:
        loss, z = rowwise_ce(h, weight, t, bias, ce_weight=ce_weight, token_scaling=use_token_scaling, **opts)
    if reduction == "none":
        loss, z = loss.view(target.shape), z.view(target.shape)
    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return loss
    pred = None
    if return_token_accuracy or return_predicted_tokens:
        pred = argmax_tokens(h, weight, bias, t, ignore_index=ignore_index, temperature=temperature, softcap=softcap)
    return CrossEntropyOutput(
        loss=loss,
        z_loss=z.to(input.dtype) if return_z_loss else None,
        token_accuracy=_accuracy(pred, t, ignore_index, reduction) if return_token_accuracy else None,
        predicted_tokens=pred if return_predicted_tokens else None,
    )


class LigerFusedLinearCrossEntropyLoss(nn.Module):
    """Drop-in for ``liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss`` (module docstring):
    same constructor order and defaults, call ``(lin_weight (V, D), _input (..., D), target (...),
    bias=None)`` → loss or :class:`CrossEntropyOutput`. Keyword-only extras: ``temperature``, ``impl``."""

    def __init__(self, ce_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 lse_square_scale: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
                 softcap: Optional[float] = None, return_z_loss: bool = False, accum_dtype=None,
                 use_token_scaling: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False, *, temperature: float = 1.0, impl: str = "auto"):
        super().__init__()
        check_liger_ce_args(label_smoothing, reduction, softcap, accum_dtype, (
            ("return_z_loss", return_z_loss), ("return_token_accuracy", return_token_accuracy),
            ("return_predicted_tokens", return_predicted_tokens), ("use_token_scaling", use_token_scaling)))
        self.ce_weight, self.ignore_index, self.lse_square_scale = ce_weight, ignore_index, lse_square_scale
        self.label_smoothing, self.reduction, self.softcap = label_smoothing, reduction, softcap
        self.return_z_loss, self.accum_dtype, self.use_token_scaling = return_z_loss, accum_dtype, use_token_scaling
        self.return_token_accuracy, self.return_predicted_tokens = return_token_accuracy, return_predicted_tokens
        self.temperature, self.impl = temperature, impl

    def forward(self, lin_weight, _input, target, bias=None):
        return liger_fused_linear_cross_entropy(
            _input, lin_weight, target, bias, self.ce_weight, self.ignore_index, self.lse_square_scale,
            self.label_smoothing, self.reduction, self.softcap, self.return_z_loss, self.accum_dtype,
            self.use_token_scaling, self.return_token_accuracy, self.return_predicted_tokens,
            temperature=self.temperature, impl=self.impl,
        )


class LigerFusedLinearCrossEntropyFunction:
    """Drop-in for ``liger_kernel.ops.LigerFusedLinearCrossEntropyFunction``: the same ``apply`` call (Liger's
    positional order and defaults) on :func:`liger_fused_linear_cross_entropy`, returning Liger's 4-tuple
    ``(loss, z_loss, token_accuracy, predicted_tokens)``. Autograd runs through zephyr's own Functions."""

    @staticmethod
    def apply(_input, weight, target, bias=None, ce_weight=None, ignore_index: int = -100,
              lse_square_scale: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
              softcap: Optional[float] = None, return_z_loss: bool = False, accum_dtype=None,
              use_token_scaling: bool = False, return_token_accuracy: bool = False,
              return_predicted_tokens: bool = False, ce_impl=None, ce_mode=None, chunk_mem_const: int = 1):
        for name, value in (("ce_impl", ce_impl), ("ce_mode", ce_mode)):
            if value is not None:
                raise ValueError(f"{name}={value!r} selects one of Liger's own cross-entropy backends; "
                                 "zephyr_kernels dispatches by impl= instead: pass None")
        out = liger_fused_linear_cross_entropy(
            _input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction,
            softcap, return_z_loss, accum_dtype, use_token_scaling, return_token_accuracy, return_predicted_tokens,
            chunk_mem_const,
        )
        if isinstance(out, CrossEntropyOutput):
            return out.loss, out.z_loss, out.token_accuracy, out.predicted_tokens
        return out, None, None, None
