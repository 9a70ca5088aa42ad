"""Typed recipe configuration: YAML (flat TRL/alignment-handbook style or sectioned) + ``--key=value``.

A recipe is one YAML mapping. Keys may be flat (``learning_rate: 5.0e-7``, as in the
alignment-handbook recipes) or grouped under the section names ``model:``, ``data:``,
``training:``, ``dpo:``; both resolve to the same :class:`Config`. Field names are unique across
sections, so a flat key always has exactly one home. Every other key a published alignment-handbook /
TRL recipe uses is handled by :mod:`zephyr_fast.recipe_keys`: an alias, a translation, a value that
is what zephyr_fast always does, a key with no effect on results (accepted, and listed in
:attr:`Config.notices` for the run to print), or a one-line refusal saying what to use instead;
anything else unknown is an error with a did-you-mean suggestion. Nothing is silently ignored.

The stage is read from the recipe (:func:`zephyr_fast.recipe_keys.infer_stage`): handbook recipes
have no ``stage:`` key, their DPO keys (``beta``, ``loss_type``, ...) or preference data make them
``dpo``; an explicit ``stage`` the keys contradict is refused. Command-line values are parsed by
the key's type (``--eval_strategy=no`` is the string "no"), and their errors name
``command line --key`` even when a section's own check fails.

Each section is the dataclass of the layer that owns it, and checks its own values once, when it
is built: ``data`` is ``zephyr_fast.data.loading.DataConfig``, ``dpo`` is the DPO stage's
``DPOConfig`` (checked by ``zephyr_kernels.check_dpo_args``), ``model`` / ``training`` live here.
:class:`Config` derives the one value that spans sections, the micro-batch token budget.

Nothing here executes code from the file: ``yaml.safe_load`` only; ``trust_remote_code`` stays off whatever a
recipe says (a notice; the model's family must be built into transformers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml
from zephyr_kernels import LOSS_TYPES
from zephyr_kernels.dispatch import IMPLS

from zephyr_fast.fileio import atomic_open
from zephyr_fast import recipe_keys as rk
from zephyr_fast import redaction, safe_yaml, trl_keys
from zephyr_fast.recipe_keys import CLI, ConfigError, typed
from zephyr_fast.data.loading import DataConfig
from zephyr_fast.model.attention import BACKENDS
from zephyr_fast.model.load import check_model_init
from zephyr_fast.model.load import did_you_mean as _suggest  # a typo's nearest key
from zephyr_fast.training.stages import STAGES, DPOConfig, stage_class

# transformers' names; the ones beyond the first four are built by transformers.get_scheduler
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr", "inverse_sqrt",
              "polynomial", "warmup_stable_decay")
# the bitsandbytes ones (paged / 8-bit) need CUDA and bitsandbytes: refused at start otherwise
OPTIMIZERS = ("adamw", "adamw_torch", "adamw_torch_fused", "adam", "rmsprop", "sgd",
              "paged_adamw_32bit", "paged_adamw_8bit", "adamw_bnb_8bit", "adamw_8bit")
DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("no", "steps", "epoch")
MAX_EPOCHS = 1e6
# zephyr_fast's packed backends, and transformers' names that training.build._ATTN_ALIASES maps onto them
ATTN_IMPLEMENTATIONS = ("auto",) + tuple(BACKENDS) + ("flash_attention_2", "sdpa", "eager")


def _check(cond: bool, key: str, msg: str) -> None:
    """A section's own check: ``ValueError("key: msg")`` (``build_config`` adds the recipe path)."""
    if not cond:
        raise ValueError(f"{key}: {msg}")


@dataclass
class ModelConfig:
    model_name_or_path: Optional[str] = None  # None: random init from ``model_init`` (tiny runs)
    model_init: dict = field(default_factory=dict)  # kwargs for zephyr_fast.model.tiny_config
    tokenizer_name_or_path: Optional[str] = None  # default: model_name_or_path
    eos_token: Optional[str] = None  # replaces the tokenizer's EOS (TRL / SmolLM3: <|im_end|>)
    model_revision: str = "main"
    dtype: str = "float32"  # parameter dtype (alias torch_dtype)
    attn_implementation: str = "auto"
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
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.model_name_or_path is not None or bool(self.model_init), "model_init",
               "is required when model_name_or_path is not set (a random init needs its config)")
        _check(self.model_name_or_path is not None or self.tokenizer_name_or_path is not None,
               "tokenizer_name_or_path", "is required when model_name_or_path is not set (random init)")
        _check(self.attn_implementation in ATTN_IMPLEMENTATIONS, "attn_implementation",
               f"must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
               f"{_suggest(str(self.attn_implementation), ATTN_IMPLEMENTATIONS)}")
        if self.model_name_or_path is None:
            check_model_init(self.model_init)


@dataclass
class TrainingConfig:
    stage: Optional[str] = None  # None: inferred from the recipe's keys (recipe_keys.infer_stage)
    output_dir: str = "outputs/run"
    # TRL's key: write into a non-empty output_dir zephyr_fast did not create, or over (and rotating
    # away) an earlier run's checkpoints without resuming from them (zephyr_fast.outputs)
    overwrite_output_dir: bool = False
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
    tf32: Optional[bool] = None  # TF32 matmuls on CUDA (training.build.set_tf32); None: torch's default
    fp16: bool = False  # refused: fp16 needs loss scaling; use bf16
    deepspeed: Optional[str] = None  # a DeepSpeed JSON or an accelerate config (docs/LAUNCH.md); default ZeRO-3 when world > 1
    # step counts below 1 are fractions of the run's optimiser steps (HF: ceil(fraction x total))
    logging_steps: Union[int, float] = 10
    logging_first_step: bool = False  # also log the first optimiser step
    eval_strategy: str = "no"  # no | steps | epoch (alias evaluation_strategy)
    eval_steps: Union[int, float] = 0  # 0 (TRL: None) with eval_strategy steps: logging_steps, as HF
    eval_on_start: bool = False  # evaluate once before the first step (logged at step 0), as HF
    # HF: end with the weights of the checkpoint whose eval metric was best (kept whatever save_total_limit)
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None  # default "loss" (eval_loss); "eval_" is added as HF does
    greater_is_better: Optional[bool] = None  # default: False for a *loss metric, True otherwise
    save_strategy: str = "steps"  # no | steps | epoch
    save_steps: Union[int, float] = 0  # 0: only the final save
    save_total_limit: Optional[int] = 2  # None: keep every checkpoint (HF's default)
    resume_from_checkpoint: Optional[str] = None  # auto | PATH
    resume_allow_changes: bool = False  # resume although the config or data differ from the checkpoint's
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
    packing: bool = True  # false: exactly per_device_train_batch_size examples per micro-batch (still padding-free)
    # HF's label smoothing of the SFT cross-entropy: (1 - e) nll + e mean_v(-log p_v) (Szegedy et al. 2016);
    # DPO's own is dpo.label_smoothing (TRL's DPOTrainer does not apply this one either)
    label_smoothing_factor: float = 0.0
    use_cpu: bool = False  # train on the CPU even where CUDA is available (HF's key)
    save_final_model: bool = True

    def __post_init__(self):
        redaction.register(self.hub_token)  # masked in every message, log line and file from now on
        names = tuple(STAGES)
        _check(self.stage is None or self.stage in STAGES, "stage",
               f"must be one of {names}, got {self.stage!r}{_suggest(str(self.stage), names)}")
        _check(self.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type",
               f"must be one of {SCHEDULERS}, got {self.lr_scheduler_type!r}")
        _check(self.optim in OPTIMIZERS, "optim", f"must be one of {OPTIMIZERS}, got {self.optim!r}")
        _check(self.learning_rate >= 0, "learning_rate", f"must be >= 0, got {self.learning_rate}")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        self._check_ranges()
        for key in ("gradient_accumulation_steps", "per_device_train_batch_size"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs", "or max_steps must be > 0")
        for key in ("eval_strategy", "save_strategy"):
            _check(getattr(self, key) in STRATEGIES, key, f"must be no | steps | epoch, got {getattr(self, key)!r}")
        if self.eval_strategy == "steps" and self.eval_steps == 0:
            self.eval_steps = self.logging_steps  # HF: eval_steps defaults to logging_steps
        _check(0.0 <= self.label_smoothing_factor < 1.0, "label_smoothing_factor",
               f"must be in [0, 1), got {self.label_smoothing_factor}")
        _check(not self.fp16, "fp16", "is not supported (fp16 training needs loss scaling); use bf16: true")
        _check(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        _check(self.kernel_impl in IMPLS, "kernel_impl", f"must be {' | '.join(IMPLS)}, got {self.kernel_impl!r}")
        _check(self.deepspeed is None or os.path.isfile(self.deepspeed), "deepspeed",
               f"file not found: {self.deepspeed!r}")
        if self.load_best_model_at_end:
            self._check_best_model()

    def _check_best_model(self) -> None:
        """HF's rules: checkpoints are written where the metric is measured."""
        _check(self.eval_strategy != "no" and self.save_strategy == self.eval_strategy, "load_best_model_at_end",
               f"needs eval_strategy and save_strategy to be the same and not 'no' (got {self.eval_strategy!r} "
               f"and {self.save_strategy!r})")
        _check(self.save_strategy != "steps" or (self.save_steps > 0 and self.save_steps % self.eval_steps == 0),
               "load_best_model_at_end", f"needs save_steps ({self.save_steps}) to be a multiple of eval_steps "
               f"({self.eval_steps})")
        name = self.metric_for_best_model or "loss"
        self.metric_for_best_model = name if name.startswith("eval_") else f"eval_{name}"
        if self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    def _check_ranges(self) -> None:
        """Optimiser and step counts: a value transformers would take silently but that means nothing
        (a negative step count, a negative clipping norm) or that torch refuses mid-run (betas, eps);
        no float may be inf / nan, nor an epoch count beyond :data:`MAX_EPOCHS` (a step count that
        overflows when the plan is made)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                _check(math.isfinite(value), f.name, f"must be a finite number, got {value}")
        _check(self.num_train_epochs <= MAX_EPOCHS, "num_train_epochs", f"must be <= {MAX_EPOCHS:g}, got "
               f"{self.num_train_epochs:g} (use max_steps for an exact step count)")
        for key in ("weight_decay", "warmup_steps", *rk.STEP_KEYS):
            _check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        # HF clips only when max_grad_norm > 0: 0 turns clipping off, a negative one did so silently
        _check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        for key in ("adam_beta1", "adam_beta2"):
            _check(0.0 <= getattr(self, key) < 1.0, key, f"must be in [0, 1), got {getattr(self, key)}")
        _check(self.adam_epsilon > 0, "adam_epsilon", f"must be > 0, got {self.adam_epsilon}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "training": TrainingConfig, "dpo": DPOConfig}


@dataclass
class Config:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    source: Optional[str] = None  # the recipe path (for messages and the model card)
    # "key: why" for each accepted key that has no effect on results; the run prints them at start
    notices: list = field(default_factory=list)

    def __post_init__(self):
        """The cross-section values: the micro-batch token budget (derived here and nowhere else)."""
        if self.training.stage is None:  # built in code, not from a recipe: nothing to infer from
            self.training.stage = "sft"
        stage, d = stage_class(self.training.stage), self.data
        k = stage.tokens_per_example  # max_length-long sequences per example (a DPO pair: 2)
        if d.max_tokens_per_batch is None:  # HF-style batch sizes -> a packed token budget
            d.max_tokens_per_batch = self.training.per_device_train_batch_size * d.max_length * k
        _check(d.max_tokens_per_batch >= d.max_length * k, "max_tokens_per_batch",
               f"must hold one sequence of max_length ({k} per {stage.name} example: >= {k * d.max_length}), "
               f"got {d.max_tokens_per_batch} with max_length={d.max_length}")
        stage.check(d)

    def to_dict(self) -> dict:
        """The sections as plain dicts (``source`` is bookkeeping). Secrets are left out (``hub_token``
        -> None, the environment's / cached login is used again): this dict is what config.yaml, the
        model card, the wandb run config and the config hash see."""
        out = {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}
        out["training"]["hub_token"] = None
        return out

    def save(self, path: str) -> None:
        """Write the resolved config (sectioned YAML) -- loadable again with :func:`load_config`.

        An sft config leaves out the DPO keys at their defaults: written out, they would read as
        DPO keys contradicting ``stage: sft`` when the file is loaded again.
        """
        out = self.to_dict()
        if self.training.stage == "sft":
            _drop_dpo_defaults(out)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_open(path) as f:
            if self.source:
                f.write(f"# resolved from {self.source}\n")
            yaml.safe_dump(out, f, sort_keys=False)


def _defaults(cls) -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


def _drop_dpo_defaults(out: dict) -> None:
    """Remove the DPO-only values still at their defaults from a ``to_dict()`` (in place)."""
    dpo, data = _defaults(DPOConfig), _defaults(DataConfig)
    out["dpo"] = {k: v for k, v in out["dpo"].items() if v != dpo[k]}
    out["data"] = {k: v for k, v in out["data"].items() if k not in rk.DPO_DATA_KEYS or v != data[k]}
    if not out["dpo"]:
        del out["dpo"]


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


def _parse_override(arg: str):
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"{CLI}: override {arg!r} must look like --key=value")
    key, raw = arg[2:].split("=", 1)
    return key.replace("-", "_"), raw


def _blame(msg: str, seen: dict, source: str) -> ConfigError:
    """A check's ``"key: problem"`` as one line naming where ``key`` was set (recipe or command line)."""
    key, sep, rest = msg.partition(": ")
    if sep and key in seen:
        return ConfigError(f"{seen[key]}: {rest}")
    for k, where in seen.items():  # a message that names a command-line key elsewhere (the kernels' checks)
        if where.startswith(CLI) and re.search(rf"\b{re.escape(k)}\b", msg):
            return ConfigError(f"{where}: {msg}")
    return ConfigError(f"{source}: {msg}")


def build_config(raw: dict, *, source: str = "<dict>", overrides=()) -> Config:
    """Resolve a flat or sectioned mapping (+ ``--key=value`` strings) into a validated Config."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    refusal = rk.objective_of_path(source) if os.path.isfile(source) else None
    if refusal:
        raise ConfigError(f"{source}: {refusal}")
    keys = _RecipeKeys(source)
    keys.read(raw, overrides)
    kwargs = _section_kwargs(keys.flat)
    try:
        _resolve_stage(kwargs, keys)
        sections = {sec: cls(**kwargs[sec]) for sec, cls in SECTIONS.items()}
        # every section checks its own values; Config the cross-section ones
        cfg = Config(**sections, source=source, notices=list(keys.notices.values()))
    except (TypeError, ValueError) as e:
        raise _blame(str(e), keys.seen, source) from e
    cfg.notices += _default_notices(cfg, keys.seen)
    return cfg


def _resolve_stage(kwargs: dict, keys: "_RecipeKeys") -> None:
    """Set ``training.stage``: the explicit one checked against the recipe's keys, else inferred."""
    dpo_keys = {k: where for k, where in keys.seen.items() if k in _dpo_keys()}
    stage, notices = rk.infer_stage(kwargs["training"].get("stage"), dpo_keys, rk.data_kind(kwargs["data"]))
    if keys.sft_loss_type and stage != "sft":
        raise ConfigError(f"{keys.sft_loss_type}: nll is SFTConfig's loss_type; a DPO loss_type is one of "
                          f"{', '.join(LOSS_TYPES)}")
    kwargs["training"]["stage"] = stage
    keys.notices.update((n.split(":", 1)[0], n) for n in notices)


def _dpo_keys() -> set:
    """The keys only the DPO stage reads (their presence makes a recipe a DPO one)."""
    return {f.name for f in dataclasses.fields(DPOConfig)} | set(rk.DPO_DATA_KEYS) | set(rk.DPO_TRL_KEYS)


def _default_notices(cfg: Config, seen: dict) -> list:
    """Notices for the result-setting keys left out whose default here differs from transformers' / TRL's."""
    values = {k: getattr(getattr(cfg, secs[0]), k) for k, secs in _field_index().items() if k in rk.HF_DEFAULTS}
    return rk.default_notices(values, seen, cfg.training.stage, _dpo_keys())


class _RecipeKeys:
    """The keys of one recipe, read in order: the recipe's, then the command line's.

    ``flat``: ``{(section, key): (value, where)}`` for the section fields; ``seen``: ``{key: where}``
    for every key named (aliases resolved); ``notices``: ``{key: "key: why"}``.
    """

    def __init__(self, source: str):
        self.source, self.index = source, _field_index()
        self.known = set(self.index) | rk.extra_keys()
        self.flat: dict = {}
        self.seen: dict = {}
        self.notices: dict = {}
        self.dataset: dict = {}  # TRL's dataset_name & co -> (value, where)
        self.sft_loss_type: Optional[str] = None  # where SFTConfig's loss_type (nll) was given

    def read(self, raw: dict, overrides) -> None:
        for key, value in raw.items():
            if key in SECTIONS and isinstance(value, dict):
                for k, v in value.items():
                    self.put(f"{key}.{k}", v, f"{self.source}: {key}.{k}")
            else:
                self.put(str(key), value, f"{self.source}: {key}")
        for arg in overrides:
            key, value = _parse_override(arg)
            self.put(key, value, f"{CLI} --{key}")
        if self.dataset:
            self._translate_dataset()

    def put(self, key: str, value, where: str) -> None:
        sec_hint = None
        if "." in key:
            sec_hint, key = key.split(".", 1)
            if sec_hint not in SECTIONS:
                raise ConfigError(f"{where}: unknown section {sec_hint!r}{_suggest(sec_hint, SECTIONS)}")
        key = rk.ALIASES.get(key, key)
        if key == "loss_type" and self._sft_loss_type(value, where):  # SFTConfig's: nll is the SFT loss
            self.sft_loss_type = where
            return
        self.seen[key] = where
        if key not in self.index:
            return self._extra(key, value, where)
        if sec_hint is not None and sec_hint not in self.index[key]:
            raise ConfigError(f"{where}: key {key!r} belongs to section {self.index[key][0]!r}, not {sec_hint!r}")
        if key in rk.STEP_KEYS:
            rk.check_step_count(key, value, where)
        for sec in ([sec_hint] if sec_hint else self.index[key]):
            self.flat[(sec, key)] = (value, where)

    @staticmethod
    def _sft_loss_type(value, where: str) -> bool:
        try:
            return trl_keys.sft_loss_type(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {str(e).removeprefix('loss_type: ')}") from None

    def _extra(self, key: str, value, where: str) -> None:
        """A key that is no section's field (:func:`zephyr_fast.recipe_keys.extra_key`), or unknown."""
        if key in rk.DATASET_KEYS:
            self.dataset[key] = (typed(value, Optional[str], where), where)
            return
        try:
            puts, notice = rk.extra_key(key, value, where)
        except KeyError:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, self.known)}") from None
        if notice:
            self.notices[key] = notice
        for k, v, w in puts:
            self.put(k, v, w)

    def _translate_dataset(self) -> None:
        where = self.dataset.get("dataset_name", next(iter(self.dataset.values())))[1]
        for other in ("dataset_mixer", "dataset_mixture"):
            if str(self.flat.get(("data", other), (None,))[0]).lower() not in ("none", "null"):
                raise ConfigError(f"{where}: give either dataset_name (TRL) or {other}, not both")
        try:
            out = rk.translate_dataset({k: v for k, (v, _) in self.dataset.items()})
        except ValueError as e:
            key, _, rest = str(e).partition(": ")
            raise ConfigError(f"{self.dataset.get(key, (None, where))[1]}: {rest}") from None
        for k, v in out.items():
            self.put(k, v, where)


def _section_kwargs(flat: dict) -> dict:
    """``{section: {key: value as the field's type}}``."""
    kwargs: dict = {sec: {} for sec in SECTIONS}
    for (sec, key), (value, where) in flat.items():
        if key == "dtype" and (value is None or str(value).lower() in ("auto", "none", "null")):
            # HF: "the checkpoint's dtype" -> bf16 runs stay bf16
            bf16, bf16_where = flat.get(("training", "bf16"), (False, ""))
            value = "bfloat16" if typed(bf16, bool, bf16_where) else "float32"
        tp = _field_types(SECTIONS[sec])[key]
        if value is None and not rk.optional(tp):  # TRL's "not set" (a dumped config): the default here
            continue
        kwargs[sec][key] = typed(value, tp, where)
    return kwargs


def load_config(path: str, overrides=()) -> Config:
    """Read a recipe (``yaml.safe_load``) and apply ``--key=value`` overrides."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: recipe file not found")
    with open(path, "rb") as f:
        try:
            raw = safe_yaml.load(f, path)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        except safe_yaml.YamlBudgetError as e:
            raise ConfigError(str(e)) from None
    return build_config(raw or {}, source=path, overrides=list(overrides))


def keys_help() -> str:
    """The ``train.py --help`` text: every key with its section, type, default and accepted aliases."""
    return rk.describe_keys(SECTIONS, {sec: _field_types(cls) for sec, cls in SECTIONS.items()})


def config_hash(cfg: Config) -> str:
    """Short hash of the resolved sections (a checkpoint records the config it was written by)."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
