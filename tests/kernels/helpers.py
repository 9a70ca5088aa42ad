"""Shared helpers for the zephyr_kernels tests (inputs, tolerances, gradient collection)."""

import pytest
import torch

from zephyr_kernels import torch_chunked, triton_chunked

# "torch-tiled" is the torch path with tiny blocks, so that multi-chunk code runs at test shapes
# (online log-sum-exp across vocab chunks, several row blocks, targets outside the current chunk).
# "triton-small" is the GEMM + Triton-epilogue backend with a tiny workspace: several row chunks,
# several vocab slices in the gradient pass, and cross-entropy's two-pass branch.
IMPLS = ["torch", "torch-tiled", "triton", "triton-small", "triton_tiled"]


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    if request.param == "torch-tiled":
        monkeypatch.setattr(torch_chunked, "_BLOCK_BYTES", 1024)  # → 64-column vocab chunks, 8-row CE chunks
        monkeypatch.setattr(torch_chunked, "_ROW_BLOCK", 16)
        monkeypatch.setattr(torch_chunked, "_TILE", 16)  # filter tiles and vocab chunks of 16 columns
        return "torch"
    if request.param == "triton-small":
        monkeypatch.setattr(triton_chunked, "_WORKSPACE_BYTES", 16 * 128 * 6)  # 16-row chunks / 128-col slices
        return "triton"
    return request.param
ATOL, RTOL = 1e-5, 5e-4


def make_inputs(N, D, V, *, dtype=torch.float32, ignore_frac=0.0, bias=False, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    scale = scale if scale is not None else 2.0 / D**0.5
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * scale).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_frac:
        t[torch.rand(N, generator=g) < ignore_frac] = -100
    return h, w, b, t


def make_peaked_inputs(N, D, V, *, dtype=torch.float32, ignore_frac=0.0, bias=False, seed=0, p_right=0.7,
                       confidence=30.0):
    """A trained model's softmax: each hidden state points at a predicted token's weight row with
    logit margin about ``confidence`` (the wrong token in ``1 - p_right`` of the rows), so almost
    every (row, vocab tile) carries a probability far below fp32 resolution."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g) / D**0.5
    t = torch.randint(0, V, (N,), generator=g)
    wrong = torch.rand(N, generator=g) > p_right
    pred = torch.where(wrong, torch.randint(0, V, (N,), generator=g), t)
    unit = w[pred] / w[pred].norm(dim=1, keepdim=True)
    h = confidence * unit / w.norm(dim=1).mean() + 0.3 * torch.randn(N, D, generator=g) / D**0.5
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    if ignore_frac:
        t[torch.rand(N, generator=g) < ignore_frac] = -100
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), b, t


def grads_of(fn, tensors):
    """Run ``fn()`` (returns a scalar), backprop, return (value, [grads]) and clear the grads."""
    for x in tensors:
        x.grad = None
    out = fn()
    out.backward()
    gs = [x.grad.detach().clone() for x in tensors]
    for x in tensors:
        x.grad = None
    return out.detach(), gs


def assert_close(actual, expected, atol=ATOL, rtol=RTOL, what=""):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def params(h, w, b):
    return [x for x in (h, w, b) if x is not None]
