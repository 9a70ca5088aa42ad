"""Drop-in layers (issue 23), on the CPU in fp32, the same inputs for every variant:

* ``compat_ce``: zephyr_kernels' Liger-compatible module (``LigerFusedLinearCrossEntropyLoss``), its Function
  (``LigerFusedLinearCrossEntropyFunction.apply``) and CCE's
  call on ``linear_cross_entropy`` (``(e, c, targets)`` with leading dimensions and ``shift``) against the
  native ``linear_cross_entropy`` on the same rows -- what the compatibility layers cost;
* ``compat_dpo``: Liger's DPO module (``LigerFusedLinearDPOLoss``, ``(2B, T, D)`` chosen-then-rejected rows,
  precomputed reference log-probs) against the native ``fused_linear_dpo_loss`` on the same packed rows;
* ``compat_patch``: one Hugging Face ``Trainer`` step (``Trainer.training_step``: ``forward(input_ids,
  labels=...)`` + ``backward``, Trainer's ``num_items_in_batch``) of a small Mistral (hidden 256, 2 layers,
  V 32000, 4 x 512 tokens), plain and through ``zephyr_kernels.patch(model)``: the same loss and gradients
  (checked), time and peak memory (peak-RSS growth of one step in a fresh process, memprobe's method; the floor
  is the parameters' gradients), the patched step's below the plain one's (checked);
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
    if variant == "Liger Function":
        return lambda: zk.LigerFusedLinearCrossEntropyFunction.apply(h[:, :-1].reshape(-1, D), w, t[:, 1:].reshape(-1))[0]
    return lambda: zk.linear_cross_entropy(h, w, t, shift=1, impl="torch")  # CCE's call


@pytest.mark.benchmark(group="compat-ce")
@pytest.mark.parametrize("variant", ["native", "Liger module", "Liger Function", "CCE call"])
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


@pytest.fixture(scope="module")
def dpo_inputs():
    g = torch.Generator().manual_seed(0)
    P = B // 2  # pairs: rows 0..P-1 chosen, P..2P-1 rejected
    h = torch.randn(2 * P, T, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_()
    t = torch.randint(0, V, (2 * P, T), generator=g)
    t[:, : T // 4] = -100  # prompt
    ref = -torch.rand(2, P, generator=g) * T * 10
    return h, w, t, ref


def _dpo_call(variant, h, w, t, ref):
    if variant == "Liger module":
        module = zk.LigerFusedLinearDPOLoss(impl="torch")
        return lambda: module(w, h, t, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])[0]
    P = t.shape[0] // 2
    row = torch.arange(2 * P)
    seg = torch.where(row < P, 2 * row, 2 * (row - P) + 1).repeat_interleave(T)
    return lambda: zk.fused_linear_dpo_loss(h.reshape(-1, D), w, t.reshape(-1), seg, ref[0], ref[1], impl="torch")[0]


@pytest.mark.benchmark(group="compat-dpo")
@pytest.mark.parametrize("variant", ["native", "Liger module"])
def test_compat_dpo_cost(benchmark, dpo_inputs, variant):
    h, w, t, ref = dpo_inputs
    call = _dpo_call(variant, h, w, t, ref)
    torch.testing.assert_close(call(), _dpo_call("native", h, w, t, ref)(), rtol=1e-6, atol=1e-6)  # the same loss

    def step():
        h.grad = w.grad = None
        call().backward()

    run_timed(benchmark, step, dev=CPU, rounds=5)
    record(benchmark, suite="compat_dpo", provider="zephyr_fast", mode="full",
           shape=f"{B // 2} pairs x{T} tokens D{D} V{V}", dtype="float32", dev=CPU, variant=variant)


@pytest.fixture(scope="module")
def plain_step():
    """The plain model's ``Trainer`` step: its loss, gradients and peak memory, what the patched step must match."""
    case = HFPatchCase(_patch_spec("plain"))
    loss = case.full()
    return {"loss": loss, "grads": {n: g.clone() for n, g in case.grads().items()}}


def _patch_spec(variant):
    return {"case": "hf_patch", "variant": variant, "batch": B, "seq": T, "hidden": D, "vocab": V, "seed": 0}


_PEAK = {}


@pytest.mark.benchmark(group="compat-patch")
@pytest.mark.parametrize("variant", ["plain", "patched"])
def test_hf_patch_step(benchmark, plain_step, variant):
    case = HFPatchCase(_patch_spec(variant))
    torch.testing.assert_close(case.full(), plain_step["loss"], rtol=1e-5, atol=1e-6)
    got = case.grads()
    assert got.keys() == plain_step["grads"].keys()
    for name, want in plain_step["grads"].items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6, msg=name)
    run_timed(benchmark, case.full, dev=CPU, rounds=3)
    record(benchmark, suite="compat_patch", provider="zephyr_fast", mode="full",
           shape=f"Mistral D{D} x2 layers, {B}x{T} tokens, V{V}", dtype="float32", dev=CPU, variant=variant)
    del case, got
    probe = cpu_peak_growth_subprocess(dict(_patch_spec(variant), mode="full"))
    _PEAK[variant] = probe["peak_rss_growth"]
    benchmark.extra_info.update(peak_mem_bytes=probe["peak_rss_growth"], floor_bytes=probe["floor"],
                                workspace_bytes=probe["peak_rss_growth"] - probe["floor"])
    if variant == "patched" and "plain" in _PEAK:  # no (B, T, V) fp32 logits and their gradient
        assert _PEAK["patched"] < _PEAK["plain"], _PEAK


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
