"""Fixtures shared by the evaluation tests: a tiny SFT run with a checkpoint, a tiny dDPO run from it, and
a judge served from that checkpoint (session-wide, built once)."""

import os

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


@pytest.fixture(scope="session")
def dpo_run(tmp_path_factory, sft_run):
    """A 2-step tiny dDPO run from ``sft_run``'s model (test split = train split), checkpoint at step 1,
    evaluated at step 2; returns ``(recipe path, output_dir, summary)``."""
    import yaml

    from zephyr_fast.config import build_config
    from zephyr_fast.train import run
    from tests.train.helpers import dpo_rows, write_dpo_dir

    data = write_dpo_dir(str(tmp_path_factory.mktemp("eval_dpo_data")), dpo_rows())
    out = tmp_path_factory.mktemp("eval_dpo_run")
    r = recipe("dpo", out, data, model_name_or_path=sft_run[1], max_steps=2, save_strategy="steps", save_steps=1,
               eval_strategy="steps", eval_steps=2)
    del r["model_init"]
    path = tmp_path_factory.mktemp("eval_dpo_recipe") / "recipe.yaml"  # the output folder starts empty
    path.write_text(yaml.safe_dump(r))
    summary = run(build_config(r, source=str(path)))
    return str(path), str(out), summary


@pytest.fixture(scope="session")
def judge(tmp_path_factory, sft_run):
    """A real OpenAI-compatible judge: ``transformers serve`` of a copy of ``sft_run``'s checkpoint-1 (a
    checkpoint is a servable model folder) on 127.0.0.1, forced to answer with a verdict token
    (``constrain_tokenizer``); a tiny model's verdicts mean nothing, the plumbing is real."""
    import shutil

    from tests.aif.helpers import TOKENIZER
    from zephyr_fast.aif.serve import serve_local

    model_dir = str(tmp_path_factory.mktemp("eval_judge") / "checkpoint-1")
    shutil.copytree(os.path.join(sft_run[1], "checkpoint-1"), model_dir)  # the server may write beside it
    with serve_local(model_dir) as server:
        yield ["--base-url", server.base_url, "--judge-model", server.model, "--constrain-tokenizer", str(TOKENIZER),
               "--concurrency", "2", "--timeout", "60"]
