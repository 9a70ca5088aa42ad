"""Every launch form on CPU against one reference run: ``python zephyr_fast/train.py`` with a
``deepspeed:`` key (one process, no launcher, no mpi4py), ``python -m zephyr_fast.train``,
``accelerate launch`` with the handbook's configs, ``torchrun``; plus the config translation.

The 2-rank launches run 1 accumulation step of what the reference runs in 2, so by the step plan
they see the same micro-batches and must log the same losses (see test_deepspeed.py).
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from tests.train.helpers import REPO, recipe

from zephyr_fast.config import ConfigError, TrainingConfig
from zephyr_fast.train import main
from zephyr_fast.training import distributed as D

ACCEL = REPO / "recipes" / "accelerate"
ZERO3_JSON = "recipes/deepspeed/zero3.json"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    """CPU ranks, one thread each, nothing inherited from an outer launcher."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "FSDP_")) and k not in D.LAUNCHER_ENV}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _launch(prefix, recipe_dict, path, *extra, timeout=300):
    """Write ``recipe_dict`` to ``path`` and run ``prefix + [RECIPE, *extra]`` from the repo root."""
    path.write_text(yaml.safe_dump(recipe_dict))
    proc = subprocess.run([*prefix, str(path), *extra], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(recipe_dict["output_dir"], "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(recipe_dict["output_dir"], "metrics.jsonl")) as f:
        return summary, [json.loads(line) for line in f if '"loss"' in line]


def _accelerate(config):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / config),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0", "zephyr_fast/train.py"]


def _training(**kw):
    return TrainingConfig(stage="sft", **kw)


def _assert_same_run(got, ref):
    assert [m["step"] for m in got] == [m["step"] for m in ref] == [1, 2]
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-6)  # step 1: same data, same init
    assert got[1]["loss"] == pytest.approx(ref[1]["loss"], rel=1e-5)  # step 2: the update agreed too
    assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-3)


@pytest.fixture(scope="module")
def two_steps(sft_dir, tmp_path_factory):
    """``(recipe for 2 ranks x 1 accumulation, reference metrics)``: the reference is
    ``python zephyr_fast/train.py`` at 1 process x 2 accumulation with a ``deepspeed:`` ZeRO-3 JSON."""
    tmp = tmp_path_factory.mktemp("launch")
    ref = recipe("sft", tmp / "ref", sft_dir, max_steps=2, gradient_accumulation_steps=2, deepspeed=ZERO3_JSON)
    summary, metrics = _launch([sys.executable, "zephyr_fast/train.py"], ref, tmp / "ref.yaml")
    assert (summary["world_size"], summary["deepspeed"], summary["zero_stage"]) == (1, True, 3)
    return recipe("sft", tmp / "unused", sft_dir, max_steps=2), metrics


@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("config,stage", [("deepspeed_zero3.yaml", 3), ("multi_gpu.yaml", D.DDP_ZERO_STAGE)])
def test_accelerate_launch_two_ranks_match_one_process(two_steps, tmp_path, config, stage):
    r, ref = two_steps
    r = {**r, "output_dir": str(tmp_path / "out")}
    summary, got = _launch(_accelerate(config), r, tmp_path / "r.yaml")
    assert (summary["world_size"], summary["deepspeed"], summary["zero_stage"]) == (2, True, stage)
    _assert_same_run(got, ref)


@pytest.mark.deepspeed
@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(two_steps, tmp_path):
    r, ref = two_steps
    r = {**r, "output_dir": str(tmp_path / "out")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port()), "zephyr_fast/train.py"]
    summary, got = _launch(torchrun, r, tmp_path / "r.yaml")
    assert (summary["world_size"], summary["zero_stage"]) == (2, 3)  # no deepspeed: key -> ZeRO-3
    _assert_same_run(got, ref)


@pytest.mark.deepspeed
@pytest.mark.slow
def test_python_m_lora_with_deepspeed_key_from_repo_root(two_steps, tmp_path):
    """``python -m`` from the repo root (cwd on sys.path: the repo's kernels/ is importable as
    ``kernels``, which transformers probes) with peft and a ZeRO-2 JSON, one process, no launcher.
    LoRA's B starts at zero, so step 1 is the base model's loss."""
    r, ref = two_steps
    r = {**r, "output_dir": str(tmp_path / "out"), "gradient_accumulation_steps": 2, "use_peft": True, "lora_r": 8,
         "lora_alpha": 16, "lora_target_modules": ["q_proj", "v_proj"], "deepspeed": "recipes/deepspeed/zero2.json"}
    summary, got = _launch([sys.executable, "-m", "zephyr_fast.train"], r, tmp_path / "r.yaml")
    assert (summary["world_size"], summary["deepspeed"], summary["zero_stage"]) == (1, True, 2)
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-6)
    assert os.path.isdir(tmp_path / "out" / "adapter")


@pytest.mark.slow
def test_python_m_from_repo_root_with_hf_kernels_installed(sft_dir, tmp_path):
    """With the Hugging Face ``kernels`` package installed (a dist-info in its supported range stands in
    for it), transformers imports ``kernels`` -- from the repo root that is the repo's kernels/ folder,
    and ``import peft`` failed (ImportError: cannot import name 'CUDAProperties') until train.py's
    ``__main__`` dropped the repo root from ``sys.path``."""
    dist_info = tmp_path / "site" / "kernels-0.18.5.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.18.5\n")
    r = recipe("sft", tmp_path / "out", sft_dir, max_steps=1, use_peft=True, lora_r=8,
               lora_target_modules=["q_proj", "v_proj"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    env = {**_env(), "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-m", "zephyr_fast.train", str(tmp_path / "r.yaml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("name,stage,offload", [
    ("deepspeed_zero1.yaml", 1, False), ("deepspeed_zero2.yaml", 2, False), ("deepspeed_zero3.yaml", 3, False),
    ("multi_gpu.yaml", D.DDP_ZERO_STAGE, False), ("fsdp.yaml", 3, False), ("fsdp_qlora.yaml", 3, True)])
def test_accelerate_config_as_deepspeed_key_is_translated(name, stage, offload):
    t = _training(deepspeed=str(ACCEL / name), gradient_accumulation_steps=4, max_grad_norm=0.5)
    base, bf16 = D.base_ds_config(t, {}, bf16=False)
    conf = D.ds_config(t, 8, bf16=bf16, base=base)
    zero = conf["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == ("offload_param" in zero) == offload
    assert conf["bf16"]["enabled"] is (name != "fsdp_qlora.yaml")  # every handbook config but qlora says bf16
    assert (conf["train_batch_size"], conf["gradient_clipping"]) == (32, 0.5)


def test_accelerate_launch_env_is_translated():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
           "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
           "ACCELERATE_MIXED_PRECISION": "bf16", "LOCAL_RANK": "0"}
    base, bf16 = D.base_ds_config(_training(), env, bf16=False)
    conf = D.ds_config(_training(), 2, bf16=bf16, base=base)
    assert conf["zero_optimization"]["stage"] == 2 and conf["bf16"]["enabled"] is True
    assert conf["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert conf["zero_force_ds_cpu_optimizer"] is False and "offload_param" not in conf["zero_optimization"]
    ddp = {"ACCELERATE_MIXED_PRECISION": "no", "LOCAL_RANK": "1"}
    assert D.base_ds_config(_training(), ddp, bf16=False)[0]["zero_optimization"]["stage"] == D.DDP_ZERO_STAGE
    plain = {"LOCAL_RANK": "1"}  # torchrun / deepspeed without accelerate or a deepspeed: key
    assert D.base_ds_config(_training(), plain, bf16=False)[0] == D.DEFAULT_ZERO3
    with pytest.raises(ConfigError, match=r"ACCELERATE_MIXED_PRECISION.*mixed_precision: fp16 is not supported"):
        D.base_ds_config(_training(), {**env, "ACCELERATE_MIXED_PRECISION": "fp16"}, bf16=False)


@pytest.mark.parametrize("text,expected", [
    ('{"zero_optimization": {"stage": 2},}', r"bad\.json: deepspeed: not valid JSON \(.* line 1 column"),
    ("distributed_type: TPU\n", r"bad\.json: distributed_type: TPU is not supported"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 4}\n", r"bad\.json: zero_stage: must be 0"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 2, offload_param_device: cpu}\n",
     r"bad\.json: offload_param_device: cpu offload needs zero_stage 3"),
    ("[1, 2]", r"bad\.json: deepspeed: expected a JSON object"),
])
def test_bad_deepspeed_file_is_one_line_exit_2(sft_dir, tmp_path, capsys, text, expected):
    """Through the launch script's main(): status 2 and one stderr line naming the file and key."""
    (tmp_path / "bad.json").write_text(text)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe("sft", tmp_path / "out", sft_dir, deepspeed=str(tmp_path / "bad.json"))))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    assert re.search(expected, err), err


@pytest.mark.deepspeed
def test_single_rank_group_without_launcher_is_torn_down(monkeypatch):
    """In-process: a deepspeed: key and no launcher env -> a 1-rank group (no MPI discovery); teardown
    removes it and the rank variables it set, so a later plain run in this process stays plain."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k in D.LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    info = D.setup(_training(deepspeed=str(REPO / ZERO3_JSON)), bf16=False)
    assert (info.rank, info.world_size, info.use_deepspeed, info.zero_stage) == (0, 1, True, 3)
    assert os.environ["LOCAL_RANK"] == "0" and torch.distributed.get_world_size() == 1
    D.teardown()
    assert not torch.distributed.is_initialized() and "LOCAL_RANK" not in os.environ
    assert D.setup(_training(), bf16=False).use_deepspeed is False


def test_handbook_configs_are_byte_identical_copies():
    """The git blob ids recorded in recipes/accelerate/README.md are those of the files here."""
    readme = (ACCEL / "README.md").read_text()
    files = sorted(p.name for p in ACCEL.glob("*.yaml"))
    assert len(files) == 6
    for name in files:
        data = (ACCEL / name).read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert f"| {name} |" in readme and blob in readme.split(f"| {name} |", 1)[1].split("\n", 1)[0], name
    assert "Apache-2.0" in readme and "huggingface/alignment-handbook" in readme
