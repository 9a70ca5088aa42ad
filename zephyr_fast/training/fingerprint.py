"""Model identity for the reference log-prob cache: what "the same reference weights" means.

* A local checkpoint directory is identified by the **content** of its weight files and
  ``config.json``: one sha256 per file, combined. Hashing 14 GB at every start (on every rank) was
  the cost of doing this naively, so each file's digest is stored once in
  ``{dir}/.zephyr_fingerprint.json`` (or, when that cannot be written, under
  ``$XDG_CACHE_HOME/zephyr_fast/fingerprints/``) together with the file's
  ``(size, mtime_ns, ctime_ns, inode)``; a later start re-hashes only files whose stat changed.
  ``ctime`` cannot be set from user space, so rewriting a file in place -- even at the same size with
  its mtime restored -- or renaming another file over it re-hashes it. The stat tuple only decides
  *when* to re-hash: the identity is always the content digest (a touched but unchanged file keeps
  its fingerprint). A sampled hash (headers + a few blocks) was rejected: a partial change (e.g. a
  few merged-LoRA layers) would go unseen, and the full digest is paid once per file version.
* A hub id is identified by the **commit sha** its revision resolves to: ``HfApi().model_info``
  online, else the HF cache's ``refs/<revision>`` (offline, or the Hub unreachable). A revision that
  is already a 40-hex sha is its own identity. When it cannot be resolved the identity is a unique
  ``unresolved:...`` string that equals no stored key: the cache is never reused by name.
* A random init: its parameters (not ZeRO-3 partitioned) or its config + seed.

The fingerprint is computed on rank 0 only and broadcast (``torch.distributed`` when initialised).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from typing import Callable, Optional

import torch
import torch.distributed as tdist

from zephyr_fast.data.chat import hub_unreachable
from zephyr_fast.data.identity import file_digest
from zephyr_fast.fileio import atomic_write

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
IDENTITY_FILES = ("config.json",)  # architecture settings change the log-probs as much as weights do
FINGERPRINT_FILE = ".zephyr_fingerprint.json"
_FP_VERSION = 1
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}


def sha256_text(*chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c if isinstance(c, bytes) else str(c).encode())
    return h.hexdigest()


def on_rank0(fn: Callable[[], str]) -> str:
    """``fn()`` computed on rank 0 and broadcast to every rank (all ranks must call this)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return fn()
    box = [None]
    error = None
    if tdist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # broadcast the failure so no rank waits forever, then re-raise it here
            error, box[0] = e, ("error", f"{type(e).__name__}: {e}")
    tdist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status != "ok":
        raise RuntimeError(f"rank 0 could not fingerprint the reference model: {value}")
    return value


# ---- local directories ---------------------------------------------------------------------------

def _identity_names(path: str) -> list:
    names = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES))
    if not names:
        raise FileNotFoundError(f"{path}: no weight files to fingerprint")
    return names + [n for n in IDENTITY_FILES if os.path.isfile(os.path.join(path, n))]


def _stat_key(path: str) -> list:
    st = os.stat(path)  # follows symlinks (HF snapshots link to blobs): the content's file
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _store_paths(path: str) -> list:
    """Where a directory's digests are stored: next to the model, else the user cache (read-only dirs)."""
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = sha256_text(os.path.realpath(path))[:32] + ".json"
    return [os.path.join(path, FINGERPRINT_FILE), os.path.join(user, "zephyr_fast", "fingerprints", name)]


def _load_store(paths: list) -> dict:
    for p in paths:
        try:
            with open(p) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("version") == _FP_VERSION and isinstance(data.get("files"), dict):
            return data["files"]
    return {}


def _save_store(paths: list, files: dict) -> None:
    text = json.dumps({"version": _FP_VERSION, "files": files}, indent=1, sort_keys=True)
    for p in paths:  # first writable location wins; none writable: digests are recomputed next time
        try:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            atomic_write(p, text)
            return
        except OSError:
            continue


def local_fingerprint(path: str) -> str:
    """``files:<sha256>`` of a checkpoint directory's weight files + config (digests cached per stat)."""
    stores = _store_paths(path)
    known = _load_store(stores)
    files, changed = {}, False
    for name in _identity_names(path):
        full = os.path.join(path, name)
        stat = _stat_key(full)
        entry = known.get(name)
        if not (isinstance(entry, dict) and entry.get("stat") == stat and isinstance(entry.get("sha256"), str)):
            entry, changed = {"stat": stat, "sha256": file_digest(full)}, True
            stat_after = _stat_key(full)
            if stat_after != stat:  # written while we read it: do not remember a digest of a moving target
                entry["stat"] = None
        files[name] = entry
    if changed or set(known) != set(files):
        _save_store(stores, files)
    return "files:" + sha256_text(*(f"{n}:{e['sha256']}\n" for n, e in sorted(files.items())))


# ---- hub ids -------------------------------------------------------------------------------------

def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return env
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def hf_offline() -> bool:
    from huggingface_hub import constants

    env = [os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if any(v in _TRUE for v in env):
        return True
    return "HF_HUB_OFFLINE" not in os.environ and bool(constants.HF_HUB_OFFLINE)


def cached_commit(repo_id: str, revision: str) -> Optional[str]:
    """The commit ``revision`` points to in the local HF cache (``refs/<revision>``), or None."""
    ref = os.path.join(_hf_cache_dir(), "models--" + repo_id.replace("/", "--"), "refs", revision)
    try:
        with open(ref) as f:
            sha = f.read().strip()
    except OSError:
        return None
    return sha if _SHA_RE.match(sha) else None


def _online_commit(repo_id: str, revision: str) -> Optional[str]:
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(repo_id, revision=revision, timeout=20).sha
    except Exception:  # unreachable, gated, unknown: fall back to the local cache's refs
        return None
    return sha if isinstance(sha, str) and _SHA_RE.match(sha) else None


def resolve_commit(repo_id: str, revision: str) -> Optional[str]:
    """The commit sha ``repo_id@revision`` resolves to now, or None when it cannot be resolved."""
    revision = revision or "main"
    if _SHA_RE.match(revision):
        return revision
    sha = None if hf_offline() or hub_unreachable() else _online_commit(repo_id, revision)
    return sha or cached_commit(repo_id, revision)


def hub_fingerprint(repo_id: str, revision: str) -> str:
    """``hub:<id>@<commit sha>``; unresolvable: a unique ``unresolved:...`` that matches no cache."""
    sha = resolve_commit(repo_id, revision)
    if sha is None:
        return f"unresolved:hub:{repo_id}@{revision}:{uuid.uuid4().hex}"
    return f"hub:{repo_id}@{sha}"


# ---- any model -----------------------------------------------------------------------------------

def _params_fingerprint(model, init: Optional[dict], seed: Optional[int]) -> str:
    params = list(model.named_parameters()) if model is not None else []
    if params and not any(hasattr(p, "ds_id") for _, p in params):
        h = hashlib.sha256()
        for name, p in params:
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return f"params:{h.hexdigest()}"
    return "init:" + sha256_text(json.dumps(init or {}, sort_keys=True), seed)


def weights_fingerprint(model_name_or_path: Optional[str], model=None, *, revision: str = "main",
                        init: Optional[dict] = None, seed: Optional[int] = None) -> str:
    """Identity of the reference weights (see the module docstring), computed on rank 0 and broadcast.

    Starts with ``files:`` (a local directory), ``hub:`` (a resolved hub commit), ``params:`` /
    ``init:`` (a random init) or ``unresolved:`` (a hub id that could not be resolved: never reused).
    """
    def compute() -> str:
        if model_name_or_path and os.path.isdir(model_name_or_path):
            return local_fingerprint(model_name_or_path)
        if model_name_or_path:
            return hub_fingerprint(model_name_or_path, revision)
        return _params_fingerprint(model, init, seed)

    return on_rank0(compute)
