"""Training stages: one object per objective, from dataset rows to its summed loss; and the registry.

A stage owns everything that differs between objectives (SFT, DPO; ORPO / KTO later):

* ``tokenize`` -- dataset rows -> examples (``zephyr_fast.data.sft`` / ``zephyr_fast.data.preference``);
* ``pack`` -- examples -> padding-free ``PackedBatch`` micro-batches (``zephyr_fast.data.packing``);
* ``loss_head`` -- the loss head: final hidden rows + LM-head weight -> ``(loss_sum, metric_sums)``
  through a ``zephyr_kernels`` fused loss, built once per model with the model's logit transform
  (``zephyr_fast.model.forward.head_transform``: Gemma 2's final-logit softcap), arguments checked there;
* ``denominator`` -- which host-side count of a micro-batch (``MicroStats`` field) the summed loss
  of an optimiser step is divided by;
* ``tokens_per_example`` -- how many ``max_length`` sequences one example puts into a micro-batch
  (the factor of the default token budget, derived in ``zephyr_fast.config.Config``);
* its metrics (``log_metrics`` / ``summary_metrics``), its config section and checks (``DPOConfig``).

:class:`LossModule` (what DeepSpeed wraps) runs the packed forward and hands the hidden states to the
stage's loss head. :data:`STAGES` maps the recipe's ``stage:`` to a class -- the only place that
maps stage names to code; nothing else in the trainer asks which stage it runs. Add an objective:
subclass :class:`Stage` and register it in :data:`STAGES`.

Formulas (the caller divides each sum by the step's global count):

* dSFT (Tunstall et al. 2023, §3): ``loss_sum = Σ_t −log π(y_t | y_<t)`` over the target tokens,
  ``zephyr_kernels.linear_cross_entropy(reduction="sum")``.
* dDPO (Rafailov et al. 2023, eq. 7):
  ``loss_sum = Σ_i −log σ(β [(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])``
  over the pairs (``loss_type`` / ``label_smoothing`` variants as in ``zephyr_kernels``),
  ``zephyr_kernels.FusedLinearDPOLoss(reduction="sum")`` with cached reference log-probs.
  ``ref_logps`` runs only the reference pass (``zephyr_fast.training.reference``) and stops.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from zephyr_kernels import FusedLinearDPOLoss, check_dpo_args, linear_cross_entropy

from zephyr_fast.config import STAGES as SCHEMAS
from zephyr_fast.config import DataConfig, DPOConfig, StageSchema
from zephyr_fast.config.keys import did_you_mean
from zephyr_fast.config.values import LOSS_TYPES
from zephyr_fast.data.batch import loss_inputs
from zephyr_fast.data.packing import dpo_batch, pack_dpo, pack_sft, pair_tokens, sft_batch
from zephyr_fast.data.preference import build_dpo_examples
from zephyr_fast.data.sft import tokenize_sft
from zephyr_fast.model.forward import forward_hidden, head_transform, lm_head_weight, unwrap_model


class Stage:
    """Base class; subclasses set the class attributes and implement :meth:`tokenize`, :meth:`pack`,
    :meth:`loss_head`."""

    schema: StageSchema  # the config's facts of this stage: name, section, tokens_per_example, trains
    name: str = ""
    section: Optional[str] = None  # the Config section holding this stage's own keys (e.g. "dpo")
    tokens_per_example: int = 1  # max_length-long sequences one example adds to a micro-batch
    denominator: str = "targets"  # MicroStats field counting the loss terms: "targets" | "pairs"
    batch_by: str = "tokens"  # what ``batch_by: auto`` means for this stage (zephyr_fast.training.plan)
    example_name: str = "example"  # what one example is called in logs and plans
    uses_reference: bool = False  # needs reference log-probs (zephyr_fast.training.reference)
    trains: bool = True  # False: the run ends after the reference pass

    def __init_subclass__(cls, **kwargs):
        """A registered stage takes its facts from its schema (``zephyr_fast.config.values.STAGES``)."""
        super().__init_subclass__(**kwargs)
        s = cls.schema
        cls.name, cls.section, cls.tokens_per_example, cls.trains = s.name, s.section, s.tokens_per_example, s.trains

    def __init__(self, impl: str = "auto", section=None):
        self.impl = impl  # zephyr_kernels dispatch (training.kernel_impl)
        self.cfg = section

    @classmethod
    def check_section(cls, section) -> None:
        """Refuse, as ``section.error(...)``, what only the stage's code can check (nothing by default)."""

    def model_path(self, default: Optional[str]) -> Optional[str]:
        """The weights this stage starts from (``model_name_or_path``, or a stage-specific override)."""
        return default

    def tokenize(self, rows, tokenizer, data: DataConfig, name: str):
        """``rows`` -> ``(examples, report)``."""
        raise NotImplementedError

    def pack(self, examples: list, data: DataConfig, max_tokens: int, *, seed: int, num_shards: int):
        """``examples`` -> ``PackedBatches`` (``list[PackedBatch]`` with ``.stats``), a multiple of ``num_shards``."""
        raise NotImplementedError

    def size(self, example: dict, data: DataConfig) -> int:
        """Tokens ``example`` occupies in a packed micro-batch."""
        raise NotImplementedError

    def collate(self, examples: list, data: DataConfig):
        """``examples`` -> one padding-free ``PackedBatch`` holding all of them (``batch_by: examples``)."""
        raise NotImplementedError

    def loss_head(self, *, temperature: float, softcap: Optional[float]) -> Callable:
        """The loss head for a model with this logit transform, built (and checked) once:
        ``(rows (M, D), weight (V, D), labels (M,) int64, segment_ids (M,) int64, ref)``
        (``zephyr_fast.data.batch.loss_inputs``; ``ref`` the reference log-probs or None)
        -> ``(loss_sum () fp32, {name: 0-d metric sum})``."""
        raise NotImplementedError

    def prepare_model(self, model) -> None:
        """Adjust the model before training (in place); nothing by default."""

    def log_metrics(self, pairs: int, seconds: float) -> dict:
        """Stage-specific throughput for a logged step window (TRL names)."""
        return {}

    def summary_metrics(self, pairs: int, seconds: float) -> dict:
        """Stage-specific totals for the run summary."""
        return {}


def common_tokenize_kwargs(data: DataConfig, name: str) -> dict:
    """The tokeniser settings every stage shares."""
    return dict(max_length=data.max_length, add_empty_system=data.auto_insert_empty_system_msg,
                skip_invalid_rows=data.skip_invalid_rows, dataset_name=name)


class SFTStage(Stage):
    schema = SCHEMAS["sft"]
    denominator = "targets"
    example_name = "sequence"

    def tokenize(self, rows, tokenizer, data: DataConfig, name: str):
        return tokenize_sft(rows, tokenizer, assistant_only_loss=data.assistant_only_loss,
                            **common_tokenize_kwargs(data, name))

    def pack(self, examples: list, data: DataConfig, max_tokens: int, *, seed: int, num_shards: int):
        return pack_sft(examples, max_tokens, seed=seed, overlong=data.overlong, num_shards=num_shards)

    def size(self, example: dict, data: DataConfig) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list, data: DataConfig):
        return sft_batch([(ex["input_ids"], ex["loss_mask"]) for ex in examples])  # each <= max_length already

    label_smoothing = 0.0  # training.label_smoothing_factor (make_stage)

    def loss_head(self, *, temperature: float, softcap: Optional[float]) -> Callable:
        eps = self.label_smoothing

        def head(rows, weight, labels, segment_ids, ref):
            return linear_cross_entropy(rows, weight, labels, reduction="sum", label_smoothing=eps,
                                        temperature=temperature, softcap=softcap, impl=self.impl), {}

        return head


class DPOStage(Stage):
    schema = SCHEMAS["dpo"]  # a pair holds two completions
    denominator = "pairs"
    batch_by = "examples"  # TRL counts DPO batches in pairs
    example_name = "pair"
    uses_reference = True

    def __init__(self, impl: str = "auto", section: Optional[DPOConfig] = None):
        super().__init__(impl, section or DPOConfig())

    @classmethod
    def check_section(cls, section: DPOConfig) -> None:
        """The kernels' own rule for the loss arguments (``zephyr_kernels.check_dpo_args``), naming the key
        where the recipe set it; a misspelt loss_type gets a did-you-mean."""
        d = section
        try:
            check_dpo_args(d.beta, d.loss_type, d.label_smoothing, "sum", d.loss_weights, d.discopop_tau,
                           d.f_divergence_type, d.use_weighting)
        except ValueError as e:
            names = [d.loss_type] if isinstance(d.loss_type, str) else list(d.loss_type)
            bad = next((str(n) for n in names if n not in LOSS_TYPES), None)
            hint = did_you_mean(bad, LOSS_TYPES, cutoff=0.6) if bad else ""
            raise section.error(f"{e}{hint}") from None

    def tokenize(self, rows, tokenizer, data: DataConfig, name: str):
        return build_dpo_examples(rows, tokenizer, max_prompt_length=data.max_prompt_length,
                                  truncation_mode=data.truncation_mode,
                                  max_completion_length=data.max_completion_length,
                                  **common_tokenize_kwargs(data, name))

    def pack(self, examples: list, data: DataConfig, max_tokens: int, *, seed: int, num_shards: int):
        return pack_dpo(examples, max_tokens, layout=data.dpo_layout, seed=seed, num_shards=num_shards)

    def size(self, example: dict, data: DataConfig) -> int:
        return pair_tokens(example, data.dpo_layout)

    def collate(self, examples: list, data: DataConfig):
        return dpo_batch(examples, data.dpo_layout)

    def prepare_model(self, model) -> None:
        """TRL's ``disable_dropout``: every ``nn.Dropout`` (LoRA's included) gets ``p = 0``."""
        if self.cfg.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0

    def loss_head(self, *, temperature: float, softcap: Optional[float]) -> Callable:
        d = self.cfg
        dpo_loss = FusedLinearDPOLoss(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                                      rpo_alpha=d.rpo_alpha, reduction="sum", loss_weights=d.loss_weights,
                                      discopop_tau=d.discopop_tau, temperature=temperature, softcap=softcap,
                                      impl=self.impl, f_divergence_type=d.f_divergence_type,
                                      f_alpha_divergence_coef=d.f_alpha_divergence_coef,
                                      use_weighting=d.use_weighting)

        def head(rows, weight, labels, segment_ids, ref):
            ref_chosen, ref_rejected = ref
            return dpo_loss(rows, weight, labels, segment_ids, ref_chosen, ref_rejected)

        return head

    def log_metrics(self, pairs: int, seconds: float) -> dict:
        return {"train_pairs_per_second": pairs / seconds}

    def summary_metrics(self, pairs: int, seconds: float) -> dict:
        return {"train_pairs": pairs, "train_pairs_per_second": pairs / seconds}


class RefLogpsStage(DPOStage):
    """Only the reference pass of a DPO recipe (optionally of another model): no training."""

    schema = SCHEMAS["ref_logps"]

    def model_path(self, default: Optional[str]) -> Optional[str]:
        return self.cfg.ref_model_name_or_path or default


class LossModule(torch.nn.Module):
    """``model`` + the stage's fused loss as one module: ``(batch, ref) -> (loss_sum, metric_sums)``.

    Args:
        batch: ``PackedBatch`` on the model's device (``input_ids: (N,)``, ``cu_seqlens: (S+1,) int32``).
        ref: DPO only, ``(ref_chosen_logps (P,), ref_rejected_logps (P,))`` fp32 for ``batch.pair_index``.
    Returns:
        ``loss_sum: () fp32`` and a dict of 0-d metric sums over pairs (empty for SFT).

    DeepSpeed wraps *this* module, so the whole packed forward (decoder body, LM-head gather, fused
    loss) runs inside ``engine(...)`` and ZeRO-3's forward/backward hooks see every parameter use.
    """

    def __init__(self, model, stage: Stage):
        super().__init__()
        stage.prepare_model(model)
        self.model = model  # the state dict's "model." prefix is what the HF export strips
        self.loss_head = stage.loss_head(**head_transform(model))  # as packed_logps scores the reference

    def forward(self, batch, ref=None):
        core = unwrap_model(self.model)
        hidden = forward_hidden(core, batch)
        # on CUDA only the loss rows reach the head (found on the host at packing: no sync); the
        # CPU path of the kernels compacts by itself
        rows, labels, segment_ids = loss_inputs(hidden, batch, compact=hidden.is_cuda)
        with lm_head_weight(core) as weight:
            return self.loss_head(rows, weight, labels, segment_ids, ref)


STAGES = {cls.name: cls for cls in (SFTStage, RefLogpsStage, DPOStage)}  # recipe ``stage:`` -> class


def stage_class(name: str) -> type:
    """The registered stage class called ``name`` (``KeyError`` when there is none)."""
    return STAGES[name]


def make_stage(cfg) -> Stage:
    """The recipe's stage, given the kernel impl and its own config section (none for SFT), after the
    checks only the stage's code can make (:meth:`Stage.check_section`; a one-line ``ConfigError``)."""
    cls = STAGES[cfg.training.stage]
    section = getattr(cfg, cls.section) if cls.section else None
    if section is not None:
        cls.check_section(section)
    stage = cls(cfg.training.kernel_impl, section)
    if cls is SFTStage:
        stage.label_smoothing = cfg.training.label_smoothing_factor
    return stage
