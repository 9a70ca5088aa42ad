"""Process-group setup, the DeepSpeed config, and the few collectives the trainer needs.

One process (``python train.py``) without a ``deepspeed:`` key runs a plain torch optimiser. Under
a launcher (``deepspeed`` / ``torchrun`` / ``accelerate launch``, which set ``LOCAL_RANK``) or with
a ``deepspeed:`` key, the model is wrapped by ``deepspeed.initialize``. The DeepSpeed config comes,
first match wins, from:

1. the recipe's ``deepspeed:`` -- a DeepSpeed JSON, or an accelerate config YAML (translated);
2. ``accelerate launch --config_file X.yaml``'s environment: ``ACCELERATE_USE_DEEPSPEED`` (zero
   stage, offload, ``ACCELERATE_DEEPSPEED_CONFIG_FILE``), ``ACCELERATE_USE_FSDP`` (sharding
   strategy -> the ZeRO stage that shards the same state), or a plain multi-GPU (DDP) launch ->
   ZeRO stage 1 (gradients all-reduced, every rank steps its shard of the optimiser state: DDP's update);
3. ZeRO-3 (``DEFAULT_ZERO3``) for ``deepspeed`` / ``torchrun`` without either.

``ACCELERATE_MIXED_PRECISION=bf16`` turns bf16 on like the recipe's ``bf16: true``; fp16 is refused.
Without a launcher (no ``RANK``/``MASTER_ADDR``...) a 1-rank process group is set up in-process
(a ``HashStore``: no port, no MPI discovery, so no ``mpi4py``) and the run is exactly what
``deepspeed --num_gpus 1`` runs. On CPU set ``DS_ACCELERATOR=cpu`` (gloo backend).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from zephyr_fast import safe_yaml
from zephyr_fast.config import ConfigError, TrainingConfig

DEFAULT_ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}
# the env a launcher sets; without all of them deepspeed.init_distributed falls back to MPI discovery
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
# FSDP sharding strategy (accelerate writes the name or its 1-based number) -> the ZeRO stage sharding the same state
FSDP_TO_ZERO = {"FULL_SHARD": 3, "SHARD_GRAD_OP": 2, "NO_SHARD": 1, "HYBRID_SHARD": 3, "HYBRID_SHARD_ZERO2": 2,
                "1": 3, "2": 2, "3": 1, "4": 3, "5": 2}
# accelerate MULTI_GPU (DDP): ZeRO-1 is DDP's update exactly (gradients all-reduced, the elementwise
# optimiser step applied per shard of its state); stage 0 would also match but reports no grad norm
DDP_ZERO_STAGE = 1
_ENV_SET: list = []  # rank variables _init_single_rank put in os.environ (teardown removes them)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    use_deepspeed: bool
    ds_config: Optional[dict] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def zero_stage(self) -> int:
        if not self.ds_config:
            return 0
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))


def _device(local_rank: int, use_cpu: bool = False) -> torch.device:
    if _use_cuda(use_cpu):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _use_cuda(use_cpu: bool = False) -> bool:
    """CUDA when there is one, unless the recipe says ``use_cpu`` or DeepSpeed's accelerator is the CPU."""
    return not use_cpu and torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def setup(t: TrainingConfig, *, bf16: bool, env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """This process's rank, device and (DeepSpeed runs) DeepSpeed config; ``bf16``: bf16 weights / mixed
    precision; ``env``: the launcher's environment (``os.environ``)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    use_ds = world > 1 or t.deepspeed is not None or "LOCAL_RANK" in env
    if not use_ds:
        return DistInfo(0, 1, 0, _device(0, t.use_cpu), False, None)
    base, bf16 = base_ds_config(t, env, bf16=bf16)  # read before any process group: a bad file fails in one line
    if t.use_cpu:  # DeepSpeed picks its accelerator when imported
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # optional heavy dependency: DeepSpeed runs only

    local_rank = int(env.get("LOCAL_RANK", "0"))
    device = _device(local_rank, t.use_cpu)
    if not dist.is_initialized():
        if world == 1 and not all(k in env for k in LAUNCHER_ENV):
            _init_single_rank()
        deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, device, True, ds_config(t, world, bf16=bf16, base=base))


def _init_single_rank() -> None:
    """A 1-rank process group in-process: ``python train.py`` with a ``deepspeed:`` key, no launcher.

    DeepSpeed's engine still asserts ``LOCAL_RANK`` is set: rank variables a launcher would set are
    put in the environment and removed again by :func:`teardown`.
    """
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        if k not in os.environ:
            os.environ[k] = v
            _ENV_SET.append(k)
    backend = "nccl" if _use_cuda() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def base_ds_config(t: TrainingConfig, env: Mapping[str, str], *, bf16: bool) -> tuple:
    """``(config, bf16)``: the DeepSpeed config before the recipe fills it in, and bf16 as the recipe or
    the launcher's mixed precision asks (either turns it on)."""
    launcher = accelerate_env(env)
    if t.deepspeed:
        conf, mixed = read_ds_file(t.deepspeed)
        bf16 = _bf16(bf16, mixed, t.deepspeed)
        if launcher is not None and env.get("RANK", "0") == "0":
            print(f"note: the recipe's deepspeed: {t.deepspeed} is used, not the accelerate config's "
                  f"{launcher['distributed_type']} settings (--deepspeed=null to follow the launcher)", file=sys.stderr)
    elif launcher is not None:
        conf, _ = from_accelerate(launcher, "accelerate launch")
    else:
        conf = json.loads(json.dumps(DEFAULT_ZERO3))
    if launcher is not None:
        bf16 = _bf16(bf16, launcher["mixed_precision"], "accelerate launch (ACCELERATE_MIXED_PRECISION)")
    return conf, bf16


def read_ds_file(path: str) -> tuple:
    """``(config, mixed_precision)`` from a DeepSpeed JSON (mixed precision None) or an accelerate
    config (YAML or JSON with ``distributed_type``, translated by :func:`from_accelerate`)."""
    with open(path) as f:
        text = f.read()
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as e:
        conf = _yaml_or_none(text)
        if not isinstance(conf, dict) or "distributed_type" not in conf:
            raise ConfigError(f"{path}: deepspeed: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}) "
                              f"and not an accelerate config (no distributed_type)") from None
    if not isinstance(conf, dict):
        raise ConfigError(f"{path}: deepspeed: expected a JSON object, got {type(conf).__name__}")
    if "distributed_type" in conf:
        return from_accelerate(accelerate_file_fields(conf), path)
    return conf, None


def _yaml_or_none(text: str):
    try:
        return safe_yaml.load(text, "deepspeed")
    except (yaml.YAMLError, safe_yaml.YamlBudgetError):
        return None


def accelerate_file_fields(conf: dict) -> dict:
    """The launch fields of an accelerate config file (``accelerate launch --config_file``)."""
    ds, fsdp = conf.get("deepspeed_config") or {}, conf.get("fsdp_config") or {}
    return {"distributed_type": str(conf["distributed_type"]).upper(), "zero_stage": ds.get("zero_stage"),
            "offload_optimizer_device": ds.get("offload_optimizer_device"),
            "offload_param_device": ds.get("offload_param_device"), "config_file": ds.get("deepspeed_config_file"),
            "mixed_precision": conf.get("mixed_precision"),
            "fsdp_sharding_strategy": fsdp.get("fsdp_sharding_strategy"),
            "fsdp_offload_params": fsdp.get("fsdp_offload_params")}


def accelerate_env(env: Mapping[str, str]) -> Optional[dict]:
    """The same fields from the environment ``accelerate launch`` gives its ranks; None when not under it."""
    def flag(name):
        return env.get(name, "").lower() == "true"

    if flag("ACCELERATE_USE_DEEPSPEED"):
        kind = "DEEPSPEED"
    elif flag("ACCELERATE_USE_FSDP"):
        kind = "FSDP"
    elif "ACCELERATE_MIXED_PRECISION" in env and "LOCAL_RANK" in env:
        kind = "MULTI_GPU"  # accelerate's multi-GPU launcher marks nothing else
    else:
        return None
    return {"distributed_type": kind, "zero_stage": env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"),
            "offload_optimizer_device": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
            "offload_param_device": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"),
            "config_file": env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"),
            "mixed_precision": env.get("ACCELERATE_MIXED_PRECISION"),
            "fsdp_sharding_strategy": env.get("FSDP_SHARDING_STRATEGY"),
            "fsdp_offload_params": env.get("FSDP_OFFLOAD_PARAMS")}


def from_accelerate(f: dict, where: str) -> tuple:
    """``(DeepSpeed config, mixed_precision)`` for accelerate launch fields ``f``; ``where`` names them in errors.

    DEEPSPEED: its zero stage (accelerate's default 2) and offload devices, or its
    ``deepspeed_config_file``; FSDP: the ZeRO stage sharding the same state (FULL_SHARD -> 3,
    SHARD_GRAD_OP -> 2, NO_SHARD -> 1), ``fsdp_offload_params`` -> optimiser and parameters on CPU;
    MULTI_GPU / NO: stage 1 (data parallel: DDP's update, the optimiser state sharded).
    """
    if f["distributed_type"] == "DEEPSPEED" and f.get("config_file"):
        conf, _ = read_ds_file(str(f["config_file"]))
        return conf, f.get("mixed_precision")
    stage = _accelerate_stage(f, where)
    zero = {"stage": stage}
    if stage > 0:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    offload_all = f["distributed_type"] == "FSDP" and str(f.get("fsdp_offload_params")).lower() == "true"
    for key, name in (("offload_optimizer_device", "offload_optimizer"), ("offload_param_device", "offload_param")):
        device = "cpu" if offload_all else str(f.get(key) or "none").lower()
        if device not in ("none", "cpu"):
            raise ConfigError(f"{where}: {key}: {device!r} must be none | cpu (nvme: use a DeepSpeed JSON)")
        needs = 3 if name == "offload_param" else 1
        if device == "cpu" and stage < needs:
            raise ConfigError(f"{where}: {key}: cpu offload needs zero_stage {needs}{'' if needs == 3 else ' or more'}")
        if device == "cpu":
            zero[name] = {"device": "cpu", "pin_memory": True}
    return {"zero_optimization": zero}, f.get("mixed_precision")


def _accelerate_stage(f: dict, where: str) -> int:
    """The ZeRO stage for accelerate launch fields ``f`` (see :func:`from_accelerate`)."""
    kind = f["distributed_type"]
    if kind == "DEEPSPEED":
        return _int(f.get("zero_stage") if f.get("zero_stage") is not None else 2, where, "zero_stage")
    if kind == "FSDP":
        strategy = str(f.get("fsdp_sharding_strategy") or "FULL_SHARD").upper()
        if strategy not in FSDP_TO_ZERO:
            raise ConfigError(f"{where}: fsdp_sharding_strategy: {strategy!r} must be one of "
                              f"{' | '.join(k for k in FSDP_TO_ZERO if not k.isdigit())}")
        return FSDP_TO_ZERO[strategy]
    if kind in ("MULTI_GPU", "MULTI_CPU", "NO"):
        return DDP_ZERO_STAGE
    raise ConfigError(f"{where}: distributed_type: {kind} is not supported; use DEEPSPEED, FSDP or MULTI_GPU")


def _int(value, where: str, key: str) -> int:
    try:
        stage = int(value)
    except (TypeError, ValueError):
        stage = -1
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: {key}: must be 0 | 1 | 2 | 3, got {value!r}")
    return stage


def _bf16(bf16: bool, mixed_precision, where: str) -> bool:
    mixed = str(mixed_precision or "no").lower()
    if mixed not in ("no", "bf16"):
        raise ConfigError(f"{where}: mixed_precision: {mixed} is not supported; use bf16 or no")
    return bf16 or mixed == "bf16"


def ds_config(t: TrainingConfig, world_size: int, *, bf16: bool, base: Optional[dict] = None) -> dict:
    """The DeepSpeed config (``base``, else the recipe's file or ZeRO-3) with every "auto" filled from the recipe.

    One packed micro-batch is one "sample" to DeepSpeed (``train_micro_batch_size_per_gpu: 1``); the
    real batch size is set by packing and the loss is normalised by the trainer, not by DeepSpeed.
    """
    if base is None:
        base, bf16 = base_ds_config(t, {}, bf16=bf16)
    conf = {k: v for k, v in base.items() if k not in ("optimizer", "scheduler")}  # ours are built in-process
    conf["train_micro_batch_size_per_gpu"] = 1
    conf["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    conf["train_batch_size"] = world_size * t.gradient_accumulation_steps
    conf["gradient_clipping"] = t.max_grad_norm if t.max_grad_norm > 0 else 0.0
    conf["bf16"] = {"enabled": bool(bf16)}
    conf["fp16"] = {"enabled": False}
    conf["zero_allow_untested_optimizer"] = True  # our torch AdamW / RMSprop, wrapped by ZeRO
    conf.setdefault("steps_per_print", 10 ** 9)
    conf.setdefault("wall_clock_breakdown", False)
    zero = conf.setdefault("zero_optimization", {"stage": 0})
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        conf["zero_force_ds_cpu_optimizer"] = False  # the recipe's torch optimiser steps the offloaded fp32 state
    for k, v in list(zero.items()):
        if v == "auto":
            del zero[k]  # DeepSpeed's own defaults; "auto" is an HF Trainer convention
    return conf


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj, world_size: int) -> list:
    if world_size == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def sharded_forwards(model, batches: list, forward: Callable, *, dist: DistInfo, desc: Optional[str] = None) -> list:
    """``forward(j, batches[j] on the device)`` for this rank's share of ``batches`` (round-robin), no grad, eval mode.

    ZeRO-3 gathers parameters collectively inside every forward, so all ranks must run the same
    number of forwards: a rank with fewer batches repeats batch 0 and discards its result.
    Returns this rank's results in order; ``desc`` shows a progress bar on rank 0.
    """
    module = getattr(model, "module", model)  # a DeepSpeed engine's train/eval state is its module's
    was_training = module.training
    module.eval()
    mine = list(range(dist.rank, len(batches), dist.world_size))
    out = []
    steps = range(math.ceil(len(batches) / dist.world_size))
    for i in tqdm(steps, desc=desc, disable=desc is None or not dist.is_main, unit="batch"):
        j = mine[i] if i < len(mine) else 0
        result = forward(j, batches[j].to(dist.device))
        if i < len(mine):
            out.append(result)
    module.train(was_training)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    # Without this DeepSpeed CPU ranks abort at exit ("terminate called without an active exception").
    if dist.is_initialized():
        dist.destroy_process_group()
    while _ENV_SET:
        os.environ.pop(_ENV_SET.pop(), None)
