"""``linear_logprobs``: per-token (and per-segment) ``log p(target | hidden)`` through the LM head.

    logp[r] = z[r, t_r] - logsumexp_v z[r, v],   z = transform(hidden W^T + b)   (see reference.py)

computed without ever holding ``(N, V)`` logits.  Forward = one statistics pass; backward
recomputes logit tiles and takes arbitrary upstream gradients for the token log-probs, the segment
sums and the log-sum-exp.
"""

from __future__ import annotations

from typing import Optional

import torch

from zephyr_kernels.backend_common import Stats
from zephyr_kernels.dispatch import autocast_inputs, autocast_off, backend, check_inputs


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, targets, segment_ids, num_segments, ignore_index,
                temperature, softcap, impl):
        be = backend(impl, hidden.device)
        st = be.stats(
            hidden, weight, bias, targets, ignore_index=ignore_index, temperature=temperature,
            softcap=softcap, segment_ids=segment_ids, num_segments=num_segments,
        )
        lse, logp, seg = st.lse, st.logp, st.seg
        if seg is None:
            seg = logp.new_zeros(0)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, targets, segment_ids, lse, st.tgt, st.tile_max)
        ctx.cfg = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap)
        ctx.be = be
        return logp, seg, lse

    @staticmethod
    @autocast_off
    def backward(ctx, g_tok, g_seg, g_lse):
        hidden, weight, bias, targets, segment_ids, lse, tgt, tile_max = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        if not (need_dx or need_dw or need_db) or (g_tok is None and g_seg is None and g_lse is None):
            return (None,) * 10
        g = torch.zeros_like(lse)
        if g_tok is not None:
            g = g + g_tok.float()
        if g_seg is not None and segment_ids is not None:
            g = g + g_seg.float().index_select(0, segment_ids)
        A = -g if g_lse is None else g_lse.float() - g
        dx, dw, db = ctx.be.grads(
            hidden, weight, bias, targets, lse, A, g, None, need_dx=need_dx, need_dw=need_dw,
            need_db=need_db, stats=Stats(lse, tgt, None, None, None, tile_max), **ctx.cfg,
        )
        return (
            None if dx is None else dx.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
        ) + (None,) * 7


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    segment_ids: Optional[torch.Tensor] = None,
    num_segments: Optional[int] = None,
    return_lse: bool = False,
    impl: str = "auto",
):
    """Token log-probabilities of ``targets`` under ``softmax(transform(hidden W^T + b))``.

    Args:
        hidden: ``(N, D)`` fp32 / bf16 / fp16 final hidden states (packed, no padding).
        weight: ``(V, D)`` LM-head weight, same dtype as ``hidden``.
        targets: ``(N,) int64`` token ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``(V,)``.
        temperature: logits are divided by it (after the softcap).
        softcap: if set, logits become ``softcap · tanh(z / softcap)`` (Gemma-2) before temperature.
        segment_ids: optional ``(N,) int64`` in ``[0, num_segments)``; per-segment sums are reduced
            inside the kernel.  ``num_segments`` should be given (else it is read from the tensor,
            which syncs with the device).
        return_lse: also return the per-row log-sum-exp ``(N,)`` fp32 (0 on ignored rows).
        impl: ``"auto" | "triton" | "triton_tiled" | "torch"`` (see :mod:`zephyr_kernels.dispatch`).

    Returns:
        ``token_logps (N,) fp32`` (0 where ignored); with ``segment_ids`` the tuple
        ``(token_logps, segment_logps (S,) fp32)`` (empty segments give 0); ``lse`` appended when
        ``return_lse``.  Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` through every
        output.
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_inputs(hidden, weight, targets, bias, segment_ids, num_segments, ignore_index)
    if segment_ids is not None and num_segments is None:
        # host sync, only when the caller did not say how many segments there are
        num_segments = int(segment_ids.max()) + 1 if segment_ids.numel() else 0
    logp, seg, lse = LinearLogprobsFunction.apply(
        hidden.contiguous(), weight.contiguous(), bias, targets.contiguous(),
        None if segment_ids is None else segment_ids.contiguous(), num_segments, ignore_index,
        float(temperature), None if softcap is None else float(softcap), impl,
    )
    out = [logp]
    if segment_ids is not None:
        out.append(seg)
    if return_lse:
        out.append(lse)
    return out[0] if len(out) == 1 else tuple(out)
