"""The ``model:``, ``training:`` and ``dpo:`` sections of a recipe (``data:`` is :mod:`.data`), and what
every section shares.

A section is a dataclass whose fields are recipe keys, each declared with :func:`option` (TRL's
``field(default=..., metadata={"help": ...})``, the help ``--help`` prints). A section checks its own
values when it is built (``ValueError("key: problem")``; :func:`zephyr_fast.config.build_config` turns
that into ``ConfigError("<file>: key: problem")``). It remembers where each of its keys was set, so
that a check only the layer that builds things can make names the same place, at run start:
``raise section.error("key: problem")``. Those checks: a random init's ``model_init`` keys
(transformers' config classes, ``training.build.check_model``), the bitsandbytes / CUDA requirements
(``training.build.check_runtime``), and the DPO loss arguments -- every option of ``zephyr_kernels``'
DPO losses is a ``dpo:`` key, checked by the kernels' own rule ``check_dpo_args``
(``zephyr_fast.objectives.make_stage``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

from zephyr_fast import redaction
from zephyr_fast.config.keys import CLI, STEP_KEYS, ConfigError, did_you_mean
from zephyr_fast.config.values import (ATTN_IMPLEMENTATIONS, BNB_4BIT_QUANT_TYPES, DTYPES, F_DIVERGENCES, HUB_STRATEGIES,
                                       KERNEL_IMPLS, LOSS_TYPES, MAX_EPOCHS, OPTIMIZERS, SCHEDULERS, STAGES, STRATEGIES)
REQUIRED = dataclasses.MISSING  # the default of a key that has none


def option(default, help: str, **metadata):
    """A recipe key: its default (a list / dict default is copied per instance) and its ``--help`` text."""
    if default is REQUIRED:
        return dataclasses.field(metadata={"help": help, **metadata})
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def check(cond: bool, key: str, msg: str) -> None:
    """A section's own check: ``ValueError("key: msg")`` (``build_config`` adds the recipe path)."""
    if not cond:
        raise ValueError(f"{key}: {msg}")


def blame(msg: str, seen: dict, source: str) -> ConfigError:
    """A check's ``"key: problem"`` as one line naming where ``key`` was set (recipe or command line)."""
    key, sep, rest = msg.partition(": ")
    if sep and key in seen:
        return ConfigError(f"{seen[key]}: {rest}")
    for k, where in seen.items():  # a message that names a command-line key elsewhere (the kernels' checks)
        if where.startswith(CLI) and re.search(rf"\b{re.escape(k)}\b", msg):
            return ConfigError(f"{where}: {msg}")
    return ConfigError(f"{source}: {msg}")


def defaults(cls) -> dict:
    """``{key: default}`` of a section class."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


class Section:
    """Base of the section dataclasses: where each key was set (``{key: where}``, from build_config)."""

    def locate(self, seen: dict, source: str) -> None:
        """Remember where the recipe set each key (not a field: it is in no dict, hash or saved config)."""
        self._seen, self._source = dict(seen), source

    def error(self, msg: str) -> ConfigError:
        """A later check's ``"key: problem"`` as the one-line ConfigError that build_config raises for its own."""
        seen = getattr(self, "_seen", None)
        return blame(msg, seen, self._source) if seen is not None else ConfigError(msg)


_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig(Section):
    model_name_or_path: Optional[str] = option(None, "checkpoint folder or hub id; none: a random init from "
                                               "model_init (tiny runs)")
    model_init: dict = option({}, "a random init's config: arch (mistral, llama, qwen2, ...) and that config "
                                  "class's keys (zephyr_fast.model.tiny_config)")
    tokenizer_name_or_path: Optional[str] = option(None, "tokenizer folder or hub id (default: model_name_or_path)")
    eos_token: Optional[str] = option(None, "replaces the tokenizer's EOS token (TRL / SmolLM3: <|im_end|>)")
    model_revision: str = option("main", "hub branch, tag or commit of the model")
    dtype: str = option("float32", f"parameter dtype: {' | '.join(DTYPES)} (auto: bfloat16 with bf16, else float32)")
    attn_implementation: str = option("auto", f"packed attention: {' | '.join(ATTN_IMPLEMENTATIONS)} "
                                              "(transformers' names pick auto)")
    gradient_checkpointing: bool = option(False, "recompute each layer's activations in the backward pass")
    gradient_checkpointing_kwargs: dict = option({}, "passed to gradient_checkpointing_enable, e.g. "
                                                     "{use_reentrant: false}")
    load_in_4bit: bool = option(False, "QLoRA: 4-bit frozen weights (bitsandbytes, CUDA only; needs use_peft)")
    load_in_8bit: bool = option(False, "QLoRA: 8-bit frozen weights (bitsandbytes, CUDA only; needs use_peft)")
    bnb_4bit_quant_type: str = option("nf4", f"4-bit quantization: {' | '.join(BNB_4BIT_QUANT_TYPES)}")
    use_bnb_nested_quant: bool = option(False, "4-bit: quantize the quantization constants too (double quant)")
    use_liger_ops: bool = option(False, "Liger's RMSNorm / SwiGLU / RoPE kernels (CUDA only), never its loss")
    use_peft: bool = option(False, "train LoRA adapters (peft) instead of every weight")
    lora_r: int = option(16, "LoRA rank (the inner dimension of each adapter)")
    lora_alpha: int = option(32, "LoRA scale numerator (the update is scaled by lora_alpha / lora_r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_target_modules: list = option(_LORA_MODULES, "module names that get LoRA adapters")

    def __post_init__(self):
        check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        check(self.model_name_or_path is not None or bool(self.model_init), "model_init",
              "is required when model_name_or_path is not set (a random init needs its config)")
        check(self.model_name_or_path is not None or self.tokenizer_name_or_path is not None,
              "tokenizer_name_or_path", "is required when model_name_or_path is not set (random init)")
        check(self.attn_implementation in ATTN_IMPLEMENTATIONS, "attn_implementation",
              f"must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
              f"{did_you_mean(str(self.attn_implementation), ATTN_IMPLEMENTATIONS)}")


@dataclass
class TrainingConfig(Section):
    stage: Optional[str] = option(None, f"{' | '.join(STAGES)}; none: inferred from the recipe's keys and data")
    output_dir: str = option("outputs/run", "the run's folder: checkpoints, the exported model, metrics")
    overwrite_output_dir: bool = option(False, "TRL's key: write into a non-empty output_dir zephyr_fast did not "
                                               "create, or over (and rotating away) an earlier run's checkpoints "
                                               "without resuming from them (zephyr_fast.outputs)")
    seed: int = option(42, "seed of the init, the data order and dropout (also the data section's)")
    num_train_epochs: float = option(1.0, f"epochs over the train split (<= {MAX_EPOCHS:g}; max_steps wins when > 0)")
    max_steps: int = option(-1, "optimiser steps; -1: num_train_epochs decides")
    learning_rate: float = option(2.0e-5, "peak learning rate")
    lr_scheduler_type: str = option("cosine", f"schedule: {' | '.join(SCHEDULERS)}")
    lr_scheduler_kwargs: dict = option({}, "the schedule's own arguments, e.g. {min_lr_rate: 0.1} "
                                           "(cosine_with_min_lr), {num_cycles: 0.5} (cosine)")
    warmup_ratio: float = option(0.0, "linear warmup over this fraction of the optimiser steps, in [0, 1)")
    warmup_steps: int = option(0, "linear warmup steps (wins over warmup_ratio when > 0)")
    optim: str = option("adamw_torch", f"optimiser: {' | '.join(OPTIMIZERS)} (the bitsandbytes ones need CUDA)")
    weight_decay: float = option(0.0, "decoupled weight decay of the matrices (norms and biases: none)")
    adam_beta1: float = option(0.9, "Adam's first-moment decay, in [0, 1)")
    adam_beta2: float = option(0.999, "Adam's second-moment decay, in [0, 1)")
    adam_epsilon: float = option(1.0e-8, "Adam's epsilon, > 0")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this; 0: no clipping")
    per_device_train_batch_size: int = option(8, "examples per micro-batch and device (DPO: pairs); with packing, "
                                                 "the token budget is this x max_length")
    per_device_eval_batch_size: int = option(8, "examples per evaluation micro-batch and device")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimiser step and device")
    bf16: bool = option(False, "DeepSpeed bf16 mixed precision (the model's own dtype is dtype)")
    tf32: Optional[bool] = option(None, "TF32 matmuls on CUDA (training.build.set_tf32); none: torch's default")
    fp16: bool = option(False, "refused: fp16 needs loss scaling; use bf16")
    deepspeed: Optional[str] = option(None, "a DeepSpeed JSON or an accelerate config (docs/LAUNCH.md); default "
                                            "ZeRO-3 when the world is > 1")
    logging_steps: Union[int, float] = option(10, "log every this many optimiser steps (below 1: a fraction of "
                                                  "the run, ceil(fraction x total))")
    logging_first_step: bool = option(False, "also log the first optimiser step")
    eval_strategy: str = option("no", f"when to evaluate: {' | '.join(STRATEGIES)}")
    eval_steps: Union[int, float] = option(0, "evaluate every this many steps with eval_strategy steps (0: "
                                              "logging_steps, as HF; below 1: a fraction of the run)")
    eval_on_start: bool = option(False, "evaluate once before the first step (logged at step 0), as HF")
    load_best_model_at_end: bool = option(False, "end with the weights of the checkpoint whose eval metric was "
                                                 "best (kept whatever save_total_limit), as HF")
    metric_for_best_model: Optional[str] = option(None, "the metric of load_best_model_at_end (default loss; "
                                                        "eval_ is added as HF does)")
    greater_is_better: Optional[bool] = option(None, "whether a larger metric is better (default: False for a "
                                                     "*loss metric, True otherwise)")
    save_strategy: str = option("steps", f"when to checkpoint: {' | '.join(STRATEGIES)}")
    save_steps: Union[int, float] = option(0, "checkpoint every this many steps; 0: only the final save (below "
                                              "1: a fraction of the run)")
    save_total_limit: Optional[int] = option(2, "checkpoints kept (the oldest are removed); none: keep every one "
                                                "(HF's default)")
    resume_from_checkpoint: Optional[str] = option(None, "auto (the newest checkpoint in output_dir) | PATH")
    resume_allow_changes: bool = option(False, "resume although the config or data differ from the checkpoint's")
    report_to: list = option(["tensorboard"], "tensorboard | wandb | none | all")
    run_name: Optional[str] = option(None, "wandb run name (default: the output_dir's name)")
    wandb_project: Optional[str] = option(None, "wandb project (default: $WANDB_PROJECT or zephyr_fast)")
    wandb_entity: Optional[str] = option(None, "wandb entity (default: the login's)")
    wandb_run_group: Optional[str] = option(None, "wandb run group")
    push_to_hub: bool = option(False, "upload the exported model to the Hugging Face Hub (checked at start, "
                                      "not at the end)")
    hub_model_id: Optional[str] = option(None, "hub repo (default: the output_dir's name under the token's user)")
    hub_strategy: str = option("every_save", f"what is uploaded when: {' | '.join(HUB_STRATEGIES)}")
    hub_private_repo: Optional[bool] = option(None, "create the hub repo private")
    hub_model_revision: Optional[str] = option(None, "branch to push to (default: main)")
    hub_token: Optional[str] = option(None, "hub token (default: $HF_TOKEN / the cached login); masked everywhere")
    peak_tflops: float = option(0.0, "per-device peak TFLOP/s for MFU; 0: detected from the CUDA card's name")
    kernel_impl: str = option("auto", f"zephyr_kernels dispatch: {' | '.join(KERNEL_IMPLS)}")
    packing: bool = option(True, "false: exactly per_device_train_batch_size examples per micro-batch (still "
                                 "padding-free)")
    label_smoothing_factor: float = option(0.0, "HF's label smoothing of the SFT cross-entropy, (1 - e) nll + e "
                                                "mean_v(-log p_v) (Szegedy et al. 2016); DPO's own is "
                                                "label_smoothing")
    use_cpu: bool = option(False, "train on the CPU even where CUDA is available (HF's key)")
    save_final_model: bool = option(True, "export the final model (Hugging Face folder) to output_dir")

    def __post_init__(self):
        redaction.register(self.hub_token)  # masked in every message, log line and file from now on
        names = tuple(STAGES)
        check(self.stage is None or self.stage in STAGES, "stage",
              f"must be one of {names}, got {self.stage!r}{did_you_mean(str(self.stage), names)}")
        check(self.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type",
              f"must be one of {SCHEDULERS}, got {self.lr_scheduler_type!r}")
        check(self.optim in OPTIMIZERS, "optim", f"must be one of {OPTIMIZERS}, got {self.optim!r}")
        check(self.learning_rate >= 0, "learning_rate", f"must be >= 0, got {self.learning_rate}")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        self._check_ranges()
        for key in ("gradient_accumulation_steps", "per_device_train_batch_size"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs", "or max_steps must be > 0")
        for key in ("eval_strategy", "save_strategy"):
            check(getattr(self, key) in STRATEGIES, key, f"must be no | steps | epoch, got {getattr(self, key)!r}")
        if self.eval_strategy == "steps" and self.eval_steps == 0:
            self.eval_steps = self.logging_steps  # HF: eval_steps defaults to logging_steps
        check(0.0 <= self.label_smoothing_factor < 1.0, "label_smoothing_factor",
              f"must be in [0, 1), got {self.label_smoothing_factor}")
        check(not self.fp16, "fp16", "is not supported (fp16 training needs loss scaling); use bf16: true")
        check(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        check(self.kernel_impl in KERNEL_IMPLS, "kernel_impl",
              f"must be {' | '.join(KERNEL_IMPLS)}, got {self.kernel_impl!r}")
        check(self.deepspeed is None or os.path.isfile(self.deepspeed), "deepspeed",
              f"file not found: {self.deepspeed!r}")
        if self.load_best_model_at_end:
            self._check_best_model()

    def _check_best_model(self) -> None:
        """HF's rules: checkpoints are written where the metric is measured."""
        check(self.eval_strategy != "no" and self.save_strategy == self.eval_strategy, "load_best_model_at_end",
              f"needs eval_strategy and save_strategy to be the same and not 'no' (got {self.eval_strategy!r} "
              f"and {self.save_strategy!r})")
        check(self.save_strategy != "steps" or (self.save_steps > 0 and self.save_steps % self.eval_steps == 0),
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
                check(math.isfinite(value), f.name, f"must be a finite number, got {value}")
        check(self.num_train_epochs <= MAX_EPOCHS, "num_train_epochs", f"must be <= {MAX_EPOCHS:g}, got "
              f"{self.num_train_epochs:g} (use max_steps for an exact step count)")
        for key in ("weight_decay", "warmup_steps", *STEP_KEYS):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        # HF clips only when max_grad_norm > 0: 0 turns clipping off, a negative one did so silently
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        for key in ("adam_beta1", "adam_beta2"):
            check(0.0 <= getattr(self, key) < 1.0, key, f"must be in [0, 1), got {getattr(self, key)}")
        check(self.adam_epsilon > 0, "adam_epsilon", f"must be > 0, got {self.adam_epsilon}")


@dataclass
class DPOConfig(Section):
    """The ``dpo:`` section of a recipe; the loss arguments are checked by the kernels' own rule."""

    beta: float = option(0.1, "the DPO temperature: how far the policy may move from the reference, > 0")
    loss_type: Union[str, list] = option("sigmoid", f"{' | '.join(LOSS_TYPES)}, or TRL's list of them (MPO), "
                                                    "mixed by loss_weights")
    loss_weights: Optional[list] = option(None, "one weight per loss_type entry (default: 1 each)")
    label_smoothing: float = option(0.0, "cDPO's / robust DPO's label noise (sigmoid, aot: [0, 1); robust: "
                                         "[0, 0.5); exo_pair: its epsilon in (0, 1))")
    rpo_alpha: Optional[float] = option(None, "RPO: add rpo_alpha x the chosen completions' NLL")
    discopop_tau: float = option(0.05, "temperature of loss_type discopop, > 0")
    f_divergence_type: str = option("reverse_kl", f"TRL's f-DPO scores: {' | '.join(F_DIVERGENCES)}")
    f_alpha_divergence_coef: float = option(0.5, "alpha of f_divergence_type alpha_divergence")
    use_weighting: bool = option(False, "WPO's pair weights (zephyr_kernels.losses)")
    average_log_prob: bool = option(False, "the loss sees each completion's mean token log-prob instead of its "
                                           "sum (policy and reference; Liger's / SimPO's option)")
    reference_free: bool = option(False, "TRL: the reference log-probs are 0 (no reference pass)")
    disable_dropout: bool = option(True, "TRL's default: every nn.Dropout of the trained model (LoRA's too) "
                                         "gets p = 0")
    ref_logps_dir: Optional[str] = option(None, "the reference log-prob cache (default: {output_dir}/ref_logps)")
    ref_logps_max_tokens: int = option(0, "micro-batch token budget of the no-grad reference pass; 0: 4x the "
                                          "training one")
    ref_logps_recompute: bool = option(False, "overwrite a stale reference cache instead of refusing it")
    ref_model_name_or_path: Optional[str] = option(None, "the reference model: stage ref_logps computes the cache "
                                                         "with it; stage dpo reuses that cache and refuses to "
                                                         "compute it")

    def __post_init__(self):
        if isinstance(self.loss_type, list) and len(self.loss_type) == 1 and self.loss_weights is None:
            self.loss_type = self.loss_type[0]  # TRL 1.16's default is ["sigmoid"]: the same loss
