"""Fixtures for the data-layer tests: the real Mistral tokenizer and the bundled sample rows."""

import pytest

from tests.conftest import read_jsonl


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    from zephyr_fast.data.chat import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def uc_rows(assets_dir):
    return read_jsonl(assets_dir / "data" / "ultrachat_200k" / "sample16.jsonl")
