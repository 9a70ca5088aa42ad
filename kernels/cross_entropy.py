"""Fused linear cross-entropy for SFT: ``loss = CE(hidden W^T + b, targets)`` without ``(N, V)`` logits.

Per non-ignored token (Szegedy et al. 2016 label smoothing; PaLM's z-loss, Chowdhery et al. 2022)::

    ℓ_r = (1 - ε)(lse_r - z[r, t_r]) + ε (lse_r - mean_v z[r, v]) + λ · lse_r²

With ``reduction="mean"|"sum"`` the upstream gradient is known in the forward (``1/n_valid`` or 1),
so the forward also computes dX / dW / db — one pass per chunk on the torch path, statistics +
gradient kernels on Triton — and backward only scales them by ``grad_output`` (no recomputation).
``reduction="none"`` keeps a generic backward for arbitrary per-token upstream gradients.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from zephyr_kernels.cce_compat import cce_options, cce_with_lse, shift_inputs
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
    """Returns ``(loss, z_part)``: ``z_part`` is the z-loss share of ``loss`` (``λ·lse²`` reduced the same
    way, detached — Liger's ``z_loss`` output); only ``loss`` carries a gradient."""

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
        else:
            # the reduction's gradient is known now: compute dX/dW/db in the forward (Liger FLCE style)
            def coef_fn(sel, lse_c, zsum_c):
                return _ce_coefs(w, lse_c, label_smoothing, z_loss, V)

            lse, tgt, zsum, dx, dw, db = be.fused(
                hidden, weight, bias, targets, need_zsum=label_smoothing > 0, coef_fn=coef_fn, **need, **cfg
            )
            ctx.grads = (dx, dw, db)
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = _token_loss(lse, tgt, zsum, valid, label_smoothing, z_loss, V)
        z_part = torch.where(valid, z_loss * lse.square(), 0.0)
        if reduction != "none":
            loss, z_part = loss.sum() * w, z_part.sum() * w
        ctx.mark_non_differentiable(z_part)
        return loss, z_part

    @staticmethod
    @autocast_off
    def backward(ctx, g, _g_z):
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


def check_ce_options(reduction, label_smoothing, z_loss, softcap=None):
    """One-line refusals shared by every cross-entropy entry point."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0 or z_loss < 0.0:
        raise ValueError(f"need 0 <= label_smoothing <= 1 and z_loss >= 0, got {label_smoothing}, {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")


def fused_ce(hidden, weight, targets, bias=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
             z_loss=0.0, temperature=1.0, softcap=None, impl="auto"):
    """``(loss, z_part)`` on flat ``(N, D)`` / ``(N,)`` inputs (see :class:`LinearCrossEntropyFunction`);
    casts for autocast and checks inputs. The one door into the fused cross-entropy Function."""
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_inputs(hidden, weight, targets, bias, ignore_index=ignore_index)
    check_ce_options(reduction, label_smoothing, z_loss, softcap)
    return LinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), bias, targets.contiguous(), ignore_index, reduction,
        float(label_smoothing), float(z_loss), float(temperature),
        None if softcap is None else float(softcap), impl,
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    shift: Union[bool, int] = 0,
    return_lse: bool = False,
    filter_eps: Union[float, str, None] = "auto",
    accum_e_fp32: bool = False,
    accum_c_fp32: bool = False,
    filter_e_grad: bool = True,
    filter_c_grad: bool = True,
    impl: str = "auto",
    vocab_parallel_options=None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
):
    """Cross-entropy of ``targets`` under the LM head, fused (formula in the module docstring).

    The positional order is Cut Cross-Entropy's ``linear_cross_entropy(e, c, targets, bias, ignore_index,
    softcap, reduction, shift, return_lse, filter_eps, accum_e_fp32, accum_c_fp32, filter_e_grad,
    filter_c_grad, impl, vocab_parallel_options)`` (:mod:`zephyr_kernels.cce_compat` says how each CCE
    option maps); zephyr's own options are keyword-only.

    Args:
        hidden: ``(..., D)`` (CCE's ``e``); weight: ``(V, D)`` (CCE's ``c``, same dtype);
        targets: ``(...)`` int64 in ``[0, V)`` or ``ignore_index``; bias: optional ``(V,)``.
        reduction: ``"mean"`` (over non-ignored tokens; 0 if there are none), ``"sum"`` or ``"none"``.
        shift: position ``i`` of ``hidden`` predicts ``targets[..., i + shift]`` (CCE; ``True`` = 1).
        return_lse: also return the per-position log-sum-exp (differentiable; 0 on ignored positions).
        label_smoothing: ε in [0, 1]; z_loss: λ ≥ 0 (coefficient of ``lse²``).
        impl: zephyr's ``"auto" | "triton" | "triton_tiled" | "torch"`` or a CCE impl name.
    Returns:
        fp32 scalar, or fp32 ``targets``-shaped (less ``shift`` positions) for ``reduction="none"``
        (0 on ignored positions); ``(loss, lse)`` with ``return_lse``.
    """
    impl = cce_options(impl, filter_eps, accum_e_fp32, accum_c_fp32, filter_e_grad, filter_c_grad,
                       vocab_parallel_options)
    hidden, targets = shift_inputs(hidden, targets, shift)
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if return_lse:
        return cce_with_lse(h, weight, t, bias, ignore_index=ignore_index, reduction=reduction,
                            temperature=temperature, softcap=softcap, label_smoothing=label_smoothing,
                            z_loss=z_loss, impl=impl, shape=targets.shape)
    loss, _ = fused_ce(h, weight, t, bias, ignore_index=ignore_index, reduction=reduction,
                       label_smoothing=label_smoothing, z_loss=z_loss, temperature=temperature, softcap=softcap,
                       impl=impl)
    return loss.view(targets.shape) if reduction == "none" else loss
