"""Offline reference log-probs: computed once by a no-grad pass, cached, never recomputed in DPO.

DPO needs ``log π_ref(y|x)`` of every chosen and rejected completion. Instead of keeping a frozen
reference model in memory (TRL's default, doubling weights memory and adding a forward per step),
zephyr_fast runs the frozen dSFT model once over the preference data in large packed no-grad
batches, sharded across ranks, and writes ONE file per split, ``{dir}/{split}.safetensors``:

* tensors ``index (P,) int64`` (dataset row, strictly increasing), ``ref_chosen_logps (P,) fp32``,
  ``ref_rejected_logps (P,) fp32`` (summed over completion tokens);
* metadata ``key`` (JSON: dataset content, reference model identity, tokenizer + chat template,
  length settings, dtype, a hash of the exact token ids of every pair), ``stats`` and ``sha256`` --
  the digest of the metadata and every tensor's name, dtype, shape and bytes.

Key and tensors are one unit: written to a temp file, fsynced and renamed over the old file, so a
crash leaves the old cache or the new one, never new tensors under an old key. Reading verifies the
digest, the shapes and dtypes, the index order and finite values before the key is even compared:
a flipped byte anywhere is refused in one line naming the file (:class:`CorruptRefLogpsError`).
Version-2 caches (a separate ``{split}.json`` key, no digest) are refused with a "recompute"
message, not migrated: their key cannot vouch for the tensors beside it.

The reference model's identity (``zephyr_fast.training.fingerprint``): a local checkpoint by its
files' content (digested once, re-hashed when a file's stat changes), a hub id by the commit sha
its revision resolves to (never by name), a random init by its parameters. :func:`reference_identity`
picks the model: the policy at its initial weights, or -- in a ``stage: dpo`` run whose recipe names
``ref_model_name_or_path`` -- that model, whose cache ``stage: ref_logps`` computed.

:class:`ReferencePass` owns the pass: its cache directory (``ref_logps_dir``, default
``{output_dir}/ref_logps``), its token budget (``ref_logps_max_tokens``, default 4x the training
micro-batch: no activations are kept) and its packing (the separate layout: exact per-sequence
attention with any backend). A cache whose key differs from the current run is refused with the
differing components named, because silently reusing reference log-probs of other data or another
model gives a wrong DPO objective with no visible error. Train and eval splits have separate caches.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load, save

from zephyr_fast.config import DPOConfig
from zephyr_fast.data.examples import DPOExamples, example_indices, pair_line
from zephyr_fast.data.identity import rows_digest
from zephyr_fast.data.loading import DataConfig
from zephyr_fast.data.packing import pack_dpo
from zephyr_fast.fileio import atomic_write, first_line
from zephyr_fast.model.forward import packed_logps
from zephyr_fast.training.distributed import DistInfo, barrier, gather_objects, sharded_forwards
from zephyr_fast.training.fingerprint import sha256_text, weights_fingerprint

__all__ = ["CorruptRefLogpsError", "ReferenceIdentity", "ReferencePass", "RefLogps", "StaleRefLogpsError",
           "cache_key", "cache_path", "read_cache", "ref_summary", "reference_identity", "weights_fingerprint",
           "write_cache"]

# 3: one file -- key + sha256 in the safetensors metadata; hub ids by commit sha, local dirs with config.json
CACHE_VERSION = 3
CACHE_FORMAT = "zephyr_fast.ref_logps"
_TENSORS = {"index": torch.int64, "ref_chosen_logps": torch.float32, "ref_rejected_logps": torch.float32}
_REDO = "delete it or pass --ref_logps_recompute=true to recompute it"


class StaleRefLogpsError(RuntimeError):
    """The reference log-prob cache on disk was computed for other data, model or settings."""


class CorruptRefLogpsError(StaleRefLogpsError):
    """The reference log-prob cache file fails its integrity checks (digest, header, shapes, values)."""


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return sha256_text(vocab, tokenizer.chat_template or "", json.dumps(tokenizer.special_tokens_map, sort_keys=True))


def examples_fingerprint(examples) -> str:
    """Hash of the exact token ids of every pair (catches any data/template/truncation change):
    sha256 over ``pair_line`` of each pair in order -- compact ``DPOExamples`` hash the same bytes
    (and keep the digest when they are built without their token ids, as a plan builds them)."""
    if isinstance(examples, DPOExamples):
        return examples.fingerprint()
    h = hashlib.sha256()
    for ex in examples:
        h.update(pair_line(ex["index"], ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]))
    return h.hexdigest()


def cache_key(*, split: str, rows, examples, tokenizer, weights: str, max_length: int,
              max_prompt_length: int, dtype: str) -> dict:
    return {
        "version": CACHE_VERSION,
        "split": split,
        "dataset": rows_digest(rows),  # content of the rows used (not paths or mtimes)
        "model_weights": weights,
        "tokenizer_and_template": tokenizer_fingerprint(tokenizer),
        "lengths": {"max_length": max_length, "max_prompt_length": max_prompt_length},
        "dtype": dtype,
        "examples": examples_fingerprint(examples),
        "num_pairs": len(examples),
    }


@dataclass
class RefLogps:
    """Reference log-probs of one split, looked up by dataset row (``PackedBatch.pair_index``)."""

    index: torch.Tensor  # (P,) int64, strictly increasing
    chosen: torch.Tensor  # (P,) fp32
    rejected: torch.Tensor  # (P,) fp32
    path: str = ""
    reused: bool = False
    seconds: float = 0.0
    tokens: int = 0

    def lookup(self, pair_index: torch.Tensor):
        """``pair_index (P_b,) int64`` -> ``(ref_chosen (P_b,), ref_rejected (P_b,))`` fp32, host tensors."""
        pos = torch.searchsorted(self.index, pair_index.cpu())
        ok = (pos < self.index.numel()) & (self.index[pos.clamp(max=self.index.numel() - 1)] == pair_index.cpu())
        if not bool(ok.all()):  # setup-time check (batches are resolved once, before the loop)
            missing = pair_index.cpu()[~ok][:5].tolist()
            raise StaleRefLogpsError(f"{self.path}: no reference log-probs for dataset rows {missing}")
        return self.chosen[pos], self.rejected[pos]


def cache_path(cache_dir: str, split: str) -> str:
    """The one file of a split's cache: tensors, key and digest together."""
    return os.path.join(cache_dir, f"{split}.safetensors")


def cache_paths(cache_dir: str, split: str):
    """``(cache file, version-2 key file)``: the second exists only beside an old-format cache."""
    return cache_path(cache_dir, split), os.path.join(cache_dir, f"{split}.json")


def _digest(meta: dict, tensors: dict) -> str:
    """sha256 of the metadata (all but the digest itself) and every tensor's name, dtype, shape, bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _header_metadata(path: str, data: bytes) -> dict:
    """The safetensors header's ``__metadata__`` (``{}`` when absent); a broken header is refused."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= len(data) - 8:
        raise CorruptRefLogpsError(f"{path}: corrupt reference log-prob cache: truncated file or broken "
                                   f"header length; {_REDO}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is a ValueError
        raise CorruptRefLogpsError(f"{path}: corrupt reference log-prob cache: its header is not valid JSON; "
                                   f"{_REDO}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _check_tensors(path: str, t: dict, num_pairs) -> None:
    """Names, dtypes, shapes, strictly increasing index, finite log-probs (after the digest matched)."""
    def bad(what: str):
        return CorruptRefLogpsError(f"{path}: corrupt reference log-prob cache: {what}; {_REDO}")

    if set(t) != set(_TENSORS):
        raise bad(f"tensors {sorted(t)}, expected {sorted(_TENSORS)}")
    for name, dtype in _TENSORS.items():
        if t[name].dtype != dtype or t[name].dim() != 1 or t[name].numel() != num_pairs:
            raise bad(f"{name} is {t[name].dtype} {list(t[name].shape)}, expected {dtype} [{num_pairs}]")
    if t["index"].numel() > 1 and not bool((t["index"][1:] > t["index"][:-1]).all()):
        raise bad("index is not strictly increasing")
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if not bool(torch.isfinite(t[name]).all()):
            raise bad(f"{name} has non-finite values")


def load_verified(path: str) -> tuple:
    """``(key, RefLogps)`` of a cache file whose digest and contents check out; else one-line refusal."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptRefLogpsError(f"{path}: cannot read the reference log-prob cache ({e.strerror})") from None
    meta = _header_metadata(path, data)
    if meta.get("format") != CACHE_FORMAT:
        legacy = cache_paths(os.path.dirname(path), os.path.basename(path)[:-len(".safetensors")])[1]
        if os.path.exists(legacy):
            raise StaleRefLogpsError(f"{path}: an old-format reference log-prob cache (key in {legacy}, no "
                                     f"integrity digest) is not reused; {_REDO}")
        raise CorruptRefLogpsError(f"{path}: not a zephyr_fast reference log-prob cache (no embedded key and "
                                   f"digest); {_REDO}")
    try:
        tensors = load(data)
        key, stats = json.loads(meta["key"]), json.loads(meta.get("stats", "{}"))
    except Exception as e:  # safetensors raises its own error types for a broken layout
        raise CorruptRefLogpsError(f"{path}: corrupt reference log-prob cache: {first_line(e)}; {_REDO}") from None
    if _digest(meta, tensors) != meta.get("sha256"):
        raise CorruptRefLogpsError(f"{path}: corrupt reference log-prob cache: its sha256 does not match the digest "
                                   f"stored with it (changed on disk after it was written); {_REDO}")
    _check_tensors(path, tensors, key.get("num_pairs") if isinstance(key, dict) else None)
    return key, RefLogps(tensors["index"], tensors["ref_chosen_logps"], tensors["ref_rejected_logps"], path=path,
                         reused=True, tokens=int(stats.get("tokens", 0)))


def read_cache(cache_dir: str, split: str, key: dict, *, recompute: bool = False, fix: Optional[str] = None,
               log=print) -> Optional[RefLogps]:
    """The cached split if it verifies and its key matches; None if absent (or stale / corrupt and
    ``recompute``); else raise (:class:`CorruptRefLogpsError` for a damaged file). ``fix``: the advice
    appended to a key mismatch (default: delete / recompute / point elsewhere)."""
    path = cache_path(cache_dir, split)
    if not os.path.exists(path):
        return None
    try:
        stored, ref = load_verified(path)
    except StaleRefLogpsError as e:
        if recompute:
            log(f"reference log-probs ({split}): recomputing: {e}")
            return None
        raise
    diff = [k for k in key if stored.get(k) != key[k]]
    if not diff:
        return ref
    if recompute:
        return None
    detail = "; ".join(f"{k}: cached {_short(stored.get(k))} vs now {_short(key[k])}" for k in diff)
    fix = fix or (f"Delete {cache_dir} or pass --ref_logps_recompute=true to recompute them, or point "
                  f"--ref_logps_dir at a cache made for this data and model.")
    raise StaleRefLogpsError(f"{path}: the cached reference log-probs do not match this run ({', '.join(diff)} "
                             f"changed: {detail}). {fix}")


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "..."


def write_cache(cache_dir: str, split: str, key: dict, ref: RefLogps) -> None:
    """One ``{split}.safetensors`` holding the tensors, the key and their sha256, replaced atomically:
    a crash leaves the previous file whole or the new one whole, never new tensors under an old key."""
    os.makedirs(cache_dir, exist_ok=True)
    path, legacy = cache_paths(cache_dir, split)
    tensors = {"index": ref.index.contiguous(), "ref_chosen_logps": ref.chosen.contiguous(),
               "ref_rejected_logps": ref.rejected.contiguous()}
    meta = {"format": CACHE_FORMAT, "key": json.dumps(key, sort_keys=True),
            # no timing in the file: the same data and model give the same bytes (seconds go to the summary)
            "stats": json.dumps({"tokens": ref.tokens})}
    meta["sha256"] = _digest(meta, tensors)
    atomic_write(path, _canonical(save(tensors, metadata=meta)))
    if os.path.exists(legacy):  # the version-2 key beside it would only mislead a reader
        os.remove(legacy)
    ref.path = path

def _canonical(blob: bytes) -> bytes:
    """``blob`` (a safetensors file) with its header's keys in sorted order: safetensors writes the
    metadata from a hash map, in an order that changes from process to process, so the same cache would
    otherwise differ byte for byte between two runs. Same length, same offsets: only the order moves."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # cannot happen (same keys, same values); never write a header that overlaps the data
        raise RuntimeError("reference cache: canonical header longer than safetensors' own")
    return blob[:8] + text.ljust(n) + blob[8 + n:]


def compute_ref_logps(model, batches: list, *, dist: DistInfo, impl: str = "auto", desc: str = "ref logps") -> RefLogps:
    """No-grad pass over packed DPO ``batches`` (sharded round-robin over ranks), gathered on every rank."""
    t0 = time.time()

    def forward(j, batch):
        _, seg = packed_logps(model, batch, impl=impl)  # segment 2i: pair i chosen, 2i+1: rejected
        return batch.pair_index, seg[0::2].float(), seg[1::2].float()

    results = sharded_forwards(model, batches, forward, dist=dist, desc=desc)
    # one device->host copy at the end, not one per batch
    local = tuple(torch.cat(parts).cpu() for parts in zip(*results)) if results else None
    parts = [p for p in gather_objects(local, dist.world_size) if p is not None]
    seconds = time.time() - t0
    tokens = sum(batches[j].num_tokens for j in range(dist.rank, len(batches), dist.world_size))
    all_tokens = sum(gather_objects(tokens, dist.world_size))
    index = torch.cat([p[0] for p in parts])
    order = torch.argsort(index)
    index = index[order]
    if index.numel() > 1 and bool((index[1:] == index[:-1]).any()):
        raise ValueError("reference pass: a dataset row appears in two pairs; pair indices must be unique")
    return RefLogps(index, torch.cat([p[1] for p in parts])[order], torch.cat([p[2] for p in parts])[order],
                    seconds=seconds, tokens=all_tokens)


def compute_and_write(model, batches: list, *, cache_dir: str, split: str, key: dict, dist: DistInfo,
                      impl: str = "auto", log=print) -> RefLogps:
    """Run the reference pass over ``batches`` and write the ``split`` cache under ``key`` (rank 0)."""
    ref = compute_ref_logps(model, batches, dist=dist, impl=impl, desc=f"ref logps ({split})")
    if ref.index.numel() != key["num_pairs"]:
        raise RuntimeError(f"reference pass produced {ref.index.numel()} pairs, expected {key['num_pairs']}")
    if dist.is_main:
        write_cache(cache_dir, split, key, ref)
    barrier()
    ref.path = cache_path(cache_dir, split)
    tps = ref.tokens / max(ref.seconds, 1e-9)
    log(f"reference log-probs ({split}): {ref.index.numel()} pairs, {ref.tokens} tokens in {ref.seconds:.1f}s "
        f"({tps:.0f} tokens/s) -> {ref.path}")
    return ref


@dataclass(frozen=True)
class ReferenceIdentity:
    """Which model the reference log-probs are of, and whether this run holds it."""

    weights: str  # weights_fingerprint of the reference model (the cache key's model_weights)
    source: str = ""  # for messages: the path / hub id, or the random init
    computable: bool = True  # the model this run built *is* the reference: it may compute a missing cache


def reference_identity(stage, model_cfg, *, path: Optional[str], model=None,
                       seed: Optional[int] = None) -> ReferenceIdentity:
    """The reference model of a run of ``stage`` (an ``objectives.Stage``): ``path`` (the model it built,
    ``model`` in memory) -- or the other model the stage names (``Stage.other_reference``: in ``stage: dpo``,
    a ``ref_model_name_or_path`` whose cache ``stage: ref_logps`` wrote; this run cannot compute it).
    Fingerprinted now, before training."""
    revision = getattr(model_cfg, "model_revision", "main") or "main"
    other = stage.other_reference(path)
    if other:
        return ReferenceIdentity(weights_fingerprint(other, revision=revision), source=other, computable=False)
    weights = weights_fingerprint(path, model, revision=revision, init=getattr(model_cfg, "model_init", None),
                                  seed=seed)
    return ReferenceIdentity(weights, source=path or "the random init (model_init)")


@dataclass
class ReferencePass:
    """The reference log-probs of a DPO run: where they are cached, the pass's budget and packing."""

    cache_dir: str
    max_tokens: int  # micro-batch token budget of the no-grad pass
    recompute: bool  # overwrite a stale cache instead of refusing it
    lengths: dict  # the data's length settings, part of the cache key
    dtype: str  # the model's parameter dtype, part of the cache key
    seed: int
    impl: str
    reference_free: bool = False  # TRL's reference_free: every reference log-prob is 0, nothing is computed

    @classmethod
    def configure(cls, d: DPOConfig, data: DataConfig, *, output_dir: str, dtype: str, seed: int,
                  impl: str) -> "ReferencePass":
        """Defaults: ``{output_dir}/ref_logps``; 4x the training micro-batch (no activations are kept)."""
        return cls(cache_dir=d.ref_logps_dir or os.path.join(output_dir, "ref_logps"),
                   max_tokens=d.ref_logps_max_tokens or 4 * data.max_tokens_per_batch, recompute=d.ref_logps_recompute,
                   lengths={"max_length": data.max_length, "max_prompt_length": data.max_prompt_length},
                   dtype=dtype, seed=seed, impl=impl, reference_free=d.reference_free)

    def run(self, model, splits: dict, tokenizer, identity, *, dist: DistInfo, log=print) -> dict:
        """``{split: RefLogps}`` for every split in ``splits`` (``SplitData`` or None): cached, else computed.

        ``identity``: a :class:`ReferenceIdentity` (or a bare weights fingerprint: the model in hand).
        """
        if self.reference_free:  # the loss sees log pi alone (TRL's reference_free): zeros, no pass, no identity
            return {name: _zero_logps(split) for name, split in splits.items() if split is not None}
        identity = ReferenceIdentity(identity) if isinstance(identity, str) else identity
        if identity.weights.startswith("unresolved:"):
            log(f"note: {identity.source}: its revision cannot be resolved to a commit (offline and not in the "
                f"HF cache?): its reference log-probs are computed, never reused")
        out = {}
        for name, split in splits.items():
            if split is None:
                continue
            key = cache_key(split=name, rows=split.rows, examples=split.examples, tokenizer=tokenizer,
                            weights=identity.weights, dtype=self.dtype, **self.lengths)
            out[name] = self._split(model, name, split, key, identity, dist=dist, log=log)
        return out

    def _split(self, model, name: str, split, key: dict, identity: ReferenceIdentity, *, dist, log) -> RefLogps:
        other = not identity.computable
        fix = (f"Run this recipe with --stage=ref_logps (it computes them with ref_model_name_or_path="
               f"{identity.source}) or point --ref_logps_dir at the cache it wrote.") if other else None
        ref = read_cache(self.cache_dir, name, key, recompute=self.recompute and not other, fix=fix, log=log)
        if ref is not None:
            log(f"reference log-probs ({name}): reusing {ref.path}")
            return ref
        if other:
            raise StaleRefLogpsError(f"{cache_path(self.cache_dir, name)}: no reference log-probs of "
                                     f"ref_model_name_or_path={identity.source} for this data. {fix}")
        # the separate layout: exact per-sequence attention, any backend
        batches = list(pack_dpo(split.examples, self.max_tokens, layout="separate", seed=self.seed))
        return compute_and_write(model, batches, cache_dir=self.cache_dir, split=name, key=key, dist=dist,
                                 impl=self.impl, log=log)


def _zero_logps(split) -> RefLogps:
    index = torch.from_numpy(np.sort(example_indices(split.examples)))
    return RefLogps(index, torch.zeros(len(index)), torch.zeros(len(index)), path="reference_free")


def ref_summary(refs: dict) -> dict:
    """Summary entries of a reference pass: cache paths, reuse, throughput of computed splits."""
    out = {}
    for split, ref in refs.items():
        out[f"ref_logps_{split}_path"] = ref.path
        out[f"ref_logps_{split}_reused"] = ref.reused
        if not ref.reused and ref.seconds > 0:
            out[f"ref_logps_{split}_tokens_per_second"] = ref.tokens / ref.seconds
    return out
