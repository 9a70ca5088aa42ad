"""End-to-end suite: DPO and SFT training steps, zephyr_fast vs TRL, and the reference log-prob pass.

One epoch each on the same tiny Mistral, the same real rows, the same machine (see ``e2e.py`` for
the throughput definitions).  A run is long, so each provider runs once (``rounds=1``); tokens/s
come from the trainers' own loop timing, not from the pytest-benchmark wall time (which includes
start-up: tokenisation, model load).
"""

import pytest
import torch

from . import e2e
from .harness import device, provider_unavailable, record

SHAPE = "tiny-mistral-h256-l4-v32000"


@pytest.fixture(scope="module")
def e2e_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    try:
        model_dir = e2e.make_model_dir(root)
    except ImportError as exc:
        pytest.skip(f"zephyr_fast.model / data not importable: {exc}")
    files = e2e.write_rows(root, e2e.e2e_pairs())
    return {"root": root, "model_dir": model_dir, **files}


def _skip_unavailable(provider):
    if provider == "zephyr_fast":
        try:
            import zephyr_fast.train  # noqa: F401
        except Exception as exc:
            pytest.skip(f"zephyr_fast.train not importable: {type(exc).__name__}: {exc}")
    reason = provider_unavailable(provider)
    if reason:
        pytest.skip(reason)


def _run_once(benchmark, fn):
    out = {}
    benchmark.pedantic(lambda: out.update(fn()), rounds=1, iterations=1, warmup_rounds=0)
    return out


@pytest.mark.slow
@pytest.mark.benchmark(group="e2e-dpo")
@pytest.mark.parametrize("provider", ["zephyr_fast", "trl"])
def test_e2e_dpo(benchmark, e2e_env, provider, tmp_path):
    _skip_unavailable(provider)
    if provider == "zephyr_fast":
        s = _run_once(benchmark, lambda: e2e.run_zephyr("dpo", e2e_env["model_dir"], e2e_env["pairs"], tmp_path))
    else:
        s = _run_once(benchmark, lambda: e2e.run_trl_dpo(e2e_env["model_dir"], e2e_env["pairs"], tmp_path))
    record(benchmark, suite="e2e_dpo", provider=provider, mode="full", shape=SHAPE, dtype=torch.float32,
           dev=device(), tokens_per_s=s["train_tokens_per_second"], tokens=s.get("train_tokens"),
           pairs=e2e_env["n"], pairs_per_s=s.get("train_pairs_per_second"), loop_s=s.get("train_runtime"),
           variant="reference model in memory" if provider == "trl" else "precomputed reference")
    assert s["train_tokens_per_second"] > 0


@pytest.mark.slow
@pytest.mark.benchmark(group="e2e-sft")
@pytest.mark.parametrize("provider", ["zephyr_fast", "trl"])
def test_e2e_sft(benchmark, e2e_env, provider, tmp_path):
    _skip_unavailable(provider)
    if provider == "zephyr_fast":
        s = _run_once(benchmark, lambda: e2e.run_zephyr("sft", e2e_env["model_dir"], e2e_env["sft"], tmp_path))
    else:
        s = _run_once(benchmark, lambda: e2e.run_trl_sft(e2e_env["model_dir"], e2e_env["sft"], tmp_path))
    record(benchmark, suite="e2e_sft", provider=provider, mode="full", shape=SHAPE, dtype=torch.float32,
           dev=device(), tokens_per_s=s["train_tokens_per_second"], tokens=s.get("train_tokens"),
           rows=e2e_env["n"], loop_s=s.get("train_runtime"))
    assert s["train_tokens_per_second"] > 0


@pytest.mark.benchmark(group="ref-pass")
def test_reference_pass(benchmark, e2e_env, tmp_path):
    """The offline reference log-prob pass (stage ref_logps): no grad, 4× larger packed batches."""
    _skip_unavailable("zephyr_fast")
    s = _run_once(benchmark, lambda: e2e.run_zephyr("ref_logps", e2e_env["model_dir"], e2e_env["pairs"], tmp_path))
    tps = s.get("ref_logps_train_tokens_per_second")
    assert tps, f"ref_logps summary has no throughput: {sorted(s)}"
    record(benchmark, suite="ref_pass", provider="zephyr_fast", mode="fwd", shape=SHAPE, dtype=torch.float32,
           dev=device(), tokens_per_s=tps, pairs=e2e_env["n"])
