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


_RUNNERS = {("dpo", "trl"): e2e.run_trl_dpo, ("sft", "trl"): e2e.run_trl_sft}


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["zephyr_fast", "trl"])
@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_e2e_training(benchmark, e2e_env, stage, provider, tmp_path):
    """One epoch of DPO (zephyr: precomputed reference; TRL: reference model in memory) or SFT."""
    _skip_unavailable(provider)
    benchmark.group = f"e2e-{stage}"
    data = e2e_env["pairs" if stage == "dpo" else "sft"]
    if provider == "zephyr_fast":
        s = _run_once(benchmark, lambda: e2e.run_zephyr(stage, e2e_env["model_dir"], data, tmp_path))
    else:
        s = _run_once(benchmark, lambda: _RUNNERS[stage, provider](e2e_env["model_dir"], data, tmp_path))
    variant = None
    if stage == "dpo":
        variant = "reference model in memory" if provider == "trl" else "precomputed reference"
    record(benchmark, suite=f"e2e_{stage}", provider=provider, mode="full", shape=SHAPE, dtype=torch.float32,
           dev=device(), tokens_per_s=s["train_tokens_per_second"], tokens=s.get("train_tokens"),
           rows=e2e_env["n"], pairs_per_s=s.get("train_pairs_per_second"), loop_s=s.get("train_runtime"),
           variant=variant)
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
