"""Atomic checkpoints, exact resume, and the final Hugging Face export.

Layout of ``{output_dir}/checkpoint-{step}/``:

* ``trainer_state.json`` -- global step, epoch, config hash, last metrics (written last, by rank 0);
* plain torch: ``model.safetensors``, ``optimizer.pt``; DeepSpeed: ``ds/`` (``engine.save_checkpoint``,
  every rank writes its ZeRO partition);
* ``scheduler.pt`` and ``rng_state_{rank}.pt`` (torch / CUDA / Python / NumPy generators).

A checkpoint is written into ``.checkpoint-{step}.tmp`` and renamed into place only when complete,
so a crash mid-write never leaves a directory that ``resume_from_checkpoint=auto`` would pick.
Loading never unpickles arbitrary objects: safetensors for weights, ``torch.load(weights_only=True)``
for the rest -- DeepSpeed's own loader is wrapped to do the same, allow-listing only its plain
state classes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import yaml
from safetensors.torch import load_model, save_model

from zephyr_fast.training.distributed import DistInfo, barrier

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    v, key, tail = state["python"][0], state["python"][1], state["python"][2]
    random.setstate((v, tuple(key), tail))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_torch_load(path: str, map_location="cpu"):
    """``torch.load(weights_only=True)``, allow-listing DeepSpeed's plain-data checkpoint classes."""
    allowed = []
    try:  # DeepSpeed (optional) pickles its loss scaler and a few enums inside optimizer / model states
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints (renamed into place) in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_resume(arg: Optional[str], output_dir: str) -> Optional[str]:
    """``auto`` -> the newest checkpoint in ``output_dir`` (or None); a path -> checked; None -> None."""
    if arg in (None, "", False):
        return None
    if str(arg).lower() == "auto":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    if not os.path.isfile(os.path.join(arg, "trainer_state.json")):
        raise FileNotFoundError(f"resume_from_checkpoint: {arg!r} is not a complete checkpoint "
                                f"(no trainer_state.json)")
    return arg


def save_checkpoint(output_dir: str, step: int, *, dist: DistInfo, model, optimizer, scheduler, engine=None,
                    state: dict, total_limit: Optional[int] = None) -> str:
    """Write ``checkpoint-{step}`` atomically (collective under DeepSpeed: every rank must call)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    if engine is not None:
        engine.save_checkpoint(tmp, tag="ds")
    elif dist.is_main:
        save_model(model, os.path.join(tmp, "model.safetensors"))  # handles tied embeddings
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{dist.rank}.pt"))
    barrier()
    if dist.is_main:
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**state, "global_step": step}, f, indent=2)
        if os.path.exists(final):  # re-saving a step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str, *, dist: DistInfo, model, optimizer, scheduler, engine=None) -> dict:
    """Restore model, optimiser, scheduler and RNG from ``path``; returns its trainer_state."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if engine is not None:
        engine.checkpoint_engine.load = lambda p, map_location=None: safe_torch_load(p, map_location or "cpu")
        load_path, _ = engine.load_checkpoint(path, tag="ds", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"resume_from_checkpoint: DeepSpeed found no state under {path}/ds")
    else:
        load_model(model, os.path.join(path, "model.safetensors"))
        optimizer.load_state_dict(safe_torch_load(os.path.join(path, "optimizer.pt")))
    scheduler.load_state_dict(safe_torch_load(os.path.join(path, "scheduler.pt")))
    rng_path = os.path.join(path, f"rng_state_{dist.rank}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(safe_torch_load(rng_path))
    return state


def _model_card(cfg, results: dict) -> str:
    recipe = ""
    if cfg.source and os.path.isfile(cfg.source):
        with open(cfg.source) as f:
            recipe = f.read()
    resolved = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    lines = [
        "---", "library_name: transformers", "tags: [zephyr_fast, " + cfg.training.stage + "]", "---", "",
        f"# {os.path.basename(os.path.abspath(cfg.training.output_dir))}", "",
        f"Trained with zephyr_fast, stage `{cfg.training.stage}` (Zephyr recipe: dSFT -> dDPO, "
        "Tunstall et al. 2023), from `" + str(cfg.model.model_name_or_path or "random init") + "`.", "",
        "## Results", "", "```json", json.dumps(results, indent=2, default=str), "```", "",
    ]
    if recipe:
        lines += [f"## Recipe (`{cfg.source}`)", "", "```yaml", recipe.rstrip(), "```", ""]
    lines += ["## Resolved configuration", "", "```yaml", resolved.rstrip(), "```", ""]
    return "\n".join(lines)


def export_final(out_dir: str, *, cfg, dist: DistInfo, model, tokenizer, engine=None, results: dict,
                 prefix: str = "model.") -> None:
    """HF-format save (safetensors; 16-bit gathered under ZeRO-3), tokenizer, model card, results.

    Collective under DeepSpeed (the ZeRO-3 gather): every rank must call.
    """
    state_dict = None
    if engine is not None and dist.zero_stage == 3:
        full = engine._zero3_consolidated_16bit_state_dict()  # rank 0 gets the full dict
        if dist.is_main:  # the engine wraps the trainer's LossModule: drop its "model." prefix
            state_dict = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
        to_save = model
        if cfg.model.use_peft:
            model.save_pretrained(os.path.join(out_dir, "adapter"), safe_serialization=True)
            to_save = model.merge_and_unload() if state_dict is None else model.get_base_model()
        kwargs = {"safe_serialization": True}
        if state_dict is not None:
            kwargs["state_dict"] = state_dict
        to_save.save_pretrained(out_dir, **kwargs)
        tokenizer.save_pretrained(out_dir)
        with open(os.path.join(out_dir, "README.md"), "w") as f:
            f.write(_model_card(cfg, results))
        with open(os.path.join(out_dir, "train_results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        cfg.save(os.path.join(out_dir, "zephyr_fast_config.yaml"))
    barrier()
