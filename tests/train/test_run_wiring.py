"""The trainer wires the recipe keys of issues 11 and 12 end to end: start-up refusals come before any
data work, notices are printed, ``logging_first_step`` logs step 1, a bad ``eos_token`` is one line, a
run pushes its checkpoints and final model to a (local) Hub per ``hub_strategy``, and a reference
model's cache written by ``stage: ref_logps`` is what ``stage: dpo`` reuses."""

import os
import shutil

import pytest

from zephyr_fast.config import ConfigError, build_config
from zephyr_fast.training.metrics import read_jsonl
from zephyr_fast.training.reference import StaleRefLogpsError
from zephyr_fast.training.run import run
from tests.train.helpers import recipe
from tests.train.test_integrations import closed_port_url, local_hub, no_cached_token  # noqa: F401 - fixtures


def test_hub_refusal_comes_before_any_data_work(tmp_path, monkeypatch, no_cached_token):  # noqa: F811
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    missing = str(tmp_path / "no-such-data")  # were data loaded first, this would be the error
    cfg = build_config(recipe("dpo", tmp_path / "out", missing, push_to_hub=True), source="r.yaml")
    with pytest.raises(ConfigError, match=r"^push_to_hub: cannot reach the Hugging Face Hub"):
        run(cfg)


def test_bitsandbytes_optimiser_refused_on_cpu_before_data(tmp_path):
    cfg = build_config(recipe("sft", tmp_path / "out", str(tmp_path / "none"), optim="paged_adamw_32bit"),
                       source="r.yaml")
    with pytest.raises(ConfigError, match=r"^optim: .*needs a CUDA device"):
        run(cfg)


def test_bad_eos_token_is_one_line(tmp_path, sft_dir):
    cfg = build_config(recipe("sft", tmp_path / "out", sft_dir, eos_token="<|im_end|>"), source="r.yaml")
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert str(e.value).startswith("r.yaml: eos_token: '<|im_end|>'") and "\n" not in str(e.value)


def test_run_prints_notices_logs_first_step_and_pushes_to_the_hub(tmp_path, sft_dir, local_hub, capsys):  # noqa: F811
    # fractions of the run (transformers' rule): logging every ceil(0.5 x 3) = 2 steps, saving every ceil(0.6 x 3) = 2
    cfg = build_config(recipe("sft", tmp_path / "zephyr-test", sft_dir, max_steps=3, logging_steps=0.5,
                              logging_first_step=True, save_strategy="steps", save_steps=0.6, push_to_hub=True, hub_token="hf_localtest",
                              hub_strategy="checkpoint", dataset_num_proc=4), source="r.yaml")
    s = run(cfg)
    out = capsys.readouterr().out
    assert "note: dataset_num_proc" in out
    assert [r["step"] for r in read_jsonl(os.path.join(cfg.training.output_dir, "metrics.jsonl"))] == [1, 2, 3]
    assert s["hub_repo"] == "tester/zephyr-test"
    messages = [c[2] for c in local_hub.commits]
    assert messages == ["Training in progress, checkpoint-2", "checkpoint-2 as last-checkpoint", "End of training"]
    stored = local_hub.files[("tester/zephyr-test", "main")]
    assert "model.safetensors" in stored and "last-checkpoint/model.safetensors" in stored
    assert {"config.yaml", "README.md"} <= set(stored)  # no token in them, so they are uploaded
    assert all(b"hf_localtest" not in v for v in stored.values())
    assert local_hub.validated and local_hub.unhandled == []  # the model card's metadata went through the Hub's check


def test_ref_model_cache_from_stage_ref_logps_is_reused_by_stage_dpo(tmp_path, sft_model, dpo_dir):
    """``stage: ref_logps`` with ``ref_model_name_or_path`` writes the cache of that model; a ``stage: dpo``
    run naming the same reference model (its policy a different checkpoint) reuses it, and without the
    cache it refuses in one line instead of computing it with the policy."""
    policy = tmp_path / "policy"
    shutil.copytree(sft_model["model_dir"], policy, ignore=shutil.ignore_patterns("checkpoint-*", "ref_logps"))
    common = dict(model_name_or_path=str(policy), ref_model_name_or_path=sft_model["model_dir"],
                  ref_logps_dir=str(tmp_path / "cache"), max_steps=1)
    ref = run(build_config(recipe("ref_logps", tmp_path / "ref", dpo_dir, **common), source="r.yaml"))
    assert ref["ref_logps_train_reused"] is False
    dpo = run(build_config(recipe("dpo", tmp_path / "dpo", dpo_dir, **common), source="r.yaml"))
    assert dpo["ref_logps_train_reused"] is True and dpo["global_step"] == 1
    cold = build_config(recipe("dpo", tmp_path / "cold", dpo_dir, **{**common, "ref_logps_dir": str(tmp_path / "x")}),
                        source="r.yaml")
    with pytest.raises(StaleRefLogpsError, match="--stage=ref_logps"):
        run(cold)
