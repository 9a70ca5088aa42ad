"""``zephyr-fast export CHECKPOINT [--out DIR]``: make a checkpoint written without the Hugging Face files
(older checkpoints: ``model.``-prefixed weights; ``ds/`` ZeRO partitions when the save did not gather) a
HF model folder, loadable by ``from_pretrained`` and servable.

The checkpoint is verified against its manifest first; the weights are rebuilt on the run's
architecture (its ``config.yaml``, the model built on the meta device: no init, no copy), ``ds/`` through
DeepSpeed's ``zero_to_fp32`` under the safe ``torch.load``; the HF files are staged in a hidden folder,
moved in, and the manifest is rewritten last to list them (same step, same save counter), so the
checkpoint stays verified and resumable. An export killed before that rewrite leaves unlisted HF files
only, which the next export removes first. ``--out DIR`` writes the folder there and leaves the
checkpoint untouched.

:func:`export_final` writes the end of a training run the same way (``Checkpointer.export``): the
trained model as a HF folder in output_dir, with its model card and ``train_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from typing import Optional

import torch
import yaml
from safetensors.torch import load_file

from zephyr_fast import redaction
from zephyr_fast.config import ConfigError, load_config
from zephyr_fast.data.chat import load_tokenizer
from zephyr_fast.fileio import atomic_open
from zephyr_fast.model.load import tiny_config
from zephyr_fast.training.checkpoint import publish, safe_torch_loads
from zephyr_fast.training.distributed import DistInfo, barrier
from zephyr_fast.training.hf_folder import WEIGHTS, is_hf_folder, load_into, prefixed, save_hf, strip_prefix
from zephyr_fast.training.manifest import (CheckpointError, check_listing, read_manifest, verify_checkpoint,
                                           write_manifest)

__all__ = ["export_checkpoint", "export_final", "main"]

_STAGING = ".hf-export.tmp"
# what save_pretrained writes (model and tokenizer): the only unlisted names a killed export may leave
_HF_NAMES = re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|"
                       r"tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|chat_template\.jinja|"
                       r"added_tokens\.json)$")
ONE = DistInfo(0, 1, 0, torch.device("cpu"), False, None)


def _run_config(ckpt: str):
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "config.yaml")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (the run's resolved config, written at its start, names the "
                              f"model to rebuild)")
    return load_config(path, ["--deepspeed=null"])  # only the model and tokenizer are needed: one process


def _empty_model(cfg):
    """The run's architecture on the meta device (no init, no memory), in the run's dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg.model
    path = m.model_name_or_path  # the policy's architecture (a DPO reference is another model)
    config = (AutoConfig.from_pretrained(path, revision=m.model_revision, trust_remote_code=False) if path
              else tiny_config(**m.model_init))
    dtype = getattr(torch, m.dtype) if isinstance(m.dtype, str) and hasattr(torch, m.dtype) else torch.float32
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)


def _checkpoint_state(ckpt: str) -> dict:
    """The checkpoint's model weights under HF names, from whichever layout it has."""
    weights = os.path.join(ckpt, WEIGHTS)
    if os.path.isfile(weights):
        state = load_file(weights)
        return strip_prefix(state) if prefixed(weights) else state
    if not os.path.isdir(os.path.join(ckpt, "ds")):
        raise CheckpointError(f"{ckpt}: neither {WEIGHTS} nor ds/ (not a zephyr_fast checkpoint)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # DeepSpeed runs only

    with safe_torch_loads():
        return strip_prefix(get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="ds"))


def _clear_partial(ckpt: str) -> None:
    """Files of an export killed before its manifest rewrite: unlisted HF files and the staging folder."""
    shutil.rmtree(os.path.join(ckpt, _STAGING), ignore_errors=True)
    listed = set(read_manifest(ckpt)["files"])
    for name in os.listdir(ckpt):
        if name not in listed and _HF_NAMES.match(name) and os.path.isfile(os.path.join(ckpt, name)):
            os.remove(os.path.join(ckpt, name))


def _write_export(ckpt: str, out: Optional[str], cfg) -> str:
    core = _empty_model(cfg)
    state = _checkpoint_state(ckpt)
    dtype = next(iter(core.state_dict().values())).dtype
    load_into(core, {k: v.to(dtype) for k, v in state.items()}, ckpt, assign=True)
    m = cfg.model
    tokenizer = load_tokenizer(m.tokenizer_name_or_path or m.model_name_or_path, cfg.data.chat_template,
                               revision=m.model_revision, eos_token=m.eos_token)
    if out is not None:
        save_hf(out, core, tokenizer)
        return out
    staging = os.path.join(ckpt, _STAGING)
    save_hf(staging, core, tokenizer)
    manifest = read_manifest(ckpt)
    for name in sorted(os.listdir(staging)):
        if name in manifest["files"] and name != WEIGHTS:
            continue  # never overwrite a file the manifest already vouches for
        publish(os.path.join(staging, name), os.path.join(ckpt, name))
    shutil.rmtree(staging, ignore_errors=True)
    write_manifest(ckpt, step=manifest["step"], save_index=manifest["save_index"], dist=ONE)
    return ckpt


def export_checkpoint(ckpt: str, out: Optional[str] = None) -> dict:
    """Make ``ckpt`` (or ``out``) a HF model folder; verified first. Returns what it did and what it cost."""
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    if out is None:
        _clear_partial(ckpt)
    check_listing(ckpt, read_manifest(ckpt))
    verify_checkpoint(ckpt, dist=ONE)
    if out is None and is_hf_folder(ckpt):
        return {"path": ckpt, "exported": False, "seconds": 0.0, "bytes": 0}
    before = _folder_bytes(out or ckpt)
    t0 = time.time()
    path = _write_export(ckpt, out, _run_config(ckpt))
    return {"path": path, "exported": True, "seconds": time.time() - t0, "bytes": _folder_bytes(path) - before}


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
    return redaction.redact("\n".join(lines))  # the recipe as written may hold hub_token


def export_final(out_dir: str, *, cfg, dist: DistInfo, model, tokenizer, engine=None, results: dict) -> None:
    """HF-format save (safetensors; 16-bit gathered under ZeRO-3), tokenizer, model card, results.

    Collective under DeepSpeed (the ZeRO-3 gather): every rank must call.
    """
    state_dict = None
    if engine is not None and dist.zero_stage == 3:
        full = engine._zero3_consolidated_16bit_state_dict()  # rank 0 gets the full dict
        if dist.is_main:  # the engine wraps the trainer's LossModule: drop its "model." prefix
            state_dict = strip_prefix(full)
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
        to_save = model
        if cfg.model.use_peft:
            model.save_pretrained(os.path.join(out_dir, "adapter"), safe_serialization=True)
            to_save = model.merge_and_unload() if state_dict is None else model.get_base_model()
        save_hf(out_dir, to_save, tokenizer, state_dict)
        with atomic_open(os.path.join(out_dir, "README.md")) as f:
            f.write(_model_card(cfg, results))
        with atomic_open(os.path.join(out_dir, "train_results.json")) as f:
            json.dump(results, f, indent=2, default=str)
        cfg.save(os.path.join(out_dir, "zephyr_fast_config.yaml"))
    barrier()


def _folder_bytes(path: Optional[str]) -> int:
    if not path or not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> int:
    """``zephyr-fast export CHECKPOINT [--out DIR]``."""
    p = argparse.ArgumentParser(prog="zephyr-fast export", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("checkpoint", help="a checkpoint-N folder (verified against its manifest first)")
    p.add_argument("--out", default=None, help="write the HF folder here instead of into the checkpoint")
    args = p.parse_args(argv)
    try:
        result = export_checkpoint(args.checkpoint, args.out)
    except ConfigError as e:  # CheckpointError included: one line, status 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["exported"]:
        print(f"exported {result['path']} ({result['bytes'] / 2**20:.1f} MiB added, {result['seconds']:.1f} s)")
    else:
        print(f"{result['path']}: already a Hugging Face model folder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
