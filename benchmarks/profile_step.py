"""Where each second of one DPO optimiser step goes: zephyr_fast vs TRL's DPOTrainer, on CPU.

Both trainers train the same saved model (``e2e.make_model_dir``) on the same real preference pairs
(``e2e.write_rows``): one step of ``pairs`` pairs, max_length 512, prompt <= 256, fp32. Each trainer
runs one untimed warm-up step, then one step under ``torch.profiler`` (CPU activities).

Classification (self time, so nothing is counted twice; the categories sum to the step):

* forward regions are ``record_function("zf::<category>")`` around module / function boundaries:
  the decoder's ``nn.Linear`` modules (``body_linear``), the attention interface function the model
  dispatches to (``attention``), zephyr's stage loss head / TRL's chunked log-prob Function
  (``lm_head``), TRL's reference-model forward (``reference``) and the optimiser update
  (``optimizer``: grad clipping, ``optimizer.step``, scheduler, ``zero_grad``);
* backward: when a region's forward returns, the autograd nodes it created (walked from its outputs,
  sequence numbers at or after the region's start) are claimed for its category (innermost first);
  the profiler's ``autograd::engine::evaluate_function`` event of a node carries the same sequence
  number, so its whole subtree goes to that category;
* ``reference`` and ``optimizer`` win over anything nested in them; everything else (norms,
  rotary, embeddings, masks, elementwise, collation, Python) is ``other``.

FLOPs are analytic matmul FLOPs from the config and the token counts each trainer processes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import pathlib
import tempfile
import time

import torch
import trl.trainer.utils as trl_utils
from torch.profiler import ProfilerActivity, profile, record_function
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from zephyr_fast.config import build_config
from zephyr_fast.model.forward import unwrap_model
from zephyr_fast.objectives import LossModule, make_stage
from zephyr_fast.training import run as zf_run
from zephyr_fast.training.build import build_engine, build_model, flops_counter
from zephyr_fast.training.loop import TrainLoop
from zephyr_fast.training.plan import make_plan, prepare

from . import e2e
from .e2e_report import PROFILE_CATEGORIES as CATEGORIES
from .e2e_report import step_profile_lines as render  # noqa: F401  (the report renders it too)

PREFIX = "zf::"
_EVAL_FN = "autograd::engine::evaluate_function: "
_OUTER = ("reference", "optimizer")  # regions whose whole subtree is theirs
BATCH_PAIRS = 8  # pairs per optimiser step, both trainers (the e2e batch)


# ---- tagging: record_function regions + the autograd nodes each region created ----

def _next_seq() -> int:
    """The autograd sequence number the next node created on this thread gets (costs one view node)."""
    return torch.empty(0, requires_grad=True).view(0).grad_fn._sequence_nr() + 1


def _tensors(obj):
    """Every tensor in a (nested) output: tensors, tuples, lists, dicts / ModelOutputs."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class Tagger:
    """Wraps callables in ``zf::<category>`` regions; ``nodes``: autograd sequence number -> category."""

    def __init__(self):
        self.nodes: dict = {}

    def wrap(self, category: str, fn):
        name = PREFIX + category

        def tagged(*args, **kwargs):
            start = _next_seq() if torch.is_grad_enabled() else None
            with record_function(name):
                out = fn(*args, **kwargs)
            if start is not None:
                self._claim(out, start, category)
            return out

        return tagged

    def _claim(self, out, start: int, category: str) -> None:
        """Give ``category`` the nodes reachable from ``out`` that were created since ``start``."""
        stack = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
        seen = set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            seq = node._sequence_nr()
            if seq < start or seq >= 2 ** 62:  # older than the region, or an AccumulateGrad leaf
                continue
            self.nodes.setdefault(seq, category)  # inner regions return first: innermost wins
            stack.extend(f for f, _ in node.next_functions)


@contextlib.contextmanager
def swapped(d: dict, key: str, value):
    """``d[key] = value`` for the block (``d``: an instance's ``vars()``, a module's, a registry's
    local mapping); then what was there is put back, or the key removed."""
    had, old = key in d, d.get(key)
    d[key] = value
    try:
        yield
    finally:
        if had:
            d[key] = old
        else:
            del d[key]


@contextlib.contextmanager
def body_tags(tagger: Tagger, model, attn_name: str):
    """Tag the decoder's linear layers (``body_linear``) and the ``attn_name`` attention function."""
    with contextlib.ExitStack() as stack:
        for mod in model.get_decoder().modules():
            if isinstance(mod, torch.nn.Linear):
                stack.enter_context(swapped(vars(mod), "forward", tagger.wrap("body_linear", mod.forward)))
        stack.enter_context(swapped(ALL_ATTENTION_FUNCTIONS._local_mapping, attn_name,
                                    tagger.wrap("attention", ALL_ATTENTION_FUNCTIONS[attn_name])))
        yield


# ---- profiling one step ----

def _own_category(ev, nodes: dict):
    """The category a profiler event opens (a ``zf::`` region, a claimed autograd node), or None."""
    if ev.name.startswith(PREFIX) and ev.name[len(PREFIX):] in CATEGORIES:
        return ev.name[len(PREFIX):]
    if ev.name.startswith(_EVAL_FN):
        return nodes.get(ev.sequence_nr)
    return None


def aggregate(step_event, nodes: dict, top_other: int = 8) -> dict:
    """``{"seconds": {category: self seconds over step_event's subtree, "total": its wall seconds},
    "other_top": [[op name, seconds], ...]}`` (the largest contributors to ``other``)."""
    secs, other = dict.fromkeys(CATEGORIES, 0.0), {}
    stack = [(step_event, None, None)]  # (event, outer region, innermost category)
    while stack:
        ev, outer, inner = stack.pop()
        cat = _own_category(ev, nodes)
        if cat in _OUTER and outer is None:
            outer = cat
        elif cat is not None:
            inner = cat
        where, s = outer or inner or "other", ev.self_cpu_time_total / 1e6
        secs[where] += s
        other[ev.name] = other.get(ev.name, 0.0) + (s if where == "other" else 0.0)
        stack.extend((c, outer, inner) for c in ev.cpu_children)
    secs["total"] = step_event.cpu_time_total / 1e6
    top = sorted(((n, s) for n, s in other.items() if s > 0), key=lambda kv: -kv[1])[:top_other]
    return {"seconds": secs, "other_top": [[name, s] for name, s in top]}


def profile_step(step, tagger: Tagger) -> dict:
    """Run ``step()`` once under the profiler (inside ``zf::step``); :func:`aggregate` of it."""
    tagger.nodes.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(PREFIX + "step"):
            step()
    (step_event,) = [e for e in prof.events() if e.name == PREFIX + "step"]  # exactly one
    return aggregate(step_event, tagger.nodes)


# ---- FLOPs (analytic matmul FLOPs) ----

def dims(config) -> dict:
    """``L, D, V`` and the decoder's matmul parameters per token (q/k/v/o + gate/up/down), from a config."""
    d, heads = config.hidden_size, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // heads
    kv = config.num_key_value_heads * hd
    per_layer = d * heads * hd * 2 + 2 * d * kv + 3 * d * config.intermediate_size
    return {"L": config.num_hidden_layers, "D": d, "V": config.vocab_size, "body": per_layer * config.num_hidden_layers}


def useful_flops(m: dict, tokens: int) -> float:
    """6 x (matmul params: body + LM head) x real tokens: the same numerator for both trainers."""
    return 6.0 * (m["body"] + m["V"] * m["D"]) * tokens


def executed_flops(m: dict, *, tokens: int, attn_sq: int, head_rows: int, ref_tokens: int = 0,
                   ref_attn_sq: int = 0, ref_head_rows: int = 0) -> dict:
    """Matmul FLOPs of one training step per category.

    Body 6·P·tokens; attention (QK^T and PV over full squares) 12·L·D·Σlen²; LM head 4 GEMMs of
    2·D·V per scored row (forward, and recompute + dX + dW); a no-grad reference forward 1/3 of each.
    """
    L, D, V = m["L"], m["D"], m["V"]
    out = {"body_linear": 6.0 * m["body"] * tokens, "attention": 12.0 * L * D * attn_sq,
           "lm_head": 8.0 * D * V * head_rows,
           "reference": 2.0 * m["body"] * ref_tokens + 4.0 * L * D * ref_attn_sq + 2.0 * D * V * ref_head_rows}
    out["total"] = sum(out.values())
    return out


# ---- zephyr_fast ----

def _zephyr_config(model_dir, data_file, out_dir, pairs: int, max_length: int):
    """e2e's DPO recipe with exactly ``pairs`` pairs per optimiser step (``batch_by`` examples), 2 steps."""
    raw = e2e.zephyr_recipe("dpo", model_dir, data_file, out_dir, batch=pairs, max_length=max_length)
    return build_config(dict(raw, max_steps=2), source="benchmarks/profile_step.py")


def _zephyr_trainer(cfg, log=lambda *a, **k: None):
    """The real trainer's pieces (``training.run``): ``(loop, reference seconds, reference tokens)``."""
    t, (dist, _), stage = cfg.training, zf_run.setup(cfg), make_stage(cfg)
    tok = zf_run.recipe_tokenizer(cfg)
    data = prepare(cfg.data, stage, tok, zf_run.batching(cfg, stage, dist.world_size), log=log)
    data["test"] = None
    path = cfg.model.model_name_or_path
    model = build_model(cfg.model, dist, seed=t.seed, path=path)
    summary = {"timeline": {}}  # what run() hands its reference pass
    reference = zf_run.reference_pass(cfg, dist, stage, unwrap_model(model), path, data, tok, summary, log)
    plan = make_plan(data["train"].schedule, world_size=1, grad_accum=t.gradient_accumulation_steps,
                     num_train_epochs=t.num_train_epochs, max_steps=t.max_steps)
    lm = LossModule(model, stage)
    opt = build_engine(t, dist, lm, plan.total_steps)
    t0 = time.perf_counter()
    refs = reference(unwrap_model(lm.model))
    ref_s = time.perf_counter() - t0
    loop = TrainLoop(t, stage, dist, opt, plan, data["train"], refs["train"], None, lambda *a: None,
                     flops_counter(lm.model))
    return loop, ref_s, refs["train"].tokens


def profile_zephyr(model_dir, data_file, out_dir, pairs: int, max_length: int = e2e.MAX_LENGTH) -> dict:
    """Warm-up step, then one profiled step of zephyr_fast's DPO loop (``TrainLoop._micro_batches`` + ``opt.step``)."""
    loop, ref_s, ref_tokens = _zephyr_trainer(_zephyr_config(model_dir, data_file, out_dir, pairs, max_length))
    opt, plan = loop.opt, loop.plan
    opt.module.train()
    seen = []

    def step(k: int, optimizer_step):
        micros = plan.step_micro(k)
        loop._micro_batches(k, micros, sum(m.stats.pairs for m in micros))
        optimizer_step()
        seen.append(micros)

    step(0, opt.step)
    tagger = Tagger()
    core = opt.module.model
    with body_tags(tagger, core, core.config._attn_implementation), \
            swapped(vars(opt.module), "loss_head", tagger.wrap("lm_head", opt.module.loss_head)):
        prof = profile_step(lambda: step(1, tagger.wrap("optimizer", opt.step)), tagger)
    stats = [m.stats for m in seen[-1]]
    tokens, attn_sq = sum(s.tokens for s in stats), sum(s.attn_sq for s in stats)
    m = dims(core.config)
    flops = executed_flops(m, tokens=tokens, attn_sq=attn_sq, head_rows=sum(s.targets for s in stats))
    return {**prof, "flops": flops, "pairs": sum(s.pairs for s in stats), "real_tokens": tokens,
            "processed_tokens": tokens, "dims": m,
            "offline_reference": {"seconds": ref_s, "tokens": ref_tokens, "seconds_per_pair": ref_s / pairs}}


# ---- TRL ----

def _trl_trainer(model_dir, data_file, out_dir, pairs: int, max_length: int):
    """TRL's ``DPOTrainer`` as the e2e tier builds it, batch ``pairs``, with its optimiser and schedule created."""
    trainer = e2e.trl_trainer("dpo", model_dir, data_file, out_dir, batch=pairs, max_length=max_length)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before training_step
    return trainer


def profile_trl(model_dir, data_file, out_dir, pairs: int, max_length: int = e2e.MAX_LENGTH) -> dict:
    """Warm-up step, then one profiled step of TRL: a dataloader batch, ``training_step``, then the HF loop's
    clip / ``optimizer.step`` / scheduler / ``zero_grad``."""
    trainer = _trl_trainer(model_dir, data_file, out_dir, pairs, max_length)
    model, dl = trainer.model, trainer.get_train_dataloader()
    seen = []

    def update():
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()

    def step(optimizer_step):
        batch = next(iter(dl))
        seen.append({k: batch[k] for k in ("input_ids", "attention_mask")})
        trainer.training_step(model, batch)
        optimizer_step()

    model.train()
    step(update)
    tagger = Tagger()
    chunked = trl_utils._ChunkedLogProbFunction
    head = type("TaggedChunkedLogProb", (), {"apply": staticmethod(tagger.wrap("lm_head", chunked.apply))})
    with body_tags(tagger, model, model.config._attn_implementation), \
            swapped(vars(trl_utils), "_ChunkedLogProbFunction", head), \
            swapped(vars(trainer.ref_model), "forward", tagger.wrap("reference", trainer.ref_model.forward)):
        prof = profile_step(lambda: step(tagger.wrap("optimizer", update)), tagger)
    (rows, T), mask, m = seen[-1]["input_ids"].shape, seen[-1]["attention_mask"], dims(model.config)
    sq, head_rows = rows * T * T, rows * (T - 1)  # padded SDPA; the CPU head scores every position
    flops = executed_flops(m, tokens=rows * T, attn_sq=sq, head_rows=head_rows, ref_tokens=rows * T,
                           ref_attn_sq=sq, ref_head_rows=head_rows)
    return {**prof, "flops": flops, "pairs": rows // 2, "real_tokens": int(mask.sum()),
            "processed_tokens": rows * T, "dims": m}


# ---- both, rendering, CLI ----

def profile_both(root: pathlib.Path, pairs: int = BATCH_PAIRS, model: str = "mid",
                 max_length: int = e2e.MAX_LENGTH) -> dict:
    """Build ``model`` and ``pairs`` rows under ``root``; profile both trainers; add FLOP/s figures.

    ``max_length`` below 512 (prompts then cut at half of it) only to keep tests fast."""
    model_dir = e2e.make_model_dir(root, model=model)
    rows = e2e.write_rows(root, pairs)
    n = rows["n"]
    out = {"model": model, "pairs": n, "max_length": max_length, "threads": torch.get_num_threads(),
           "zephyr_fast": profile_zephyr(model_dir, rows["pairs"], root / "zephyr-out", n, max_length)}
    gc.collect()  # zephyr's model, optimiser state and profile go before TRL's padded batch needs memory
    out["trl"] = profile_trl(model_dir, rows["pairs"], root / "trl-out", n, max_length)
    useful = useful_flops(out["zephyr_fast"]["dims"], out["zephyr_fast"]["real_tokens"])
    for r in (out["zephyr_fast"], out["trl"]):
        secs = r["seconds"]["total"]
        r.update(useful_flops=useful, executed_flops_per_s=r["flops"]["total"] / secs, useful_flops_per_s=useful / secs)
    return out


def main(argv=None) -> dict:
    """CLI: profile both trainers on a fresh model in a temp dir, print :func:`render`, write ``--json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=BATCH_PAIRS)
    p.add_argument("--model", default="mid", choices=sorted(e2e.MODELS))
    p.add_argument("--json", default=None, help="write the result here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = profile_both(pathlib.Path(tmp), a.pairs, a.model)
    print("\n".join(render(result)))
    if a.json:
        result["datetime"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        pathlib.Path(a.json).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
