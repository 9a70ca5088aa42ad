"""The valid values of the recipe keys that name a choice, and the stages, defined once (torch-free).

The layers that act on a value import its name from here: ``training/build.py`` (optimisers,
schedules, transformers' attention names, bitsandbytes), ``model/attention.py`` (the packed
attention backends), ``training/hub.py`` (hub strategies). ``zephyr_kernels`` is a standalone package
that cannot import zephyr_fast, and importing any of its modules loads torch, so :data:`LOSS_TYPES`,
:data:`F_DIVERGENCES` and :data:`KERNEL_IMPLS` are copies of the kernels' own; ``tests/test_config_package.py``
asserts that they are equal.

The stage registry's torch-free half: a :class:`StageSchema` says which rows a stage reads
(:data:`CHAT` or :data:`PREFERENCE`), which config section holds its own keys and which recipe keys
outside that section it owns, how many ``max_length`` sequences one example puts into a micro-batch,
whether it trains, and whether a recipe without ``stage:`` can mean it. :data:`STAGES` is the one place
a stage name maps to these facts; ``zephyr_fast.objectives.STAGES`` maps the same names to the
code that runs them (each stage class takes its facts from its schema).

The stage of a recipe is read from it (:func:`infer_stage`): alignment-handbook recipes have no
``stage:`` key (its script chose the objective); their preference-stage keys (``beta``,
``loss_type``, ...) or their preference data make them ``dpo``; an explicit ``stage`` that the keys
or the data contradict is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from zephyr_fast.config.keys import CLI
# schedules computed by training.build (HF-Trainer shaped) -> the lr_scheduler_kwargs each takes
NATIVE_SCHEDULERS = {"cosine": ("num_cycles",), "linear": (), "constant": (), "constant_with_warmup": ()}
# transformers' names; the ones beyond the native ones are built by transformers.get_scheduler
SCHEDULERS = tuple(NATIVE_SCHEDULERS) + ("cosine_with_min_lr", "inverse_sqrt", "polynomial", "warmup_stable_decay")
TORCH_OPTIMIZERS = ("adamw", "adamw_torch", "adamw_torch_fused", "adam", "rmsprop", "sgd")
# HF Trainer's bitsandbytes optimiser names -> bitsandbytes.optim classes (CUDA only: refused at start otherwise)
BNB_OPTIMIZERS = {"paged_adamw_32bit": "PagedAdamW32bit", "paged_adamw_8bit": "PagedAdamW8bit",
                  "adamw_bnb_8bit": "AdamW8bit", "adamw_8bit": "AdamW8bit"}
OPTIMIZERS = TORCH_OPTIMIZERS + tuple(BNB_OPTIMIZERS)
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")
DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("no", "steps", "epoch")
MAX_EPOCHS = 1e6
# zephyr_fast's packed (varlen) attention backends (zephyr_fast.model.attention)
ATTENTION_BACKENDS = ("flash_attn", "torch_varlen", "sdpa_segments", "flex")
# transformers' attention names: a packed run picks its backend itself ("auto")
HF_ATTENTION_NAMES = ("flash_attention_2", "sdpa", "eager")
ATTN_IMPLEMENTATIONS = ("auto",) + ATTENTION_BACKENDS + HF_ATTENTION_NAMES
# zephyr_kernels.IMPLS (the kernels' dispatch)
KERNEL_IMPLS = ("auto", "triton", "triton_tiled", "torch")
# zephyr_kernels.LOSS_TYPES (the DPO losses)
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # zephyr_kernels.losses'
DPO_LAYOUTS = ("separate", "prefix_shared")
OVERLONG = ("truncate", "split")
BATCH_BY = ("auto", "examples", "tokens")
TRUNCATION_MODES = (None, "keep_start")
HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
REPORT_TO = ("tensorboard", "wandb", "none")


# --- the stages -----------------------------------------------------------------------------
CHAT, PREFERENCE = "chat", "preference"  # the rows a stage reads: messages, or chosen / rejected pairs


@dataclass(frozen=True)
class StageSchema:
    """One stage as the config sees it (``zephyr_fast.objectives`` holds its code)."""

    name: str
    data: str  # CHAT | PREFERENCE
    section: Optional[str] = None  # the Config section holding this stage's own keys (e.g. "dpo")
    keys: tuple = ()  # recipe keys outside its section that only this stage reads
    weak_keys: tuple = ()  # of those, the ones an explicit other stage ignores with a notice, not a refusal
    tokens_per_example: int = 1  # max_length-long sequences one example adds to a micro-batch
    trains: bool = True  # False: the run ends after the reference pass
    inferred: bool = True  # a recipe without ``stage:`` can mean this stage

    def check(self, data) -> None:
        """Refuse data settings this stage cannot use (``ValueError("key: message")``); ``data`` is a DataConfig."""
        if self.data == PREFERENCE:
            mpl = data.max_prompt_length
            if mpl is not None and not 0 < mpl < data.max_length:
                raise ValueError(f"max_prompt_length: must be in (0, max_length={data.max_length}), got {mpl}")


# the preference stages' keys outside the ``dpo`` section: data keys, and TRL switches
_DPO_KEYS = ("max_prompt_length", "dpo_layout", "max_completion_length", "precompute_ref_log_probs",
             "force_use_ref_model")
SFT = StageSchema("sft", CHAT)
REF_LOGPS = StageSchema("ref_logps", PREFERENCE, section="dpo", keys=_DPO_KEYS, weak_keys=("max_prompt_length",),
                        tokens_per_example=2, trains=False, inferred=False)
DPO = StageSchema("dpo", PREFERENCE, section="dpo", keys=_DPO_KEYS, weak_keys=("max_prompt_length",),
                  tokens_per_example=2)
STAGES = {s.name: s for s in (SFT, REF_LOGPS, DPO)}  # recipe ``stage:`` -> schema
INFERRED = {s.data: s for s in STAGES.values() if s.inferred}  # the data a recipe has -> the stage it means
DEFAULT = INFERRED[CHAT]  # a config built in code, or a recipe with no evidence either way


def reads(name: Optional[str], data: str) -> bool:
    """Whether the registered stage ``name`` reads ``data`` rows (False for an unknown name)."""
    schema = STAGES.get(name)
    return schema is not None and schema.data == data


def owned_keys(schema: StageSchema, sections: dict) -> set:
    """The recipe keys only ``schema``'s stage reads: its section's fields and its own keys outside it."""
    own = {f.name for f in dataclasses.fields(sections[schema.section])} if schema.section else set()
    return own | set(schema.keys)


def claimed_keys(sections: dict) -> set:
    """The keys some stage owns: their presence is evidence of that stage (:func:`infer_stage`)."""
    return set().union(*(owned_keys(s, sections) for s in STAGES.values()))


def unused_keys(name: str, sections: dict) -> set:
    """The keys stage ``name`` does not read: those other stages own and it does not."""
    mine = owned_keys(STAGES[name], sections)
    return {k for s in STAGES.values() for k in owned_keys(s, sections) if k not in mine}


def _kinds_of_spec(spec) -> set:
    """CHAT / PREFERENCE evidence of one dataset_mixture entry (its columns and split name)."""
    if not isinstance(spec, dict):
        spec = getattr(spec, "__dict__", {})
    cols = set(spec.get("columns") or ())
    split = str(spec.get("split") or "")
    kinds = set()
    if {"chosen", "rejected"} <= cols or split.endswith("_prefs"):
        kinds.add(PREFERENCE)
    if ("messages" in cols and "chosen" not in cols) or split.endswith("_sft"):
        kinds.add(CHAT)
    return kinds


def data_kind(data: dict) -> Optional[str]:
    """PREFERENCE, CHAT or None (the recipe does not say) from the data keys.

    Raises ``ValueError`` when the recipe mixes both kinds.
    """
    kinds: set = set()
    mixture = data.get("dataset_mixture")
    if mixture is not None:
        specs = mixture.get("datasets", ()) if isinstance(mixture, dict) else getattr(mixture, "datasets", ())
        for spec in specs or ():
            kinds |= _kinds_of_spec(spec)
    elif data.get("dataset_mixer") is not None:
        for split in data.get("dataset_splits") or ():
            kinds |= _kinds_of_spec({"split": split})
    if len(kinds) > 1:
        raise ValueError("dataset: mixes preference (chosen/rejected, *_prefs) and chat (messages, *_sft) data; "
                         "a run trains one stage")
    return kinds.pop() if kinds else None


def infer_stage(explicit: Optional[str], stage_keys: dict, kind: Optional[str]) -> tuple:
    """``(stage, notices)`` from an explicit ``stage`` (or None), the preference stages' keys present
    (``{key: where}``) and the data kind. Raises ``ValueError("key: ...")`` when they contradict each other.
    """
    weak = {k for s in STAGES.values() for k in s.weak_keys}
    strong = [k for k in stage_keys if k not in weak]
    named = [f"{k} ({stage_keys[k]})" if stage_keys[k].startswith(CLI) else k for k in strong]
    if explicit is None:
        if strong and kind == CHAT:
            raise ValueError(f"{strong[0]}: a DPO key, but the data is chat (SFT) data; give preference data "
                             "(chosen/rejected) or remove the DPO keys")
        return (INFERRED[PREFERENCE] if stage_keys or kind == PREFERENCE else DEFAULT).name, []
    if reads(explicit, CHAT):
        if strong:
            raise ValueError(f"stage: {explicit!r} contradicts the DPO key(s) {', '.join(named)}; remove them, "
                             "or train stage dpo (zephyr-fast dpo RECIPE)")
        if kind == PREFERENCE:
            raise ValueError(f"stage: {explicit!r} contradicts the preference data (chosen/rejected, *_prefs); "
                             "train stage dpo (zephyr-fast dpo RECIPE)")
        return explicit, [f"{k}: a DPO key, unused by stage {explicit}" for k in stage_keys]
    if kind == CHAT:
        raise ValueError(f"stage: {explicit!r} contradicts the chat (SFT) data (messages, *_sft); give preference "
                         "data (chosen/rejected) or train stage sft (zephyr-fast sft RECIPE)")
    return explicit, []
