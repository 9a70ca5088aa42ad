"""Fused LM-head suite: DPO / cross-entropy from hidden states, zephyr_fast vs every anchor.

CPU (issue 2): fp32, N=4096, D=512, V=32000, 4 pairs (first half chosen, second half rejected),
fwd+bwd, median of 3 after a warm-up, peak-RSS growth in a fresh subprocess.  Plus a small vocab /
token sweep (zephyr_fast vs naive torch) for the chart, and the DPO-with-reference comparison
(precomputed reference log-probs vs Liger's reference-hidden-states path).

CUDA (``@pytest.mark.cuda``): bf16, N=8192, D=4096, V=32000 (Mistral-7B) and V=128256 (Llama-3-8B),
fwd+bwd time, TFLOP/s (6·N·D·V) and ``max_memory_allocated`` beyond x, W, dX, dW.
"""

import pytest
import torch

from .harness import (SHAPES, add_throughput, cpu_peak_growth_subprocess, cuda_peak_growth, record,
                      run_timed)
from .lm_head import LMHeadCase, Unavailable, flops

CPU = torch.device("cpu")


def bench_lm_head(benchmark, spec: dict, *, mode: str = "full", suite: str = "lm_head",
                  shape: str = "tiny-cpu", rounds: int = 3, memory: bool = True, variant=None):
    dev = torch.device(spec["device"])
    try:
        case = LMHeadCase(spec)
    except Unavailable as exc:
        pytest.skip(str(exc))
    if mode == "full":
        run_timed(benchmark, case.full, dev=dev, rounds=rounds)
    elif mode == "fwd":
        run_timed(benchmark, case.loss, lambda: (case.zero_grad(), ())[1], dev=dev, rounds=rounds)
    else:  # bwd: the forward runs untimed in setup
        run_timed(benchmark, lambda loss: loss.backward(), lambda: (case.zero_grad(), case.loss())[1:],
                  dev=dev, rounds=rounds)
    record(benchmark, suite=suite, provider=spec["provider"], mode=mode, shape=shape,
           dtype=spec["dtype"], dev=dev, task=spec["task"], inputs=spec["kind"],
           n=spec["n"], d=spec["d"], v=spec["v"], pairs=spec.get("pairs"), variant=variant)
    add_throughput(benchmark, flops=flops(spec) if mode == "full" else None, tokens=spec["n"])
    if not memory or mode != "full":
        return
    floor = case.grad_floor_bytes()
    if dev.type == "cuda":
        case.zero_grad()
        growth = cuda_peak_growth(case.full, dev)
        benchmark.extra_info.update(peak_mem_bytes=growth, floor_bytes=floor,
                                    workspace_bytes=growth - floor)
    else:
        del case  # the probe runs in its own process; free this one's inputs first
        probe = cpu_peak_growth_subprocess(dict(spec, case="lm_head", mode="full"))
        benchmark.extra_info.update(peak_mem_bytes=probe["peak_rss_growth"], floor_bytes=probe["floor"],
                                    workspace_bytes=probe["peak_rss_growth"] - probe["floor"])


def _spec(task, provider, n, d, v, *, dtype="float32", kind="peaked", pairs=4, device="cpu"):
    return {"task": task, "provider": provider, "n": n, "d": d, "v": v, "dtype": dtype, "kind": kind,
            "pairs": pairs, "device": device, "seed": 0}


# ---------------------------------------------------------------- CPU: issue 2's benchmark ----

CPU_DPO = dict(n=4096, d=SHAPES["tiny-cpu"].hidden, v=SHAPES["tiny-cpu"].vocab)


@pytest.mark.benchmark(group="lm_head-dpo-cpu")
@pytest.mark.parametrize("provider", ["zephyr_fast", "naive_torch", "torch_compile", "liger", "cce"])
def test_dpo_cpu(benchmark, provider):
    bench_lm_head(benchmark, _spec("dpo", provider, **CPU_DPO))


@pytest.mark.benchmark(group="lm_head-dpo-cpu-normal")
@pytest.mark.parametrize("provider", ["zephyr_fast", "cce", "gemm_floor"])
def test_dpo_cpu_normal_inputs(benchmark, provider):
    """Random-normal inputs (flat softmax): the data-dependence check for filtering kernels.

    ``gemm_floor`` times the 4 bare GEMMs a head that keeps no logits must run here (nothing can be
    filtered): what the normal-input target is measured against (no memory probe: it is no loss)."""
    floor = provider == "gemm_floor"
    bench_lm_head(benchmark, _spec("dpo", provider, kind="normal", **CPU_DPO), memory=not floor,
                  variant="4 GEMMs over the loss rows, no softmax" if floor else None)


@pytest.mark.benchmark(group="lm_head-dpo-cpu-split")
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_dpo_cpu_fwd_bwd(benchmark, mode):
    """Where zephyr_fast's time goes (a forward that already computes the gradients vs the backward)."""
    bench_lm_head(benchmark, _spec("dpo", "zephyr_fast", **CPU_DPO), mode=mode)


@pytest.mark.benchmark(group="dpo_ref-cpu")
@pytest.mark.parametrize("provider", ["zephyr_fast", "naive_torch", "liger"])
def test_dpo_reference_path_cpu(benchmark, provider):
    """zephyr_fast: precomputed reference numbers; anchors: reference hidden states + weight."""
    bench_lm_head(benchmark, _spec("dpo_ref", provider, n=2048, d=512, v=32000, pairs=4),
                  suite="dpo_ref")


# ---------------------------------------------------------------- CPU: sweeps for the chart ----

@pytest.mark.benchmark(group="ce-sweep-vocab-cpu")
@pytest.mark.parametrize("v", [8000, 32000, 128256])
@pytest.mark.parametrize("provider", ["zephyr_fast", "naive_torch"])
def test_ce_vocab_sweep_cpu(benchmark, provider, v):
    bench_lm_head(benchmark, _spec("ce", provider, n=1024, d=256, v=v), suite="ce_sweep_vocab",
                  shape=f"N1024-D256-V{v}")


@pytest.mark.benchmark(group="ce-large-vocab-normal-cpu")
@pytest.mark.parametrize("provider", ["zephyr_fast", "naive_torch"])
def test_ce_large_vocab_normal_inputs_cpu(benchmark, provider):
    """V=128256 with a flat softmax (nothing to filter): the dense pass against naive torch."""
    bench_lm_head(benchmark, _spec("ce", provider, n=1024, d=256, v=128256, kind="normal"),
                  suite="ce_sweep_vocab", shape="N1024-D256-V128256")


@pytest.mark.benchmark(group="ce-sweep-tokens-cpu")
@pytest.mark.parametrize("n", [4096])  # N=1024 comes from the vocab sweep (same D, V=32000)
@pytest.mark.parametrize("provider", ["zephyr_fast", "naive_torch"])
def test_ce_tokens_sweep_cpu(benchmark, provider, n):
    bench_lm_head(benchmark, _spec("ce", provider, n=n, d=256, v=32000), suite="ce_sweep_tokens",
                  shape=f"N{n}-D256-V32000")


# ---------------------------------------------------------------- CUDA: full size, bf16 ----

@pytest.mark.cuda
@pytest.mark.benchmark(group="lm_head-ce-cuda")
@pytest.mark.parametrize("shape", ["mistral-7b", "llama-3-8b"])
@pytest.mark.parametrize("provider", ["zephyr_fast", "naive_torch", "torch_compile", "liger", "cce"])
def test_ce_cuda(benchmark, provider, shape):
    s = SHAPES[shape]
    bench_lm_head(benchmark, _spec("ce", provider, n=8192, d=s.hidden, v=s.vocab, dtype="bfloat16",
                                   device="cuda"), shape=shape, rounds=10)


@pytest.mark.cuda
@pytest.mark.benchmark(group="lm_head-dpo-cuda")
@pytest.mark.parametrize("shape", ["mistral-7b", "llama-3-8b"])
@pytest.mark.parametrize("provider", ["zephyr_fast", "naive_torch", "liger", "cce"])
def test_dpo_cuda(benchmark, provider, shape):
    s = SHAPES[shape]
    bench_lm_head(benchmark, _spec("dpo", provider, n=8192, d=s.hidden, v=s.vocab, dtype="bfloat16",
                                   pairs=8, device="cuda"), shape=shape, rounds=10)
