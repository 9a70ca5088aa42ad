"""Offline, a hub look-up fails at once in one line: one TCP probe of ``HF_ENDPOINT`` (bounded by
``HUB_PROBE_TIMEOUT_S``) replaces huggingface_hub's retries, for the model config, the tokenizer, the
dataset revision and the model fingerprint."""

import socket

import pytest
import transformers
from huggingface_hub import HfApi

from zephyr_fast.data import chat, loading
from zephyr_fast.model.load import check_supported
from zephyr_fast.training import fingerprint


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def never(*a, **k):
        raise AssertionError("the Hub was asked although the probe said it is unreachable")

    for owner, name in ((transformers.AutoConfig, "from_pretrained"), (transformers.AutoTokenizer, "from_pretrained"),
                        (HfApi, "model_info"), (HfApi, "dataset_info")):
        monkeypatch.setattr(owner, name, never)


def test_probe_is_bounded_and_names_the_host(offline):
    assert chat.HUB_PROBE_TIMEOUT_S < 2
    why = chat.hub_unreachable()
    assert why.startswith("the Hugging Face Hub (127.0.0.1) is unreachable (ConnectionRefusedError")


def test_model_config_lookup_is_one_line(offline):
    with pytest.raises(ValueError) as exc:
        check_supported("some-org/some-model")
    msg = str(exc.value)
    assert "\n" not in msg and "'some-org/some-model' is not a local path" in msg and "HF_HUB_OFFLINE=1" in msg


def test_tokenizer_lookup_is_one_line(offline):
    with pytest.raises(FileNotFoundError, match="tokenizer 'some-org/some-model' is not a local path"):
        chat.load_tokenizer("some-org/some-model")


def test_fingerprint_falls_back_to_the_cache_without_asking(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert fingerprint.resolve_commit("some-org/some-model", "main") is None
    assert fingerprint.hub_fingerprint("some-org/some-model", "main").startswith("unresolved:")


def test_dataset_revision_lookup_is_one_line(offline):
    with pytest.raises(Exception) as exc:
        loading.load_rows(loading.DataConfig(dataset_mixer={"some-org/some-data": 1.0}, dataset_splits=["train"]))
    assert "\n" not in str(exc.value) and "unreachable" in str(exc.value)
