"""Gradient filtering on the CUDA chunked path (``ZEPHYR_KERNELS_FILTER``, :mod:`zephyr_kernels.triton_sparse`),
through the Triton interpreter: probabilities below ``u / V`` are dropped, the gradient GEMMs run only
over the tiles of ``dz`` that keep a non-zero, and the result still matches the naive fp32 reference
as tightly as the dense GEMMs do (bf16: within a bf16 torch run's own error).  A peaked softmax must
leave most tiles unflagged; a flat one flags them all."""

import pytest
import torch
from tests.kernels.helpers import assert_close, grads_of, make_inputs, make_peaked_inputs, params

from zephyr_kernels import fused_linear_dpo_loss, linear_cross_entropy, linear_logprobs, triton_chunked, triton_sparse
from tests.kernels.oracle import reference_cross_entropy, reference_linear_logprobs

CASES = {
    # name: (N, D, V, ignore_frac, bias, softcap, temperature, most tiles flagged) -- uniform random
    # targets flag their own tiles; with bias + softcap a few tokens per row stay above u/V, which at
    # these tiny shapes reaches every tile (None: numerics only)
    "odd_shape": (61, 40, 1001, 0.2, False, None, 1.0, 0.5),
    "bias_softcap_temperature": (40, 32, 700, 0.2, True, 60.0, 0.8, None),
    "v_gt_64k": (8, 32, 70001, 0.25, False, None, 1.0, 0.1),
}


@pytest.fixture
def flags_seen(monkeypatch):
    """Filtering on; every flag tensor the pass allocates is kept (read after the call)."""
    monkeypatch.setattr(triton_chunked, "_FILTER", True)
    seen = []
    orig = triton_sparse.new_flags

    def spy(rows, cols, device):
        seen.append(orig(rows, cols, device))
        return seen[-1]

    monkeypatch.setattr(triton_sparse, "new_flags", spy)
    return seen


def _flagged(seen) -> float:
    return sum(int(f.sum()) for f in seen) / sum(f.numel() for f in seen)


def _peaked(case, seed=0):
    N, D, V, ign, bias, softcap, temp, _ = CASES[case]
    h, w, b, t = make_peaked_inputs(N, D, V, ignore_frac=ign, bias=bias, seed=seed, confidence=90.0)
    return (h, w, b, t), dict(softcap=softcap, temperature=temp)


@pytest.mark.parametrize("case, small_workspace", [("odd_shape", False), ("odd_shape", True),
                                                   ("bias_softcap_temperature", False), ("v_gt_64k", False)])
def test_filtered_logprobs_grads_match_reference(flags_seen, monkeypatch, case, small_workspace):
    if small_workspace:  # several vocab slices in the gradient pass
        monkeypatch.setattr(triton_chunked, "_WORKSPACE_BYTES", 64 * 256 * 4)
    (h, w, b, t), kw = _peaked(case)
    N = h.shape[0]
    g = torch.Generator().manual_seed(3)
    segs = torch.randint(0, 4, (N,), generator=g)
    gt, gs = torch.randn(N, generator=g), torch.randn(4, generator=g)

    def run(fn, **extra):
        def loss():
            lp, sg = fn(h, w, t, bias=b, segment_ids=segs, num_segments=4, **kw, **extra)
            return (lp * gt).sum() + (sg * gs).sum()
        return grads_of(loss, params(h, w, b))

    val, grads = run(linear_logprobs, impl="triton")
    rval, rgrads = run(reference_linear_logprobs)
    assert flags_seen  # the filtered pass ran
    if CASES[case][-1] is not None:
        assert _flagged(flags_seen) < CASES[case][-1]  # most tiles of a peaked softmax are skipped
    assert_close(val, rval, what="loss")
    for name, a, r in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert r.abs().max() > 0
        assert_close(a, r, what=f"grad {name}")


@pytest.mark.parametrize("case", ["odd_shape"])  # V > 64k: the log-prob test above
def test_filtered_cross_entropy_single_pass_matches_reference(flags_seen, case):
    (h, w, b, t), kw = _peaked(case, seed=1)
    val, grads = grads_of(lambda: linear_cross_entropy(h, w, t, bias=b, impl="triton", **kw), params(h, w, b))
    rval, rgrads = grads_of(lambda: reference_cross_entropy(h, w, t, bias=b, **kw), params(h, w, b))
    assert flags_seen and _flagged(flags_seen) < CASES[case][-1]
    assert_close(val, rval, what="loss")
    for name, a, r in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert_close(a, r, what=f"grad {name}")


def test_label_smoothing_runs_dense(flags_seen):
    """A label-smoothing term reaches every column: nothing may be filtered."""
    (h, w, b, t), kw = _peaked("odd_shape")
    val, grads = grads_of(lambda: linear_cross_entropy(h, w, t, label_smoothing=0.1, impl="triton"), [h, w])
    rval, rgrads = grads_of(lambda: reference_cross_entropy(h, w, t, label_smoothing=0.1), [h, w])
    assert flags_seen == []
    assert_close(val, rval, what="loss")
    for a, r in zip(grads, rgrads):
        assert_close(a, r, what="grad")


def test_flat_softmax_flags_every_tile_and_matches(flags_seen):
    h, w, _, t = make_inputs(48, 32, 900, seed=4)
    seg = torch.arange(48) // 12
    ref = torch.randn(2, 2)

    def dpo(fn):
        def loss():
            if fn is None:
                return fused_linear_dpo_loss(h, w, t, seg, ref[0], ref[1], beta=0.1, impl="triton")[0]
            _, s = fn(h, w, t, segment_ids=seg, num_segments=4)
            margin = (s[0::2] - ref[0]) - (s[1::2] - ref[1])
            return -torch.nn.functional.logsigmoid(0.1 * margin).mean()
        return grads_of(loss, [h, w])

    val, grads = dpo(None)
    rval, rgrads = dpo(reference_linear_logprobs)
    assert flags_seen and _flagged(flags_seen) == 1.0
    assert_close(val, rval, what="loss")
    for a, r in zip(grads, rgrads):
        assert_close(a, r, what="grad")


def test_bf16_filtered_error_within_same_dtype_torch_error(flags_seen):
    h32, w32, _, t = make_peaked_inputs(40, 32, 1001, ignore_frac=0.2, seed=5, confidence=90.0)
    h, w = (x.detach().to(torch.bfloat16).requires_grad_() for x in (h32, w32))
    gt = torch.randn(40)
    hf, wf = (x.detach().float().requires_grad_() for x in (h, w))
    _, tg = grads_of(lambda: (reference_linear_logprobs(hf, wf, t) * gt).sum(), [hf, wf])

    def torch_bf16():  # plain torch in bf16: bf16 logits, fp32 log-softmax
        z = (h @ w.t()).float().log_softmax(-1)
        return z.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t != -100)

    _, bg = grads_of(lambda: (torch_bf16() * gt).sum(), [h, w])
    _, og = grads_of(lambda: (linear_logprobs(h, w, t, impl="triton") * gt).sum(), [h, w])
    assert flags_seen and _flagged(flags_seen) < 0.5
    for o, bb, tr in zip(og, bg, tg):
        assert o.dtype == torch.bfloat16
        assert (o.float() - tr).abs().max() <= 2 * (bb.float() - tr).abs().max() + 1e-3
