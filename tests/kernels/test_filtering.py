"""Gradient filtering on the torch path: with a peaked softmax (a trained model) the gradient pass
skips (row, vocab tile) pairs whose probabilities are below ``u / V`` — and must still match the
naive fp32 reference as tightly as the dense pass does.  With a flat softmax it must run dense."""

import pytest
import torch
from tests.kernels.helpers import assert_close, grads_of, make_inputs, make_peaked_inputs, params

from zephyr_kernels import torch_chunked, fused_linear_dpo_loss, linear_cross_entropy, linear_logprobs
from tests.kernels.oracle import reference_cross_entropy, reference_linear_logprobs

CASES = {
    # name: (N, D, V, ignore_frac, bias, softcap, temperature, confidence)
    "odd_shape": (61, 48, 3001, 0.2, False, None, 1.0, 90.0),
    "bias_softcap_temperature": (40, 64, 2500, 0.2, True, 60.0, 0.8, 90.0),
    "v_gt_64k": (24, 48, 70001, 0.25, False, None, 1.0, 110.0),
}


@pytest.fixture(params=["torch", "torch-tiled"])
def spy(request, monkeypatch):
    """Counts which gradient pass ran; ``torch-tiled`` uses 16-column tiles and tiny blocks."""
    if request.param == "torch-tiled":
        monkeypatch.setattr(torch_chunked, "_BLOCK_BYTES", 4096)
        monkeypatch.setattr(torch_chunked, "_ROW_BLOCK", 16)
        monkeypatch.setattr(torch_chunked, "_TILE", 16)
    calls = {"sparse": 0, "dense": 0}
    for name in ("sparse", "dense"):
        orig = getattr(torch_chunked, f"_{name}_grads")

        def wrapped(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(torch_chunked, f"_{name}_grads", wrapped)
    return calls


def _inputs(case, seed=0):
    N, D, V, ign, bias, softcap, temp, conf = CASES[case]
    h, w, b, t = make_peaked_inputs(N, D, V, ignore_frac=ign, bias=bias, seed=seed, confidence=conf)
    return (h, w, b, t), dict(softcap=softcap, temperature=temp)


@pytest.mark.parametrize("case", list(CASES))
def test_logprobs_filtered_grads_match_reference(spy, case):
    (h, w, b, t), kw = _inputs(case)
    N = h.shape[0]
    g = torch.Generator().manual_seed(3)
    segs = torch.randint(0, 4, (N,), generator=g)
    gt, gs, gl = torch.randn(N, generator=g), torch.randn(4, generator=g), 0.1 * torch.randn(N, generator=g)

    def run(fn, **extra):
        def loss():
            lp, sg, lse = fn(h, w, t, bias=b, segment_ids=segs, num_segments=4, return_lse=True, **kw, **extra)
            return (lp * gt).sum() + (sg * gs).sum() + (lse * gl).sum()
        return grads_of(loss, params(h, w, b))

    val, grads = run(linear_logprobs, impl="torch")
    rval, rgrads = run(reference_linear_logprobs)
    assert spy["sparse"] == 1 and spy["dense"] == 0
    assert_close(val, rval, what="loss")
    for name, a, r in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert r.abs().max() > 0
        assert_close(a, r, what=f"grad {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_cross_entropy_filtered_grads_match_reference(spy, monkeypatch, case):
    # force the stats + filtered-gradient route even where the row-tiled single pass would fit
    monkeypatch.setattr(torch_chunked, "_MIN_FUSED_ROWS", 1 << 30)
    (h, w, b, t), kw = _inputs(case, seed=1)
    for z_loss in (0.0, 1e-3):
        val, grads = grads_of(lambda: linear_cross_entropy(h, w, t, bias=b, z_loss=z_loss, impl="torch", **kw),
                              params(h, w, b))
        rval, rgrads = grads_of(lambda: reference_cross_entropy(h, w, t, bias=b, z_loss=z_loss, **kw),
                                params(h, w, b))
        assert_close(val, rval, what="loss")
        for name, a, r in zip(("hidden", "weight", "bias"), grads, rgrads):
            assert_close(a, r, what=f"grad {name} z_loss={z_loss}")
    assert spy["sparse"] == 2 and spy["dense"] == 0


def test_label_smoothing_keeps_the_dense_pass(spy, monkeypatch):
    """Label smoothing puts ε/V of gradient on every column: nothing may be skipped."""
    monkeypatch.setattr(torch_chunked, "_MIN_FUSED_ROWS", 1 << 30)
    (h, w, b, t), kw = _inputs("odd_shape")
    val, grads = grads_of(lambda: linear_cross_entropy(h, w, t, label_smoothing=0.1, impl="torch"), [h, w])
    rval, rgrads = grads_of(lambda: reference_cross_entropy(h, w, t, label_smoothing=0.1), [h, w])
    assert spy == {"sparse": 0, "dense": 1}
    assert_close(val, rval)
    for a, r in zip(grads, rgrads):
        assert_close(a, r)


@pytest.mark.parametrize("case", list(CASES))
def test_dpo_filtered_grads_match_reference(spy, case):
    (h, w, b, t), kw = _inputs(case, seed=2)
    N, P = h.shape[0], 3
    segs = torch.arange(N) * (2 * P) // N
    ref = -5.0 * torch.rand(2 * P, generator=torch.Generator().manual_seed(4))

    def ours():
        return fused_linear_dpo_loss(h, w, t, segs, ref[0::2], ref[1::2], b, beta=0.5, rpo_alpha=0.3, impl="torch",
                                     **kw)[0]

    def reference():
        tok = reference_linear_logprobs(h, w, t, bias=b, **kw)
        seg = torch.zeros(2 * P).index_add(0, segs, tok)
        n_c = torch.zeros(2 * P).index_add(0, segs, (t != -100).float())[0::2].sum()
        delta = (seg[0::2] - ref[0::2]) - (seg[1::2] - ref[1::2])
        return -torch.nn.functional.logsigmoid(0.5 * delta).mean() + 0.3 * (-seg[0::2].sum() / n_c)

    val, grads = grads_of(ours, params(h, w, b))
    rval, rgrads = grads_of(reference, params(h, w, b))
    assert spy["sparse"] == 1 and spy["dense"] == 0
    assert_close(val, rval, what="loss")
    for name, a, r in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert_close(a, r, what=f"grad {name}")


def test_flat_softmax_runs_dense(spy):
    h, w, _, t = make_inputs(37, 24, 2000, ignore_frac=0.2)
    segs = torch.zeros(37, dtype=torch.long)
    grads_of(lambda: linear_logprobs(h, w, t, segment_ids=segs, num_segments=1, impl="torch")[1].sum(), [h, w])
    assert spy == {"sparse": 0, "dense": 1}


def test_bf16_filtered_error_within_torch_bf16_error(spy):
    """bf16 inputs: the filtered gradients are no further from the fp32 truth than a plain bf16
    torch LM head's own (same inputs, logits in fp32 after a bf16 GEMM)."""
    h32, w32, _, t = make_peaked_inputs(64, 64, 4001, ignore_frac=0.2, confidence=90.0, seed=5)
    h16, w16 = (x.detach().to(torch.bfloat16).requires_grad_() for x in (h32, w32))
    ours = grads_of(lambda: linear_logprobs(h16, w16, t, impl="torch").sum(), [h16, w16])[1]
    plain = grads_of(lambda: torch.where(t != -100, torch.log_softmax((h16 @ w16.t()).float(), -1).gather(
        1, t.clamp(min=0)[:, None]).squeeze(1), 0.0).sum(), [h16, w16])[1]
    truth = grads_of(lambda: reference_linear_logprobs(h32, w32, t).sum(), [h32, w32])[1]
    assert spy["sparse"] == 1
    for a, p, r in zip(ours, plain, truth):
        err, err_plain = (a.float() - r).abs().max(), (p.float() - r).abs().max()
        assert err <= 2.0 * err_plain + 1e-6, (err, err_plain)
