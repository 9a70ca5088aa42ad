"""Every public entry point under ``torch.autocast``: the same numbers as the explicit cast.

HF ``Trainer`` with ``bf16=True`` (and TRL on top of it) runs the model under autocast with fp32
parameters. Under autocast the kernels must behave as ``F.linear`` would: compute in the autocast
dtype, give fp32 parameters fp32 gradients through the cast, and keep working when ``backward`` is
called inside the autocast region (on CPU the backward runs in the calling thread, so a GEMM there
would be autocast too). The check: the result and the gradients of the fp32 leaves equal those of the
same call with the inputs cast to the autocast dtype by hand, outside autocast — a path the other
kernel tests compare with the fp32 references.
"""

import pytest
import torch

import zephyr_kernels as zk

from .helpers import impl, make_inputs  # noqa: F401

N, D, V, P = 37, 24, 203, 3  # odd shapes; 6 segments over 37 rows


def _segments():
    return torch.arange(N) % (2 * P)


ENTRY_POINTS = {
    "linear_cross_entropy": lambda h, w, b, t, impl: zk.linear_cross_entropy(h, w, t, bias=b, impl=impl),
    "linear_cross_entropy_none": lambda h, w, b, t, impl: zk.linear_cross_entropy(
        h, w, t, bias=b, reduction="none", impl=impl).sum(),
    "LigerFusedLinearCrossEntropyLoss_smoothing": lambda h, w, b, t, impl: zk.LigerFusedLinearCrossEntropyLoss(
        label_smoothing=0.1, impl=impl)(w, h.view(1, N, D), t.view(1, N), b),
    "linear_cross_entropy_cce_call": lambda h, w, b, t, impl: (lambda loss_lse: loss_lse[0] + (loss_lse[1] ** 2).mean())(
        zk.linear_cross_entropy(h.view(1, N, D), w, t.view(1, N), b, shift=1, return_lse=True, impl=impl)),
    "liger_fused_linear_cross_entropy": lambda h, w, b, t, impl: zk.liger_fused_linear_cross_entropy(
        h, w, t, b, lse_square_scale=1e-3, label_smoothing=0.1, softcap=5.0, impl=impl),
    "liger_fused_linear_cross_entropy_rowwise": lambda h, w, b, t, impl: zk.liger_fused_linear_cross_entropy(
        h, w, t, b, ce_weight=torch.linspace(0.5, 1.5, V), label_smoothing=0.1, use_token_scaling=True, impl=impl),
    "LigerFusedLinearCrossEntropyLoss": lambda h, w, b, t, impl: zk.LigerFusedLinearCrossEntropyLoss(
        reduction="sum", return_z_loss=True, return_token_accuracy=True, impl=impl)(w, h, t, b).loss,
    "linear_logprobs": lambda h, w, b, t, impl: sum(
        (o * (i + 1)).sum() for i, o in enumerate(zk.linear_logprobs(
            h, w, t, bias=b, segment_ids=_segments(), num_segments=2 * P, impl=impl))),
    "FusedLinearDPOLoss": lambda h, w, b, t, impl: zk.FusedLinearDPOLoss(beta=0.5, impl=impl)(
        h, w, t, _segments(), torch.full((P,), -30.0), torch.full((P,), -31.0), b)[0],
    "fused_linear_dpo_loss": lambda h, w, b, t, impl: zk.fused_linear_dpo_loss(
        h, w, t, _segments(), torch.full((P,), -30.0), torch.full((P,), -31.0), b, loss_type="ipo", impl=impl)[0],
    "LigerFusedLinearDPOLoss": lambda h, w, b, t, impl: zk.LigerFusedLinearDPOLoss(beta=0.5, impl=impl)(
        w, h[: 2 * 18].view(2, 18, D), t[: 2 * 18].view(2, 18), b,
        ref_chosen_logps=torch.full((1,), -30.0), ref_rejected_logps=torch.full((1,), -31.0))[0],
    # Liger's Functions take no impl (Liger's signature): the default dispatch, under autocast and cast alike
    "LigerFusedLinearCrossEntropyFunction": lambda h, w, b, t, impl: zk.LigerFusedLinearCrossEntropyFunction.apply(
        h, w, t, b, None, -100, 1e-3, 0.1, "mean", None, True)[0],
    "LigerFusedLinearDPOFunction": lambda h, w, b, t, impl: zk.LigerFusedLinearDPOFunction.apply(
        h[:36].view(2, 18, D), w, t[:36].view(2, 18), b, h[:36].detach().flip(0).view(2, 18, D), None, None,
        -100, 0.5, True)[0],
    "liger_fused_linear_dpo": lambda h, w, b, t, impl: zk.liger_fused_linear_dpo(
        h[:36].view(2, 18, D), w, t[:36].view(2, 18), b, h[:36].detach().flip(0).view(2, 18, D), None, None,
        -100, 0.2, False, True, True, True, 1, "apo_down")[0],
}


def _run(fn, leaves, t, impl, cast=None, autocast=None):
    """``fn``'s value and the gradients of ``leaves``; ``cast``: cast the leaves first, by hand;
    ``autocast``: run forward *and* backward inside ``torch.autocast('cpu', dtype=autocast)``."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in leaves]
    args = [x.to(cast) if (x is not None and cast is not None) else x for x in leaves]
    if autocast is not None:
        with torch.autocast("cpu", dtype=autocast):
            out = fn(*args, t, impl)
            out.backward()
    else:
        out = fn(*args, t, impl)
        out.backward()
    return out.detach(), [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_equals_explicit_cast(entry, dtype, impl):  # noqa: F811
    h, w, b, t = make_inputs(N, D, V, ignore_frac=0.2, bias=True, seed=3)
    fn = ENTRY_POINTS[entry]
    got, got_grads = _run(fn, [h, w, b], t, impl, autocast=dtype)
    want, want_grads = _run(fn, [h, w, b], t, impl, cast=dtype)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, e in zip(got_grads, want_grads):
        assert g.dtype == torch.float32  # the fp32 parameters' gradients, through the cast
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert got_grads[0].abs().sum() > 0 and got_grads[1].abs().sum() > 0


def test_autocast_mixed_hidden_and_head_dtypes():
    """Under autocast a bf16 hidden state meets an fp32 head (an fp32 master copy of ``lm_head``):
    both are cast, as ``F.linear`` does; outside autocast the mismatch stays an error."""
    h, w, b, t = make_inputs(N, D, V, seed=5)
    hb = h.detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = zk.linear_cross_entropy(hb, w, t, impl="torch")
    loss.backward()
    want = zk.linear_cross_entropy(hb.detach(), w.detach().to(torch.bfloat16), t, impl="torch")
    torch.testing.assert_close(loss.detach(), want, rtol=0, atol=0)
    assert hb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="share a float dtype"):
        zk.linear_cross_entropy(hb, w, t, impl="torch")


def test_autocast_state_restored():
    h, w, b, t = make_inputs(N, D, V, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zk.linear_cross_entropy(h, w, t, impl="torch").backward()
        assert torch.is_autocast_enabled("cpu")
        assert (h.detach() @ w.detach().T).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
