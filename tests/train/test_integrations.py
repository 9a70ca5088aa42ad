"""Integrations (issue 11): wandb reporting, Hub pushes, transformers' schedulers, bitsandbytes / QLoRA
refusals and gradient_checkpointing_kwargs -- each exercised through the real library where this
CPU machine allows (wandb offline files read back, a closed HF_ENDPOINT port, transformers' own
scheduler values); the CUDA-only paths are marked ``cuda``."""

import base64
import glob
import http.server
import json
import os
import re
import socket
import struct
import threading
import time
import urllib.parse

import pytest
import torch
import transformers.optimization as tf_opt
import wandb
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from wandb.proto import wandb_internal_pb2

from tests.model.helpers import assert_grads_close, grads, random_seqs, sft_packed, tiny_model
from tests.train.helpers import recipe
from zephyr_fast.config import ConfigError, ModelConfig, TrainingConfig, build_config
from zephyr_fast.model import forward_hidden, load_model, tiny_config
from zephyr_fast.training import build, hub, metrics
from zephyr_fast.training.build import (build_model, build_optimizer, build_scheduler, check_runtime,
                                        quantization_config, set_tf32)
from zephyr_fast.training.checkpoint import safe_torch_load
from zephyr_fast.training.distributed import DistInfo
from zephyr_fast.training.metrics import MetricLogger, check_report_to, read_jsonl, wandb_keys, wandb_settings
from zephyr_fast.training.run import run

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
    """Every ``run.log`` row of the offline runs under ``run_dir``, without wandb's own ``_`` keys."""
    items = [rec.history.item for kind, rec in wandb_records(run_dir) if kind == "history"]
    return [{it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in row
             if not (it.key or it.nested_key[0]).startswith("_")} for row in items]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    d = tmp_path / "wandb_dir"
    d.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(d))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    wandb.teardown()  # wandb keeps the first WANDB_DIR of the process in its settings singleton
    yield d
    wandb.teardown()


def test_report_to_refusals(monkeypatch):
    assert check_report_to(["none"]) == ()
    assert check_report_to("tensorboard") == ("tensorboard",)
    assert check_report_to(["all"]) == ("tensorboard", "wandb")
    with pytest.raises(ConfigError, match=r"^report_to: 'mlflow' is not supported"):
        check_report_to(["tensorboard", "mlflow"])
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None if name == "wandb" else True)
    with pytest.raises(ConfigError, match=r"^report_to: wandb is requested but not installed"):
        check_report_to(["wandb"])
    assert check_report_to(["all"]) == ("tensorboard",)


def test_wandb_offline_run_gets_hf_names_config_and_resumes(tmp_path, wandb_offline):
    t = TrainingConfig(stage="sft", output_dir=str(tmp_path / "out"), run_name="zephyr-test", wandb_project="proj",
                       wandb_run_group="grp", report_to=["wandb"])
    run_config = {"training": {"learning_rate": 3e-4, "stage": "sft", "hub_token": "hf_secret"}}
    logger = MetricLogger(t.output_dir, enabled=True, report_to=t.report_to, wandb=wandb_settings(t),
                          run_config=run_config)
    logger.log(1, {"loss": 2.5, "learning_rate": 1e-4, "rewards/margins": 0.25, "epoch": 0.5})
    logger.log(1, {"eval_loss": 2.25, "eval_rewards/accuracies": 0.75})
    run_id = logger.wandb_run.id
    logger.close()
    time.sleep(1.1)  # offline run folders are named to the second: a resume in the same second would share one
    again = MetricLogger(t.output_dir, enabled=True, report_to=t.report_to, wandb=wandb_settings(t),
                         run_config=run_config, resume=True)
    again.log(2, {"loss": 2.0})
    assert again.wandb_run.id == run_id  # the resumed run continues the same wandb run
    again.close()
    # the offline transaction logs are written by wandb's service process; finish() returns before it has
    # necessarily flushed them (one CI run read the resumed run's file without its records): shutting the
    # service down waits for it
    wandb.teardown()

    runs = [rec.run for kind, rec in wandb_records(wandb_offline) if kind == "run"]
    assert [r.run_id for r in runs] == [run_id, run_id]
    assert {(r.project, r.display_name, r.run_group) for r in runs} == {("proj", "zephyr-test", "grp")}
    config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
    assert config["training"] == {**run_config["training"], "hub_token": "<redacted>"}  # no secret in wandb
    assert wandb_history(wandb_offline) == [
        {"train/loss": 2.5, "train/learning_rate": 1e-4, "train/rewards/margins": 0.25, "train/epoch": 0.5,
         "train/global_step": 1},
        {"eval/loss": 2.25, "eval/rewards/accuracies": 0.75, "train/global_step": 1},
        {"train/loss": 2.0, "train/global_step": 2}]
    assert [r["step"] for r in read_jsonl(logger.path)] == [1, 1, 2]  # metrics.jsonl has the same rows


def test_trainer_run_sends_its_metrics_to_wandb(tmp_path, sft_dir, wandb_offline):
    """A real tiny SFT run: every metrics.jsonl row reaches wandb under HF's names, same values."""
    cfg = build_config(recipe("sft", tmp_path / "run", sft_dir, report_to=["wandb"], eval_strategy="epoch",
                              max_steps=2), source="test")
    run(cfg)
    rows = read_jsonl(os.path.join(cfg.training.output_dir, "metrics.jsonl"))
    logged = wandb_history(wandb_offline)
    assert logged == [{**wandb_keys(r), "train/global_step": r["step"]} for r in rows]
    assert any("train/loss" in r for r in logged) and any("eval/loss" in r for r in logged)


def test_wandb_off_unless_requested(tmp_path, wandb_offline):
    logger = MetricLogger(str(tmp_path / "out"), enabled=True, report_to=["tensorboard"])
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert logger.wandb_run is None and not glob.glob(str(wandb_offline / "wandb" / "*"))


# ---- a local Hub (the HTTP endpoints huggingface_hub's whoami / create_repo / create_branch / upload_folder use)

class LocalHub(http.server.ThreadingHTTPServer):
    """A minimal Hub on 127.0.0.1: whoami, repo and branch creation, preupload (every file "regular")
    and the NDJSON commit; ``files[(repo, revision)][path] = bytes`` as committed, ``commits`` in order."""

    def __init__(self, token: str, user: str = "tester"):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.token, self.user, self.url = token, user, f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict = {}  # repo_id -> {"visibility": ..., "branches": set}
        self.files, self.commits, self.unhandled, self.validated = {}, [], [], []


class _HubHandler(http.server.BaseHTTPRequestHandler):
    log_message = staticmethod(lambda *args: None)  # quiet

    def _reply(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        hub = self.server
        if self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        if self.path == "/api/whoami-v2":
            return self._reply(200, {"type": "user", "name": hub.user, "auth": {}})
        hub.unhandled.append(("GET", self.path))
        return self._reply(404, {"error": "not found"})

    def do_POST(self):
        hub, body = self.server, self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        path = urllib.parse.unquote(self.path.split("?")[0])
        if path == "/api/validate-yaml":  # the model card's metadata, checked before a README.md commit
            hub.validated.append(json.loads(body)["content"])
            return self._reply(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req.get('organization') or hub.user}/{req['name']}"
            hub.repos.setdefault(repo, {"visibility": req.get("visibility"), "branches": {"main"}})
            return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
        if m is None or m.group(1) not in hub.repos:
            hub.unhandled.append(("POST", self.path))
            return self._reply(404, {"error": "not found"})
        repo, op, rev = m.groups()
        if op == "branch":
            hub.repos[repo]["branches"].add(rev)
            return self._reply(200, {})
        if op == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        return self._commit(repo, rev, body)

    def _commit(self, repo: str, rev: str, body: bytes):
        hub = self.server
        if rev not in hub.repos[repo]["branches"]:
            return self._reply(404, {"error": f"revision {rev} not found"})
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
        hub.files.setdefault((repo, rev), {}).update(files)
        hub.commits.append((repo, rev, header["summary"], sorted(files)))
        return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{len(hub.commits)}",
                                 "commitOid": f"{len(hub.commits):040x}"})


@pytest.fixture
def local_hub(monkeypatch):
    hub = LocalHub(token="hf_localtest")
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield hub
    hub.shutdown()
    hub.server_close()


def closed_port_url() -> str:
    """An http URL on a local port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def hub_training(tmp_path, **kw) -> TrainingConfig:
    return TrainingConfig(stage="sft", output_dir=str(tmp_path / "zephyr-test"), push_to_hub=True, **kw)


def fill_output_dir(out) -> None:
    """What a run leaves in output_dir mid-training: logs, caches, a checkpoint and one being written."""
    files = {"config.yaml": "stage: sft\n", "metrics.jsonl": '{"step": 2, "loss": 1.5}\n', "runs/events.out": "tb",
             "ref_logps/train.json": "{}", "wandb_run_id": "abc\n", "wandb/run/x.wandb": "w",
             "checkpoint-2/model.safetensors": "weights-2", "checkpoint-2/trainer_state.json": '{"global_step": 2}',
             ".checkpoint-4.tmp/model.safetensors": "partial", "resolved.yaml": "hub_token: hf_localtest\n"}
    for rel, text in files.items():
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


@pytest.fixture
def no_cached_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))


def test_hub_check_without_token_refuses_before_any_network(tmp_path, monkeypatch, no_cached_token):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert hub.check(TrainingConfig(stage="sft"), str(tmp_path)) is None  # push_to_hub off: nothing checked
    with pytest.raises(ConfigError, match=r"^push_to_hub: no Hugging Face token .*--push_to_hub=false$"):
        hub.check(hub_training(tmp_path), str(tmp_path))
    with pytest.raises(ConfigError, match=r"^hub_strategy: must be one of end \| every_save"):
        hub.check(hub_training(tmp_path, hub_strategy="sometimes", hub_token="hf_x"), str(tmp_path))


def test_hub_check_unreachable_hub_is_one_line(tmp_path, monkeypatch, no_cached_token):
    url = closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")  # the environment's token is used when hub_token is unset
    with pytest.raises(ConfigError) as e:
        hub.check(hub_training(tmp_path), str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"push_to_hub: cannot reach the Hugging Face Hub at {url} (") and "\n" not in msg
    assert msg.endswith("or run without pushing: --push_to_hub=false")


def test_hub_check_rejected_token(tmp_path, local_hub):
    with pytest.raises(ConfigError, match=r"^push_to_hub: the Hub at .* rejected the token \(401 on whoami\)"):
        hub.check(hub_training(tmp_path, hub_token="hf_wrong"), str(tmp_path))
    assert local_hub.repos == {}


@pytest.mark.parametrize("strategy,ckpt_files", [
    ("end", []),
    ("every_save", []),
    ("checkpoint", ["last-checkpoint/model.safetensors", "last-checkpoint/trainer_state.json"]),
    ("all_checkpoints", ["checkpoint-2/model.safetensors", "checkpoint-2/trainer_state.json"]),
])
def test_push_per_hub_strategy_to_a_local_hub(tmp_path, local_hub, strategy, ckpt_files):
    t = hub_training(tmp_path, hub_strategy=strategy, hub_token="hf_localtest", hub_private_repo=True,
                     hub_model_revision="dpo-run")
    target = hub.check(t, t.output_dir)
    assert (target.repo_id, target.revision) == ("tester/zephyr-test", "dpo-run")
    assert local_hub.repos == {"tester/zephyr-test": {"visibility": "private", "branches": {"main", "dpo-run"}}}
    fill_output_dir(t.output_dir)
    hub.push_checkpoint(target, t.output_dir, os.path.join(t.output_dir, "checkpoint-2"))
    logs = ["config.yaml", "metrics.jsonl", "runs/events.out"]  # never resolved.yaml: it holds the token
    expected = [] if strategy == "end" else [("Training in progress, checkpoint-2", logs)]
    if ckpt_files:
        expected.append((f"checkpoint-2 as {ckpt_files[0].split('/')[0]}", ckpt_files))
    assert [(c[2], c[3]) for c in local_hub.commits] == expected
    with open(os.path.join(t.output_dir, "model.safetensors"), "w") as f:  # the final export
        f.write("final weights")
    hub.push_final(target, t.output_dir)
    assert local_hub.commits[-1][2:] == ("End of training", sorted(logs + ["model.safetensors"]))
    stored = local_hub.files[("tester/zephyr-test", "dpo-run")]
    assert stored["model.safetensors"] == b"final weights" and local_hub.unhandled == []
    if ckpt_files:
        assert stored[ckpt_files[0]] == b"weights-2"


def test_failed_checkpoint_push_warns_and_training_goes_on(tmp_path, local_hub, caplog):
    t = hub_training(tmp_path, hub_strategy="checkpoint", hub_token="hf_localtest")
    target = hub.check(t, t.output_dir)
    fill_output_dir(t.output_dir)
    local_hub.token = "hf_rotated"  # every upload from now on is refused (401)
    assert hub.push_checkpoint(target, t.output_dir, os.path.join(t.output_dir, "checkpoint-2")) == []
    assert "push_to_hub: pushing checkpoint-2 to tester/zephyr-test failed" in caplog.text
    with pytest.raises(HfHubHTTPError):  # the final push does fail loudly
        hub.push_final(target, t.output_dir)


def test_hub_model_id_rules():
    assert hub.repo_id_for(None, "me", "/x/outputs/zephyr-7b-sft") == "me/zephyr-7b-sft"
    assert hub.repo_id_for("zephyr-dpo", "me", "/x/o") == "me/zephyr-dpo"
    assert hub.repo_id_for("org/zephyr-dpo", "me", "/x/o") == "org/zephyr-dpo"


# ---- LR schedules ----------------------------------------------------------------------------------

def lr_curve(scheduler, steps: int) -> list:
    """The LR before each of ``steps`` updates (the optimiser steps first, as in training)."""
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind,kwargs,reference", [
    ("cosine_with_min_lr", {"min_lr_rate": 0.1},
     lambda o, w, n: tf_opt.get_cosine_with_min_lr_schedule_with_warmup(o, w, n, min_lr_rate=0.1)),
    ("cosine_with_min_lr", {"min_lr": 2e-4, "num_cycles": 0.25},
     lambda o, w, n: tf_opt.get_cosine_with_min_lr_schedule_with_warmup(o, w, n, min_lr=2e-4, num_cycles=0.25)),
    ("inverse_sqrt", {"timescale": 7}, lambda o, w, n: tf_opt.get_inverse_sqrt_schedule(o, w, timescale=7)),
    ("polynomial", {"lr_end": 1e-5, "power": 2.0},
     lambda o, w, n: tf_opt.get_polynomial_decay_schedule_with_warmup(o, w, n, lr_end=1e-5, power=2.0)),
    ("warmup_stable_decay", {"num_decay_steps": 12, "min_lr_ratio": 0.05},
     lambda o, w, n: tf_opt.get_wsd_schedule(o, w, 12, n, min_lr_ratio=0.05)),
    ("cosine", {"num_cycles": 1.5}, lambda o, w, n: tf_opt.get_cosine_schedule_with_warmup(o, w, n, num_cycles=1.5)),
    ("constant", {}, lambda o, w, n: tf_opt.get_constant_schedule(o)),  # transformers: no warmup on "constant"
    ("constant_with_warmup", {}, lambda o, w, n: tf_opt.get_constant_schedule_with_warmup(o, w)),
])
def test_schedules_follow_transformers_curves(kind, kwargs, reference):
    total = 41  # warmup_ratio 0.1 -> ceil(4.1) = 5 warmup steps
    t = TrainingConfig(stage="sft", learning_rate=1e-3, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs,
                       warmup_ratio=0.1)
    ours = lr_curve(build_scheduler(build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], t), t, total), total)
    theirs = lr_curve(reference(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=1e-3), 5, total), total)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    # a real curve, not a constant stand-in (transformers' "constant" ignores the warmup)
    assert len(set(ours)) == 1 if kind == "constant" else len(set(ours)) > 5


@pytest.mark.parametrize("kind,kwargs,match", [
    ("linear", {"min_lr_rate": 0.1}, r"'min_lr_rate' means nothing to lr_scheduler_type 'linear' \(it takes: none\)"),
    ("cosine", {"power": 2}, r"'power' means nothing to lr_scheduler_type 'cosine' \(it takes: num_cycles\)"),
    ("cosine_with_min_lr", {}, r".*min_lr.*\(lr_scheduler_type 'cosine_with_min_lr'\)"),
    ("warmup_stable_decay", {}, r".*missing .*num_decay_steps.*\(lr_scheduler_type 'warmup_stable_decay'\)"),
    ("polynomial", {"floor": 0.1}, r".*unexpected keyword argument 'floor'.*\(lr_scheduler_type 'polynomial'\)"),
])
def test_scheduler_kwargs_refused_in_one_line_at_start(kind, kwargs, match):
    t = TrainingConfig(stage="sft", lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs)
    with pytest.raises(ConfigError, match=r"^lr_scheduler_kwargs: " + match) as e:
        check_runtime(model_section(), t, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_transformers_schedule_resumes_from_a_checkpointed_state(tmp_path):
    t = TrainingConfig(stage="sft", learning_rate=1e-3, lr_scheduler_type="cosine_with_min_lr",
                       lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=3)
    full = lr_curve(build_scheduler(build_optimizer([torch.nn.Parameter(torch.zeros(2))], t), t, 20), 20)
    first = build_scheduler(build_optimizer([torch.nn.Parameter(torch.zeros(2))], t), t, 20)
    lr_curve(first, 8)
    torch.save(first.state_dict(), tmp_path / "scheduler.pt")
    resumed = build_scheduler(build_optimizer([torch.nn.Parameter(torch.zeros(2))], t), t, 20)
    resumed.load_state_dict(safe_torch_load(str(tmp_path / "scheduler.pt")))  # what load_checkpoint does
    assert lr_curve(resumed, 12) == pytest.approx(full[8:], rel=1e-12)


# ---- bitsandbytes optimisers / QLoRA: refused off CUDA ---------------------------------------------

def model_section(**kw) -> ModelConfig:
    return ModelConfig(model_name_or_path=kw.pop("model_name_or_path", "some/checkpoint"), **kw)


@pytest.mark.parametrize("m,t,device,match", [
    ({}, {"optim": "paged_adamw_8bit"}, "cpu",
     r"^optim: 'paged_adamw_8bit' needs a CUDA device \(bitsandbytes\); on cpu, use optim: adamw_torch$"),
    ({"load_in_4bit": True}, {}, "cpu", r"^load_in_4bit: quantized weights are frozen; .* set use_peft: true$"),
    ({"load_in_8bit": True, "use_peft": True}, {}, "cpu", r"^load_in_8bit: QLoRA loading needs a CUDA device"),
    ({"load_in_4bit": True, "load_in_8bit": True, "use_peft": True}, {}, "cuda", r"^load_in_4bit: and load_in_8bit"),
    ({"load_in_4bit": True, "use_peft": True, "model_name_or_path": None, "model_init": {"arch": "mistral"},
      "tokenizer_name_or_path": "x"}, {}, "cuda", r"^load_in_4bit: needs model_name_or_path"),
    ({"load_in_4bit": True, "use_peft": True, "bnb_4bit_quant_type": "int4"}, {}, "cuda",
     r"^bnb_4bit_quant_type: must be nf4 \| fp4, got 'int4'$"),
])
def test_check_runtime_refusals(m, t, device, match):
    with pytest.raises(ConfigError, match=match):
        check_runtime(model_section(**m), TrainingConfig(stage="sft", **t), torch.device(device))


def test_check_runtime_without_bitsandbytes(monkeypatch):
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else True)
    with pytest.raises(ConfigError, match=r"^optim: 'adamw_bnb_8bit' needs bitsandbytes, which is not installed; "
                                          r"pip install bitsandbytes"):
        check_runtime(model_section(), TrainingConfig(stage="sft", optim="adamw_bnb_8bit"), torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"^load_in_4bit: QLoRA loading needs bitsandbytes"):
        check_runtime(model_section(load_in_4bit=True, use_peft=True), TrainingConfig(stage="sft"),
                      torch.device("cuda"))
    check_runtime(model_section(use_peft=True), TrainingConfig(stage="sft"), torch.device("cpu"))  # nothing to refuse


def test_quantization_config_is_trl_shaped():
    q = quantization_config(model_section(load_in_4bit=True, use_peft=True, dtype="bfloat16",
                                          bnb_4bit_quant_type="fp4", use_bnb_nested_quant=True))
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "fp4", True)
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(model_section(load_in_8bit=True)).load_in_8bit
    assert quantization_config(model_section()) is None
    with pytest.raises(ValueError, match="quantization_config needs a checkpoint"):
        load_model(config=tiny_config("mistral", vocab_size=300, hidden_size=64, num_hidden_layers=1),
                   quantization_config=q)


# ---- gradient_checkpointing_kwargs, tf32 -----------------------------------------------------------

def test_gradient_checkpointing_kwargs_reach_the_layers_and_stay_exact():
    batch = sft_packed(random_seqs([6, 1, 9], seed=21))
    results, dist = [], DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), use_deepspeed=False)
    for gc, kwargs in ((False, {}), (True, {}), (True, {"use_reentrant": True})):
        m = ModelConfig(model_init={"arch": "mistral", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2},
                        tokenizer_name_or_path="x", attn_implementation="sdpa_segments", gradient_checkpointing=gc,
                        gradient_checkpointing_kwargs=kwargs)
        model = build_model(m, dist, seed=22)
        for layer in model.model.layers:
            assert layer.gradient_checkpointing is gc
            if gc:  # what the recipe asked for, over the non-reentrant default
                assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False, **kwargs}
        hidden = forward_hidden(model, batch)
        (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum().backward()
        results.append((hidden.detach(), grads(model)))
    for hidden, g in results[1:]:
        torch.testing.assert_close(results[0][0], hidden, atol=1e-6, rtol=0)
        assert_grads_close(results[0][1], g)


def test_set_tf32_switches_both_backends():
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before, seen = flags(), []
    for value in (True, None, False):  # None: left as it was
        set_tf32(value)
        seen.append(flags())
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert seen == [(True, True), (True, True), (False, False)]


# ---- CUDA only -------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("optim", sorted(build.BNB_OPTIMIZERS))
def test_bitsandbytes_optimizers_step_on_cuda(optim):
    import bitsandbytes

    lin = torch.nn.Linear(256, 256).cuda()  # >= 4096 elements: the 8-bit state path
    t = TrainingConfig(stage="sft", optim=optim, learning_rate=1e-2, weight_decay=0.1)
    check_runtime(model_section(), t, torch.device("cuda"))
    opt = build_optimizer(lin.parameters(), t)
    assert type(opt) is getattr(bitsandbytes.optim, build.BNB_OPTIMIZERS[optim])
    before = lin.weight.detach().clone()
    lin(torch.randn(4, 256, device="cuda")).square().sum().backward()
    opt.step()
    assert not torch.equal(before, lin.weight.detach())


@pytest.mark.cuda
def test_qlora_4bit_trains_lora_on_cuda(tmp_path):
    from peft.tuners.lora import Linear4bit

    tiny_model("mistral", seed=23).save_pretrained(tmp_path, safe_serialization=True)
    m = ModelConfig(model_name_or_path=str(tmp_path), dtype="bfloat16", load_in_4bit=True, use_peft=True,
                    use_bnb_nested_quant=True, gradient_checkpointing=True)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0), use_deepspeed=False)
    check_runtime(m, TrainingConfig(stage="sft"), dist.device)
    model = build_model(m, dist, seed=23, path=m.model_name_or_path)
    assert any(isinstance(mod, Linear4bit) for mod in model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 and p.is_cuda for p in trainable)
    hidden = forward_hidden(model.get_base_model(), sft_packed(random_seqs([20, 7], seed=24)).to("cuda"))
    hidden.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
