"""The default CUDA backend (``impl="triton"``) never reads a device value on the host.

On CPU the same code runs through the Triton interpreter.  While the backend's passes run, every
torch call that would sync a CUDA stream with the host (``nonzero``, ``item``, ``tolist``, ``cpu``,
``bool``/``int``/``float`` of a tensor) raises — except inside the kernel launches themselves,
where the interpreter (not the CUDA path) reads tensors into numpy.  The CUDA-graph capture test in
``test_cuda.py`` checks the same on a GPU.
"""

import pytest
import torch
from tests.kernels.helpers import make_inputs

from zephyr_kernels import fused_linear_dpo_loss, linear_cross_entropy, linear_logprobs, triton_chunked, triton_sparse

SYNCING = ("nonzero", "item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


@pytest.fixture
def forbid_host_reads(monkeypatch):
    real = {name: getattr(torch.Tensor, name) for name in SYNCING}
    calls = []

    def raiser(name):
        def f(*a, **k):
            raise AssertionError(f"host sync in the triton path: Tensor.{name}")
        return f

    def set_forbidden(on):
        for name in SYNCING:
            setattr(torch.Tensor, name, raiser(name) if on else real[name])

    def wrap(fn, forbidden):
        def run(*a, **k):
            calls.append(fn.__name__)
            set_forbidden(forbidden)
            try:
                return fn(*a, **k)
            finally:
                set_forbidden(not forbidden)
        return run

    for name in ("stats", "grads", "fused"):
        monkeypatch.setattr(triton_chunked, name, wrap(getattr(triton_chunked, name), True))
    for name in ("_launch_stats", "_launch_grad"):
        monkeypatch.setattr(triton_chunked, name, wrap(getattr(triton_chunked, name), False))
    for name in ("dx", "dw"):  # the block-sparse GEMM launches (gradient filtering)
        monkeypatch.setattr(triton_sparse, name, wrap(getattr(triton_sparse, name), False))
    yield calls
    set_forbidden(False)


@pytest.mark.parametrize("filtered", [False, True], ids=["dense", "filtered"])
def test_cross_entropy_and_dpo_passes_read_nothing_back(forbid_host_reads, monkeypatch, filtered):
    monkeypatch.setattr(triton_chunked, "_WORKSPACE_BYTES", 16 * 128 * 6)  # several chunks and slices
    monkeypatch.setattr(triton_chunked, "_FILTER", filtered)
    h, w, b, t = make_inputs(40, 16, 300, ignore_frac=0.3, bias=True)
    for fn in (
        lambda: linear_cross_entropy(h, w, t, bias=b, impl="triton"),
        lambda: linear_cross_entropy(h, w, t, bias=b, impl="triton", reduction="none").sum(),
        lambda: linear_logprobs(h, w, t, bias=b, segment_ids=torch.arange(40) // 10, num_segments=4,
                                impl="triton")[1].sum(),
        lambda: fused_linear_dpo_loss(h, w, t, torch.arange(40) // 10, torch.zeros(2), torch.zeros(2), b,
                                      impl="triton")[0],
    ):
        fn().backward()
    assert {"stats", "grads", "fused", "_launch_stats", "_launch_grad"} <= set(forbid_host_reads)
    assert ({"dx", "dw"} <= set(forbid_host_reads)) == filtered


def test_the_guard_catches_a_sync(forbid_host_reads, monkeypatch):
    """The fixture is not vacuous: a pass that compacts the valid rows on the host fails."""
    real_logits = triton_chunked._logits

    def compacting_logits(h, weight, bias):
        return real_logits(h[(h != 0).any(1).nonzero().squeeze(1)], weight, bias)

    monkeypatch.setattr(triton_chunked, "_logits", compacting_logits)
    with pytest.raises(AssertionError, match="host sync in the triton path: Tensor.nonzero"):
        triton_chunked.stats(torch.randn(4, 8), torch.randn(10, 8), None, torch.tensor([1, 2, -100, 3]),
                             ignore_index=-100, temperature=1.0, softcap=None)
