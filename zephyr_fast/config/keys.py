"""What every alignment-handbook / TRL / transformers recipe key becomes in zephyr_fast.

:mod:`zephyr_fast.config` owns the typed sections; this module owns the keys that are *not* a
field of one of them (the stage of a recipe is read by :mod:`zephyr_fast.config.values`):

* :data:`ALIASES` -- another name for a field (``max_seq_length`` -> ``max_length``).
* :data:`ALWAYS` -- a TRL switch whose one value is what zephyr_fast always does (``padding_free:
  true``); the other value is refused, saying what zephyr_fast does instead.
* :data:`NO_EFFECT` -- keys that cannot change a result (worker counts, log verbosity, ...): accepted,
  and the run prints one notice listing them with the reason (``Config.notices``).
* :data:`REFUSED` and :data:`OBJECTIVE_KEYS` -- refused in one line saying what to use instead.
* translations: ``use_flash_attention_2``, ``model_init_kwargs``, ``dataset_kwargs`` and TRL's
  ``dataset_name`` / ``dataset_config`` / ``dataset_train_split`` / ``dataset_test_split``.
* :data:`HF_DEFAULTS` -- transformers' / TRL's defaults of the result-setting keys: a recipe that leaves
  one out where zephyr_fast's default differs gets a notice (:func:`default_notices`).

It also reads a value as its key's type (:func:`typed`): a YAML value is coerced, a command-line
value parsed from its text by that type (never as YAML: ``--eval_strategy=no`` is the string "no").
Nothing here imports the sections; :mod:`zephyr_fast.config.loader` passes them in.
"""

from __future__ import annotations

import difflib
import math
import os
import typing
from typing import Optional

import yaml

from zephyr_fast import safe_yaml
from zephyr_fast.config import trl as trl_keys

CLI = "command line"  # the ``where`` of a command-line value: "command line --key"


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the file and key."""


def did_you_mean(key: str, known, cutoff: float = 0.8) -> str:
    """``; did you mean 'x'?`` only for a really close name (a typo), else nothing."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


# --- values: a key's value as its field's type -------------------------------------------------

_NO = object()  # "this value does not convert"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _to_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    return bool(value) if isinstance(value, int) and value in (0, 1) else _NO


def _to_number(value, tp):
    """int / float from a number or a numeric string; never from a bool; a float only if integral for int."""
    if isinstance(value, bool):
        return _NO
    if isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            return _NO
    if tp is int and isinstance(value, float):
        return int(value) if value.is_integer() else _NO
    return tp(value) if isinstance(value, (int, float)) else _NO


def _to_str(value):
    return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else _NO


def _to_list(value):
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else _NO


def _convert(value, tp):
    """``value`` as annotation ``tp`` (not a Union), or ``_NO``."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return _to_bool(value)
    if tp in (int, float):
        return _to_number(value, tp)
    if tp is str:
        return _to_str(value)
    if tp is list or origin is list:
        return _to_list(value)
    if tp is dict or origin is dict:
        return value if isinstance(value, dict) else _NO
    return value  # Any, and the data layer's own annotations: trust YAML's typing


def optional(tp) -> bool:
    """Whether annotation ``tp`` admits None."""
    return typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)


def coerce(value, tp, where: str):
    """Coerce ``value`` (already YAML-parsed) to annotation ``tp``; raise ConfigError naming ``where``."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for a in args[:-1]:
            try:
                return coerce(value, a, where)
            except ConfigError:
                continue
        return coerce(value, args[-1], where)
    out = _convert(value, tp)
    if out is _NO:
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{where}: expected {name}, got {value!r} ({type(value).__name__})")
    return out


def _yaml_or_text(raw: str):
    try:
        return safe_yaml.load(raw, CLI)
    except yaml.YAMLError:
        return raw
    except safe_yaml.YamlBudgetError as e:
        raise ConfigError(str(e)) from None


def _from_text(raw: str, tp, where: str):
    """A command-line value parsed by the key's type, not as YAML: ``--eval_strategy=no`` is "no".

    bool / int / float / str from the text; ``none`` / ``null`` for an Optional key; a list from
    ``a,b`` or ``[a, b]``; a dict from a YAML / JSON mapping; anything else as YAML.
    """
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.strip().lower() in ("none", "null", "~"):
            return None
        if len(args) > 1:
            return coerce(_yaml_or_text(raw), tp, where)
        tp = args[0]
    if tp in (bool, int, float, str):
        return coerce(raw, tp, where)
    if tp is list or typing.get_origin(tp) is list:
        return coerce(_yaml_or_text(raw) if raw.lstrip().startswith("[") else raw, tp, where)
    if tp is dict or typing.get_origin(tp) is dict:
        value = _yaml_or_text(raw)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a YAML / JSON mapping such as {{a: 1}}, got {raw!r}")
        return value
    return coerce(_yaml_or_text(raw), tp, where)


def typed(value, tp, where: str):
    """``value`` as type ``tp``: a command-line string is parsed by type, a YAML value coerced."""
    if where.startswith(CLI) and isinstance(value, str):  # (a translated key's value is typed already)
        return _from_text(value, tp, where)
    return coerce(value, tp, where)


# --- keys ---------------------------------------------------------------------------------------

ALIASES = {
    "max_seq_length": "max_length",
    "torch_dtype": "dtype",
    "evaluation_strategy": "eval_strategy",
    "attn_impl": "attn_implementation",
    "layout": "dpo_layout",
    "precompute_ref_logps_dir": "ref_logps_dir",
    **trl_keys.MORE_ALIASES,
}

# key -> (the only value zephyr_fast implements, what it does)
ALWAYS = {
    "padding_free": (True, "zephyr_fast always trains on padding-free packed batches"),
    "use_liger_kernel": (True, "zephyr_fast always computes the loss with its fused zephyr_kernels head "
                               "(Liger's RMSNorm/SwiGLU/RoPE kernels: use_liger_ops)"),
    "precompute_ref_log_probs": (True, "zephyr_fast always precomputes the reference log-probs (stage ref_logps) "
                                       "and never holds a reference model"),
    "average_tokens_across_devices": (True, "zephyr_fast always divides the loss by the step's global token count"),
    "packing_strategy": (("bfd", "ffd"), "zephyr_fast packs best-fit-decreasing, which fills bins at least as "
                                         "tightly as first-fit-decreasing"),
    "logging_strategy": ("steps", "zephyr_fast logs every logging_steps optimiser steps"),
}

# key -> why it cannot change a result (printed once at the start of the run)
NO_EFFECT = {
    "log_level": "zephyr_fast's log lines are fixed (rank 0)",
    "dataloader_num_workers": "batches are packed in memory before training; there is no DataLoader",
    "dataset_num_proc": "tokenising runs in the main process; the rows do not depend on it",
    "preprocessing_num_workers": "tokenising runs in the main process; the rows do not depend on it",
    "ddp_timeout": "zephyr_fast keeps torch.distributed's default timeout",
    "ddp_find_unused_parameters": "every parameter takes part in every step",
    "remove_unused_columns": "a stage only ever reads its own columns",
    "do_train": "the stage always trains",
    "do_eval": "evaluation follows eval_strategy",
    "bf16_full_eval": "evaluation runs in the model's dtype",
    "eval_accumulation_steps": "evaluation sums its metrics on the host step by step",
    "include_tokens_per_second": "throughput is always logged (train_tokens_per_second)",
    "save_only_model": "checkpoints always hold the optimiser state so that they resume",
    "force_use_ref_model": "the reference log-probs always come from ref_model_name_or_path (default: the model)",
    "trust_remote_code": "zephyr_fast never executes code shipped with a model: it stays off, and the model's "
                         "family must be one built into transformers (SmolLM3, Qwen3, Gemma 3, ... are)",
    **trl_keys.MORE_NO_EFFECT,
}

REFUSED = {
    "optim_args": "set adam_beta1 / adam_beta2 / adam_epsilon / weight_decay instead",
    "use_reentrant": "set gradient_checkpointing_kwargs: {use_reentrant: ...} instead",
}

# keys of objectives zephyr_fast does not implement -> the objective
OBJECTIVE_KEYS = {
    "desirable_weight": "KTO", "undesirable_weight": "KTO", "cpo_alpha": "CPO", "simpo_gamma": "SimPO",
    "prompt_sample_size": "BCO", "min_density_ratio": "BCO", "max_density_ratio": "BCO",
    "orpo_alpha": "ORPO", "num_generations": "GRPO", "reward_funcs": "GRPO", "kl_coef": "PPO",
    "cliprange": "PPO", "vf_coef": "PPO", "reward_model_path": "PPO/RLOO", "rloo_k": "RLOO",
}
# alignment-handbook keeps a recipe under a folder named after the script that runs it
OBJECTIVE_DIRS = {"orpo": "ORPO", "kto": "KTO", "cpo": "CPO", "simpo": "SimPO", "bco": "BCO", "ppo": "PPO",
                  "grpo": "GRPO", "rloo": "RLOO", "cpt": "continued pretraining on raw text (run_cpt.py)"}

# model_init_kwargs entries -> the recipe key they become
MODEL_INIT_KWARGS = {"torch_dtype": "dtype", "dtype": "dtype", "attn_implementation": "attn_implementation",
                     "revision": "model_revision", "trust_remote_code": "trust_remote_code",
                     "use_flash_attention_2": "use_flash_attention_2"}
# TRL ScriptArguments -> one dataset_mixer entry
DATASET_KEYS = ("dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split")
TRANSLATED = ("use_flash_attention_2", "model_init_kwargs", "dataset_kwargs") + DATASET_KEYS
STEP_KEYS = ("save_steps", "eval_steps", "logging_steps")

# transformers TrainingArguments / TRL defaults of the keys that set a result: a recipe that leaves one
# out gets zephyr_fast's default, and a notice when that differs (see default_notices)
HF_DEFAULTS = {
    "learning_rate": 5.0e-5, "num_train_epochs": 3.0, "lr_scheduler_type": "linear", "warmup_ratio": 0.0,
    "warmup_steps": 0, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "optim": "adamw_torch",
    "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 42, "max_length": 1024,
    "max_prompt_length": 512, "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
}



def extra_keys() -> set:
    """Every accepted key that is not a section field (for did-you-mean and ``--help``)."""
    return set(ALIASES) | set(ALWAYS) | set(NO_EFFECT) | set(TRANSLATED) | set(trl_keys.UNSET_ONLY)


def check_always(key: str, value) -> None:
    """``ValueError`` unless ``value`` is what zephyr_fast always does for ``key``."""
    want, what = ALWAYS[key]
    if value not in (want if isinstance(want, tuple) else (want,)):
        raise ValueError(f"{key}: {value!r} is not supported: {what} ({key}: {want!r}); remove it")


def check_step_count(key: str, value, where: str) -> None:
    """A number of optimiser steps, or HF's fraction of the run (``save_steps: 0.5``, in (0, 1)); a
    non-integral count above 1 means neither."""
    if isinstance(value, float) and value > 1 and not value.is_integer():
        raise ConfigError(f"{where}: must be a number of optimiser steps or a fraction of the run in (0, 1), "
                          f"got {value}")


def steps_every(value, total_steps: int) -> int:
    """``logging_steps`` / ``eval_steps`` / ``save_steps`` as a step count: a fraction ``0 < value < 1``
    of the run is ``ceil(value x total_steps)`` (transformers' rule), anything else the count itself."""
    return math.ceil(value * total_steps) if 0 < value < 1 else int(value)


def objective_key(key: str) -> Optional[str]:
    """The one-line refusal for a key of an objective zephyr_fast does not implement, or None."""
    if key not in OBJECTIVE_KEYS:
        return None
    return (f"{key}: is a {OBJECTIVE_KEYS[key]} key; that objective is not implemented "
            "(zephyr_fast trains sft | ref_logps | dpo)")


def objective_of_path(path: str) -> Optional[str]:
    """The refusal for an alignment-handbook recipe of another objective (``.../orpo/config.yaml``)."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if folder not in OBJECTIVE_DIRS:
        return None
    return (f"an alignment-handbook {OBJECTIVE_DIRS[folder]} recipe (folder {folder}/): that objective is not "
            "implemented (zephyr_fast trains sft | ref_logps | dpo)")


def extra_key(key: str, value, where: str) -> tuple:
    """What a key that is no section's field becomes: ``([(key, value, where)...] to set, notice or None)``.

    Raises ``ConfigError`` naming ``where`` when the key is refused, ``KeyError`` when it is unknown.
    TRL's dataset keys are not handled here (they combine: :func:`translate_dataset`).
    """
    try:
        return _extra_key(key, value, where)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where}: {str(e).removeprefix(key + ': ')}") from None


def _extra_key(key: str, value, where: str) -> tuple:
    refusal = REFUSED.get(key) or objective_key(key)
    if refusal and not trl_keys.unset(value):  # a config dumped from TRL holds them unset: no effect
        raise ValueError(refusal)
    if refusal or key in trl_keys.UNSET_ONLY:
        if key in trl_keys.UNSET_ONLY:
            trl_keys.check_unset_only(key, value)
        return [], None
    if key in ALWAYS:
        want = ALWAYS[key][0]
        value = typed(value, type(want[0] if isinstance(want, tuple) else want), where)
        if key in trl_keys.EQUIVALENT and value != want:
            return [], f"{key}: {value!r} -> {want!r}: {trl_keys.EQUIVALENT[key][1]}"
        check_always(key, value)
        return [], None
    if key in NO_EFFECT:
        return [], f"{key}: {NO_EFFECT[key]}"
    if key in ("model_init_kwargs", "dataset_kwargs") and trl_keys.unset(value):  # TRL's default: None
        return [], None
    if key == "use_flash_attention_2":
        return [(k, v, where) for k, v in flash_attention(typed(value, bool, where)).items()], None
    if key == "model_init_kwargs":
        return model_init_kwargs(typed(value, dict, where), where), None
    if key == "dataset_kwargs":
        kw = typed(value, dict, where)
        dataset_kwargs(kw)
        return [], dataset_kwargs_notice(kw)
    raise KeyError(key)


def model_init_kwargs(kwargs: dict, where: str) -> list:
    """TRL's ``model_init_kwargs`` -> the recipe keys of the entries that have a home here."""
    out = []
    for sub, value in kwargs.items():
        if sub not in MODEL_INIT_KWARGS:
            raise ConfigError(f"{where}.{sub}: has no zephyr_fast equivalent (model_init_kwargs takes "
                              f"{', '.join(MODEL_INIT_KWARGS)}); remove it")
        out.append((MODEL_INIT_KWARGS[sub], value, f"{where}.{sub}"))
    return out


def flash_attention(value: bool) -> dict:
    """``use_flash_attention_2`` (transformers < 4.36) -> ``attn_implementation``."""
    return {"attn_implementation": "flash_attention_2" if value else "sdpa"}


def dataset_kwargs(value: dict) -> dict:
    """TRL's SFT ``dataset_kwargs``: only the values that describe what zephyr_fast does are accepted."""
    unknown = sorted(set(value) - {"add_special_tokens", "append_concat_token", "skip_prepare_dataset"})
    if unknown:
        raise ValueError(f"dataset_kwargs: {unknown[0]!r} has no zephyr_fast equivalent; remove it")
    if value.get("append_concat_token"):
        raise ValueError("dataset_kwargs: append_concat_token: true is not supported: packed sequences are kept "
                         "apart by segment ids, never joined by a token; remove it")
    if value.get("skip_prepare_dataset"):
        raise ValueError("dataset_kwargs: skip_prepare_dataset: true is not supported: zephyr_fast always "
                         "tokenises the rows itself; remove it")
    return {}


def dataset_kwargs_notice(value: dict) -> Optional[str]:
    """``add_special_tokens`` is decided per tokenizer (no double BOS), whatever the recipe says."""
    if "add_special_tokens" not in value:
        return None
    return ("dataset_kwargs.add_special_tokens: BOS is added once, only when the chat template does not emit it "
            "(zephyr_fast.data.chat.tokenize_kwargs)")


def translate_dataset(values: dict) -> dict:
    """TRL's ``dataset_name`` (+ config / train / test split) -> ``dataset_mixer`` + ``dataset_splits``."""
    if "dataset_name" not in values:
        raise ValueError(f"{next(iter(values))}: needs dataset_name (TRL ScriptArguments)")
    train = str(values.get("dataset_train_split", "train"))
    test = str(values.get("dataset_test_split", "test"))
    for key, split, part in (("dataset_train_split", train, "train"), ("dataset_test_split", test, "test")):
        if part not in split:
            raise ValueError(f"{key}: split {split!r} must contain {part!r} (zephyr_fast tells train from test "
                             "rows by the split's name)")
    out = {"dataset_mixer": {str(values["dataset_name"]): 1.0}, "dataset_splits": [train, test]}
    if values.get("dataset_config") is not None:
        out["dataset_configs"] = [str(values["dataset_config"])]
    return out


def default_notices(values: dict, seen, unused) -> list:
    """``"key: not set; ..."`` for each :data:`HF_DEFAULTS` key the recipe leaves out whose zephyr_fast
    default (``values[key]``) differs from transformers' / TRL's (not for the ``unused`` keys: those
    the run's stage does not read)."""
    out = []
    for key, hf in HF_DEFAULTS.items():
        if key in seen or key in unused or values[key] == hf:
            continue
        out.append(f"{key}: not set, so zephyr_fast's default {values[key]!r} (transformers / TRL: {hf!r})")
    return out
