"""Where a run writes: the :class:`Checkpointer`, one per run, owns ``output_dir``.

The recipe (``training/run.py``) builds it from the config, as a torchtune recipe builds its
``CheckpointClient``, and calls it at each point of the run; the loop (``training/loop.py``) calls
:meth:`Checkpointer.save`. In run order:

* :meth:`~Checkpointer.claim` -- one writer per ``output_dir`` (``zephyr_fast.outputs``), an earlier
  run's checkpoints refused unless resumed or overwritten, the resolved ``config.yaml``;
* :meth:`~Checkpointer.check_hub` -- the Hub target (``push_to_hub``), checked before any data work;
* :meth:`~Checkpointer.resume` -- the step and best-model record restored from
  ``resume_from_checkpoint``: verified against its manifest, the config and train data compared
  with the checkpoint's (:class:`RunIdentity`), the step compared with the scheduler's,
  ``metrics.jsonl`` cut back to that step;
* :meth:`~Checkpointer.save` -- ``checkpoint-{step}`` (atomic, manifest last), pruned to
  ``save_total_limit`` (the best one spared), pushed per ``hub_strategy``;
* :meth:`~Checkpointer.load_best` -- ``load_best_model_at_end``;
* :meth:`~Checkpointer.export` -- the final Hugging Face folder, model card, ``train_results.json``,
  pushed to the Hub; :meth:`~Checkpointer.write_summary` -- ``summary.json``.

The on-disk format is ``training/checkpoint.py`` (layout, publish, prune, load), ``manifest.py``
(digests), ``hf_folder.py`` (the model folder) and ``export.py`` (the final model folder); this module
decides when and what is written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Optional

from zephyr_fast.config import Config, config_hash
from zephyr_fast.data.identity import rows_digest
from zephyr_fast.fileio import atomic_open
from zephyr_fast.model.forward import unwrap_model
from zephyr_fast.outputs import OutputError, OutputLock, claim_folder
from zephyr_fast.training import checkpoint as ckpt
from zephyr_fast.training import hub
from zephyr_fast.training.distributed import DistInfo, gather_objects
from zephyr_fast.training.export import export_final
from zephyr_fast.training.metrics import metrics_path, read_metrics, write_jsonl

__all__ = ["RESUMABLE_KEYS", "Checkpointer", "RunIdentity", "run_inputs"]

# what a resumed run may change without changing what it trains: where it writes and how often it
# logs, evaluates, saves, reports and pushes (every other key must match the checkpoint's)
RESUMABLE_KEYS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "resume_allow_changes",
                  "save_total_limit", "save_steps", "save_strategy", "save_final_model", "logging_steps",
                  "logging_first_step", "eval_strategy", "eval_steps", "per_device_eval_batch_size", "report_to",
                  "run_name", "wandb_project", "wandb_entity", "wandb_run_group", "push_to_hub", "hub_model_id",
                  "hub_strategy", "hub_private_repo", "hub_model_revision", "hub_token", "peak_tflops")


class Checkpointer:
    """Everything a run writes to ``output_dir`` but metrics and the reference cache (module docstring).

    Collective where the checkpoint format is (DeepSpeed: every rank calls :meth:`save`,
    :meth:`resume`, :meth:`load_best` and :meth:`export`); the Hub is pushed from rank 0 only.
    """

    def __init__(self, cfg: Config, dist: DistInfo, log=print):
        self.cfg, self.t, self.dist, self.log = cfg, cfg.training, dist, log
        self.hub: Optional[hub.HubTarget] = None  # set by check_hub on rank 0 when push_to_hub
        self.resumed_from: Optional[str] = None  # the checkpoint resume() restored, if any
        self._opt = self._identity = self._tokenizer = None  # the run's training state, bound by resume()

    # ---- before the run ----------------------------------------------------------------------

    def claim(self):
        """Rank 0 claims output_dir (:func:`zephyr_fast.outputs.claim_folder`: not an input, not a foreign
        folder, one writer) and writes the resolved config there; returns the lock (a context manager,
        held for the run). A refusal is raised on every rank."""
        t, lock, error = self.t, contextlib.nullcontext(), None
        if self.dist.is_main:
            try:
                lock = claim_folder(t.output_dir, "train", inputs=run_inputs(self.cfg),
                                    overwrite=t.overwrite_output_dir)
                self._check_earlier_checkpoints()
                self.cfg.save(os.path.join(t.output_dir, "config.yaml"))
            except OutputError as e:
                if isinstance(lock, OutputLock):
                    lock.release()
                error = str(e)
        errors = [e for e in gather_objects(error, self.dist.world_size) if e]
        if errors:
            raise OutputError(errors[0])
        return lock

    def _check_earlier_checkpoints(self) -> None:
        """A fresh run (no resume) next to an earlier run's checkpoints would rotate them away: refused
        unless ``overwrite_output_dir``."""
        t = self.t
        found = ckpt.list_checkpoints(t.output_dir)
        if found and not t.resume_from_checkpoint and not t.overwrite_output_dir:
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            raise OutputError(f"output_dir {t.output_dir}: holds an earlier run's checkpoints "
                              f"({os.path.basename(found[-1])}{more}); resume with --resume_from_checkpoint=auto, "
                              "pass --overwrite_output_dir=true to start afresh (they will be rotated away), or use "
                              "a new output_dir")

    def check_hub(self) -> None:
        """push_to_hub: token, reachability and repo checked now (rank 0), one line when they fail."""
        self.hub = hub.check(self.t, self.t.output_dir) if self.dist.is_main else None

    # ---- training state ----------------------------------------------------------------------

    def resume(self, opt, identity: "RunIdentity", tokenizer) -> tuple:
        """``(step, best)`` restored from ``resume_from_checkpoint`` when set, else ``(0, {})``; from now on
        :meth:`save` / :meth:`load_best` / :meth:`export` write and read ``opt`` (``build.Optimisation``:
        its module is the trainer's ``LossModule``) with ``tokenizer`` and ``identity``.

        The checkpoint is verified against its manifest; a changed config or train data is refused unless
        ``resume_allow_changes``, a step counter that disagrees with the scheduler always (one line each);
        metrics.jsonl loses the rows logged after the checkpoint."""
        t, log = self.t, self.log
        self._opt, self._identity, self._tokenizer = opt, identity, tokenizer
        resume = ckpt.resolve_resume(t.resume_from_checkpoint, t.output_dir)
        if not resume:
            return 0, {}
        restored = ckpt.load_checkpoint(resume, dist=self.dist, model=opt.module, optimizer=opt.optimizer,
                                        scheduler=opt.scheduler, engine=opt.engine)
        step = _check_step(resume, restored, opt.scheduler)
        changes = identity.changes(restored)
        if changes and not t.resume_allow_changes:
            raise ckpt.CheckpointError(f"{resume}: {'; '.join(changes)} since it was written; resume with "
                                       f"--resume_allow_changes=true to accept, or use a new output_dir")
        for change in changes:
            log(f"warning: {resume}: {change} since it was written; resuming anyway (resume_allow_changes)")
        log(f"resumed from {resume} at step {step}")
        self.resumed_from = resume
        if self.dist.is_main:
            _trim_metrics(metrics_path(t.output_dir), step, log)
        return step, restored.get("best") or {}

    def save(self, state, *, epoch: float, extra: Optional[dict] = None) -> str:
        """``checkpoint-{state.step}`` of the bound training state (``state``: the loop's ``LoopState``),
        then pruned to save_total_limit (never the best one) and pushed per hub_strategy; returns its path.
        Collective under DeepSpeed."""
        t, opt = self.t, self._opt
        record = {"stage": t.stage, **self._identity.state(), "epoch": epoch, "last_metrics": state.last_metrics,
                  **(extra or {}), "best": state.best}
        best = self._path(state.best["step"]) if state.best else None
        path = ckpt.save_checkpoint(t.output_dir, state.step, dist=self.dist, model=opt.module,
                                    optimizer=opt.optimizer, scheduler=opt.scheduler, engine=opt.engine,
                                    state=record, total_limit=t.save_total_limit, tokenizer=self._tokenizer,
                                    protect=best)
        self.log(f"checkpoint: {path}")
        if self.dist.is_main:
            hub.push_checkpoint(self.hub, t.output_dir, path)
        return path

    def load_best(self, state) -> dict:
        """load_best_model_at_end: the best saved step's weights become the run's (the last step's already
        are when it was the best); the summary entries name them as HF's trainer state does."""
        t, opt, step = self.t, self._opt, state.best["step"]
        path = self._path(step)
        if step != state.step:
            ckpt.load_checkpoint(path, dist=self.dist, model=opt.module, optimizer=opt.optimizer,
                                 scheduler=opt.scheduler, engine=opt.engine)
            self.log(f"load_best_model_at_end: {t.metric_for_best_model}={state.best['metric']:.6g} at step "
                     f"{step}: the final model is {path}'s")
        return {"best_model_checkpoint": path if step != state.step else t.output_dir,
                "best_metric": state.best["metric"], "best_step": step}

    def _path(self, step: int) -> str:
        return os.path.join(self.t.output_dir, f"checkpoint-{step}")

    # ---- after the run -----------------------------------------------------------------------

    def export(self, summary: dict) -> dict:
        """The trained model as a Hugging Face folder in output_dir (LoRA: the adapter, and the merged
        model), with its card and ``summary`` as train_results.json, pushed to the Hub when
        push_to_hub; returns the summary's new entries. Collective under DeepSpeed (the ZeRO-3 gather)."""
        lm, out = self._opt.module, self.t.output_dir
        model = lm.model if self.cfg.model.use_peft else unwrap_model(lm.model)
        export_final(out, cfg=self.cfg, dist=self.dist, model=model, tokenizer=self._tokenizer,
                          engine=self._opt.engine, results=_jsonable(summary))
        added = {"model_dir": out}
        if self.dist.is_main and self.hub is not None:
            hub.push_final(self.hub, out)
            added["hub_repo"] = self.hub.repo_id
        return added

    def write_summary(self, summary: dict) -> None:
        """``summary.json`` (rank 0), and its top-level scalars printed."""
        if self.dist.is_main:
            with atomic_open(os.path.join(self.t.output_dir, "summary.json")) as f:
                json.dump(_jsonable(summary), f, indent=2)
            self.log(json.dumps({k: v for k, v in _jsonable(summary).items() if not isinstance(v, dict)}, indent=1))


def run_inputs(cfg: Config) -> dict:
    """The run's local inputs (what output_dir must not be): model, tokenizer, data files, configs."""
    m, d = cfg.model, cfg.data
    ids = list(d.dataset_mixer or {}) + [s.id for s in (d.dataset_mixture.datasets if d.dataset_mixture else [])]
    return {"model_name_or_path": m.model_name_or_path, "tokenizer_name_or_path": m.tokenizer_name_or_path,
            "ref_model_name_or_path": getattr(cfg.dpo, "ref_model_name_or_path", None),
            "deepspeed": cfg.training.deepspeed, **{f"dataset {i}": i for i in ids}}


class RunIdentity:
    """What a checkpoint records of the run it belongs to -- the resumable config (``_resume_view``, and
    its hash) and the train split's rows digest -- and what changed since (:meth:`changes`).

    The digest (one pass over the rows) is computed once, at the first save or resume that needs it.
    """

    def __init__(self, cfg: Config, train_rows):
        view = _resume_view(cfg)
        view.training.resume_allow_changes = False  # the opt-in itself is not a change of the run
        self.config, self.config_hash = _flat(view.to_dict()), config_hash(view)
        self._rows, self._digest = train_rows, None

    @property
    def rows_digest(self) -> str:
        if self._digest is None:
            self._digest = rows_digest(self._rows)
        return self._digest

    def state(self) -> dict:
        """The checkpoint's trainer_state entries."""
        return {"config_hash": self.config_hash, "config": self.config, "train_rows_digest": self.rows_digest}

    def changes(self, restored: dict) -> list:
        """One phrase per difference between this run and the checkpoint's ``restored`` trainer_state."""
        out = []
        if restored.get("config_hash") != self.config_hash:
            old = restored.get("config") or {}
            keys = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            shown = ", ".join(f"{k} {old.get(k)!r} -> {self.config.get(k)!r}" for k in keys[:3])
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            out.append(f"the config changed ({shown or 'config hash'}{more})")
        if restored.get("train_rows_digest") != self.rows_digest:
            old = str(restored.get("train_rows_digest"))[:12]
            out.append(f"the train data changed (rows digest {old} -> {self.rows_digest[:12]})")
        return out


def _resume_view(cfg: Config) -> Config:
    """The config minus the keys a resumed run may legitimately change (:data:`RESUMABLE_KEYS`, the
    reference cache's location)."""
    c = copy.deepcopy(cfg)
    fresh = type(c.training)(stage=c.training.stage)
    for key in RESUMABLE_KEYS:
        setattr(c.training, key, getattr(fresh, key))
    c.dpo.ref_logps_dir = None
    c.source = None
    return c


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"training": {"seed": 7}}`` -> ``{"training.seed": 7}`` (JSON-safe leaves)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "dataset_mixer":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.loads(json.dumps(v, default=str))
    return out


def _check_step(path: str, restored: dict, scheduler) -> int:
    """The checkpoint's global_step, refused when the scheduler it restored stepped a different number of times."""
    step = restored.get("global_step")
    last = getattr(scheduler, "last_epoch", step)
    if not isinstance(step, int) or step < 0 or step != last:
        raise ckpt.CheckpointError(f"{path}/trainer_state.json: global_step {step!r} disagrees with scheduler.pt "
                                   f"(stepped {last} times); the checkpoint was edited or mixed from two saves")
    return step


def _trim_metrics(path: str, step: int, log=print) -> None:
    """Drop metrics logged after the checkpoint we resume from (the interrupted run's tail, including a
    line torn by the kill, with a warning); the file is replaced atomically."""
    if not os.path.exists(path):
        return
    rows, torn = read_metrics(path)
    if torn is not None:
        log(f"warning: {path}: dropped a torn last line (the previous run was interrupted mid-write): {torn[:80]!r}")
    write_jsonl(path, [r for r in rows if r.get("step", 0) <= step])


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
