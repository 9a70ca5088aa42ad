"""Atomic, digest-checked checkpoints and branch-safe resume: the checkpoint format.

Layout of ``{output_dir}/checkpoint-{step}/``:

* ``trainer_state.json`` -- global step, epoch, the resumable config and its hash, the train split's
  rows digest, last metrics;
* a Hugging Face model folder (``config.json``, ``generation_config.json``, tokenizer, HF-named weights:
  ``training/hf_folder.py``); plain torch resumes from those weights;
* plain torch: ``optimizer.pt``; DeepSpeed: ``ds/`` (``engine.save_checkpoint``,
  every rank writes its ZeRO partition);
* ``scheduler.pt`` and ``rng_state_{rank}.pt`` (torch / CUDA / Python / NumPy generators);
* ``manifest.json``, written **last**: every other file's size and XXH3-128 digest per 64 MiB chunk
  (``training/manifest.py``; hashed on threads and ranks), the step, a save counter, and its own sha256.

A checkpoint is written into ``.checkpoint-{step}.tmp``; the manifest is written there atomically
(tmp file, fsync, ``os.replace``) after every file is fsynced, and the directory is then renamed into
place (:func:`publish`; ``zephyr-fast export`` moves its staged files in with it too). A checkpoint
without a valid manifest is incomplete: ``resume_from_checkpoint=auto`` never picks it and an explicit
path is refused. Loading verifies every file against the manifest first
and refuses in one line naming the file (:class:`CheckpointError`).

``save_index`` counts saves in the output folder: ``auto`` resumes the most recently *written* complete
checkpoint, ``save_total_limit`` prunes the least recently written (never the one just written).

Loading never unpickles arbitrary objects: safetensors for weights, ``torch.load(weights_only=True)``
for the rest; while DeepSpeed loads (its own loaders, universal-checkpoint paths included),
``torch.load`` itself is replaced by the safe loader (:func:`safe_torch_loads`). A full disk while
saving is one line ``no space left on device writing PATH`` and removes the partial checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from zephyr_fast.fileio import first_line, fsync_dir
from zephyr_fast.training import hf_folder
from zephyr_fast.training.distributed import DistInfo, barrier, gather_objects
from zephyr_fast.training.manifest import (MANIFEST, CheckpointError, check_listing, is_complete,
                                           read_manifest, verify_checkpoint, verifying, write_manifest, writing)

__all__ = ["MANIFEST", "CheckpointError", "is_complete", "list_checkpoints", "load_checkpoint",
           "publish", "read_manifest", "resolve_resume", "safe_torch_load", "safe_torch_loads", "save_checkpoint",
           "verify_checkpoint", "write_manifest"]

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^\.checkpoint-.+\.tmp$")


# ---- RNG -----------------------------------------------------------------------------------------

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


# ---- safe loading --------------------------------------------------------------------------------

def _allowed_globals() -> list:
    """DeepSpeed's plain-data classes pickled inside its optimiser / model states (when installed)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_weights_only(load: Callable, f, map_location, **kwargs):
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)  # weights_only has its own unpickler
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return load(f, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        first = first_line(e)
        raise CheckpointError(f"{f}: refused to unpickle a non-tensor object ({first})") from None


def safe_torch_load(path: str, map_location="cpu"):
    """``torch.load(weights_only=True)``, allow-listing DeepSpeed's plain-data checkpoint classes;
    anything else pickled in the file is refused (:class:`CheckpointError` naming the file)."""
    return _load_weights_only(torch.load, path, map_location)


@contextlib.contextmanager
def safe_torch_loads():
    """Inside, every ``torch.load`` (DeepSpeed's own loaders, universal-checkpoint paths included, which
    pass ``weights_only=False``) is :func:`safe_torch_load`'s ``weights_only=True`` load."""
    original = torch.load

    def load(f, map_location=None, *_, **kwargs):  # a positional pickle_module is dropped
        return _load_weights_only(original, f, map_location, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# ---- discovery -----------------------------------------------------------------------------------

def _complete(output_dir: str) -> list:
    """``[(save_index, step, path)]`` of the complete checkpoints in ``output_dir``, oldest written first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if _CKPT_RE.match(name) and is_complete(path):
            m = read_manifest(path)
            found.append((m["save_index"], m["step"], path))
    return sorted(found)


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints (valid manifest) in ``output_dir``, least recently written first."""
    return [p for _, _, p in _complete(output_dir)]


def resolve_resume(arg: Optional[str], output_dir: str) -> Optional[str]:
    """``auto`` -> the most recently written complete checkpoint in ``output_dir`` (or None); a path ->
    checked complete (:class:`CheckpointError` otherwise); None -> None."""
    if arg in (None, "", False):
        return None
    if str(arg).lower() == "auto":
        return (list_checkpoints(output_dir) or [None])[-1]
    if not os.path.isdir(arg):
        raise CheckpointError(f"{arg}: resume_from_checkpoint: no such checkpoint directory")
    check_listing(arg, read_manifest(arg))
    return arg


# ---- saving --------------------------------------------------------------------------------------

def _collectively(dist: DistInfo, tmp: str, fn: Callable) -> None:
    """Run ``fn`` on every rank; a rank's :class:`CheckpointError` removes ``tmp`` and is raised on all ranks."""
    error = None
    try:
        fn()
    except CheckpointError as e:
        error = str(e)
    errors = [e for e in gather_objects(error, dist.world_size) if e]
    if errors:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space; never a candidate for auto anyway
        raise CheckpointError(errors[0] + " (the partial checkpoint was removed; earlier ones are intact)")


def _write(path: str, write: Callable) -> None:
    with writing(path):
        write(path)


def _write_states(tmp: str, *, dist: DistInfo, model, optimizer, scheduler, engine, state: dict,
                  tokenizer=None) -> None:
    join = os.path.join
    if engine is not None:
        _write(join(tmp, "ds"), lambda p: engine.save_checkpoint(tmp, tag="ds"))
    elif dist.is_main:
        _write(join(tmp, "optimizer.pt"), lambda p: torch.save(optimizer.state_dict(), p))
    hf_folder.write_model(tmp, model, tokenizer, dist=dist, engine=engine)  # a HF model folder (ZeRO-3: gathered)
    _write(join(tmp, f"rng_state_{dist.rank}.pt"), lambda p: torch.save(_rng_state(), p))
    if dist.is_main:
        _write(join(tmp, "scheduler.pt"), lambda p: torch.save(scheduler.state_dict(), p))
        _write(join(tmp, "trainer_state.json"), lambda p: Path(p).write_text(json.dumps(state, indent=2)))


def _clear_tmp(output_dir: str) -> None:
    """Leftovers of interrupted saves / prunes (``.checkpoint-*.tmp``): only one trainer writes here."""
    for name in os.listdir(output_dir):
        if _TMP_RE.match(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _rename(src: str, dst: str) -> None:
    """``os.replace`` then fsync ``dst``'s folder: the one rename of checkpoint files, durable once it returns."""
    os.replace(src, dst)
    fsync_dir(os.path.dirname(dst))


def _retire(path: str) -> None:
    """Remove a checkpoint: renamed hidden first, so a crash mid-delete never leaves a half of it visible."""
    hidden = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old.tmp")
    shutil.rmtree(hidden, ignore_errors=True)
    _rename(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def publish(src: str, dst: str) -> None:
    """The checkpoint publish: move the finished ``src`` to ``dst`` in the same folder tree, durably.

    A folder (a save's ``.checkpoint-{step}.tmp``) is fsynced and renamed into place, an existing same-step
    checkpoint (re-saved on a new branch after a resume) retired first; a file (a staged export file moved
    into its checkpoint) replaces ``dst`` atomically. Its data is fsynced by the manifest written after it.
    """
    if os.path.isdir(src):
        fsync_dir(src)
        if os.path.exists(dst):
            _retire(dst)
    _rename(src, dst)


def _prune(output_dir: str, keep: str, total_limit: Optional[int], protect: Optional[str] = None) -> None:
    """Keep the ``total_limit`` most recently written checkpoints, ``keep`` (the one just written) always,
    and ``protect`` (the best one, load_best_model_at_end) besides them, as HF does."""
    if not total_limit:
        return
    spared = {os.path.abspath(p) for p in (keep, protect) if p}
    others = [p for p in list_checkpoints(output_dir) if os.path.abspath(p) not in spared]
    for old in others[:max(len(others) - (total_limit - 1), 0)]:
        _retire(old)


def save_checkpoint(output_dir: str, step: int, *, dist: DistInfo, model, optimizer, scheduler, engine=None,
                    state: dict, total_limit: Optional[int] = None, tokenizer=None, protect: Optional[str] = None) -> str:
    """Write ``checkpoint-{step}`` atomically, manifest last (collective under DeepSpeed: every rank must call);
    then prune to ``total_limit``, never ``protect``."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if dist.is_main:
        os.makedirs(output_dir, exist_ok=True)
        _clear_tmp(output_dir)
    _collectively(dist, tmp, lambda: _write(tmp, os.makedirs) if dist.is_main else None)
    barrier()
    _collectively(dist, tmp, lambda: _write_states(tmp, dist=dist, model=model, optimizer=optimizer,
                                                   scheduler=scheduler, engine=engine,
                                                   state={**state, "global_step": step}, tokenizer=tokenizer))
    barrier()
    index = gather_objects(_next_save_index(output_dir) if dist.is_main else None, dist.world_size)[0]
    _collectively(dist, tmp, lambda: write_manifest(tmp, step=step, save_index=index, dist=dist))
    if dist.is_main:
        publish(tmp, final)
        _prune(output_dir, final, total_limit, protect)
    barrier()
    return final


def _next_save_index(output_dir: str) -> int:
    return max((i for i, _, _ in _complete(output_dir)), default=0) + 1


# ---- loading -------------------------------------------------------------------------------------

def load_checkpoint(path: str, *, dist: DistInfo, model, optimizer, scheduler, engine=None) -> dict:
    """Restore model, optimiser, scheduler and RNG from ``path`` while it is verified against its manifest
    (refused in one line naming the file); returns its trainer_state (with the manifest's ``save_index``)."""
    with verifying(path, dist=dist) as manifest:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if engine is not None:
            with safe_torch_loads():
                load_path, _ = engine.load_checkpoint(path, tag="ds", load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
            if load_path is None:
                raise CheckpointError(f"{path}/ds: DeepSpeed found no state to resume from")
        else:
            hf_folder.load_model_weights(path, model)  # the HF folder, or an older checkpoint's own layout
            optimizer.load_state_dict(safe_torch_load(os.path.join(path, "optimizer.pt")))
        scheduler.load_state_dict(safe_torch_load(os.path.join(path, "scheduler.pt")))
        rng_path = os.path.join(path, f"rng_state_{dist.rank}.pt")
        if os.path.exists(rng_path):
            _set_rng_state(safe_torch_load(rng_path))
    state["save_index"] = manifest["save_index"]
    return state
