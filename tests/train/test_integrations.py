"""Integrations (issue 11): wandb reporting, Hub pushes, transformers' schedulers, bitsandbytes / QLoRA
refusals and gradient_checkpointing_kwargs -- each exercised through the real library where this
CPU machine allows (wandb offline files read back, a closed HF_ENDPOINT port, transformers' own
scheduler values); the CUDA-only paths are marked ``cuda``."""

import glob
import json
import os
import struct
import sys

import pytest
from wandb.proto import wandb_internal_pb2

from zephyr_fast.config import ConfigError, TrainingConfig
from zephyr_fast.training import metrics
from zephyr_fast.training.metrics import MetricLogger, check_report_to, read_jsonl, wandb_settings

# ---- wandb ---------------------------------------------------------------------------------------

def wandb_records(run_dir) -> list:
    """``(kind, Record)`` of every record in the offline run files under ``run_dir``: the LevelDB-style
    log of wandb's protobuf ``Record``s (7-byte ``:W&B`` header; 32 KiB blocks of crc/len/type chunks)."""
    records = []
    for path in sorted(glob.glob(os.path.join(str(run_dir), "wandb", "offline-run-*", "run-*.wandb"))):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B", path
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            if (pos % 32768) + 7 > 32768:  # block trailer too short for a chunk header: skip to the next block
                pos = (pos // 32768 + 1) * 32768
                continue
            length, kind = struct.unpack_from("<HB", data, pos + 4)
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            pending += chunk
            if kind in (1, 4):  # FULL or LAST
                rec = wandb_internal_pb2.Record()
                rec.ParseFromString(pending)
                records.append((rec.WhichOneof("record_type"), rec))
                pending = b""
    return records


def wandb_history(run_dir) -> list:
    """Every ``run.log`` row of the offline runs under ``run_dir`` as a dict."""
    rows = []
    for kind, rec in wandb_records(run_dir):
        if kind == "history":
            rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item})
    return rows


def wandb_runs(run_dir) -> list:
    """The ``RunRecord``s (id, project, name, group, config) of the offline runs under ``run_dir``."""
    return [rec.run for kind, rec in wandb_records(run_dir) if kind == "run"]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    d = tmp_path / "wandb_dir"
    d.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(d))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    return d


def test_report_to_refusals(monkeypatch):
    assert check_report_to(["none"]) == ()
    assert check_report_to("tensorboard") == ("tensorboard",)
    assert check_report_to(["all"]) == ("tensorboard", "wandb")
    with pytest.raises(ConfigError, match=r"^report_to: 'mlflow' is not supported"):
        check_report_to(["tensorboard", "mlflow"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an absent package looks like to the import system
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None if name == "wandb" else True)
    with pytest.raises(ConfigError, match=r"^report_to: wandb is requested but not installed"):
        check_report_to(["wandb"])
    assert check_report_to(["all"]) == ("tensorboard",)


def test_wandb_offline_run_gets_hf_names_config_and_resumes(tmp_path, wandb_offline):
    t = TrainingConfig(stage="sft", output_dir=str(tmp_path / "out"), run_name="zephyr-test", wandb_project="proj",
                       wandb_run_group="grp", report_to=["wandb"])
    run_config = {"training": {"learning_rate": 3e-4, "stage": "sft"}}
    logger = MetricLogger(t.output_dir, enabled=True, report_to=t.report_to, wandb=wandb_settings(t),
                          run_config=run_config)
    logger.log(1, {"loss": 2.5, "learning_rate": 1e-4, "rewards/margins": 0.25, "epoch": 0.5})
    logger.log(1, {"eval_loss": 2.25, "eval_rewards/accuracies": 0.75})
    run_id = logger.wandb_run.id
    logger.close()
    again = MetricLogger(t.output_dir, enabled=True, report_to=t.report_to, wandb=wandb_settings(t),
                         run_config=run_config, resume=True)
    again.log(2, {"loss": 2.0})
    assert again.wandb_run.id == run_id  # the resumed run continues the same wandb run
    again.close()

    runs = wandb_runs(wandb_offline)
    assert [r.run_id for r in runs] == [run_id, run_id]
    assert {(r.project, r.display_name, r.run_group) for r in runs} == {("proj", "zephyr-test", "grp")}
    config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
    assert config["training"] == run_config["training"]
    rows = wandb_history(wandb_offline)
    by_step = [(r["train/global_step"], {k: v for k, v in r.items() if not k.startswith("_")}) for r in rows]
    assert by_step[0][1] == {"train/loss": 2.5, "train/learning_rate": 1e-4, "train/rewards/margins": 0.25,
                             "train/epoch": 0.5, "train/global_step": 1}
    assert by_step[1][1] == {"eval/loss": 2.25, "eval/rewards/accuracies": 0.75, "train/global_step": 1}
    assert by_step[2][1] == {"train/loss": 2.0, "train/global_step": 2}
    assert [r["step"] for r in read_jsonl(logger.path)] == [1, 1, 2]  # metrics.jsonl has the same rows


def test_wandb_off_unless_requested(tmp_path, wandb_offline):
    logger = MetricLogger(str(tmp_path / "out"), enabled=True, report_to=["tensorboard"])
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert logger.wandb_run is None and not glob.glob(str(wandb_offline / "wandb" / "*"))
