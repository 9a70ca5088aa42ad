"""Fixtures for the trainer tests (helpers in helpers.py)."""

import pytest
from tests.train.helpers import ASSETS, cut_turns, read_jsonl, write_jsonl, dpo_rows, recipe


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    """``{train,test}.jsonl`` of 10 + 2 short UltraChat conversations (hub schema)."""
    rows = read_jsonl(ASSETS / "data" / "ultrachat_200k" / "sample16.jsonl")
    d = tmp_path_factory.mktemp("sft_data")
    write_jsonl(str(d / "train.jsonl"), [{"messages": cut_turns(r["messages"][:4], 160)} for r in rows[:10]])
    write_jsonl(str(d / "test.jsonl"), [{"messages": cut_turns(r["messages"][:2], 160)} for r in rows[10:12]])
    return str(d)


@pytest.fixture(scope="session")
def dpo_dir(tmp_path_factory):
    """8 short UltraFeedback pairs; the test split *is* the train split (rewards measured on it)."""
    d = tmp_path_factory.mktemp("dpo_data")
    rows = dpo_rows()
    write_jsonl(str(d / "train.jsonl"), rows)
    write_jsonl(str(d / "test.jsonl"), rows)
    return str(d)


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory, sft_dir):
    """A tiny model after a short dSFT run (the DPO tests start from it); returns its summary."""
    from zephyr_fast.config import build_config
    from zephyr_fast.train import run

    out = tmp_path_factory.mktemp("sft_run")
    cfg = build_config(recipe("sft", out, sft_dir, num_train_epochs=4, eval_strategy="epoch"), source="test")
    summary = run(cfg, return_model=True)
    return summary
