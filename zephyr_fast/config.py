"""Typed recipe configuration: YAML (flat TRL/alignment-handbook style or sectioned) + ``--key=value``.

A recipe is one YAML mapping. Keys may be flat (``learning_rate: 5.0e-7``, as in the
alignment-handbook recipes) or grouped under the section names ``model:``, ``data:``,
``training:``, ``dpo:``; both resolve to the same :class:`Config`. Field names are unique across
sections, so a flat key always has exactly one home. Legacy names are accepted as aliases
(``max_seq_length`` -> ``max_length``, ``torch_dtype`` -> ``dtype``, ...). A handful of TRL /
transformers keys that have no effect here (hub pushing, logging backends, ...) are accepted and
ignored so that published recipes load unchanged; anything else unknown is an error with a
did-you-mean suggestion.

The data section is the data layer's own dataclass (``zephyr_fast.data.loading.DataConfig``), so
the dataset-mixture options live in one place.

Nothing here executes code from the file: ``yaml.safe_load`` only, ``trust_remote_code`` refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os

from zephyr_kernels.dispatch import IMPLS
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

STAGES = ("sft", "ref_logps", "dpo")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw", "adamw_torch", "adamw_torch_fused", "adam", "rmsprop", "sgd")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the file and key."""


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
    use_liger_ops: bool = False  # Liger RMSNorm/SwiGLU/RoPE (CUDA only), never its loss
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainingConfig:
    stage: str = "sft"
    output_dir: str = "outputs/run"
    seed: int = 42
    num_train_epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2.0e-5
    lr_scheduler_type: str = "cosine"
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
    deepspeed: Optional[str] = None  # path to a DeepSpeed JSON; default ZeRO-3 when world > 1
    logging_steps: int = 10
    eval_strategy: str = "no"  # no | steps | epoch (alias evaluation_strategy)
    eval_steps: int = 0
    save_strategy: str = "steps"  # no | steps | epoch
    save_steps: int = 0  # 0: only the final save
    save_total_limit: int = 2
    resume_from_checkpoint: Optional[str] = None  # auto | PATH
    report_to: list = field(default_factory=lambda: ["tensorboard"])
    peak_tflops: float = 0.0  # per device, for MFU; 0: detect from the CUDA card name
    kernel_impl: str = "auto"  # zephyr_kernels dispatch: auto | triton | torch
    packing: bool = True  # always packed (padding-free); false is refused
    save_final_model: bool = True


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: Optional[float] = None
    ref_logps_dir: Optional[str] = None  # default: {output_dir}/ref_logps
    ref_logps_max_tokens: int = 0  # micro-batch budget of the no-grad pass; 0: 4x the training one
    ref_logps_recompute: bool = False  # overwrite a stale cache instead of refusing it
    ref_model_name_or_path: Optional[str] = None  # stage ref_logps only; default: the model


def _data_config_cls():
    from zephyr_fast.data.loading import DataConfig  # the data layer owns its config

    return DataConfig


SECTIONS = ("model", "data", "training", "dpo")


def _section_classes() -> dict:
    return {"model": ModelConfig, "data": _data_config_cls(), "training": TrainingConfig, "dpo": DPOConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    source: Optional[str] = None  # the recipe path (for messages and the model card)

    explicit: frozenset = frozenset()  # keys the recipe / command line set (the rest are defaults)

    def to_dict(self) -> dict:  # noqa: D102 - sections only (source/explicit are bookkeeping)
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
    "bf16_full_eval", "do_eval", "do_train", "hub_model_id", "hub_strategy", "hub_private_repo",
    "push_to_hub", "log_level", "logging_strategy", "logging_first_step", "overwrite_output_dir",
    "remove_unused_columns", "run_name", "gradient_checkpointing_kwargs", "save_only_model",
    "dataloader_num_workers", "ddp_timeout", "tf32", "use_flash_attention_2", "optim_args",
    "include_tokens_per_second", "dataset_kwargs", "precompute_ref_log_probs", "force_use_ref_model",
    "model_init_kwargs", "load_in_4bit", "load_in_8bit", "use_bnb_nested_quant", "bnb_4bit_quant_type",
    "dataset_text_field", "eval_accumulation_steps", "fp16", "preprocessing_num_workers", "dataset_num_proc",
    "hub_model_revision", "wandb_project", "ddp_find_unused_parameters",
}


# Flat keys that legitimately exist in several sections and are set in all of them.
SHARED_KEYS = {"seed"}


def _field_index() -> dict:
    """Flat key -> list of section names; only SHARED_KEYS may live in more than one section."""
    index: dict = {}
    for sec, cls in _section_classes().items():
        for f in dataclasses.fields(cls):
            if f.name in index and f.name not in SHARED_KEYS:
                raise AssertionError(f"config field {f.name!r} defined in both {index[f.name]} and {sec}")
            index.setdefault(f.name, []).append(sec)
    return index


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _coerce(value, tp, where: str):
    """Coerce ``value`` (already YAML-parsed) to annotation ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for a in args[:-1]:
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        return _coerce(value, args[-1], where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:  # the data layer's own annotations: trust YAML's typing
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{where}: expected {name}, got {value!r} ({type(value).__name__})")


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


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

    classes = _section_classes()
    kwargs = {sec: {} for sec in SECTIONS}
    for (sec, key), (value, where) in flat.items():
        if key == "dtype" and value in (None, "auto"):  # HF: "the checkpoint's dtype" -> bf16 runs stay bf16
            bf16 = flat.get(("training", "bf16"), (False, ""))[0]
            value = "bfloat16" if _coerce(bf16, bool, where) else "float32"
        kwargs[sec][key] = _coerce(value, _field_types(classes[sec])[key], where)
    try:
        sections = {sec: classes[sec](**kwargs[sec]) for sec in SECTIONS}
    except (TypeError, ValueError) as e:  # the data layer's own validation
        raise ConfigError(f"{source}: {e}") from e
    cfg = Config(**sections, source=source, explicit=frozenset(k for _, k in flat))
    if "max_tokens_per_batch" not in cfg.explicit:
        # HF-style batch sizes -> a packed token budget; a DPO pair holds two completions
        factor = 1 if cfg.training.stage == "sft" else 2
        cfg.data.max_tokens_per_batch = cfg.training.per_device_train_batch_size * cfg.data.max_length * factor
    validate(cfg)
    return cfg


def _check(cond: bool, cfg: Config, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{cfg.source}: {key}: {msg}")


def validate(cfg: Config) -> None:
    m, t, d, data = cfg.model, cfg.training, cfg.dpo, cfg.data
    _check(t.stage in STAGES, cfg, "stage", f"must be one of {STAGES}, got {t.stage!r}{_suggest(t.stage, STAGES)}")
    _check(not m.trust_remote_code, cfg, "trust_remote_code",
           "is refused: zephyr_fast never executes code shipped with a model")
    _check(m.dtype in DTYPES, cfg, "dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
    _check(t.lr_scheduler_type in SCHEDULERS, cfg, "lr_scheduler_type",
           f"must be one of {SCHEDULERS}, got {t.lr_scheduler_type!r}")
    _check(t.optim in OPTIMIZERS, cfg, "optim", f"must be one of {OPTIMIZERS}, got {t.optim!r}")
    _check(t.learning_rate >= 0, cfg, "learning_rate", f"must be >= 0, got {t.learning_rate}")
    _check(0.0 <= t.warmup_ratio < 1.0, cfg, "warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    _check(data.max_length > 1, cfg, "max_length", f"must be > 1, got {data.max_length}")
    _check(t.gradient_accumulation_steps >= 1, cfg, "gradient_accumulation_steps",
           f"must be >= 1, got {t.gradient_accumulation_steps}")
    _check(t.per_device_train_batch_size >= 1, cfg, "per_device_train_batch_size",
           f"must be >= 1, got {t.per_device_train_batch_size}")
    _check(data.max_tokens_per_batch >= data.max_length * (1 if t.stage == "sft" else 2), cfg, "max_tokens_per_batch",
           f"must hold one sequence (>= max_length{'' if t.stage == 'sft' else ' x 2 for a DPO pair'}), got "
           f"{data.max_tokens_per_batch} with max_length={data.max_length}")
    _check(t.num_train_epochs > 0 or t.max_steps > 0, cfg, "num_train_epochs", "or max_steps must be > 0")
    _check(t.eval_strategy in ("no", "steps", "epoch"), cfg, "eval_strategy",
           f"must be no | steps | epoch, got {t.eval_strategy!r}")
    _check(t.eval_strategy != "steps" or t.eval_steps > 0, cfg, "eval_steps",
           "must be > 0 when eval_strategy is 'steps'")
    _check(t.save_strategy in ("no", "steps", "epoch"), cfg, "save_strategy",
           f"must be no | steps | epoch, got {t.save_strategy!r}")
    _check(t.save_total_limit is None or t.save_total_limit >= 1, cfg, "save_total_limit", "must be >= 1")
    _check(t.packing, cfg, "packing", "zephyr_fast always trains on padding-free packed batches; remove packing: false")
    _check(t.kernel_impl in IMPLS, cfg, "kernel_impl",
           f"must be {' | '.join(IMPLS)}, got {t.kernel_impl!r}")
    _check(t.deepspeed is None or os.path.isfile(t.deepspeed), cfg, "deepspeed",
           f"file not found: {t.deepspeed!r}")
    _check(d.beta > 0, cfg, "beta", f"must be > 0, got {d.beta}")
    from zephyr_kernels import LOSS_TYPES

    _check(d.loss_type in LOSS_TYPES, cfg, "loss_type",
           f"must be one of {LOSS_TYPES}, got {d.loss_type!r}{_suggest(d.loss_type, LOSS_TYPES)}")
    _check(0.0 <= d.label_smoothing < 0.5, cfg, "label_smoothing", f"must be in [0, 0.5), got {d.label_smoothing}")
    mpl = data.max_prompt_length
    _check(t.stage == "sft" or mpl is None or 0 < mpl < data.max_length, cfg, "max_prompt_length",
           f"must be in (0, max_length={data.max_length}), got {mpl}")
    _check(m.model_name_or_path is not None or bool(m.model_init), cfg, "model_init",
           "is required when model_name_or_path is not set (a random init needs its config)")
    _check(m.model_name_or_path is not None or m.tokenizer_name_or_path is not None, cfg,
           "tokenizer_name_or_path", "is required when model_name_or_path is not set (random init)")


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
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
