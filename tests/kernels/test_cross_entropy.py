"""linear_cross_entropy / LigerFusedLinearCrossEntropyLoss vs the reference, Liger FLCE and CCE."""

import pytest
import torch
import torch.nn.functional as F
from tests.kernels.helpers import assert_close, grads_of, make_inputs, params

from tests.kernels.helpers import impl  # noqa: F401  (parametrized fixture)
from zephyr_kernels import LigerFusedLinearCrossEntropyLoss as ZephyrFLCE, linear_cross_entropy
from tests.kernels.oracle import reference_cross_entropy


@pytest.mark.parametrize(
    "reduction,ls,zl,softcap,temp",
    [
        ("mean", 0.0, 0.0, None, 1.0),
        ("sum", 0.1, 1e-3, None, 1.0),
        ("mean", 0.2, 0.0, 4.0, 0.8),
        ("none", 0.1, 1e-2, None, 1.0),
    ],
)
def test_cross_entropy_matches_reference(impl, reduction, ls, zl, softcap, temp):
    h, w, b, t = make_inputs(47, 31, 123, ignore_frac=0.2, bias=True, seed=5)
    kw = dict(reduction=reduction, label_smoothing=ls, z_loss=zl, softcap=softcap, temperature=temp)
    up = torch.randn(47) if reduction == "none" else torch.tensor(1.7)  # non-unit upstream grad

    def run(fn, **extra):
        return grads_of(lambda: (fn(h, w, t, bias=b, **kw, **extra) * up).sum(), params(h, w, b))

    loss, g = run(linear_cross_entropy, impl=impl)
    rloss, rg = run(reference_cross_entropy)
    assert_close(loss, rloss, what="loss")
    for name, a, r in zip(("hidden", "weight", "bias"), g, rg):
        assert_close(a, r, what=f"grad {name}")


def test_reference_matches_torch_cross_entropy():
    h, w, b, t = make_inputs(30, 16, 90, ignore_frac=0.2, bias=True)
    logits = h @ w.t() + b
    for ls in (0.0, 0.1):
        expected = F.cross_entropy(logits, t, ignore_index=-100, label_smoothing=ls)
        assert_close(reference_cross_entropy(h, w, t, bias=b, label_smoothing=ls), expected)


def test_mean_over_no_valid_tokens_is_zero(impl):
    h, w, _, t = make_inputs(6, 16, 40)
    t[:] = -100
    loss = linear_cross_entropy(h, w, t, impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_matches_liger_fused_linear_cross_entropy():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    h, w, b, t = make_inputs(2 * 24, 32, 300, ignore_frac=0.2, bias=True, seed=9)
    h3, t3 = h.view(2, 24, 32), t.view(2, 24)
    for kw in (dict(), dict(label_smoothing=0.1, lse_square_scale=1e-3), dict(reduction="sum")):  # Liger softcap fails in the interpreter
        ours = grads_of(lambda: ZephyrFLCE(impl="torch", **kw)(w, h3, t3, b), params(h, w, b))
        liger = grads_of(lambda: LigerFusedLinearCrossEntropyLoss(**kw)(w, h, t, b), params(h, w, b))
        assert_close(ours[0], liger[0], what="loss")
        for a, r in zip(ours[1], liger[1]):
            assert_close(a, r, atol=2e-5, what="grad")


@pytest.mark.slow
def test_matches_cut_cross_entropy_torch_compile():
    from cut_cross_entropy import linear_cross_entropy as cce

    h, w, _, t = make_inputs(64, 32, 500, ignore_frac=0.2, seed=11)
    ours = grads_of(lambda: linear_cross_entropy(h, w, t, impl="torch"), [h, w])
    theirs = grads_of(lambda: cce(h, w, t, impl="torch_compile"), [h, w])
    assert_close(ours[0], theirs[0], what="loss")
    for a, r in zip(ours[1], theirs[1]):
        assert_close(a, r, atol=2e-5, what="grad")
