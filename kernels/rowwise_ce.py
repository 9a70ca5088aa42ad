"""Row-blocked PyTorch linear cross-entropy for the Liger options the fused kernels do not express
(``ce_weight`` with label smoothing puts a per-*column* weight on the smoothing term; token scaling needs
``p(t)`` before the gradient), and the no-grad argmax pass behind token accuracy / predicted tokens.

Liger's own scheme: rows in blocks so one ``(rows, V)`` fp32 logits block (``_BLOCK_BYTES``, 32 MiB) is
alive at a time; each block's loss is PyTorch's ``F.cross_entropy`` (class weights, label smoothing —
formula in :mod:`zephyr_kernels.liger_ce`) plus the z-loss, and its gradients come from autograd on
that block. For ``mean`` / ``sum`` the gradients are taken in the forward (the upstream gradient is a
known scalar), for ``none`` in the backward with the per-token upstream gradient. dW / db accumulate
in fp32 and are returned in the parameters' dtypes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from zephyr_kernels.dispatch import autocast_off, check_inputs

_BLOCK_BYTES = 32 << 20


class _Opts(NamedTuple):
    ignore_index: int
    label_smoothing: float
    z_loss: float
    temperature: float
    softcap: Optional[float]
    token_scaling: bool


def _rows_per_block(V: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * V))


def block_logits(h, weight, bias, temperature, softcap):
    """fp32 ``transform(h Wᵀ + b)`` of one row block; the GEMM in the input dtype (as ``F.linear``)."""
    z = F.linear(h, weight, bias).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature if temperature != 1.0 else z


def _block_losses(z, t, ce_weight, o: _Opts, s_ce, s_z):
    """Per-token ``(loss, z_part)`` of one block: ``s_ce·ℓ + s_z·ζ`` (× detached ``p(t)`` when scaling)."""
    valid = t != o.ignore_index
    ce = F.cross_entropy(z, t, weight=ce_weight, ignore_index=o.ignore_index, reduction="none",
                         label_smoothing=o.label_smoothing)
    lse = torch.logsumexp(z, dim=-1)
    zeta = torch.where(valid, o.z_loss * lse.square(), 0.0) * s_z
    if o.token_scaling:
        p_t = torch.exp(z.gather(1, torch.where(valid, t, 0)[:, None])[:, 0] - lse).detach()
        p_t = torch.where(valid, p_t, 0.0)
        return (ce * s_ce + zeta) * p_t, zeta * p_t
    return ce * s_ce + zeta, zeta


def _pass(h, weight, bias, t, ce_weight, o: _Opts, s_ce, s_z, g_tok=None, need=(False, False, False)):
    """Per-token losses (and, with ``g_tok``, the gradients of ``Σ g_tok · loss``) over row blocks."""
    N, V = h.shape[0], weight.shape[0]
    loss, zeta = h.new_zeros(N, dtype=torch.float32), h.new_zeros(N, dtype=torch.float32)
    dx = torch.zeros_like(h) if need[0] else None
    dw = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
    db = torch.zeros_like(bias, dtype=torch.float32) if need[2] else None
    w_leaf = weight.detach().requires_grad_(need[1])
    b_leaf = None if bias is None else bias.detach().requires_grad_(need[2])
    step = _rows_per_block(V)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        h_leaf = h[r0:r1].detach().requires_grad_(need[0])
        with torch.enable_grad():
            z = block_logits(h_leaf, w_leaf, b_leaf, o.temperature, o.softcap)
            tok, zt = _block_losses(z, t[r0:r1], ce_weight, o, s_ce, s_z)
            if g_tok is not None and any(need):
                leaves = [x for x, n in zip((h_leaf, w_leaf, b_leaf), need) if n]
                grads = iter(torch.autograd.grad((tok * g_tok[r0:r1]).sum(), leaves))
                if need[0]:
                    dx[r0:r1] = next(grads)
                if need[1]:
                    dw += next(grads)
                if need[2]:
                    db += next(grads)
        loss[r0:r1], zeta[r0:r1] = tok.detach(), zt.detach()
    return loss, zeta, (dx, dw, db)


class RowwiseCEFunction(torch.autograd.Function):
    """``(loss, z_part)`` as :class:`zephyr_kernels.cross_entropy.LinearCrossEntropyFunction`; ``z_part``
    has no gradient."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, targets, ce_weight, o: _Opts, reduction):
        valid = targets != o.ignore_index
        n = valid.sum().clamp(min=1).float()
        s_z = 1.0 / n if reduction == "mean" else torch.ones((), device=hidden.device)
        s_ce = s_z
        if reduction == "mean" and ce_weight is not None:
            s_ce = 1.0 / (ce_weight[torch.where(valid, targets, 0)] * valid).sum()  # no host sync
        need = tuple(ctx.needs_input_grad[:3])
        ctx.reduction, ctx.dtypes = reduction, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        g_tok = None if reduction == "none" or not any(need) else torch.ones_like(valid, dtype=torch.float32)
        loss, zeta, ctx.grads = _pass(hidden, weight, bias, targets, ce_weight, o, s_ce, s_z, g_tok, need)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, targets, ce_weight)
            ctx.o, ctx.need = o, need
        else:
            loss, zeta = loss.sum(), zeta.sum()
        ctx.mark_non_differentiable(zeta)
        return loss, zeta

    @staticmethod
    @autocast_off
    def backward(ctx, g, _g_z):
        if ctx.reduction == "none":
            hidden, weight, bias, targets, ce_weight = ctx.saved_tensors
            one = torch.ones((), device=hidden.device)
            *_, ctx.grads = _pass(hidden, weight, bias, targets, ce_weight, ctx.o, one, one, g.float(), ctx.need)
        else:
            ctx.grads = tuple(None if d is None else d.mul_(g) for d in ctx.grads)
        out = tuple(None if d is None else d.to(dt) for d, dt in zip(ctx.grads, ctx.dtypes))
        ctx.grads = None
        return out + (None,) * 4


def rowwise_ce(hidden, weight, targets, bias=None, *, ce_weight=None, token_scaling=False, ignore_index=-100,
               reduction="mean", label_smoothing=0.0, z_loss=0.0, temperature=1.0, softcap=None):
    """``(loss, z_part)`` on flat ``hidden (N, D)``, ``weight (V, D)``, ``targets (N,)`` int64, optional
    ``bias (V,)`` and class weights ``ce_weight (V,)`` (module docstring; fp32 outputs)."""
    check_inputs(hidden, weight, targets, bias, ignore_index=ignore_index)
    o = _Opts(ignore_index, float(label_smoothing), float(z_loss), float(temperature),
              None if softcap is None else float(softcap), bool(token_scaling))
    cw = None if ce_weight is None else ce_weight.detach().float()
    return RowwiseCEFunction.apply(hidden, weight, bias, targets, cw, o, reduction)


@torch.no_grad()
def argmax_tokens(hidden, weight, bias, targets, *, ignore_index=-100, temperature=1.0, softcap=None):
    """``(N,) int64`` index of each row's largest transformed logit (first one on ties), ``-1`` where
    ``targets`` is ignored; one no-grad pass over ``(rows, V)`` blocks."""
    N, V = hidden.shape[0], weight.shape[0]
    out = torch.full((N,), -1, dtype=torch.int64, device=hidden.device)
    step = _rows_per_block(V)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        out[r0:r1] = block_logits(hidden[r0:r1], weight, bias, temperature, softcap).argmax(-1)
    return torch.where(targets != ignore_index, out, -1)


STAT_NAMES = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@torch.no_grad()
def token_statistics(hidden, weight, bias, targets, names, *, temperature=1.0, softcap=None):
    """No-grad per-row statistics of ``p = softmax(z)``, ``z = transform(h Wᵀ + b)`` (``(N, D)`` hidden, ``(V, D)``
    weight, ``(N,)`` int64 targets, every row valid), over ``(rows, V)`` fp32 blocks of at most ``_BLOCK_BYTES``:

    * ``entropy``: ``H = lse(z) - Σ_v p_v z_v`` (fp32);
    * ``log_sum_sq_probs``: ``log Σ_v p_v² = lse(2z) - 2·lse(z)`` (fp32);
    * ``mean_logits``: ``Σ_v z_v / V`` (fp32);
    * ``is_top1``: ``argmax_v z_v == target`` (bool; the first maximum on ties).

    Returns ``{name: (N,) tensor}`` for the requested ``names`` (a subset of :data:`STAT_NAMES`)."""
    N, V = hidden.shape[0], weight.shape[0]
    out = {n: hidden.new_empty(N, dtype=torch.bool if n == "is_top1" else torch.float32) for n in names}
    step = _rows_per_block(V)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        z = block_logits(hidden[r0:r1], weight, bias, temperature, softcap)
        if "entropy" in out or "log_sum_sq_probs" in out:
            lse = torch.logsumexp(z, dim=-1)
        if "entropy" in out:
            out["entropy"][r0:r1] = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
        if "log_sum_sq_probs" in out:
            out["log_sum_sq_probs"][r0:r1] = torch.logsumexp(2 * z, dim=-1) - 2 * lse
        if "mean_logits" in out:
            out["mean_logits"][r0:r1] = z.sum(-1) / V
        if "is_top1" in out:
            out["is_top1"][r0:r1] = z.argmax(-1) == targets[r0:r1]
    return out
