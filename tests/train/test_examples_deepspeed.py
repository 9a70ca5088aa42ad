"""DPO with ``batch_by: examples`` on 2 DeepSpeed ZeRO-3 CPU ranks against one process.

Examples batching cuts each epoch's shuffled pairs into steps of ``per_device x accumulation x
world`` pairs and splits a step into its ``world x accumulation`` micro-batches, so 2 ranks x 2 pairs
x 1 accumulation run exactly the step content of 1 process x 2 pairs x 2 accumulations: both must
log the same losses and count exactly 4 pairs in every optimiser step.
"""

import json
import os

import pytest
from tests.train.helpers import dpo_rows, recipe, write_dpo_dir
from tests.train.test_deepspeed import launch, metrics

from zephyr_fast.config import build_config
from zephyr_fast.training.run import run

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


def examples_recipe(out, data_dir, **over):
    """A tiny random-init DPO recipe batched by examples (no token budget): 2 pairs per micro-batch."""
    r = recipe("dpo", out, data_dir, per_device_train_batch_size=2, gradient_accumulation_steps=1,
               num_train_epochs=2, **over)
    r.pop("max_tokens_per_batch")
    return r


def summary_of(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def test_examples_batching_on_two_zero3_ranks_matches_one_process_with_accumulation(tmp_path):
    data = write_dpo_dir(tmp_path / "data", dpo_rows(n=8, cut=120))
    r = examples_recipe(tmp_path / "ds", data)
    launch(r, tmp_path, "dpo")
    one = run(build_config({**r, "output_dir": str(tmp_path / "one"), "gradient_accumulation_steps": 2}, source="test"))

    ds = summary_of(tmp_path / "ds")
    assert (ds["world_size"], ds["zero_stage"], one["world_size"]) == (2, 3, 1)
    for s in (ds, one):  # 8 pairs an epoch, 4 a step, 2 epochs
        assert s["finished"] and s["global_step"] == 4 and s["train_pairs"] / s["global_step"] == 4
    a, b = metrics(tmp_path / "ds"), metrics(one["output_dir"])
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    assert b[-1]["loss"] != b[0]["loss"]  # the policy moved: steps 2-4 compare the updates, not the init
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], rel=1e-4, abs=1e-5)
