"""``torch.autocast("cuda")`` (bf16 and fp16) through every public entry point of
``tests/kernels/test_autocast.py`` on the CUDA paths: the same numbers as the explicit cast (skipped
without CUDA, by the ``cuda`` mark)."""

import pytest
import torch

from .helpers import make_inputs
from .test_autocast import ENTRY_POINTS, N, D, V

pytestmark = pytest.mark.cuda


def _run(fn, leaves, t, impl, cast=None, autocast=None):
    leaves = [x.detach().cuda().requires_grad_() for x in leaves]
    args = [x.to(cast) if cast is not None else x for x in leaves]
    with torch.device("cuda"), torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None):
        out = fn(*args, t.cuda(), impl)
        out.backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["triton", "triton_tiled", "torch"])
def test_cuda_autocast_equals_explicit_cast(entry, dtype, impl):
    h, w, b, t = make_inputs(N, D, V, ignore_frac=0.2, bias=True, seed=3)
    got, got_grads = _run(ENTRY_POINTS[entry], [h, w, b], t, impl, autocast=dtype)
    want, want_grads = _run(ENTRY_POINTS[entry], [h, w, b], t, impl, cast=dtype)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    # the same kernels on the same casted inputs; cuBLAS may pick another algorithm, so not bitwise
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
