"""One module per training objective (``sft.py``, ``dpo.py``), what they share (``base.py``) and the
registry (``registry.py``).  See :mod:`zephyr_fast.objectives.base`."""

from zephyr_fast.objectives.base import LossModule, Stage
from zephyr_fast.objectives.dpo import DPOStage, RefLogpsStage
from zephyr_fast.objectives.registry import STAGES, make_stage, stage_class
from zephyr_fast.objectives.sft import SFTStage

__all__ = ["STAGES", "DPOStage", "LossModule", "RefLogpsStage", "SFTStage", "Stage", "make_stage", "stage_class"]
