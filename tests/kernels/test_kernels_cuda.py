"""GPU correctness of the compiled Triton kernels (bf16 and fp32); skipped without CUDA."""

import pytest
import torch
from kernels_testutil import grads_of

from zephyr_kernels import FusedLinearDPOLoss, dpo_loss, linear_cross_entropy, linear_logprobs
from zephyr_kernels.reference import reference_cross_entropy, reference_linear_logprobs


def _inputs(N, D, V, dtype, seed=0, ignore_frac=0.2):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, D, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * (2.0 / D**0.5)).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[torch.rand(N, device="cuda", generator=g) < ignore_frac] = -100
    return h, w, t


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.cuda
class TestTritonOnCuda:
    @pytest.mark.parametrize("V", [32000, 128256])
    def test_bf16_logprobs_within_torch_bf16_error(self, V):
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
            lp_bf = ((h @ w.t()).float().log_softmax(-1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)) * (t != -100)
            lp = linear_logprobs(h, w, t, impl="triton")
        _, bg = grads_of(lambda: run(reference_linear_logprobs, h, w), [h, w])  # torch bf16 autograd run
        _, og = grads_of(lambda: run(linear_logprobs, h, w, impl="triton"), [h, w])
        assert og[0].dtype == torch.bfloat16 and lp.dtype == torch.float32
        assert _err(lp, lp_ref) <= 2 * _err(lp_bf, lp_ref) + 1e-3
        for o, b, tr in zip(og, bg, tg):
            assert _err(o, tr) <= 2 * _err(b, tr) + 1e-3

    def test_fp32_logprobs_tight(self):
        h, w, t = _inputs(300, 256, 5003, torch.float32)
        gt = torch.randn(300, device="cuda")
        ours, og = grads_of(lambda: (linear_logprobs(h, w, t, impl="triton", softcap=20.0) * gt).sum(), [h, w])
        ref, rg = grads_of(lambda: (reference_linear_logprobs(h, w, t, softcap=20.0) * gt).sum(), [h, w])
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=5e-4)
        for a, b in zip(og, rg):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=5e-4)

    def test_bf16_cross_entropy_and_dpo(self):
        N, D, V, P = 1024, 512, 32000, 4
        h, w, t = _inputs(N, D, V, torch.bfloat16, seed=1)
        ce = linear_cross_entropy(h, w, t, impl="triton")
        ref = reference_cross_entropy(h.float(), w.float(), t)
        assert _err(ce, ref) < 2e-2
        seg = (torch.arange(N, device="cuda") * (2 * P) // N).long()
        rc, rr = torch.randn(P, device="cuda") - 300, torch.randn(P, device="cuda") - 300
        loss, m = FusedLinearDPOLoss(impl="triton")(h, w, t, seg, rc, rr)
        _, s = reference_linear_logprobs(h.float(), w.float(), t, segment_ids=seg, num_segments=2 * P)
        rl, rm = dpo_loss(s[0::2], s[1::2], rc, rr)
        assert _err(loss, rl) < 2e-2 and _err(m["rewards/margins"], rm["rewards/margins"]) < 0.5
        loss.backward()
        assert torch.isfinite(h.grad.float()).all() and torch.isfinite(w.grad.float()).all()
