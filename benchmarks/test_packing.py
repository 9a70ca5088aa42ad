"""Packed vs padded forward+backward on real sequence lengths (issue 4), and the logits-free saving.

CPU: the tiny Mistral (hidden 256, 4 layers, vocab 32000), 6 real UltraFeedback sequences (3 pairs,
prompt + chosen / prompt + rejected, ≤ 512 tokens).  CUDA (``@pytest.mark.cuda``): a ~1B Mistral
config in bf16 on 32 sequences, plus the DPO step (packed, precomputed reference vs padded with a
reference model in memory).
"""

import pytest
import torch

from .harness import add_throughput, cpu_peak_growth_subprocess, cuda_peak_growth, record, run_timed
from .lm_head import Unavailable
from .model_cases import VARIANTS, ModelCase


def bench_model(benchmark, spec: dict, *, rounds: int = 3, memory: bool = True):
    dev = torch.device(spec["device"])
    try:
        case = ModelCase(spec)
    except (Unavailable, ImportError) as exc:
        pytest.skip(str(exc))
    run_timed(benchmark, case.full, dev=dev, rounds=rounds)
    suite = "dpo_step" if spec["variant"].startswith("dpo") else "packing"
    record(benchmark, suite=suite, provider=VARIANTS[spec["variant"]], mode="full",
           shape=f"mistral-{spec['model']}", dtype=spec["dtype"], dev=dev, variant=spec["variant"],
           seqs=len(case.seqs), real_tokens=case.tokens,
           ablation=True if spec["variant"] == "packed+logits" else None)
    add_throughput(benchmark, tokens=case.tokens)
    if not memory:
        return
    if dev.type == "cuda":
        case.zero_grad()
        benchmark.extra_info["peak_mem_bytes"] = cuda_peak_growth(case.full, dev)
    else:
        del case
        probe = cpu_peak_growth_subprocess(dict(spec, case="model", mode="full"))
        benchmark.extra_info["peak_mem_bytes"] = probe["peak_rss_growth"]


@pytest.mark.benchmark(group="packing-cpu")
@pytest.mark.parametrize("variant", ["padded", "packed+logits", "packed+fused"])
def test_packed_vs_padded_cpu(benchmark, variant):
    bench_model(benchmark, {"case": "model", "variant": variant, "model": "tiny", "seqs": 6,
                            "dtype": "float32", "device": "cpu", "seed": 0})


@pytest.mark.cuda
@pytest.mark.benchmark(group="packing-cuda")
@pytest.mark.parametrize("variant", ["padded", "packed+logits", "packed+fused", "dpo_padded_ref", "dpo_packed"])
def test_packed_vs_padded_cuda(benchmark, variant):
    bench_model(benchmark, {"case": "model", "variant": variant, "model": "1b", "seqs": 32,
                            "dtype": "bfloat16", "device": "cuda", "seed": 0}, rounds=5)
