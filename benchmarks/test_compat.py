"""Drop-in layers (issue 23), on the CPU in fp32, the same inputs for every variant:

* ``compat_ce``: zephyr_kernels' Liger-compatible module (``LigerFusedLinearCrossEntropyLoss``) and CCE's
  call on ``linear_cross_entropy`` (``(e, c, targets)`` with leading dimensions and ``shift``) against the
  native ``linear_cross_entropy`` on the same rows -- what the compatibility layers cost;
* ``compat_patch``: one Hugging Face training step (``forward(input_ids, labels=...)`` + ``backward``) of a
  small Mistral (hidden 256, 2 layers, V 32000, 4 x 512 tokens), plain and through
  ``zephyr_kernels.patch(model)``: time and peak memory (peak-RSS growth of one step in a fresh process,
  memprobe's method; the floor is the parameters' gradients);
* ``compat_trl``: the same model and tokens through TRL 1.16's fused LM head (what ``SFTTrainer`` /
  ``DPOTrainer`` call: ``model(input_ids, labels=..., fused_lm_head=True)`` with SFT's outputs ``log_probs``,
  ``entropy``, ``is_top1``) + ``backward``, TRL's head vs zephyr's (``zephyr_kernels.patch_trl()``); time only.
"""

import pytest
import torch

import zephyr_kernels as zk
from zephyr_kernels import trl_patch

from .compat_cases import HFPatchCase
from .harness import cpu_peak_growth_subprocess, record, run_timed

CPU = torch.device("cpu")
B, T, D, V = 4, 512, 256, 32000


@pytest.fixture(scope="module")
def ce_inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_()
    t = torch.randint(0, V, (B, T), generator=g)
    return h, w, t


def _ce_call(variant, h, w, t):
    if variant == "native":  # the rows CCE's shift takes: positions 0..T-2 predict 1..T-1
        return lambda: zk.linear_cross_entropy(h[:, :-1].reshape(-1, D), w, t[:, 1:].reshape(-1), impl="torch")
    if variant == "Liger module":
        module = zk.LigerFusedLinearCrossEntropyLoss()
        return lambda: module(w, h[:, :-1].reshape(-1, D), t[:, 1:].reshape(-1))
    return lambda: zk.linear_cross_entropy(h, w, t, shift=1, impl="torch")  # CCE's call


@pytest.mark.benchmark(group="compat-ce")
@pytest.mark.parametrize("variant", ["native", "Liger module", "CCE call"])
def test_compat_layers_cost(benchmark, ce_inputs, variant):
    h, w, t = ce_inputs
    call = _ce_call(variant, h, w, t)
    torch.testing.assert_close(call(), _ce_call("native", h, w, t)(), rtol=1e-6, atol=1e-6)  # the same loss

    def step():
        h.grad = w.grad = None
        call().backward()

    run_timed(benchmark, step, dev=CPU, rounds=5)
    record(benchmark, suite="compat_ce", provider="zephyr_fast", mode="full", shape=f"{B}x{T} rows D{D} V{V}",
           dtype="float32", dev=CPU, variant=variant)


@pytest.mark.benchmark(group="compat-patch")
@pytest.mark.parametrize("variant", ["plain", "patched"])
def test_hf_patch_step(benchmark, variant):
    spec = {"case": "hf_patch", "variant": variant, "batch": B, "seq": T, "hidden": D, "vocab": V, "seed": 0}
    case = HFPatchCase(spec)
    run_timed(benchmark, case.full, dev=CPU, rounds=3)
    record(benchmark, suite="compat_patch", provider="zephyr_fast", mode="full",
           shape=f"Mistral D{D} x2 layers, {B}x{T} tokens, V{V}", dtype="float32", dev=CPU, variant=variant)
    del case
    probe = cpu_peak_growth_subprocess(dict(spec, mode="full"))
    benchmark.extra_info.update(peak_mem_bytes=probe["peak_rss_growth"], floor_bytes=probe["floor"],
                                workspace_bytes=probe["peak_rss_growth"] - probe["floor"])


@pytest.mark.benchmark(group="compat-trl")
@pytest.mark.parametrize("variant", ["TRL head", "zephyr head"])
def test_trl_fused_head_step(benchmark, variant):
    from trl.trainer.utils import add_fused_lm_head

    case = HFPatchCase({"case": "hf_patch", "variant": "plain", "batch": B, "seq": T, "hidden": D, "vocab": V,
                        "seed": 0})
    outputs = ("log_probs", "entropy", "is_top1")  # SFTTrainer's
    if variant == "TRL head":
        add_fused_lm_head(case.model, outputs=outputs)
    else:
        trl_patch.add_fused_lm_head(case.model, outputs=outputs)

    def step():
        case.zero_grad()
        case.model(input_ids=case.input_ids, labels=case.input_ids, fused_lm_head=True).loss.backward()

    run_timed(benchmark, step, dev=CPU, rounds=3)
    record(benchmark, suite="compat_trl", provider="zephyr_fast", mode="full",
           shape=f"Mistral D{D} x2 layers, {B}x{T} tokens, V{V}", dtype="float32", dev=CPU, variant=variant)
