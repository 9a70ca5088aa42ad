"""Liger's FLCE drop-in (``LigerFusedLinearCrossEntropyLoss`` / ``liger_fused_linear_cross_entropy``) against a
plain PyTorch reference of Liger's definitions: every option, forward and gradients, odd shapes, V > 64k."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import zephyr_kernels as zk

from .helpers import assert_close, make_inputs, params

N, D, V = 37, 24, 203


def reference(h, w, b, t, *, ce_weight=None, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
              reduction="mean", softcap=None, use_token_scaling=False):
    """Liger's loss from full fp32 logits (``F.cross_entropy`` + z-loss, token scaling): ``(loss, z_loss)``."""
    z = F.linear(h, w, b).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = t != ignore_index
    cw = None if ce_weight is None else ce_weight.float()
    ce = F.cross_entropy(z, t, weight=cw, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         reduction="none")
    lse = torch.logsumexp(z, -1)
    zeta = torch.where(valid, lse_square_scale * lse**2, 0.0)
    if reduction == "mean":
        ce = ce / (valid.sum() if cw is None else cw[t[valid]].sum())
        zeta = zeta / valid.sum()
    tok = ce + zeta
    if use_token_scaling:
        p_t = torch.where(valid, torch.softmax(z, -1).gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0).detach()
        tok, zeta = tok * p_t, zeta * p_t
    return (tok, zeta) if reduction == "none" else (tok.sum(), zeta.sum())


def _run(fn, h, w, b, t, g=None):
    """Value and gradients of ``fn`` (``g``: upstream gradient for ``reduction='none'``)."""
    leaves = [x.detach().clone().requires_grad_() for x in params(h, w, b)]
    hh, ww, bb = leaves[0], leaves[1], leaves[2] if b is not None else None
    loss, z = fn(hh, ww, bb, t)
    loss.backward(g if g is not None else torch.ones_like(loss))
    return loss.detach(), z, [x.grad for x in leaves]


CASES = {
    "fused_defaults": {},
    "fused_all": dict(lse_square_scale=1e-3, label_smoothing=0.1, softcap=3.0, ignore_index=42),
    "weight_smoothing_softcap": dict(ce_weight=True, label_smoothing=0.1, softcap=3.0, lse_square_scale=1e-3),
    "weight_only": dict(ce_weight=True),
    "token_scaling": dict(use_token_scaling=True, lse_square_scale=1e-3),
    "weight_and_scaling": dict(ce_weight=True, use_token_scaling=True, label_smoothing=0.2),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_option_matches_reference_fp32(case, reduction):
    h, w, b, t = make_inputs(N, D, V, ignore_frac=0.2, bias=True, seed=4)
    opts = dict(CASES[case], reduction=reduction)
    if opts.pop("ce_weight", False):
        opts["ce_weight"] = torch.rand(V, generator=torch.Generator().manual_seed(5)) + 0.1
    if opts.get("ignore_index") == 42:  # a class id as ignore_index (Liger's test does this)
        t[t == -100] = 42
    g = torch.rand(N) + 0.5 if reduction == "none" else None  # a non-uniform per-token upstream gradient
    mod = zk.LigerFusedLinearCrossEntropyLoss(**opts, return_z_loss=True, impl="torch")
    got = _run(lambda hh, ww, bb, tt: (lambda o: (o.loss, o.z_loss))(mod(ww, hh, tt, bb)), h, w, b, t, g)
    want = _run(lambda hh, ww, bb, tt: reference(hh, ww, bb, tt, **opts), h, w, b, t, g)
    assert_close(got[0], want[0], what="loss")
    assert_close(got[1], want[1], what="z_loss")
    for name, a, e in zip(("x", "w", "b"), got[2], want[2]):
        assert e.abs().max() > 0
        assert_close(a, e, what=f"grad {name}")


@pytest.mark.parametrize("case", ["fused_all", "weight_smoothing_softcap"])
def test_large_vocab_odd_shapes(case):
    h, w, b, t = make_inputs(9, 8, 65_601, ignore_frac=0.2, bias=True, seed=6)
    opts = dict(CASES[case])
    opts.pop("ignore_index", None)
    if opts.pop("ce_weight", False):
        opts["ce_weight"] = torch.rand(65_601) + 0.1
    got = _run(lambda hh, ww, bb, tt: (zk.liger_fused_linear_cross_entropy(hh, ww, tt, bb, impl="torch", **opts),
                                       None), h, w, b, t)
    want = _run(lambda hh, ww, bb, tt: reference(hh, ww, bb, tt, **opts), h, w, b, t)
    assert_close(got[0], want[0], what="loss")
    for a, e in zip(got[2], want[2]):
        assert_close(a, e, atol=1e-6, what="grad")


@pytest.mark.parametrize("case", ["fused_all", "weight_smoothing_softcap", "token_scaling"])
def test_bf16_within_a_bf16_torch_run(case):
    """bf16 inputs: the error against the fp32 reference is of the order of a bf16 PyTorch run's own."""
    h, w, b, t = make_inputs(N, D, V, ignore_frac=0.2, bias=True, seed=7)
    opts = dict(CASES[case])
    opts.pop("ignore_index", None)
    if opts.pop("ce_weight", False):
        opts["ce_weight"] = torch.rand(V) + 0.1
    bf = [x.detach().to(torch.bfloat16) for x in (h, w, b)]
    exact = _run(lambda hh, ww, bb, tt: reference(hh.float(), ww.float(), bb.float(), tt, **opts), *bf, t)
    torch_bf16 = _run(lambda hh, ww, bb, tt: reference(hh, ww, bb, tt, **opts), *bf, t)
    ours = _run(lambda hh, ww, bb, tt: (zk.liger_fused_linear_cross_entropy(hh, ww, tt, bb, impl="torch", **opts),
                                        None), *bf, t)
    assert (ours[0] - exact[0]).abs() <= 2 * (torch_bf16[0] - exact[0]).abs() + 1e-3 * exact[0].abs()
    for a, r, e in zip(ours[2], torch_bf16[2], exact[2]):
        assert a.dtype == torch.bfloat16
        assert (a.float() - e.float()).abs().max() <= 2 * (r.float() - e.float()).abs().max() + 1e-6


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_token_accuracy_and_predicted_tokens(reduction):
    h, w, b, t = make_inputs(N, D, V, ignore_frac=0.3, bias=True, seed=8)
    t[::3] = (h @ w.T + b).argmax(-1)[::3]  # some hits
    out = zk.liger_fused_linear_cross_entropy(h, w, t, b, reduction=reduction, softcap=2.0, return_token_accuracy=True,
                                              return_predicted_tokens=True, impl="torch")
    valid = t != -100
    pred = (2.0 * torch.tanh((h @ w.T + b) / 2.0)).argmax(-1)
    assert torch.equal(out.predicted_tokens, torch.where(valid, pred, -1))
    hit = ((pred == t) & valid).float()
    assert hit.sum() > 0
    want = hit if reduction == "none" else hit.sum() / valid.sum()
    torch.testing.assert_close(out.token_accuracy, want)
    assert out.z_loss is None
    assert isinstance(zk.liger_fused_linear_cross_entropy(h, w, t, b, impl="torch"), torch.Tensor)


def test_signatures_are_liger_s():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def positional(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
                if p.kind == p.POSITIONAL_OR_KEYWORD]

    assert positional(zk.LigerFusedLinearCrossEntropyLoss.__init__) == positional(LigerFusedLinearCrossEntropyLoss.__init__)
    assert positional(zk.LigerFusedLinearCrossEntropyLoss.forward) == positional(LigerFusedLinearCrossEntropyLoss.forward)
    assert positional(zk.liger_fused_linear_cross_entropy) == positional(liger_fused_linear_cross_entropy)


@pytest.mark.parametrize("kw,match", [
    (dict(label_smoothing=1.5), "label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
    (dict(reduction="avg"), "reduction must be 'mean' or 'sum' or 'none'. Got: avg"),
    (dict(softcap=0.0), "softcap must greater than 0.0 or None. Got: 0.0"),
    (dict(accum_dtype=torch.bfloat16), "accum_dtype=torch.bfloat16 is not supported"),
    (dict(return_z_loss=1), "return_z_loss must be True or False"),
])
def test_refusals_at_construction_in_one_line(kw, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        zk.LigerFusedLinearCrossEntropyLoss(**kw)


def test_accum_dtype_fp32_changes_nothing():
    h, w, b, t = make_inputs(N, D, V, seed=9)
    a = _run(lambda hh, ww, bb, tt: (zk.liger_fused_linear_cross_entropy(hh, ww, tt, accum_dtype=torch.float32,
                                                                         impl="torch"), None), h, w, None, t)
    e = _run(lambda hh, ww, bb, tt: (zk.liger_fused_linear_cross_entropy(hh, ww, tt, impl="torch"), None), h, w, None, t)
    assert torch.equal(a[0], e[0]) and all(torch.equal(x, y) for x, y in zip(a[2], e[2]))


def test_function_signature_is_liger_s():
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

    liger = [(p.name, p.default) for p in inspect.signature(LigerFusedLinearCrossEntropyFunction.forward).parameters.values()]
    ours = [(p.name, p.default) for p in inspect.signature(zk.LigerFusedLinearCrossEntropyFunction.apply).parameters.values()]
    assert ours == liger[1:]  # Liger's forward takes ctx first; apply does not


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_function_apply_is_liger_s_four_tuple(reduction):
    """``apply`` positionally, every output asked: the reference's loss, z-loss and gradients, the argmax outputs."""
    h, w, b, t = make_inputs(N, D, V, ignore_frac=0.3, bias=True, seed=10)
    g = torch.randn(N) if reduction == "none" else None
    outs = {}

    def fn(hh, ww, bb, tt):
        outs["all"] = zk.LigerFusedLinearCrossEntropyFunction.apply(
            hh, ww, tt, bb, None, -100, 1e-3, 0.1, reduction, 3.0, True, torch.float32, False, True, True)
        return outs["all"][0], outs["all"][1]

    ours = _run(fn, h, w, b, t, g)
    ref = _run(lambda hh, ww, bb, tt: reference(hh, ww, bb, tt, lse_square_scale=1e-3, label_smoothing=0.1,
                                                reduction=reduction, softcap=3.0), h, w, b, t, g)
    assert_close(ours[0], ref[0], what="loss")
    assert_close(ours[1], ref[1], what="z_loss")
    for name, a, r in zip("hwb", ours[2], ref[2]):
        assert_close(a, r, what=f"grad {name}")
    out = zk.liger_fused_linear_cross_entropy(h, w, t, b, reduction=reduction, softcap=3.0, return_token_accuracy=True,
                                              return_predicted_tokens=True)
    assert torch.equal(outs["all"][3], out.predicted_tokens)
    torch.testing.assert_close(outs["all"][2], out.token_accuracy)


def test_function_without_return_flags_gives_loss_and_nones():
    h, w, _, t = make_inputs(N, D, V, seed=11)
    loss, z, acc, pred = zk.LigerFusedLinearCrossEntropyFunction.apply(h, w, t)
    assert (z, acc, pred) == (None, None, None)
    assert_close(loss, reference(h, w, None, t)[0])


@pytest.mark.parametrize("kw", [dict(ce_impl="triton"), dict(ce_mode="fused")])
def test_function_refuses_liger_backend_selection(kw):
    h, w, _, t = make_inputs(N, D, V, seed=12)
    with pytest.raises(ValueError, match=f"{next(iter(kw))}=.* Liger's own cross-entropy backends"):
        zk.LigerFusedLinearCrossEntropyFunction.apply(h, w, t, **kw)
