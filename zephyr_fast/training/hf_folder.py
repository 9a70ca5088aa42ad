"""Every checkpoint is also a Hugging Face model folder: ``config.json``, ``generation_config.json``, the
tokenizer (with its chat template) and the weights under transformers' names, so
``AutoModelForCausalLM.from_pretrained("out/checkpoint-2")``, ``transformers serve`` and vLLM load it as is.

At save time (:func:`write_model`, inside the checkpoint's temporary folder, before the manifest is
written, so the manifest vouches for these files too): a plain-torch run writes its weights once, as the
HF ``model.safetensors`` (the ``LossModule``'s ``model.`` prefix dropped) and resume reads that same file
back (:func:`load_model_weights`, which still reads the older ``model.``-prefixed layout). Under DeepSpeed
``ds/`` stays what resume reads; the HF weights are an extra copy in the model dtype (ZeRO-3: gathered on
rank 0, a collective every rank enters). A LoRA model or a bare module keeps ``model.safetensors`` under its own names.
``zephyr-fast export`` (``training/export.py``) adds the folder to a checkpoint written without it.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_model

from zephyr_fast.model.forward import unwrap_model
from zephyr_fast.training.distributed import DistInfo, barrier
from zephyr_fast.training.manifest import CheckpointError, writing

__all__ = ["HF_CONFIG", "INDEX", "PREFIX", "WEIGHTS", "is_hf_folder", "load_into", "load_model_weights", "prefixed",
           "save_hf", "strip_prefix", "write_model"]

HF_CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PREFIX = "model."  # the LossModule's attribute: its state dict is the HF model's under this prefix


def _core(model):
    """The transformers model inside a LossModule (``.model``) / engine wrapper, or None (LoRA, a bare module)."""
    inner = getattr(model, "model", None)
    if inner is None or hasattr(inner, "peft_config"):
        return None
    core = unwrap_model(inner)
    return core if hasattr(core, "save_pretrained") else None


def is_hf_folder(path: str) -> bool:
    """``config.json`` and HF-named weights (one file or an index of shards)."""
    has_weights = os.path.isfile(os.path.join(path, INDEX)) or (
        os.path.isfile(os.path.join(path, WEIGHTS)) and not prefixed(os.path.join(path, WEIGHTS)))
    return os.path.isfile(os.path.join(path, HF_CONFIG)) and has_weights


def prefixed(weights: str) -> bool:
    """The trainer's legacy layout: every key under the LossModule's ``model.model.`` / ``model.lm_head``."""
    with safe_open(weights, framework="pt") as f:
        keys = list(f.keys())
    return bool(keys) and all(k.startswith(PREFIX + "model.") or k.startswith(PREFIX + "lm_head.") for k in keys)


def save_hf(out_dir: str, core, tokenizer, state_dict: Optional[dict] = None) -> None:
    kwargs = {"safe_serialization": True}
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    core.save_pretrained(out_dir, **kwargs)  # config.json, generation_config.json, weights (sharded past 5 GB)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def write_model(tmp: str, model, tokenizer, *, dist: DistInfo, engine=None) -> None:
    """The checkpoint's model files into ``tmp`` (the checkpoint being written; before its manifest).

    Plain torch (rank 0): the HF folder *is* the model state (a bare ``nn.Module`` or a LoRA model keeps
    ``model.safetensors`` under its own names). DeepSpeed: the HF folder besides ``ds/``; under ZeRO-3
    the 16-bit weights are gathered (collective: every rank calls)."""
    core = _core(model)
    if engine is None:
        if dist.is_main:
            with writing(os.path.join(tmp, WEIGHTS)):
                if core is None:
                    save_model(model, os.path.join(tmp, WEIGHTS))
                else:
                    save_hf(tmp, core, tokenizer)
        return
    if core is None:
        return
    state_dict = None
    if dist.zero_stage == 3:
        full = engine._zero3_consolidated_16bit_state_dict()  # rank 0 gets the whole dict
        state_dict = strip_prefix(full) if dist.is_main else None
    if dist.is_main:
        with writing(os.path.join(tmp, WEIGHTS)):
            save_hf(tmp, core, tokenizer, state_dict)
    barrier()


def strip_prefix(state: dict) -> dict:
    return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}


def _read_hf_weights(path: str) -> dict:
    index = os.path.join(path, INDEX)
    if not os.path.isfile(index):
        return load_file(os.path.join(path, WEIGHTS))
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
        out.update(load_file(os.path.join(path, shard)))
    return out


def load_into(core, state: dict, source: str, assign: bool = False) -> None:
    """``state`` (HF names) into ``core`` (``assign``: a meta-device model takes the tensors themselves); a key
    missing (other than a tied copy) or unexpected is refused."""
    tied = _tied_names(core)
    missing, unexpected = core.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(f"{source}: weights do not fit the model ({what}, {len(missing) + len(unexpected)} "
                              f"keys in all)")
    core.tie_weights()


def _tied_names(core) -> set:
    """State-dict names sharing storage with another (tied embeddings): saved once, under one of the names."""
    seen, tied = {}, set()
    for name, t in core.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.shape) if t.device.type != "meta" else (id(t), t.shape)
        if key in seen:
            tied.update({name, seen[key]})
        seen[key] = name
    return tied


def load_model_weights(path: str, model) -> None:
    """Resume: the checkpoint's weights into ``model`` (a LossModule or a bare module), whichever layout
    the checkpoint has -- the HF folder or the trainer's ``model.``-prefixed / own-name file."""
    core = _core(model)
    weights = os.path.join(path, WEIGHTS)
    if core is not None and is_hf_folder(path):
        load_into(core, _read_hf_weights(path), weights)
    else:
        load_model(model, weights)


