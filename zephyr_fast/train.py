"""zephyr_fast trainer: ``train.py RECIPE.yaml [--key=value ...]``, stage ``sft | ref_logps | dpo``.

Launch with ``python`` (one process, plain torch optimiser), ``torchrun`` or ``deepspeed``
(``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 zephyr_fast/train.py recipes/tiny/dpo.yaml`` on CPU).
In-process: ``run(load_config(path, overrides)) -> summary dict``.

Reads top to bottom: setup -> data -> model -> (reference log-probs) -> train -> save.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: its folder must not shadow top-level modules
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import json  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

from zephyr_fast import checkpoint as ckpt  # noqa: E402
from zephyr_fast import metrics as M  # noqa: E402
from zephyr_fast.config import Config, ConfigError, config_hash, load_config  # noqa: E402,F401
from zephyr_fast.training import distributed  # noqa: E402
from zephyr_fast.training.build import (build_engine, build_model, core_model, flops_counter,  # noqa: E402
                                        peak_tflops, seed_everything)
from zephyr_fast.training.data import prepare  # noqa: E402
from zephyr_fast.training.loop import LoopState, LossModule, train_loop  # noqa: E402
from zephyr_fast.training.plan import make_plan  # noqa: E402


def reference_logps(cfg: Config, dist, model, data: dict, tokenizer, weights: str, log) -> dict:
    """Cached (or freshly computed) reference log-probs for the train and test splits."""
    from zephyr_fast import ref_logps as R
    from zephyr_fast.data.packing import pack_dpo

    d, t = cfg.dpo, cfg.training
    cache_dir = d.ref_logps_dir or os.path.join(t.output_dir, "ref_logps")
    budget = d.ref_logps_max_tokens or 4 * cfg.data.max_tokens_per_batch  # no activations kept: bigger batches
    out = {}
    for split, sd in data.items():
        if sd is None:
            continue
        key = R.cache_key(split=split, rows=sd.rows, examples=sd.examples, tokenizer=tokenizer, weights=weights,
                          max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                          dtype=cfg.model.dtype)
        ref = R.read_cache(cache_dir, split, key, recompute=d.ref_logps_recompute)
        if ref is None:
            # the reference pass uses the separate layout: exact per-sequence attention, any backend
            batches = list(pack_dpo(sd.examples, budget, layout="separate", seed=t.seed))
            ref = R.compute_and_write(model, batches, cache_dir=cache_dir, split=split, key=key, dist=dist,
                                      impl=t.kernel_impl, log=log)
        else:
            log(f"reference log-probs ({split}): reusing {ref.path}")
        out[split] = ref
    return out


def run(cfg: Config, *, stop_after: Optional[int] = None, return_model: bool = False) -> dict:
    """Run the recipe's stage; returns a summary (throughput, final metrics, output paths).

    ``stop_after``: stop once that many optimiser steps are done (after any checkpoint due at that
    step), as if the job were killed -- resume it with ``resume_from_checkpoint="auto"``.
    ``return_model``: add the trained transformers model under ``"model"`` (in-process callers).
    """
    from zephyr_fast.data.chat import load_tokenizer

    # ---- setup -------------------------------------------------------------------------------
    t0 = time.time()
    dist = distributed.setup(cfg)
    t, m = cfg.training, cfg.model
    log = print if dist.is_main else (lambda *a, **k: None)
    if m.use_peft and dist.zero_stage == 3:
        raise ConfigError(f"{cfg.source}: use_peft: LoRA runs use ZeRO-2 or one process (frozen base weights need "
                          f"no partitioning); pass --deepspeed=recipes/deepspeed/zero2.json")
    if dist.is_main:
        os.makedirs(t.output_dir, exist_ok=True)
        cfg.save(os.path.join(t.output_dir, "config.yaml"))
    seed_everything(t.seed)
    tok_path = m.tokenizer_name_or_path or m.model_name_or_path
    tokenizer = load_tokenizer(tok_path, cfg.data.chat_template, revision=m.model_revision)

    # ---- data --------------------------------------------------------------------------------
    data = prepare(cfg, tokenizer, world_size=dist.world_size, log=log)
    if t.stage != "ref_logps" and t.eval_strategy == "no":
        data["test"] = None  # no evaluation: no test-split reference pass either

    # ---- model -------------------------------------------------------------------------------
    ref_path = cfg.dpo.ref_model_name_or_path if t.stage == "ref_logps" else None
    model = build_model(cfg, dist, path_override=ref_path)
    summary = {"stage": t.stage, "output_dir": t.output_dir, "world_size": dist.world_size,
               "deepspeed": dist.use_deepspeed, "zero_stage": dist.zero_stage, "device": str(dist.device)}
    refs = None
    if t.stage in ("ref_logps", "dpo"):
        from zephyr_fast.ref_logps import weights_fingerprint

        # fingerprint the weights *before* any training or resume: they are the reference weights
        weights = weights_fingerprint(ref_path or m.model_name_or_path, core_model(model),
                                      revision=m.model_revision, init=m.model_init, seed=t.seed)

    # ---- reference log-probs only ------------------------------------------------------------
    if t.stage == "ref_logps":
        engine, _, _ = build_engine(cfg, dist, model, 0, train=False)
        net = core_model(engine.module if engine is not None else model)
        refs = reference_logps(cfg, dist, net, data, tokenizer, weights, log)
        summary.update(_ref_summary(refs), runtime_seconds=time.time() - t0)
        _write_summary(cfg, dist, summary, log)
        return summary

    # ---- optimiser / engine --------------------------------------------------------------------
    plan = make_plan(len(data["train"].batches), world_size=dist.world_size, grad_accum=t.gradient_accumulation_steps,
                     seed=t.seed, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps)
    log(f"{t.stage}: {plan.total_steps} optimiser steps ({plan.steps_per_epoch}/epoch) of {plan.per_step} "
        f"micro-batches (world {dist.world_size} x accumulation {t.gradient_accumulation_steps})")
    lm = LossModule(model, cfg)
    engine, optimizer, scheduler = build_engine(cfg, dist, lm, plan.total_steps)

    train_refs = eval_refs = None
    if t.stage == "dpo":
        net = core_model((engine.module if engine is not None else lm).model)
        refs = reference_logps(cfg, dist, net, data, tokenizer, weights, log)
        train_refs = [refs["train"].lookup(b.pair_index) for b in data["train"].batches]
        if data["test"] is not None:
            eval_refs = [refs["test"].lookup(b.pair_index) for b in data["test"].batches]
        summary.update(_ref_summary(refs))

    # ---- resume --------------------------------------------------------------------------------
    state = LoopState()
    resume = ckpt.resolve_resume(t.resume_from_checkpoint, t.output_dir)
    if resume:
        restored = ckpt.load_checkpoint(resume, dist=dist, model=lm, optimizer=optimizer, scheduler=scheduler,
                                        engine=engine)
        if restored.get("config_hash") != config_hash(_resume_view(cfg)):
            log(f"warning: {resume} was written by a different config; resuming anyway")
        state.step = int(restored["global_step"])
        log(f"resumed from {resume} at step {state.step}")
    logger = M.MetricLogger(t.output_dir, enabled=dist.is_main, report_to=t.report_to, resume=bool(resume))
    if resume and dist.is_main:
        _trim_metrics(logger.path, state.step)

    def save(step: int, extra: dict) -> str:
        st = {"stage": t.stage, "config_hash": config_hash(_resume_view(cfg)), "epoch": step / plan.steps_per_epoch,
              "last_metrics": state.last_metrics, **extra}
        path = ckpt.save_checkpoint(t.output_dir, step, dist=dist, model=lm, optimizer=optimizer, scheduler=scheduler,
                                    engine=engine, state=st, total_limit=t.save_total_limit)
        log(f"checkpoint: {path}")
        return path

    # ---- train ---------------------------------------------------------------------------------
    eval_split = data["test"] if t.eval_strategy != "no" else None
    state = train_loop(cfg=cfg, dist=dist, model=lm, engine=engine, optimizer=optimizer, scheduler=scheduler,
                       stage=t.stage, plan=plan, train=data["train"], train_refs=train_refs, eval_split=eval_split,
                       eval_refs=eval_refs, state=state, logger=logger, flops_fn=flops_counter(lm.model),
                       peak_tflops=peak_tflops(cfg, dist), save_fn=save, stop_after=stop_after, log=log)
    logger.close()

    # ---- save ----------------------------------------------------------------------------------
    secs = max(state.train_seconds, 1e-9)
    summary.update({
        "global_step": state.step, "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
        "train_runtime": secs, "train_tokens": state.train_tokens, "train_tokens_per_second": state.train_tokens / secs,
        "metrics": state.last_metrics, "eval_metrics": state.eval_metrics, "train_loss": state.last_metrics.get("loss"),
        "metrics_path": logger.path, "runtime_seconds": time.time() - t0,
    })
    if t.stage == "dpo":
        summary["train_pairs"] = state.train_pairs
        summary["train_pairs_per_second"] = state.train_pairs / secs
    finished = state.step >= plan.total_steps
    summary["finished"] = finished
    if finished and t.save_final_model:
        ckpt.export_final(t.output_dir, cfg=cfg, dist=dist, model=core_model(lm.model) if not m.use_peft else lm.model,
                          tokenizer=tokenizer, engine=engine, results=_jsonable(summary))
        summary["model_dir"] = t.output_dir
    _write_summary(cfg, dist, summary, log)
    if return_model:
        summary["model"] = core_model(lm.model)
    return summary


def _resume_view(cfg: Config) -> Config:
    """The config minus the keys a resumed run may legitimately change."""
    import copy

    c = copy.deepcopy(cfg)
    c.training.resume_from_checkpoint = None
    c.source = None
    return c


def _trim_metrics(path: str, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from (the interrupted run's tail)."""
    if os.path.exists(path):
        rows = [r for r in M.read_jsonl(path) if r.get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def _ref_summary(refs: dict) -> dict:
    out = {}
    for split, ref in refs.items():
        out[f"ref_logps_{split}_path"] = ref.path
        out[f"ref_logps_{split}_reused"] = ref.reused
        if not ref.reused and ref.seconds > 0:
            out[f"ref_logps_{split}_tokens_per_second"] = ref.tokens / ref.seconds
    return out


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def _write_summary(cfg: Config, dist, summary: dict, log) -> None:
    if dist.is_main:
        with open(os.path.join(cfg.training.output_dir, "summary.json"), "w") as f:
            json.dump(_jsonable(summary), f, indent=2)
        log(json.dumps({k: v for k, v in _jsonable(summary).items() if not isinstance(v, dict)}, indent=1))


def parse_args(argv: list) -> tuple:
    """``RECIPE.yaml [--key=value ...]``; launcher-added ``--local_rank`` is dropped."""
    args, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank") or a.startswith("--local-rank"):
            skip = "=" not in a
            continue
        args.append(a)
    if not args or args[0].startswith("--"):
        raise SystemExit("usage: train.py RECIPE.yaml [--key=value ...]")
    overrides = []
    rest = args[1:]
    i = 0
    while i < len(rest):  # accept "--key value" as well as "--key=value"
        a = rest[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            overrides.append(f"{a}={rest[i + 1]}")
            i += 2
        else:
            overrides.append(a)
            i += 1
    return args[0], overrides


def main(argv=None) -> int:
    path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # --stop_after=N is a run option, not a recipe key: stop after N steps as if preempted
    stop = [o for o in overrides if o.startswith("--stop_after=")]
    overrides = [o for o in overrides if o not in stop]
    stop_after = int(stop[-1].split("=", 1)[1]) if stop else None
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg, stop_after=stop_after)
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
