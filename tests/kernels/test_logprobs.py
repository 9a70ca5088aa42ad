"""linear_logprobs (torch chunked + Triton interpreter) against the naive fp32 reference."""

import pytest
import torch
from tests.kernels.helpers import assert_close, grads_of, make_inputs, params

from tests.kernels.helpers import impl  # noqa: F401  (parametrized fixture)
from zephyr_kernels import linear_logprobs
from tests.kernels.oracle import reference_linear_logprobs

CASES = {
    # name: (N, D, V, ignore_frac, bias, softcap, temperature)
    "odd_47_31_123": (47, 31, 123, 0.0, False, None, 1.0),
    "ignored_20pct_bias": (47, 31, 123, 0.2, True, None, 1.0),
    "softcap_temperature": (40, 24, 301, 0.2, True, 3.0, 0.7),
    "single_row": (1, 31, 123, 0.0, False, None, 1.0),
    "v_not_tile_multiple": (33, 20, 1001, 0.1, False, None, 1.3),
    "v_gt_64k": (8, 16, 70001, 0.25, False, None, 1.0),
}


def _run(fn, h, w, b, t, segs, S, gt, gs, gl, **kw):
    def loss():
        lp, sg, lse = fn(h, w, t, bias=b, segment_ids=segs, num_segments=S, return_lse=True, **kw)
        return (lp * gt).sum() + (sg * gs).sum() + (lse * gl).sum()

    with torch.no_grad():
        outs = fn(h, w, t, bias=b, segment_ids=segs, num_segments=S, return_lse=True, **kw)
    return outs, grads_of(loss, params(h, w, b))[1]


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_all_grads_match_reference(impl, case):
    N, D, V, ign, bias, softcap, temp = CASES[case]
    h, w, b, t = make_inputs(N, D, V, ignore_frac=ign, bias=bias, seed=hash(case) % 1000)
    S = 7  # segments 5 and 6 get no tokens: empty segments must come back as 0
    g = torch.Generator().manual_seed(1)
    segs = torch.randint(0, 5, (N,), generator=g)
    # upstream gradients that differ per token, per segment and on the lse output
    gt, gs, gl = torch.randn(N, generator=g), torch.randn(S, generator=g), torch.randn(N, generator=g) * 0.1
    kw = dict(softcap=softcap, temperature=temp)
    (lp, sg, lse), grads = _run(lambda *a, **k: linear_logprobs(*a, impl=impl, **k), h, w, b, t, segs, S, gt, gs, gl, **kw)
    (rlp, rsg, rlse), rgrads = _run(reference_linear_logprobs, h, w, b, t, segs, S, gt, gs, gl, **kw)
    assert lp.dtype == sg.dtype == torch.float32 and lp.shape == (N,) and sg.shape == (S,)
    assert_close(lp, rlp, what="token_logps")
    assert_close(sg, rsg, what="segment_logps")
    assert_close(lse, rlse, what="lse")
    assert torch.all(lp[t == -100] == 0) and torch.all(sg[5:] == 0)
    for name, a, r in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert r.abs().max() > 0
        assert_close(a, r, what=f"grad {name}")


def test_all_targets_ignored(impl):
    h, w, b, t = make_inputs(9, 16, 50, bias=True)
    t[:] = -100
    lp, sg = linear_logprobs(h, w, t, bias=b, segment_ids=torch.zeros(9, dtype=torch.long), num_segments=2, impl=impl)
    assert torch.all(lp == 0) and torch.all(sg == 0)
    (lp.sum() + sg.sum()).backward()
    assert all(torch.all(x.grad == 0) for x in (h, w, b))


def test_token_only_output_and_partial_requires_grad(impl):
    h, w, _, t = make_inputs(20, 16, 77, ignore_frac=0.2)
    w.requires_grad_(False)
    lp = linear_logprobs(h, w, t, impl=impl)
    assert torch.is_tensor(lp) and lp.shape == (20,)
    lp.sum().backward()
    ref = reference_linear_logprobs(h.detach().requires_grad_(), w, t)
    assert_close(lp, ref)
    assert w.grad is None and h.grad is not None


def test_bf16_error_within_same_dtype_torch_error(impl):
    """bf16 inputs: our error vs the fp32 truth is at most ~a bf16 torch run's own error."""
    N, D, V = 32, 32, 257
    h, w, _, t = make_inputs(N, D, V, dtype=torch.bfloat16, ignore_frac=0.2, seed=3)
    gt = torch.randn(N)
    hf, wf = (x.detach().float().requires_grad_() for x in (h, w))
    truth, tg = grads_of(lambda: (reference_linear_logprobs(hf, wf, t) * gt).sum(), [hf, wf])
    truth_lp = reference_linear_logprobs(hf, wf, t).detach()

    def torch_bf16():  # what plain torch does in bf16: bf16 logits, fp32 log_softmax
        z = (h @ w.t()).float().log_softmax(-1)
        lp = z.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t != -100)
        return lp

    base_lp = torch_bf16().detach()
    _, bg = grads_of(lambda: (torch_bf16() * gt).sum(), [h, w])
    ours_lp = linear_logprobs(h, w, t, impl=impl).detach()
    _, og = grads_of(lambda: (linear_logprobs(h, w, t, impl=impl) * gt).sum(), [h, w])
    assert ours_lp.dtype == torch.float32 and og[0].dtype == og[1].dtype == torch.bfloat16
    assert (ours_lp - truth_lp).abs().max() <= 2 * (base_lp - truth_lp).abs().max() + 1e-3
    for o, bb, tr in zip(og, bg, tg):
        assert (o.float() - tr).abs().max() <= 2 * (bb.float() - tr).abs().max() + 1e-3
