"""Fixtures for the data-layer tests: the real Mistral tokenizer and the bundled sample rows."""

import json

import pytest


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    from zephyr_fast.data.chat import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def uf_rows(assets_dir):
    return read_jsonl(assets_dir / "data" / "ultrafeedback_binarized" / "sample16.jsonl")


@pytest.fixture(scope="session")
def uc_rows(assets_dir):
    return read_jsonl(assets_dir / "data" / "ultrachat_200k" / "sample16.jsonl")


@pytest.fixture(scope="session")
def flat_rows(assets_dir):
    return read_jsonl(assets_dir / "data" / "ultrafeedback_binarized" / "flat1k.jsonl")
