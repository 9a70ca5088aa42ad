"""Process-group setup, the DeepSpeed config, and the few collectives the trainer needs.

One process (``python train.py``) runs a plain torch optimiser and needs no DeepSpeed. Under a
launcher (``deepspeed`` / ``torchrun``, which set ``LOCAL_RANK``) or with a ``deepspeed:`` JSON in
the recipe, the model is wrapped by ``deepspeed.initialize``; without a JSON, ZeRO-3 is the default.
On CPU set ``DS_ACCELERATOR=cpu`` (gloo backend).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from zephyr_fast.config import TrainingConfig

DEFAULT_ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


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


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(t: TrainingConfig, *, bf16: bool) -> DistInfo:
    """This process's rank, device and (under a launcher) DeepSpeed config; ``bf16``: bf16 weights / mixed precision."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # any distributed launcher (deepspeed / torchrun set LOCAL_RANK), even with one process, or a
    # deepspeed: JSON in the recipe -> DeepSpeed; a plain `python train.py` -> plain torch
    use_ds = world > 1 or t.deepspeed is not None or "LOCAL_RANK" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_ds:
        import deepspeed

        if not dist.is_initialized():
            deepspeed.init_distributed()
        rank, world = dist.get_rank(), dist.get_world_size()
        device = _device(local_rank)
        return DistInfo(rank, world, local_rank, device, True, ds_config(t, world, bf16=bf16))
    return DistInfo(0, 1, 0, _device(0), False, None)


def ds_config(t: TrainingConfig, world_size: int, *, bf16: bool) -> dict:
    """The recipe's DeepSpeed JSON with every "auto" filled from the recipe.

    One packed micro-batch is one "sample" to DeepSpeed (``train_micro_batch_size_per_gpu: 1``); the
    real batch size is set by packing and the loss is normalised by the trainer, not by DeepSpeed.
    """
    if t.deepspeed:
        with open(t.deepspeed) as f:
            conf = json.load(f)
    else:
        conf = json.loads(json.dumps(DEFAULT_ZERO3))
    conf = {k: v for k, v in conf.items() if k not in ("optimizer", "scheduler")}  # ours are built in-process
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
