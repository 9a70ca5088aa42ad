"""Offline reference log-probs: computed once by a no-grad pass, cached, never recomputed in DPO.

DPO needs ``log π_ref(y|x)`` of every chosen and rejected completion. Instead of keeping a frozen
reference model in memory (TRL's default, doubling weights memory and adding a forward per step),
zephyr_fast runs the frozen dSFT model once over the preference data in large packed no-grad
batches, sharded across ranks, and writes

* ``{dir}/{split}.safetensors`` -- ``index (P,) int64`` (dataset row, sorted),
  ``ref_chosen_logps (P,) fp32``, ``ref_rejected_logps (P,) fp32`` (summed over completion tokens);
* ``{dir}/{split}.json`` -- the key: dataset fingerprint, model weights hash, tokenizer + chat
  template hash, length settings, and a hash of the exact token ids of every pair.

:class:`ReferencePass` owns the pass: its cache directory (``ref_logps_dir``, default
``{output_dir}/ref_logps``), its token budget (``ref_logps_max_tokens``, default 4x the training
micro-batch: no activations are kept) and its packing (the separate layout: exact per-sequence
attention with any backend). ``stage: dpo`` reads the cache (computing it first, with the policy at
its initial weights -- which *are* the reference weights -- when it is missing). A cache whose key differs from the
current run is refused with the differing components named, because silently reusing reference
log-probs of other data or another model gives a wrong DPO objective with no visible error.
Train and eval splits have separate caches.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from zephyr_fast.data.loading import DataConfig, rows_digest
from zephyr_fast.data.packing import pack_dpo
from zephyr_fast.model.forward import packed_logps
from zephyr_fast.training.distributed import DistInfo, barrier, gather_objects, sharded_forwards
from zephyr_fast.training.stages import DPOConfig

CACHE_VERSION = 2  # 2: the dataset is keyed by rows_digest (content), not the datasets fingerprint
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class StaleRefLogpsError(RuntimeError):
    """The reference log-prob cache on disk was computed for other data, model or settings."""


def _sha(*chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c if isinstance(c, bytes) else str(c).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return _sha(vocab, tokenizer.chat_template or "", json.dumps(tokenizer.special_tokens_map, sort_keys=True))


def examples_fingerprint(examples) -> str:
    """Hash of the exact token ids of every pair (catches any data/template/truncation change)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["index"], ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]]).encode())
    return h.hexdigest()


def weights_fingerprint(model_name_or_path: Optional[str], model=None, *, revision: str = "main",
                        init: Optional[dict] = None, seed: Optional[int] = None) -> str:
    """Hash of the reference weights.

    A local checkpoint directory: its weight files' bytes (works whatever the in-memory sharding).
    A hub id: ``id@revision``. A random init: the model's parameters when they are not ZeRO-3
    partitioned, else its config + seed (initialisation is deterministic given both).
    """
    if model_name_or_path and os.path.isdir(model_name_or_path):
        h = hashlib.sha256()
        names = sorted(n for n in os.listdir(model_name_or_path) if n.endswith(_WEIGHT_SUFFIXES))
        if not names:
            raise FileNotFoundError(f"{model_name_or_path}: no weight files to fingerprint")
        for name in names:
            h.update(name.encode())
            with open(os.path.join(model_name_or_path, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        return f"files:{h.hexdigest()}"
    if model_name_or_path:
        return f"hub:{model_name_or_path}@{revision}"
    params = list(model.named_parameters()) if model is not None else []
    if params and not any(hasattr(p, "ds_id") for _, p in params):
        h = hashlib.sha256()
        for name, p in params:
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return f"params:{h.hexdigest()}"
    return "init:" + _sha(json.dumps(init or {}, sort_keys=True), seed)


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


def cache_paths(cache_dir: str, split: str):
    return os.path.join(cache_dir, f"{split}.safetensors"), os.path.join(cache_dir, f"{split}.json")


@dataclass
class RefLogps:
    """Reference log-probs of one split, looked up by dataset row (``PackedBatch.pair_index``)."""

    index: torch.Tensor  # (P,) int64, sorted
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


def read_cache(cache_dir: str, split: str, key: dict, *, recompute: bool = False) -> Optional[RefLogps]:
    """The cached split if its key matches; None if absent (or stale and ``recompute``); else raise."""
    st_path, key_path = cache_paths(cache_dir, split)
    if not (os.path.exists(st_path) and os.path.exists(key_path)):
        return None
    with open(key_path) as f:
        stored = json.load(f)
    diff = [k for k in key if stored.get(k) != key[k]]
    if diff:
        if recompute:
            return None
        detail = "; ".join(f"{k}: cached {_short(stored.get(k))} vs now {_short(key[k])}" for k in diff)
        raise StaleRefLogpsError(
            f"{key_path}: the cached reference log-probs do not match this run ({', '.join(diff)} changed: "
            f"{detail}). Delete {cache_dir} or pass --ref_logps_recompute=true to recompute them, or point "
            f"--ref_logps_dir at a cache made for this data and model."
        )
    t = load_file(st_path)
    return RefLogps(t["index"], t["ref_chosen_logps"], t["ref_rejected_logps"], path=st_path, reused=True)


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "..."


def write_cache(cache_dir: str, split: str, key: dict, ref: RefLogps) -> None:
    """``{split}.safetensors`` then ``{split}.json``, each written to a temp file and renamed."""
    os.makedirs(cache_dir, exist_ok=True)
    st_path, key_path = cache_paths(cache_dir, split)
    tensors = {"index": ref.index.contiguous(), "ref_chosen_logps": ref.chosen.contiguous(),
               "ref_rejected_logps": ref.rejected.contiguous()}
    save_file(tensors, st_path + ".tmp", metadata={"split": split})
    with open(key_path + ".tmp", "w") as f:
        json.dump({**key, "seconds": ref.seconds, "tokens": ref.tokens}, f, indent=2)
    # tensors first, key last: a crash in between leaves a key-less (ignored) cache, never a stale pair
    os.replace(st_path + ".tmp", st_path)
    os.replace(key_path + ".tmp", key_path)
    ref.path = st_path


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
    ref.path = cache_paths(cache_dir, split)[0]
    tps = ref.tokens / max(ref.seconds, 1e-9)
    log(f"reference log-probs ({split}): {ref.index.numel()} pairs, {ref.tokens} tokens in {ref.seconds:.1f}s "
        f"({tps:.0f} tokens/s) -> {ref.path}")
    return ref


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

    @classmethod
    def configure(cls, d: DPOConfig, data: DataConfig, *, output_dir: str, dtype: str, seed: int,
                  impl: str) -> "ReferencePass":
        """Defaults: ``{output_dir}/ref_logps``; 4x the training micro-batch (no activations are kept)."""
        return cls(cache_dir=d.ref_logps_dir or os.path.join(output_dir, "ref_logps"),
                   max_tokens=d.ref_logps_max_tokens or 4 * data.max_tokens_per_batch, recompute=d.ref_logps_recompute,
                   lengths={"max_length": data.max_length, "max_prompt_length": data.max_prompt_length},
                   dtype=dtype, seed=seed, impl=impl)

    def run(self, model, splits: dict, tokenizer, weights: str, *, dist: DistInfo, log=print) -> dict:
        """``{split: RefLogps}`` for every split in ``splits`` (``SplitData`` or None): cached, else computed."""
        out = {}
        for name, split in splits.items():
            if split is None:
                continue
            key = cache_key(split=name, rows=split.rows, examples=split.examples, tokenizer=tokenizer, weights=weights,
                            dtype=self.dtype, **self.lengths)
            ref = read_cache(self.cache_dir, name, key, recompute=self.recompute)
            if ref is None:
                # the separate layout: exact per-sequence attention, any backend
                batches = list(pack_dpo(split.examples, self.max_tokens, layout="separate", seed=self.seed))
                ref = compute_and_write(model, batches, cache_dir=self.cache_dir, split=name, key=key, dist=dist,
                                        impl=self.impl, log=log)
            else:
                log(f"reference log-probs ({name}): reusing {ref.path}")
            out[name] = ref
        return out


def ref_summary(refs: dict) -> dict:
    """Summary entries of a reference pass: cache paths, reuse, throughput of computed splits."""
    out = {}
    for split, ref in refs.items():
        out[f"ref_logps_{split}_path"] = ref.path
        out[f"ref_logps_{split}_reused"] = ref.reused
        if not ref.reused and ref.seconds > 0:
            out[f"ref_logps_{split}_tokens_per_second"] = ref.tokens / ref.seconds
    return out
