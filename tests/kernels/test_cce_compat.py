"""``zephyr_kernels.linear_cross_entropy`` takes Cut Cross-Entropy's call: positional order, leading dimensions,
``shift``, ``return_lse``, CCE's impl names; against a plain PyTorch reference (forward and gradients)."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import zephyr_kernels as zk
from zephyr_kernels.dispatch import CCE_IMPLS, canonical_impl

from .helpers import assert_close

# cut_cross_entropy (main, 2025) linear_cross_entropy's parameters, in order
CCE_PARAMS = ["e", "c", "targets", "bias", "ignore_index", "softcap", "reduction", "shift", "return_lse", "filter_eps",
              "accum_e_fp32", "accum_c_fp32", "filter_e_grad", "filter_c_grad", "impl", "vocab_parallel_options"]


def reference(e, c, targets, bias, softcap, shift, reduction):
    """CCE's test reference: ``(loss, lse)`` from full fp32 logits, ``shift`` applied."""
    if shift:
        e, targets = e[:, :-shift], targets[:, shift:]
    z = e.flatten(0, -2).float() @ c.float().T + (0 if bias is None else bias.float())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, targets.flatten(), reduction=reduction)
    lse = torch.where(targets.flatten() != -100, torch.logsumexp(z, -1), 0.0).view(targets.shape)
    return (loss.view(targets.shape) if reduction == "none" else loss), lse


def _inputs(seed=0, B=3, T=11, D=20, V=157):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(B, T, D, generator=g).requires_grad_()
    c = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=g)).requires_grad_()
    t = torch.randint(0, V, (B, T), generator=g)
    t[torch.rand(B, T, generator=g) < 0.2] = -100
    return e, c, bias, t


def _grads(out, leaves, g):
    for x in leaves:
        x.grad = None
    out.backward(g)
    return [x.grad.clone() for x in leaves]


def test_positional_order_is_cce_s():
    names = list(inspect.signature(zk.linear_cross_entropy).parameters)
    assert names[3:len(CCE_PARAMS)] == CCE_PARAMS[3:]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift,softcap,impl", [(0, None, "cce"), (2, 20.0, "cce_exact"), (True, None, "torch_compile")])
def test_cce_call_matches_reference(shift, softcap, impl, reduction):
    e, c, bias, t = _inputs()
    got = zk.linear_cross_entropy(e, c, t, bias, -100, softcap, reduction, shift, impl=impl)
    want, _ = reference(e, c, t, bias, softcap, int(shift), reduction)
    assert got.shape == want.shape
    assert_close(got, want, what="loss")
    g = torch.rand_like(want) + 0.5
    for a, r in zip(_grads(got, [e, c, bias], g), _grads(want, [e, c, bias], g)):
        assert r.abs().max() > 0
        assert_close(a, r, what="grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_lse_carries_the_z_loss_gradient(reduction):
    """CCE users add a z-loss from the returned lse: its gradient must flow back through the head."""
    e, c, bias, t = _inputs(seed=1)
    loss, lse = zk.linear_cross_entropy(e, c, t, bias=bias, shift=1, reduction=reduction, return_lse=True, impl="torch")
    want, want_lse = reference(e, c, t, bias, None, 1, reduction)
    assert lse.shape == t[:, 1:].shape
    assert_close(loss, want, what="loss")
    assert_close(lse, want_lse, what="lse")
    total, want_total = loss.sum() + 1e-2 * lse.square().sum(), want.sum() + 1e-2 * want_lse.square().sum()
    for a, r in zip(_grads(total, [e, c, bias], None), _grads(want_total, [e, c, bias], None)):
        assert_close(a, r, what="grad")


def test_impl_names_map_or_refuse_in_one_line():
    assert {canonical_impl(n) for n in CCE_IMPLS} == {"auto", "torch"}
    assert canonical_impl("triton_tiled") == "triton_tiled"
    e, c, bias, t = _inputs()
    with pytest.raises(ValueError, match="impl must be one of .* Cut Cross-Entropy impl"):
        zk.linear_cross_entropy(e, c, t, impl="cce_fast")
    with pytest.raises(ValueError, match="filter_eps=0.01 is not supported"):
        zk.linear_cross_entropy(e, c, t, filter_eps=0.01)
    with pytest.raises(NotImplementedError, match="vocab_parallel_options"):
        zk.linear_cross_entropy(e, c, t, vocab_parallel_options=object())
    with pytest.raises(ValueError, match=r"Shift must be in the range \[0, 11\). Got 11."):
        zk.linear_cross_entropy(e, c, t, shift=11)
    with pytest.raises(ValueError, match="return_lse=True takes neither"):
        zk.linear_cross_entropy(e, c, t, return_lse=True, z_loss=1e-4)
    for ok in ("auto", "high", None):  # zephyr's own filter, below rounding
        zk.linear_cross_entropy(e, c, t, filter_eps=ok, accum_e_fp32=True, accum_c_fp32=True, impl="torch")
