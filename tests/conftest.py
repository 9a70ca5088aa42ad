"""Shared test setup: Triton runs through its CPU interpreter, CUDA-only tests skip by mark."""

import json
import os
import pathlib

# Must be set before triton is imported anywhere: CI has no GPU, kernels run in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
TOKENIZER_DIR = ASSETS / "tokenizers" / "mistral-7b-v0.1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets_dir():
    return ASSETS


@pytest.fixture(scope="session")
def tokenizer_dir():
    return TOKENIZER_DIR


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def uf_rows(assets_dir):
    """The 16 real ``ultrafeedback_binarized`` sample rows."""
    return read_jsonl(assets_dir / "data" / "ultrafeedback_binarized" / "sample16.jsonl")


@pytest.fixture(scope="session")
def flat_rows(assets_dir):
    """1000 real flat UltraFeedback preference rows."""
    return read_jsonl(assets_dir / "data" / "ultrafeedback_binarized" / "flat1k.jsonl")
