"""Fixtures shared by the AIF tests: one ``transformers serve`` of a tiny random model for the whole
session (judge and generation tests both talk to it; a start costs 20-35 s on the CI machine)."""

import pytest

from tests.aif.helpers import save_tiny_model
from zephyr_fast.aif.serve import serve_local


@pytest.fixture(scope="session")
def served_tiny(tmp_path_factory):
    """A real OpenAI-compatible server on 127.0.0.1: ``transformers serve`` of a tiny Mistral model."""
    model_dir = save_tiny_model(tmp_path_factory.mktemp("served") / "tiny-served", seed=3)
    with serve_local(model_dir) as server:
        yield server
