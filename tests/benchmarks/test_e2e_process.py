"""benchmarks/e2e.py: one whole DPO process of each trainer on the tiny model, as the e2e tier runs them
(launch → exit, the phases from zephyr_fast's summary timeline and TRL's callback)."""

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import e2e  # noqa: E402

PAIRS = 2  # one optimiser step of 2 pairs per trainer: the least that passes through every phase


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return e2e.make_model_dir(root), e2e.write_rows(root, PAIRS)


@pytest.mark.slow
@pytest.mark.parametrize("process", [e2e.zephyr_process, e2e.trl_process], ids=["zephyr_fast", "trl"])
def test_whole_dpo_process_and_its_phases(inputs, process, tmp_path):
    model_dir, rows = inputs
    out = process("dpo", model_dir, rows["pairs"], tmp_path, 1, batch=PAIRS)
    assert out["epochs"] == 1 and len(out["epoch_whole_s"]) == 1 and out["tokens"] > 0 and out["tokens_per_s"] > 0
    phases = out["phases"]
    # the phases tile the process: they sum to launch → exit, each one non-negative
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) == pytest.approx(out["whole_s"], rel=1e-9)
    assert list(phases)[0] == "start-up" and list(phases)[-2:] == ["epoch 1", "exit"]
    expected = {"data", "model", "reference"} if process is e2e.zephyr_process else {"data + model"}
    assert expected <= set(phases)
    assert out["epoch_whole_s"][0] <= out["whole_s"] and out["loss"] is not None
