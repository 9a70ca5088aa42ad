"""Typed recipe configuration: YAML (flat TRL/alignment-handbook style or sectioned) + ``--key=value``.

A recipe is one YAML mapping. Keys may be flat (``learning_rate: 5.0e-7``, as in the
alignment-handbook recipes) or grouped under the section names ``model:``, ``data:``,
``training:``, ``dpo:``; both resolve to the same :class:`Config`. Field names are unique across
sections, so a flat key always has exactly one home. Legacy names are accepted as aliases
(``max_seq_length`` -> ``max_length``, ``torch_dtype`` -> ``dtype``, ...). A handful of TRL /
transformers keys that have no effect here (hub pushing, logging backends, ...) are accepted and
ignored so that published recipes load unchanged; anything else unknown is an error with a
did-you-mean suggestion.

Each section is the dataclass of the layer that owns it, and checks its own values once, when it
is built: ``data`` is ``zephyr_fast.data.loading.DataConfig``, ``dpo`` is the DPO stage's
``DPOConfig`` (checked by ``zephyr_kernels.check_dpo_args``), ``model`` / ``training`` live here.
:class:`Config` derives the one value that spans sections, the micro-batch token budget.

Nothing here executes code from the file: ``yaml.safe_load`` only, ``trust_remote_code`` refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from zephyr_kernels.dispatch import IMPLS

from zephyr_fast.data.loading import DataConfig
from zephyr_fast.training.stages import STAGES, DPOConfig, stage_class

# transformers' names; the ones beyond the first four are built by transformers.get_scheduler
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr", "inverse_sqrt",
              "polynomial", "warmup_stable_decay")
# the bitsandbytes ones (paged / 8-bit) need CUDA and bitsandbytes: refused at start otherwise
OPTIMIZERS = ("adamw", "adamw_torch", "adamw_torch_fused", "adam", "rmsprop", "sgd",
              "paged_adamw_32bit", "paged_adamw_8bit", "adamw_bnb_8bit", "adamw_8bit")
DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("no", "steps", "epoch")


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the file and key."""


def _check(cond: bool, key: str, msg: str) -> None:
    """A section's own check: ``ValueError("key: msg")`` (``build_config`` adds the recipe path)."""
    if not cond:
        raise ValueError(f"{key}: {msg}")


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass
class ModelConfig:
    model_name_or_path: Optional[str] = None  # None: random init from ``model_init`` (tiny runs)
    model_init: dict = field(default_factory=dict)  # kwargs for zephyr_fast.model.tiny_config
    tokenizer_name_or_path: Optional[str] = None  # default: model_name_or_path
    model_revision: str = "main"
    dtype: str = "float32"  # parameter dtype (alias torch_dtype)
    attn_implementation: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict = field(default_factory=dict)  # e.g. {use_reentrant: false}
    # QLoRA (bitsandbytes, CUDA only; refused at start elsewhere)
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = False
    use_liger_ops: bool = False  # Liger RMSNorm/SwiGLU/RoPE (CUDA only), never its loss
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self):
        _check(not self.trust_remote_code, "trust_remote_code",
               "is refused: zephyr_fast never executes code shipped with a model")
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.model_name_or_path is not None or bool(self.model_init), "model_init",
               "is required when model_name_or_path is not set (a random init needs its config)")
        _check(self.model_name_or_path is not None or self.tokenizer_name_or_path is not None,
               "tokenizer_name_or_path", "is required when model_name_or_path is not set (random init)")


@dataclass
class TrainingConfig:
    stage: str = "sft"
    output_dir: str = "outputs/run"
    seed: int = 42
    num_train_epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2.0e-5
    lr_scheduler_type: str = "cosine"
    lr_scheduler_kwargs: dict = field(default_factory=dict)  # e.g. {min_lr_rate: 0.1} (cosine_with_min_lr)
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    optim: str = "adamw_torch"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    bf16: bool = False  # DeepSpeed bf16 mixed precision (the model dtype is ``dtype``)
    fp16: bool = False  # refused: fp16 needs loss scaling; use bf16
    deepspeed: Optional[str] = None  # path to a DeepSpeed JSON; default ZeRO-3 when world > 1
    logging_steps: int = 10
    eval_strategy: str = "no"  # no | steps | epoch (alias evaluation_strategy)
    eval_steps: int = 0
    save_strategy: str = "steps"  # no | steps | epoch
    save_steps: int = 0  # 0: only the final save
    save_total_limit: Optional[int] = 2  # None: keep every checkpoint (HF's default)
    resume_from_checkpoint: Optional[str] = None  # auto | PATH
    report_to: list = field(default_factory=lambda: ["tensorboard"])  # tensorboard | wandb | none
    run_name: Optional[str] = None  # wandb run name (default: the output_dir's name)
    wandb_project: Optional[str] = None  # default: $WANDB_PROJECT or "zephyr_fast"
    wandb_entity: Optional[str] = None
    wandb_run_group: Optional[str] = None
    # Hub upload of the exported model (huggingface_hub); checked at start, not at the end
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None  # default: the output_dir's name under the token's user
    hub_strategy: str = "every_save"  # end | every_save | checkpoint | all_checkpoints
    hub_private_repo: Optional[bool] = None
    hub_model_revision: Optional[str] = None  # branch to push to (default: main)
    hub_token: Optional[str] = None  # default: $HF_TOKEN / the cached login
    peak_tflops: float = 0.0  # per device, for MFU; 0: detect from the CUDA card name
    kernel_impl: str = "auto"  # zephyr_kernels dispatch: one of zephyr_kernels.dispatch.IMPLS
    packing: bool = True  # always packed (padding-free); false is refused
    save_final_model: bool = True

    def __post_init__(self):
        names = tuple(STAGES)
        _check(self.stage in STAGES, "stage",
               f"must be one of {names}, got {self.stage!r}{_suggest(self.stage, names)}")
        _check(self.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type",
               f"must be one of {SCHEDULERS}, got {self.lr_scheduler_type!r}")
        _check(self.optim in OPTIMIZERS, "optim", f"must be one of {OPTIMIZERS}, got {self.optim!r}")
        _check(self.learning_rate >= 0, "learning_rate", f"must be >= 0, got {self.learning_rate}")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        for key in ("gradient_accumulation_steps", "per_device_train_batch_size"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs", "or max_steps must be > 0")
        for key in ("eval_strategy", "save_strategy"):
            _check(getattr(self, key) in STRATEGIES, key, f"must be no | steps | epoch, got {getattr(self, key)!r}")
        _check(self.eval_strategy != "steps" or self.eval_steps > 0, "eval_steps",
               "must be > 0 when eval_strategy is 'steps'")
        _check(not self.fp16, "fp16", "is not supported (fp16 training needs loss scaling); use bf16: true")
        _check(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        _check(self.packing, "packing",
               "zephyr_fast always trains on padding-free packed batches; remove packing: false")
        _check(self.kernel_impl in IMPLS, "kernel_impl", f"must be {' | '.join(IMPLS)}, got {self.kernel_impl!r}")
        _check(self.deepspeed is None or os.path.isfile(self.deepspeed), "deepspeed",
               f"file not found: {self.deepspeed!r}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "training": TrainingConfig, "dpo": DPOConfig}


@dataclass
class Config:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    source: Optional[str] = None  # the recipe path (for messages and the model card)

    def __post_init__(self):
        """The cross-section values: the micro-batch token budget (derived here and nowhere else)."""
        stage, d = stage_class(self.training.stage), self.data
        k = stage.tokens_per_example  # max_length-long sequences per example (a DPO pair: 2)
        if d.max_tokens_per_batch is None:  # HF-style batch sizes -> a packed token budget
            d.max_tokens_per_batch = self.training.per_device_train_batch_size * d.max_length * k
        _check(d.max_tokens_per_batch >= d.max_length * k, "max_tokens_per_batch",
               f"must hold one sequence of max_length ({k} per {stage.name} example: >= {k * d.max_length}), "
               f"got {d.max_tokens_per_batch} with max_length={d.max_length}")
        stage.check(d)

    def to_dict(self) -> dict:  # noqa: D102 - sections only (source is bookkeeping)
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}

    def save(self, path: str) -> None:
        """Write the resolved config (sectioned YAML) -- loadable again with :func:`load_config`."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            if self.source:
                f.write(f"# resolved from {self.source}\n")
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


# Legacy / TRL / alignment-handbook names -> ours. A value of None in IGNORED means "accepted, no effect".
ALIASES = {
    "max_seq_length": "max_length",
    "torch_dtype": "dtype",
    "evaluation_strategy": "eval_strategy",
    "attn_impl": "attn_implementation",
    "layout": "dpo_layout",
    "precompute_ref_logps_dir": "ref_logps_dir",
}
IGNORED = {
    "bf16_full_eval", "do_eval", "do_train", "log_level", "logging_strategy", "logging_first_step", "overwrite_output_dir",
    "remove_unused_columns", "save_only_model",
    "dataloader_num_workers", "ddp_timeout", "tf32", "use_flash_attention_2", "optim_args",
    "include_tokens_per_second", "dataset_kwargs", "precompute_ref_log_probs", "force_use_ref_model",
    "model_init_kwargs",
    "dataset_text_field", "eval_accumulation_steps", "preprocessing_num_workers", "dataset_num_proc",
    "ddp_find_unused_parameters",
}

# Flat keys that legitimately exist in several sections and are set in all of them.
SHARED_KEYS = {"seed"}


def _field_index() -> dict:
    """Flat key -> list of section names; only SHARED_KEYS may live in more than one section."""
    index: dict = {}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in index and f.name not in SHARED_KEYS:
                raise AssertionError(f"config field {f.name!r} defined in both {index[f.name]} and {sec}")
            index.setdefault(f.name, []).append(sec)
    return index


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


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


def _coerce(value, tp, where: str):
    """Coerce ``value`` (already YAML-parsed) to annotation ``tp``; raise ConfigError naming ``where``."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for a in args[:-1]:
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        return _coerce(value, args[-1], where)
    out = _convert(value, tp)
    if out is _NO:
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{where}: expected {name}, got {value!r} ({type(value).__name__})")
    return out


def _parse_override(arg: str, where: str):
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"{where}: override {arg!r} must look like --key=value")
    key, raw = arg[2:].split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.replace("-", "_"), value


def build_config(raw: dict, *, source: str = "<dict>", overrides=()) -> Config:
    """Resolve a flat or sectioned mapping (+ ``--key=value`` strings) into a validated Config."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    kwargs = _section_kwargs(_flatten(raw, source, overrides))
    try:  # every section checks its own values; Config the cross-section ones
        return Config(**{sec: cls(**kwargs[sec]) for sec, cls in SECTIONS.items()}, source=source)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from e


def _flatten(raw: dict, source: str, overrides) -> dict:
    """``{(section, key): (value, where)}`` from the recipe then the overrides (aliases resolved)."""
    index = _field_index()
    known = set(index) | set(ALIASES) | IGNORED | set(SECTIONS)
    flat: dict = {}

    def put(key, value, where):
        sec_hint = None
        if "." in key:
            sec_hint, key = key.split(".", 1)
            if sec_hint not in SECTIONS:
                raise ConfigError(f"{where}: unknown section {sec_hint!r}{_suggest(sec_hint, SECTIONS)}")
        key = ALIASES.get(key, key)
        if key in IGNORED:
            return
        if key not in index:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, known)}")
        if sec_hint is not None and sec_hint not in index[key]:
            raise ConfigError(f"{where}: key {key!r} belongs to section {index[key][0]!r}, not {sec_hint!r}")
        for sec in ([sec_hint] if sec_hint else index[key]):
            flat[(sec, key)] = (value, where)

    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                put(f"{key}.{k}", v, f"{source}: {key}.{k}")
        else:
            put(str(key), value, f"{source}: {key}")
    for arg in overrides:
        key, value = _parse_override(arg, "command line")
        put(key, value, f"command line --{key}")
    return flat


def _section_kwargs(flat: dict) -> dict:
    """``{section: {key: value coerced to the field's type}}``."""
    kwargs: dict = {sec: {} for sec in SECTIONS}
    for (sec, key), (value, where) in flat.items():
        if key == "dtype" and value in (None, "auto"):  # HF: "the checkpoint's dtype" -> bf16 runs stay bf16
            bf16 = flat.get(("training", "bf16"), (False, ""))[0]
            value = "bfloat16" if _coerce(bf16, bool, where) else "float32"
        kwargs[sec][key] = _coerce(value, _field_types(SECTIONS[sec])[key], where)
    return kwargs


def load_config(path: str, overrides=()) -> Config:
    """Read a recipe (``yaml.safe_load``) and apply ``--key=value`` overrides."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: recipe file not found")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return build_config(raw or {}, source=path, overrides=list(overrides))


def config_hash(cfg: Config) -> str:
    """Short hash of the resolved sections (a checkpoint records the config it was written by)."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
