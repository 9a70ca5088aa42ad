"""GPU correctness of the compiled Triton kernels (bf16 and fp32); skipped without CUDA."""

import pytest
import torch
from tests.kernels.helpers import grads_of

from zephyr_kernels import FusedLinearDPOLoss, dpo_loss, linear_cross_entropy, linear_logprobs
from tests.kernels.oracle import reference_linear_logprobs


def _inputs(N, D, V, dtype, seed=0, ignore_frac=0.2):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, D, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * (2.0 / D**0.5)).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[torch.rand(N, device="cuda", generator=g) < ignore_frac] = -100
    return h, w, t


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _torch_bf16_logprobs(h, w, t, segment_ids=None, num_segments=None):
    """What a plain bf16 torch LM head does: bf16 logits, fp32 log-softmax (the error baseline)."""
    z = (h @ w.t()).float().log_softmax(-1)
    lp = z.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t != -100)
    if segment_ids is None:
        return lp
    return lp, torch.zeros(num_segments, device=lp.device).index_add(0, segment_ids, lp)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "triton_tiled"])
class TestTritonOnCuda:
    @pytest.mark.parametrize("V", [32000, 128256])
    def test_bf16_logprobs_within_torch_bf16_error(self, V, impl):
        N, D = 1024, 512
        h, w, t = _inputs(N, D, V, torch.bfloat16)
        seg = torch.arange(N, device="cuda") // 100
        gt, gs = torch.randn(N, device="cuda"), torch.randn(11, device="cuda")
        hf, wf = (x.detach().float().requires_grad_() for x in (h, w))

        def run(fn, a, b, **kw):
            lp, s = fn(a, b, t, segment_ids=seg, num_segments=11, **kw)
            return (lp * gt).sum() + (s * gs).sum()

        truth, tg = grads_of(lambda: run(reference_linear_logprobs, hf, wf), [hf, wf])
        with torch.no_grad():
            lp_ref = reference_linear_logprobs(hf, wf, t)
            lp_bf = _torch_bf16_logprobs(h, w, t)
            lp = linear_logprobs(h, w, t, impl=impl)
        _, bg = grads_of(lambda: run(_torch_bf16_logprobs, h, w), [h, w])
        _, og = grads_of(lambda: run(linear_logprobs, h, w, impl=impl), [h, w])
        assert og[0].dtype == torch.bfloat16 and lp.dtype == torch.float32
        assert _err(lp, lp_ref) <= 2 * _err(lp_bf, lp_ref) + 1e-3
        for o, b, tr in zip(og, bg, tg):
            assert _err(o, tr) <= 2 * _err(b, tr) + 1e-3

    def test_fp32_logprobs_tight(self, impl):
        h, w, t = _inputs(300, 256, 5003, torch.float32)
        gt = torch.randn(300, device="cuda")
        ours, og = grads_of(lambda: (linear_logprobs(h, w, t, impl=impl, softcap=20.0) * gt).sum(), [h, w])
        ref, rg = grads_of(lambda: (reference_linear_logprobs(h, w, t, softcap=20.0) * gt).sum(), [h, w])
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=5e-4)
        for a, b in zip(og, rg):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=5e-4)

    def test_bf16_cross_entropy_and_dpo(self, impl):
        """bf16 CE and fused DPO: loss and gradients within ~a bf16 torch run's own error."""
        N, D, V, P = 1024, 512, 32000, 4
        h, w, t = _inputs(N, D, V, torch.bfloat16, seed=1)
        hf, wf = (x.detach().float().requires_grad_() for x in (h, w))
        seg = (torch.arange(N, device="cuda") * (2 * P) // N).long()
        with torch.no_grad():
            _, s = reference_linear_logprobs(hf, wf, t, segment_ids=seg, num_segments=2 * P)
        g = torch.Generator(device="cuda").manual_seed(2)
        rc = s[0::2] + torch.randn(P, device="cuda", generator=g)  # margins of a few nats
        rr = s[1::2] + torch.randn(P, device="cuda", generator=g)

        def dpo_of(logprobs_fn):
            def f(a, b):
                _, sg = logprobs_fn(a, b, t, segment_ids=seg, num_segments=2 * P)
                return dpo_loss(sg[0::2], sg[1::2], rc, rr)[0]
            return f

        def ce_of(logprobs_fn):
            return lambda a, b: -logprobs_fn(a, b, t).sum() / (t != -100).sum()

        cases = {
            "ce": (ce_of, lambda: linear_cross_entropy(h, w, t, impl=impl)),
            "dpo": (dpo_of, lambda: FusedLinearDPOLoss(impl=impl)(h, w, t, seg, rc, rr)[0]),
        }
        for name, (loss_of, ours_fn) in cases.items():
            truth, tg = grads_of(lambda: loss_of(reference_linear_logprobs)(hf, wf), [hf, wf])
            base, bg = grads_of(lambda: loss_of(_torch_bf16_logprobs)(h, w), [h, w])
            ours, og = grads_of(ours_fn, [h, w])
            assert _err(ours, truth) <= 2 * _err(base, truth) + 1e-4, name
            for o, b, tr in zip(og, bg, tg):
                assert _err(o, tr) <= 2 * _err(b, tr) + 1e-5, name


@pytest.mark.cuda
@pytest.mark.parametrize("filtered", [False, True], ids=["dense", "filtered"])
@pytest.mark.parametrize("loss", ["ce", "dpo"])
def test_default_cuda_path_captures_in_a_cuda_graph(loss, filtered, monkeypatch):
    """No host sync in the default CUDA path (with or without gradient filtering): one fwd+bwd call is
    captured in a CUDA graph, and its replay on new inputs gives the eager result."""
    from zephyr_kernels import triton_chunked

    monkeypatch.setattr(triton_chunked, "_FILTER", filtered)
    N, D, V, P = 512, 256, 32000, 4
    h, w, t = _inputs(N, D, V, torch.bfloat16)
    seg = torch.arange(N, device="cuda") * (2 * P) // N
    ref_c, ref_r = torch.full((P,), -300.0, device="cuda"), torch.full((P,), -310.0, device="cuda")
    mod = FusedLinearDPOLoss(impl="auto")

    def step():
        h.grad = w.grad = None
        out = linear_cross_entropy(h, w, t) if loss == "ce" else mod(h, w, t, seg, ref_c, ref_r)[0]
        out.backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compilation and cuBLAS handles happen here
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    h.grad = w.grad = None
    with torch.cuda.graph(graph):
        out = linear_cross_entropy(h, w, t) if loss == "ce" else mod(h, w, t, seg, ref_c, ref_r)[0]
        out.backward()
    with torch.no_grad():  # new inputs in the captured buffers, then replay
        h.copy_(torch.randn_like(h))
        t.copy_(torch.where(torch.rand(N, device="cuda") < 0.3, -100, torch.randint_like(t, V)))
    graph.replay()
    torch.cuda.synchronize()
    got = (out.detach().clone(), h.grad.clone(), w.grad.clone())
    want = step()
    torch.testing.assert_close(got[0], want.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got[1].float(), h.grad.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[2].float(), w.grad.float(), rtol=2e-2, atol=2e-3)
