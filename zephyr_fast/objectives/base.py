"""What every objective is: :class:`Stage` (rows -> examples -> packed micro-batches -> summed loss) and
:class:`LossModule`, the model and a stage's fused loss head as the one module DeepSpeed wraps.

A stage owns everything that differs between objectives (SFT, DPO; ORPO / KTO later):

* ``tokenize`` -- dataset rows -> examples (``zephyr_fast.data.sft`` / ``zephyr_fast.data.preference``);
* ``pack`` / ``size`` / ``collate`` -- examples -> padding-free ``PackedBatch`` micro-batches
  (``zephyr_fast.data.packing``);
* ``loss_head`` -- final hidden rows + LM-head weight -> ``(loss_sum, metric_sums)`` through a
  ``zephyr_kernels`` fused loss, built once per model with the model's logit transform
  (``zephyr_fast.model.forward.head_transform``: Gemma 2's final-logit softcap);
* ``denominator`` -- which host-side count of a micro-batch (``MicroStats`` field) the summed loss
  of an optimiser step is divided by;
* its facts as the config knows them (``schema``: name, config section, tokens per example, whether it
  trains -- ``zephyr_fast.config.values.STAGES``), its reference-pass hookup (``uses_reference``,
  :meth:`Stage.other_reference`), its metrics (``log_metrics`` / ``summary_metrics``).

One module per objective (``sft.py``, ``dpo.py``); ``registry.py`` maps the recipe's ``stage:`` to
its class, the only place a stage name is looked up.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from zephyr_fast.config import DataConfig, StageSchema
from zephyr_fast.data.batch import loss_inputs
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

    @classmethod
    def from_config(cls, cfg) -> "Stage":
        """This stage for recipe ``cfg`` (a ``zephyr_fast.config.Config``): the kernel impl and its own
        config section (none for SFT), after the checks only its code can make (:meth:`check_section`)."""
        section = getattr(cfg, cls.section) if cls.section else None
        if section is not None:
            cls.check_section(section)
        return cls(cfg.training.kernel_impl, section)

    def model_path(self, default: Optional[str]) -> Optional[str]:
        """The weights this stage starts from (``model_name_or_path``, or a stage-specific override)."""
        return default

    def other_reference(self, model_path: Optional[str]) -> Optional[str]:
        """The model whose reference log-probs this run reads when it is *not* the one the run builds
        (``model_path``), else None: the run's own initial weights are the reference."""
        return None

    def tokenize(self, rows, tokenizer, data: DataConfig, name: str, *, keep_ids: bool = True):
        """``rows`` -> ``(examples, report)``; ``keep_ids=False``: lengths only, no token ids (a plan)."""
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


def common_tokenize_kwargs(data: DataConfig, name: str, keep_ids: bool) -> dict:
    """The tokeniser settings every stage shares."""
    return dict(max_length=data.max_length, add_empty_system=data.auto_insert_empty_system_msg,
                skip_invalid_rows=data.skip_invalid_rows, dataset_name=name, keep_ids=keep_ids)


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
