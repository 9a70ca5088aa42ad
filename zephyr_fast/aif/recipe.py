"""The AIF recipe: its keys, their types and defaults, read from YAML and ``--section.key=value``.

Every key has one type, taken from where the value is used -- ``generate_completions``'s signature,
:class:`~zephyr_fast.aif.client.JudgeConfig`'s fields, ``binarize_rows``'s signature -- so a default or
a type is written once.  Recipe values are coerced to that type and command-line values parsed by it
with the trainer's parser (:func:`zephyr_fast.config.keys.typed`): ``--judge.model=null`` is None,
``--binarize.score=no`` the string "no", ``--judge.aspects=honesty,helpfulness`` a list.  An unknown
key gets a did-you-mean; every error is one line naming the file (or ``command line --key``) and key.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import fields
from typing import Optional

import yaml

from .. import safe_yaml
from ..config.keys import CLI, ConfigError, did_you_mean, typed
from .binarize import SCORES, binarize_rows
from .client import JudgeConfig
from .generate import generate_completions

TOP_KEYS = {"output_dir": str, "overwrite_output_dir": bool}
GEN_KEYS = ("n_models", "seed", "max_new_tokens", "temperature", "top_p", "batch_size", "backend", "dtype",
            "concurrency", "max_retries", "timeout")


class RecipeError(ConfigError):
    """An AIF recipe or override is invalid (one line, exit status 2)."""


def _signature_types(fn, names) -> dict:
    hints = typing.get_type_hints(fn)
    return {n: hints[n] for n in names}


def signature_defaults(fn, names) -> dict:
    """``{name: default}`` of ``fn``'s keyword arguments ``names`` (the one place those defaults live)."""
    params = inspect.signature(fn).parameters
    return {n: params[n].default for n in names}


def _judge_types() -> dict:
    hints = typing.get_type_hints(JudgeConfig)
    own = {f.name: hints[f.name] for f in fields(JudgeConfig) if f.name != "constrain_tokenizer"}
    return {**own, "serve_local": Optional[str], "constrain": bool, "aspects": list, "retry_failed": bool,
            "completions_per_request": int}


SECTIONS = {
    "generate": {"prompts": str, "pool": dict, "limit": Optional[int], **_signature_types(generate_completions, GEN_KEYS)},
    "judge": _judge_types(),
    "binarize": _signature_types(binarize_rows, ("seed", "score", "skip_invalid_rows")),
    "train": {"recipe": str, "overrides": list},
}


def _unknown(where: str, key: str, name: str, known) -> RecipeError:
    return RecipeError(f"{where}: unknown key {key}{did_you_mean(name, known, cutoff=0.6)}")


def _key_type(where: str, key: str):
    """The type of ``key`` (``output_dir`` or ``section.name``), or a one-line refusal."""
    if key in TOP_KEYS:
        return TOP_KEYS[key]
    sec, _, name = key.partition(".")
    if sec not in SECTIONS:
        raise _unknown(where, key, key, [*SECTIONS, *TOP_KEYS])
    if not name:
        raise RecipeError(f"{where}: {sec} is a section; set its keys as --{sec}.KEY=VALUE")
    if name not in SECTIONS[sec]:
        raise _unknown(where, key, name, SECTIONS[sec])
    return SECTIONS[sec][name]


def _typed_recipe(raw: dict, source: str) -> dict:
    recipe = {}
    for key, value in raw.items():
        if key in TOP_KEYS or key not in SECTIONS:
            recipe[key] = typed(value, _key_type(source, key), f"{source}: {key}")
            continue
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {key}: expected a mapping, got {type(value).__name__}")
        recipe[key] = {k: typed(v, _key_type(source, f"{key}.{k}"), f"{source}: {key}.{k}") for k, v in value.items()}
    return recipe


def _apply_override(recipe: dict, arg: str) -> None:
    if not arg.startswith("--") or "=" not in arg:
        raise RecipeError(f"{CLI}: override {arg!r} must look like --section.key=value")
    key, raw = arg[2:].split("=", 1)
    value = typed(raw, _key_type(f"{CLI} --{key}", key), f"{CLI} --{key}")
    if "." in key:
        sec, name = key.split(".", 1)
        recipe.setdefault(sec, {})[name] = value
    else:
        recipe[key] = value


def _check(recipe: dict, source: str) -> None:
    gen = recipe.get("generate", {})
    if "prompts" not in gen or not gen.get("pool"):
        raise RecipeError(f"{source}: generate.prompts and generate.pool (name: model_dir) are required")
    if recipe.get("binarize", {}).get("score", "auto") not in SCORES:
        raise RecipeError(f"{source}: binarize.score must be one of {SCORES}")


def load_recipe(path: str, overrides=()) -> dict:
    """Read an AIF recipe (``yaml.safe_load``, alias budget) and apply ``--section.key=value`` overrides.

    Returns ``{"output_dir": ..., "generate": {...}, "judge": {...}, "binarize": {...}, "train": {...}}``
    with every value of its key's type (only the keys the recipe or the overrides set).
    """
    with open(path, "rb") as f:
        try:
            raw = safe_yaml.load(f, path) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a YAML mapping")
    recipe = _typed_recipe(raw, path)
    for arg in overrides:
        _apply_override(recipe, arg)
    _check(recipe, path)
    return recipe
