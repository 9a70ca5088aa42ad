"""Atomic, digest-checked checkpoints, branch-safe resume, and the final Hugging Face export.

Layout of ``{output_dir}/checkpoint-{step}/``:

* ``trainer_state.json`` -- global step, epoch, the resumable config and its hash, the train split's
  rows digest, last metrics;
* plain torch: ``model.safetensors``, ``optimizer.pt``; DeepSpeed: ``ds/`` (``engine.save_checkpoint``,
  every rank writes its ZeRO partition);
* ``scheduler.pt`` and ``rng_state_{rank}.pt`` (torch / CUDA / Python / NumPy generators);
* ``manifest.json``, written **last**: every other file's size and sha256 per 64 MiB chunk (hashed on
  threads and ranks), the step, a save counter, and its own digest.

A checkpoint is written into ``.checkpoint-{step}.tmp``; the manifest is written there atomically
(tmp file, fsync, ``os.replace``) after every file is fsynced, and the directory is then renamed into
place. A checkpoint without a valid manifest is incomplete: ``resume_from_checkpoint=auto`` never
picks it and an explicit path is refused. Loading verifies every file against the manifest first
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
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import yaml
from safetensors.torch import load_model, save_model

from zephyr_fast.config import ConfigError
from zephyr_fast.training.distributed import DistInfo, barrier, gather_objects

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "zephyr_fast.checkpoint"
MANIFEST_VERSION = 1
CHUNK_BYTES = 64 << 20  # one sha256 per chunk: a large file verifies on several threads / ranks
_READ_BYTES = 8 << 20
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^\.checkpoint-.+\.tmp$")
_DISK_FULL_TEXT = ("No space left", "inline_container", "file write failed")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted, resumed from or written; one line naming the file.

    A :class:`~zephyr_fast.config.ConfigError`, so the launcher ends with status 2 and that line.
    """


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
        first = (str(e).strip().splitlines() or ["?"])[0]
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


# ---- digests and the manifest --------------------------------------------------------------------

def _listing(root: str) -> list:
    """Every file under ``root`` (relative, sorted) but the manifest and hidden names."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        rel = os.path.relpath(d, root)
        out += [os.path.normpath(os.path.join(rel, f)) for f in files if not f.startswith(".")]
    return sorted(p for p in out if p != MANIFEST)


def _chunks(sizes: dict) -> list:
    """``[(rel, offset, length)]``: every file cut into :data:`CHUNK_BYTES` pieces (an empty file: one)."""
    return [(rel, off, min(CHUNK_BYTES, size - off)) for rel, size in sizes.items()
            for off in range(0, max(size, 1), CHUNK_BYTES)]


def _hash_chunk(root: str, job: tuple, sync: bool) -> str:
    rel, off, length = job
    h, buf = hashlib.sha256(), bytearray(min(_READ_BYTES, max(length, 1)))
    view = memoryview(buf)
    with open(os.path.join(root, rel), "rb", buffering=0) as f:
        if sync and off == 0:
            os.fsync(f.fileno())  # the file's data is on disk before the manifest vouches for it
        f.seek(off)
        left = length
        while left:
            n = f.readinto(view[:min(left, len(buf))])
            if not n:
                break  # shorter than listed: the digest cannot match
            h.update(view[:n])
            left -= n
    return h.hexdigest()


def _hash_jobs(root: str, jobs: list, dist: DistInfo, *, sync: bool = False) -> list:
    """sha256 of every chunk, shared round-robin across ranks and hashed on threads (hashlib releases the GIL)."""
    world = dist.world_size
    mine = jobs[dist.rank::world]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda job: _hash_chunk(root, job, sync), mine))
    out = [None] * len(jobs)
    for r, part in enumerate(gather_objects(digests, world)):
        out[r::world] = part
    return out


def _self_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str, obj) -> None:
    """``path`` replaced whole or not at all: write a hidden tmp file, fsync, ``os.replace``, fsync the dir."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with _writing(path), open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def write_manifest(root: str, *, step: int, save_index: int, dist: DistInfo) -> Optional[dict]:
    """Hash (and fsync) every file under ``root`` and write its manifest last (collective: every rank calls)."""
    rels = gather_objects(_listing(root) if dist.is_main else None, dist.world_size)[0]
    sizes = {rel: os.path.getsize(os.path.join(root, rel)) for rel in rels}
    jobs = _chunks(sizes)
    digests = _hash_jobs(root, jobs, dist, sync=True)
    if not dist.is_main:
        return None
    files = {rel: {"size": size, "sha256": []} for rel, size in sizes.items()}
    for (rel, _, _), d in zip(jobs, digests):
        files[rel]["sha256"].append(d)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "save_index": save_index,
                "chunk_bytes": CHUNK_BYTES, "files": files}
    manifest["manifest_sha256"] = _self_digest(manifest)
    atomic_write_json(os.path.join(root, MANIFEST), manifest)
    return manifest


def read_manifest(path: str) -> dict:
    """The checkpoint's parsed, self-consistent manifest; :class:`CheckpointError` when missing or invalid."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MANIFEST}: its save was interrupted, or it "
                              f"predates checkpoint digests)")
    try:
        with open(mpath) as f:
            m = json.load(f)
        ok = (m.get("format") == MANIFEST_FORMAT and m.get("version") == MANIFEST_VERSION
              and m.get("chunk_bytes") == CHUNK_BYTES and isinstance(m.get("step"), int)
              and isinstance(m.get("save_index"), int) and "trainer_state.json" in m.get("files", {}))
    except (ValueError, UnicodeDecodeError, AttributeError):
        ok = False
    if not ok or m.get("manifest_sha256") != _self_digest(m):
        raise CheckpointError(f"{mpath}: corrupted or not a zephyr_fast checkpoint manifest")
    return m


def _check_listing(path: str, m: dict) -> None:
    """Every listed file present at its listed size, nothing unlisted (DeepSpeed globs its shard names)."""
    for rel, entry in m["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{full}: missing (listed in {MANIFEST})")
        size = os.path.getsize(full)
        if size != entry["size"]:
            raise CheckpointError(f"{full}: {size} bytes, its manifest says {entry['size']} (truncated or modified)")
    extra = sorted(set(_listing(path)) - set(m["files"]))
    if extra:
        raise CheckpointError(f"{os.path.join(path, extra[0])}: not in the checkpoint's {MANIFEST} (added after "
                              f"the save); remove it")


def is_complete(path: str) -> bool:
    """A valid manifest, and every file it lists present at its size (content is checked on load)."""
    try:
        _check_listing(path, read_manifest(path))
    except CheckpointError:
        return False
    return True


def verify_checkpoint(path: str, *, dist: DistInfo) -> dict:
    """Check every file of ``path`` against its manifest (collective); the manifest, or one-line refusal."""
    m = read_manifest(path)
    _check_listing(path, m)
    jobs = _chunks({rel: e["size"] for rel, e in m["files"].items()})
    bad = [rel for (rel, off, _), d in zip(jobs, _hash_jobs(path, jobs, dist))
           if d != m["files"][rel]["sha256"][off // CHUNK_BYTES]]
    if bad:
        raise CheckpointError(f"{os.path.join(path, bad[0])}: content does not match its sha256 in {MANIFEST} "
                              f"(corrupted); resume from another checkpoint")
    return m


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
    _check_listing(arg, read_manifest(arg))
    return arg


# ---- saving --------------------------------------------------------------------------------------

def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, or torch's / safetensors' wrapped text of it (``inline_container`` write failures)."""
    return (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            or any(t in str(exc) for t in _DISK_FULL_TEXT))  # RuntimeError (torch), SafetensorError (safetensors)


@contextlib.contextmanager
def _writing(path: str):
    """A full disk while writing ``path`` is one line naming it."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only disk-full is translated; anything else propagates as is
        if not is_disk_full(e):
            raise
        raise CheckpointError(f"no space left on device writing {path}") from None


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
    with _writing(path):
        write(path)


def _write_states(tmp: str, *, dist: DistInfo, model, optimizer, scheduler, engine, state: dict) -> None:
    join = os.path.join
    if engine is not None:
        _write(join(tmp, "ds"), lambda p: engine.save_checkpoint(tmp, tag="ds"))
    elif dist.is_main:
        _write(join(tmp, "model.safetensors"), lambda p: save_model(model, p))  # handles tied embeddings
        _write(join(tmp, "optimizer.pt"), lambda p: torch.save(optimizer.state_dict(), p))
    _write(join(tmp, f"rng_state_{dist.rank}.pt"), lambda p: torch.save(_rng_state(), p))
    if dist.is_main:
        _write(join(tmp, "scheduler.pt"), lambda p: torch.save(scheduler.state_dict(), p))
        _write(join(tmp, "trainer_state.json"), lambda p: Path(p).write_text(json.dumps(state, indent=2)))


def _clear_tmp(output_dir: str) -> None:
    """Leftovers of interrupted saves / prunes (``.checkpoint-*.tmp``): only one trainer writes here."""
    for name in os.listdir(output_dir):
        if _TMP_RE.match(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _retire(path: str) -> None:
    """Remove a checkpoint: renamed hidden first, so a crash mid-delete never leaves a half of it visible."""
    hidden = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old.tmp")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _publish(tmp: str, final: str) -> None:
    """Rename the finished ``tmp`` into place (an existing same-step checkpoint is replaced)."""
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving a step on a new branch after a resume
        _retire(final)
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))


def _prune(output_dir: str, keep: str, total_limit: Optional[int]) -> None:
    """Keep the ``total_limit`` most recently written checkpoints, ``keep`` (the one just written) always."""
    if not total_limit:
        return
    others = [p for p in list_checkpoints(output_dir) if os.path.abspath(p) != os.path.abspath(keep)]
    for old in others[:max(len(others) - (total_limit - 1), 0)]:
        _retire(old)


def save_checkpoint(output_dir: str, step: int, *, dist: DistInfo, model, optimizer, scheduler, engine=None,
                    state: dict, total_limit: Optional[int] = None) -> str:
    """Write ``checkpoint-{step}`` atomically, manifest last (collective under DeepSpeed: every rank must call)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if dist.is_main:
        _clear_tmp(output_dir)
    _collectively(dist, tmp, lambda: _write(tmp, os.makedirs) if dist.is_main else None)
    barrier()
    _collectively(dist, tmp, lambda: _write_states(tmp, dist=dist, model=model, optimizer=optimizer,
                                                   scheduler=scheduler, engine=engine,
                                                   state={**state, "global_step": step}))
    barrier()
    index = gather_objects(_next_save_index(output_dir) if dist.is_main else None, dist.world_size)[0]
    _collectively(dist, tmp, lambda: write_manifest(tmp, step=step, save_index=index, dist=dist))
    if dist.is_main:
        _publish(tmp, final)
        _prune(output_dir, final, total_limit)
    barrier()
    return final


def _next_save_index(output_dir: str) -> int:
    return max((i for i, _, _ in _complete(output_dir)), default=0) + 1


# ---- loading -------------------------------------------------------------------------------------

def load_checkpoint(path: str, *, dist: DistInfo, model, optimizer, scheduler, engine=None) -> dict:
    """Verify ``path`` against its manifest, then restore model, optimiser, scheduler and RNG;
    returns its trainer_state (with the manifest's ``save_index``)."""
    manifest = verify_checkpoint(path, dist=dist)
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if engine is not None:
        with safe_torch_loads():
            load_path, _ = engine.load_checkpoint(path, tag="ds", load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"{path}/ds: DeepSpeed found no state to resume from")
    else:
        load_model(model, os.path.join(path, "model.safetensors"))
        optimizer.load_state_dict(safe_torch_load(os.path.join(path, "optimizer.pt")))
    scheduler.load_state_dict(safe_torch_load(os.path.join(path, "scheduler.pt")))
    rng_path = os.path.join(path, f"rng_state_{dist.rank}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(safe_torch_load(rng_path))
    state["save_index"] = manifest["save_index"]
    return state


# ---- export --------------------------------------------------------------------------------------

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
