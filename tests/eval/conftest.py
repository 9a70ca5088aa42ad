"""Fixtures shared by the evaluation tests: one tiny SFT run with checkpoints (session-wide)."""

import pytest

from tests.train.conftest import sft_dir  # noqa: F401 - the trainer tests' 10 + 2 UltraChat rows, reused
from tests.train.helpers import recipe


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, sft_dir):  # noqa: F811
    """A 2-step tiny SFT run saving a checkpoint at step 1; returns ``(recipe dict, output_dir)``."""
    from zephyr_fast.config import build_config
    from zephyr_fast.train import run

    out = tmp_path_factory.mktemp("eval_sft_run")
    r = recipe("sft", out, sft_dir, max_steps=2, save_strategy="steps", save_steps=1)
    run(build_config(r, source="test"))
    return r, str(out)
