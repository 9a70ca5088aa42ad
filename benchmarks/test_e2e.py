"""The e2e tier (``pytest benchmarks/ --e2e``): whole training processes, zephyr_fast vs TRL.

Each case runs each trainer once as a fresh process (see ``e2e.py``: same model folder, same real
rows, same batch), so the pytest-benchmark time *is* the whole process, launch to exit.  Cases:

* ``tiny``, DPO, 64 pairs, 1 epoch: where start-up, data preparation and export dominate (issue 13:
  whole process ≥ 4 × TRL); its loop also gives the step throughput and the reference pass (issue 5);
* ``mid`` (D768, 6 layers), DPO, 8 pairs, 3 epochs: compute-dominated; the same run gives the
  1-epoch figure at the end of its first epoch (issue 13: ≥ 1.6 × TRL at 1 epoch, ≥ 2 × at 3);
* ``mid``, SFT, 1 epoch (issue 13: ≥ 1.5 × SFTTrainer).
"""

import pytest
import torch

from . import e2e
from .harness import device, provider_unavailable, record

# (stage, model, rows, epochs)
CASES = [("dpo", "tiny", 64, 1), ("dpo", "mid", 8, 3), ("sft", "mid", 16, 1)]
_PROCESS = {"zephyr_fast": e2e.zephyr_process, "trl": e2e.trl_process}


@pytest.fixture(scope="module")
def e2e_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return {"root": root, "models": {}, "rows": {}}


def _inputs(env, model: str, rows: int) -> tuple:
    """The model folder and the row files, made once per module."""
    if model not in env["models"]:
        env["models"][model] = e2e.make_model_dir(env["root"], model=model)
    if rows not in env["rows"]:
        env["rows"][rows] = e2e.write_rows(env["root"], rows)
    return env["models"][model], env["rows"][rows]


@pytest.mark.e2e
@pytest.mark.parametrize("provider", ["zephyr_fast", "trl"])
@pytest.mark.parametrize("stage,model,rows,epochs", CASES, ids=[f"{s}-{m}-{n}x{e}" for s, m, n, e in CASES])
def test_whole_process(benchmark, e2e_root, stage, model, rows, epochs, provider, tmp_path):
    """One whole training process of ``provider``; records its phases and loop throughput."""
    reason = provider_unavailable(provider)
    if reason:
        pytest.skip(reason)
    model_dir, files = _inputs(e2e_root, model, rows)
    assert files["n"] == rows, f"only {files['n']} of {rows} rows fit the prompt budget"
    data = files["pairs" if stage == "dpo" else "sft"]
    out = {}
    benchmark.group = f"e2e-{stage}-{model}"
    benchmark.pedantic(lambda: out.update(_PROCESS[provider](stage, model_dir, data, tmp_path, epochs)),
                       rounds=1, iterations=1, warmup_rounds=0)
    assert out["epochs"] == epochs and out["tokens_per_s"] > 0
    variant = ("reference model in memory" if provider == "trl" else "precomputed reference") if stage == "dpo" else None
    record(benchmark, suite=f"e2e_whole_{stage}", provider=provider, mode="full", shape=e2e.shape_name(model),
           dtype=torch.float32, dev=device(), variant=variant, rows=rows, model=model, **out)
