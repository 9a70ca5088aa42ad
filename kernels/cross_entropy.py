"""Fused linear cross-entropy for SFT: ``loss = CE(hidden W^T + b, targets)`` without ``(N, V)`` logits.

Per non-ignored token (Szegedy et al. 2016 label smoothing; PaLM's z-loss, Chowdhery et al. 2022)::

    ℓ_r = (1 - ε)(lse_r - z[r, t_r]) + ε (lse_r - mean_v z[r, v]) + λ · lse_r²

With ``reduction="mean"|"sum"`` the upstream gradient is known in the forward (``1/n_valid`` or 1),
so the forward also computes dX / dW / db — one pass per chunk on the torch path, statistics +
gradient kernels on Triton — and backward only scales them by ``grad_output`` (no recomputation).
``reduction="none"`` keeps a generic backward for arbitrary per-token upstream gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from zephyr_kernels.dispatch import autocast_inputs, autocast_off, backend, check_inputs

REDUCTIONS = ("mean", "sum", "none")


def _ce_coefs(w, lse, label_smoothing, z_loss, V):
    """``(A, B, C)`` of ``dℓ/dz = A·p + B·onehot + C`` for per-row weight ``w`` (scalar or (n,))."""
    A = w * (1.0 + 2.0 * z_loss * lse) if z_loss else (w * torch.ones_like(lse))
    B = (-(1.0 - label_smoothing) * w) * torch.ones_like(lse)
    C = (-(label_smoothing / V) * w) * torch.ones_like(lse) if label_smoothing else None
    return A, B, C


def _token_loss(lse, tgt, zsum, valid, label_smoothing, z_loss, V):
    loss = (1.0 - label_smoothing) * (lse - tgt)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - zsum / V)
    if z_loss:
        loss = loss + z_loss * lse.square()
    return torch.where(valid, loss, 0.0)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss,
                temperature, softcap, impl):
        be = backend(impl, hidden.device)
        V = weight.shape[0]
        valid = targets != ignore_index
        cfg = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap)
        need = dict(zip(("need_dx", "need_dw", "need_db"), ctx.needs_input_grad[:3]))
        ctx.reduction, ctx.coefs = reduction, (label_smoothing, z_loss, V)
        w = 1.0 / valid.sum().clamp(min=1).float() if reduction == "mean" else torch.ones((), device=hidden.device)
        if reduction == "none" or not any(need.values()):
            lse, tgt, zsum, *_ = be.fused(hidden, weight, bias, targets, need_zsum=label_smoothing > 0, **cfg)
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
            ctx.be, ctx.cfg, ctx.need = be, cfg, need
            loss = _token_loss(lse, tgt, zsum, valid, label_smoothing, z_loss, V)
            return loss if reduction == "none" else loss.sum() * w
        # the reduction's gradient is known now: compute dX/dW/db in the forward (Liger FLCE style)

        def coef_fn(sel, lse_c, zsum_c):
            return _ce_coefs(w, lse_c, label_smoothing, z_loss, V)

        lse, tgt, zsum, dx, dw, db = be.fused(
            hidden, weight, bias, targets, need_zsum=label_smoothing > 0, coef_fn=coef_fn, **need, **cfg
        )
        ctx.grads = (dx, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _token_loss(lse, tgt, zsum, valid, label_smoothing, z_loss, V).sum() * w

    @staticmethod
    @autocast_off
    def backward(ctx, g):
        if ctx.reduction != "none" and hasattr(ctx, "grads"):
            # the buffers are ours: scale in place rather than allocating another (V, D)
            out = tuple(None if d is None else d.mul_(g).to(dt) for d, dt in zip(ctx.grads, ctx.dtypes))
            ctx.grads = None
            return out + (None,) * 8
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        label_smoothing, z_loss, V = ctx.coefs
        g = g.float().expand(lse.shape) if ctx.reduction != "none" else g.float()
        A, B, C = _ce_coefs(g, lse, label_smoothing, z_loss, V)
        dx, dw, db = ctx.be.grads(hidden, weight, bias, targets, lse, A, B, C, **ctx.need, **ctx.cfg)
        return (
            None if dx is None else dx.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
        ) + (None,) * 8


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``targets`` under the LM head, fused (formula in the module docstring).

    Args:
        hidden: ``(N, D)``; weight: ``(V, D)`` (same dtype); targets: ``(N,) int64`` or ``ignore_index``.
        reduction: ``"mean"`` (over non-ignored tokens; 0 if there are none), ``"sum"`` or ``"none"``.
        label_smoothing: ε in [0, 1); z_loss: λ ≥ 0 (coefficient of ``lse²``).
    Returns:
        fp32 scalar, or ``(N,)`` fp32 for ``reduction="none"`` (0 on ignored rows).
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_inputs(hidden, weight, targets, bias, ignore_index=ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0 or z_loss < 0.0:
        raise ValueError(f"need 0 <= label_smoothing < 1 and z_loss >= 0, got {label_smoothing}, {z_loss}")
    return LinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), bias, targets.contiguous(), ignore_index, reduction,
        float(label_smoothing), float(z_loss), float(temperature),
        None if softcap is None else float(softcap), impl,
    )


class FusedLinearCrossEntropyLoss(nn.Module):
    """Drop-in for ``liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss``.

    Same constructor order (``ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction,
    softcap``; ``lse_square_scale`` is the z-loss coefficient) and call ``(lin_weight (V, D),
    _input (..., D), target (...), bias=None)`` → loss; leading dimensions are flattened.  Liger
    options this module does not implement (class weights, returning z-loss / accuracy) raise.
    """

    def __init__(self, ce_weight=None, ignore_index: int = -100, lse_square_scale: float = 0.0,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap: Optional[float] = None,
                 return_z_loss: bool = False, *, temperature: float = 1.0, impl: str = "auto"):
        super().__init__()
        if ce_weight is not None or return_z_loss:
            raise NotImplementedError("FusedLinearCrossEntropyLoss: ce_weight and return_z_loss are not supported")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss = label_smoothing, lse_square_scale
        self.temperature, self.softcap, self.impl = temperature, softcap, impl

    def forward(self, lin_weight, _input, target, bias=None):
        return linear_cross_entropy(
            _input.reshape(-1, _input.shape[-1]), lin_weight, target.reshape(-1), bias=bias,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            temperature=self.temperature, softcap=self.softcap, impl=self.impl,
        )
