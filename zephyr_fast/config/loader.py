"""A recipe -> :class:`Config`: YAML (flat TRL/alignment-handbook style or sectioned) + ``--key=value``.

A recipe is one YAML mapping. Keys may be flat (``learning_rate: 5.0e-7``, as in the
alignment-handbook recipes) or grouped under the section names ``model:``, ``data:``,
``training:``, ``dpo:``; both resolve to the same :class:`Config`. Field names are unique across
sections, so a flat key always has exactly one home. Every other key a published alignment-handbook /
TRL recipe uses is handled by :mod:`zephyr_fast.config.keys`: an alias, a translation, a value that
is what zephyr_fast always does, a key with no effect on results (accepted, and listed in
:attr:`Config.notices` for the run to print), or a one-line refusal saying what to use instead;
anything else unknown is an error with a did-you-mean suggestion. Nothing is silently ignored.

The stage is read from the recipe (:func:`zephyr_fast.config.values.infer_stage`). Command-line values
are parsed by the key's type (``--eval_strategy=no`` is the string "no"), and their errors name
``command line --key`` even when a section's own check fails. Each section checks its own values once,
when it is built; :class:`Config` derives the one value that spans sections, the micro-batch token
budget, and runs the stage's own data check.

Nothing here executes code from the file: ``yaml.safe_load`` only; ``trust_remote_code`` stays off whatever a
recipe says (a notice; the model's family must be built into transformers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from zephyr_fast import safe_yaml
from zephyr_fast.config import keys as rk
from zephyr_fast.config import trl as trl_keys
from zephyr_fast.config import values as st
from zephyr_fast.config.data import DataConfig
from zephyr_fast.config.keys import (ALIASES, ALWAYS, CLI, DATASET_KEYS, MODEL_INIT_KWARGS, NO_EFFECT, OBJECTIVE_KEYS,
                                     REFUSED, ConfigError, did_you_mean, typed)
from zephyr_fast.config.sections import DPOConfig, ModelConfig, TrainingConfig, blame, check, defaults
from zephyr_fast.config.values import LOSS_TYPES
from zephyr_fast.fileio import atomic_open
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
            self.training.stage = st.DEFAULT.name
        stage, d = st.STAGES[self.training.stage], self.data
        k = stage.tokens_per_example  # max_length-long sequences per example (a DPO pair: 2)
        if d.max_tokens_per_batch is None:  # HF-style batch sizes -> a packed token budget
            d.max_tokens_per_batch = self.training.per_device_train_batch_size * d.max_length * k
        check(d.max_tokens_per_batch >= d.max_length * k, "max_tokens_per_batch",
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

        The keys of other stages still at their defaults are left out (an sft config: the DPO keys):
        written out, they would read as keys contradicting the stage when the file is loaded again.
        """
        out = self.to_dict()
        _drop_unused_defaults(out, st.unused_keys(self.training.stage, SECTIONS))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_open(path) as f:
            if self.source:
                f.write(f"# resolved from {self.source}\n")
            yaml.safe_dump(out, f, sort_keys=False)


def _drop_unused_defaults(out: dict, unused: set) -> None:
    """Remove the ``unused`` keys still at their defaults from a ``to_dict()`` (in place), and a section
    left empty by that."""
    for sec, cls in SECTIONS.items():
        default = defaults(cls)
        kept = {k: v for k, v in out[sec].items() if k not in unused or v != default[k]}
        if kept or not out[sec]:
            out[sec] = kept
        else:
            del out[sec]


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


def field_types(cls) -> dict:
    """``{key: annotation}`` of a section class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _parse_override(arg: str):
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"{CLI}: override {arg!r} must look like --key=value")
    key, raw = arg[2:].split("=", 1)
    return key.replace("-", "_"), raw


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
        raise blame(str(e), keys.seen, source) from e
    for section in sections.values():
        section.locate(keys.seen, source)  # for the checks made at run start (Section.error)
    cfg.notices += _default_notices(cfg, keys.seen)
    return cfg


def _resolve_stage(kwargs: dict, keys: "_RecipeKeys") -> None:
    """Set ``training.stage``: the explicit one checked against the recipe's keys, else inferred."""
    claimed = st.claimed_keys(SECTIONS)
    stage_keys = {k: where for k, where in keys.seen.items() if k in claimed}
    stage, notices = st.infer_stage(kwargs["training"].get("stage"), stage_keys, st.data_kind(kwargs["data"]))
    if keys.sft_loss_type and not st.reads(stage, st.CHAT):
        raise ConfigError(f"{keys.sft_loss_type}: nll is SFTConfig's loss_type; a DPO loss_type is one of "
                          f"{', '.join(LOSS_TYPES)}")
    kwargs["training"]["stage"] = stage
    keys.notices.update((n.split(":", 1)[0], n) for n in notices)


def _default_notices(cfg: Config, seen: dict) -> list:
    """Notices for the result-setting keys left out whose default here differs from transformers' / TRL's."""
    values = {k: getattr(getattr(cfg, secs[0]), k) for k, secs in _field_index().items() if k in rk.HF_DEFAULTS}
    return rk.default_notices(values, seen, st.unused_keys(cfg.training.stage, SECTIONS))
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
                raise ConfigError(f"{where}: unknown section {sec_hint!r}{did_you_mean(sec_hint, SECTIONS)}")
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
        """A key that is no section's field (:func:`zephyr_fast.config.keys.extra_key`), or unknown."""
        if key in rk.DATASET_KEYS:
            self.dataset[key] = (typed(value, Optional[str], where), where)
            return
        try:
            puts, notice = rk.extra_key(key, value, where)
        except KeyError:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, self.known)}") from None
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
        tp = field_types(SECTIONS[sec])[key]
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


def config_hash(cfg: Config) -> str:
    """Short hash of the resolved sections (a checkpoint records the config it was written by)."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- --help: every key, from the sections' field metadata ------------------------------------
_HEADER = ("recipe keys (flat, or under their section; --key=value / --section.key=value on the command line,",
           "parsed by the key's type: a list as a,b or [a, b], a dict as {a: 1}, none/null for an Optional key).",
           f"stage: {' | '.join(st.STAGES)}; when the recipe has none: dpo if it has a DPO key (beta, loss_type, ...,",
           "max_prompt_length) or preference data (chosen/rejected columns, *_prefs splits), else sft.")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return "Optional[" + ", ".join(_type_name(a) for a in args) + "]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def keys_help() -> str:
    """The ``train.py --help`` text: every key with its section, type, default, help and accepted aliases."""
    lines = [*_HEADER]
    by_target = _aliases()
    for sec, cls in SECTIONS.items():
        lines.append(f"\n[{sec}]")
        types, default = field_types(cls), defaults(cls)
        for f in dataclasses.fields(cls):
            also = by_target.get(f.name)
            alias = f"  (also: {', '.join(also)})" if also else ""
            lines.append(f"  {f.name}: {_type_name(types[f.name])} = {default[f.name]!r}{alias}")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines + _other_keys())


def _aliases() -> dict:
    """``{field: [the other names a recipe may give it]}``."""
    by_target: dict = {}
    for alias, target in ALIASES.items():
        by_target.setdefault(target, []).append(alias)
    for sub, target in MODEL_INIT_KWARGS.items():
        by_target.setdefault(target, []).append(f"model_init_kwargs.{sub}")
    by_target.setdefault("attn_implementation", []).append("use_flash_attention_2")
    return by_target


def _other_keys() -> list:
    """The keys that are no section field: translated, always-values, no-effect, unset-only, refused."""
    lines = ["\n[TRL dataset keys] " + ", ".join(DATASET_KEYS) + " -> dataset_mixer + dataset_splits"]
    lines.append("[dataset_kwargs] add_special_tokens (decided per tokenizer), append_concat_token: false")
    lines.append("\n[accepted: what zephyr_fast always does; any other value is refused]")
    lines += [f"  {k}: {v!r}  ({what})" for k, (v, what) in ALWAYS.items()]
    lines.append("\n[accepted, no effect on results: listed in a notice at the start of the run]")
    lines += [f"  {k}  ({why})" for k, why in NO_EFFECT.items()]
    lines.append("\n[TRL / transformers features zephyr_fast does not implement: accepted off (TRL's default), "
                 "any other value refused]")
    lines += [f"  {k}  ({why})" for k, (_, why) in trl_keys.UNSET_ONLY.items()]
    lines.append("\n[refused]")
    lines += [f"  {k}: {why}" for k, why in REFUSED.items()]
    lines.append("  " + ", ".join(OBJECTIVE_KEYS) + ": objectives zephyr_fast does not implement")
    return lines


TRAIN_USAGE = "usage: train.py RECIPE.yaml [--key=value ...] [--debug] [--stop_after=N]   (--help: every recipe key)"


def wants_help(argv) -> bool:
    """Whether a training command line asks for ``--help`` / ``-h``."""
    return any(a in ("-h", "--help") for a in argv)


def print_help(argv=None) -> int:
    """``train.py --help`` / ``zephyr-fast train --help``: the usage and every recipe key; status 0.
    Torch-free, so the trainer is never imported for it."""
    print(f"{TRAIN_USAGE}\n\n{keys_help()}")
    return 0
