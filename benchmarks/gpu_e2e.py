"""Issue 13's GPU rows: whole trainers on one card, zephyr_fast vs TRL (sections of ``gpu_check``).

* ``e2e_dpo``: ~1B Mistral (``model_cases.MODELS["1b"]``), bf16, real UltraFeedback pairs, max_length
  1024, 8 pairs per step: zephyr_fast's trainer in-process (``zephyr_fast.train.run``, precomputed
  reference, default attention) vs DPOTrainer at its fastest documented settings
  (``precompute_ref_log_probs``, ``padding_free`` where TRL allows it, Liger when it imports).
* ``e2e_sft``: SFT vs SFTTrainer (``packing``, bfd, ``padding_free``, Liger), 8 × 1024 tokens per step.
* ``prefix_shared``: ``dpo_layout: prefix_shared`` (FlexAttention on CUDA) vs ``separate``.
* ``zero3``: 1-rank in-process DeepSpeed ZeRO-3 DPO (``recipes/deepspeed/zero3.json``, ``DS_BUILD_OPS=0``;
  skipped without DeepSpeed): step-1 loss and log-probs = the plain run's within rtol 1e-3, tokens/s.

Timing: 8 steps (smoke 3), the first two warm-up (smoke one: a compiled FlexAttention recompiles once
for dynamic shapes); figures from the end of the last warm-up step to the end of the last step (CUDA
synchronised, real tokens counted per step); the offline reference pass is outside it (``ref_pass_s``).
Peak memory: ``max_memory_allocated`` over the whole trainer. MFU: 6 · matmul parameters · real
tokens/s over the card's bf16 dense peak (``metrics.PEAK_TFLOPS``: H100/H200 989, A100 312; else None).
Record (``extra_info``): suite ``gpu_e2e_dpo|gpu_e2e_sft|gpu_prefix_shared|gpu_zero3``, provider
``zephyr_fast|trl``, variant, pairs_per_s, tokens_per_s, peak_mem_bytes, mfu, device_name, timed_steps,
timed_tokens, ref_pass_s, settings (zero3: loss, plain_loss, loss_rel_diff, loss_equal); stats.median =
median timed step (s). ``gpu_targets`` judges issue 13's GPU rows from them.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import inspect
import os
import pathlib
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.models.mistral import modeling_mistral

from zephyr_fast.config import build_config
from zephyr_fast.data.chat import load_tokenizer
from zephyr_fast.model.attention import resolve_backend
from zephyr_fast.model.load import tiny_config
from zephyr_fast.train import run
from zephyr_fast.training import loop
from zephyr_fast.training.distributed import teardown
from zephyr_fast.training.metrics import count_matmul_params, detect_peak_tflops

from .e2e import LR, TINY, trl_inputs, write_rows, zephyr_recipe
from .fmt import SUT
from .harness import REPO, TOKENIZER_DIR, record, sync
from .model_cases import MODELS

ZERO3_JSON = REPO / "recipes" / "deepspeed" / "zero3.json"
LOSS_RTOL = 1e-3  # ZeRO-3 vs plain step-1 loss / log-probs in bf16: the same forward, partitioned weights


@dataclass(frozen=True)
class Size:
    """One size of the sections: model, dtype, pairs / SFT rows, pairs (or packed rows) per step, steps."""

    model: dict
    shape: str
    dtype: str
    max_length: int
    batch: int
    steps: int
    sft_rows: int
    warmup: int  # untimed first steps

    @property
    def pairs(self) -> int:
        return self.batch * self.steps  # every step full, and both reference passes cover the same rows


GPU = Size(dict(arch="mistral", vocab_size=32000, **MODELS["1b"]), "mistral-1b", "bfloat16", 1024, 8, 8, 240, 2)
SMOKE = Size(dict(TINY, hidden_size=128, num_hidden_layers=2, intermediate_size=256), "mistral-smoke", "float32",
             256, 2, 3, 12, 1)


# -------------------- shared inputs: one model folder, the same rows (built once)

_CACHE: dict = {}


def workdir() -> pathlib.Path:
    if "root" not in _CACHE:
        _CACHE["root"] = pathlib.Path(tempfile.mkdtemp(prefix="gpu_e2e_"))
        atexit.register(shutil.rmtree, _CACHE["root"], True)
    return _CACHE["root"]


def model_dir(s: Size, dev: torch.device) -> pathlib.Path:
    """Save a seeded random-init ``s.model`` Mistral in ``s.dtype`` (initialised on ``dev``) + the tokenizer."""
    key = ("model", s.shape, s.dtype)
    if key not in _CACHE:
        out = workdir() / s.shape
        torch.manual_seed(0)
        with torch.device(dev):  # a 1B init on the host takes minutes
            net = AutoModelForCausalLM.from_config(tiny_config(**s.model), dtype=getattr(torch, s.dtype))
        net.save_pretrained(out, safe_serialization=True)
        del net
        load_tokenizer(str(TOKENIZER_DIR)).save_pretrained(out)
        _CACHE[key] = out
    return _CACHE[key]


def rows(s: Size) -> dict:
    """``{"pairs": jsonl, "sft": jsonl}``: ``s.pairs`` preference rows and ``s.sft_rows`` SFT conversations."""
    key = ("rows", s.shape)
    if key not in _CACHE:
        root = workdir()  # files named by row count: pairs{n}.jsonl, sft{n}.jsonl
        _CACHE[key] = {"pairs": write_rows(root, s.pairs)["pairs"], "sft": write_rows(root, s.sft_rows)["sft"]}
    return _CACHE[key]


def matmul_params(s: Size) -> int:
    """Parameters that take part in matmuls (all but the input embedding), counted on the meta device."""
    with torch.device("meta"):
        return count_matmul_params(AutoModelForCausalLM.from_config(tiny_config(**s.model)))


def free(dev: torch.device) -> Optional[int]:
    """The CUDA peak since the last call (bytes; CPU: None), then drop the last trainer's memory and reset it."""
    peak = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    return peak


# -------------------- step timing

def timed_figures(ends: list, tokens: list, pairs: list, warmup: int = 1) -> dict:
    """Throughput over the steps after ``warmup``: ``ends[i]`` (s, end of step i), ``tokens[i]``, ``pairs[i]``."""
    if len(ends) <= warmup:
        raise RuntimeError(f"{len(ends)} step(s) timed; need {warmup} warm-up step(s) and at least one more")
    w = warmup - 1  # the window opens at the end of the last warm-up step
    secs = ends[-1] - ends[w]
    timed_tokens, timed_pairs = sum(tokens[warmup:]), sum(pairs[warmup:])
    return {"timed_steps": len(ends) - warmup, "warmup_steps": warmup, "timed_s": secs, "timed_tokens": timed_tokens,
            "tokens_per_s": timed_tokens / secs, "pairs_per_s": timed_pairs / secs if timed_pairs else None,
            "step_s": [b - a for a, b in zip(ends[w:], ends[w + 1:])]}


@contextlib.contextmanager
def zephyr_steps():
    """Wrap ``TrainLoop._log_window`` (CUDA-synchronised; with ``logging_steps: 1`` one call per step):
    yields a list of ``{"end", "tokens", "pairs", "row"}``, one per optimiser step."""
    steps, original = [], loop.TrainLoop._log_window

    def probe(self, window, state, lr, grad_norm):
        row = original(self, window, state, lr, grad_norm)
        steps.append({"end": time.perf_counter(), "tokens": window.tokens, "pairs": window.pairs, "row": row})
        return row

    loop.TrainLoop._log_window = probe
    try:
        yield steps
    finally:
        loop.TrainLoop._log_window = original


def run_zephyr(s: Size, stage: str, dev: torch.device, *, layout: str = "separate", deepspeed=None) -> dict:
    """One in-process ``zephyr_fast.train.run`` of ``s.steps`` steps; figures over the timed steps."""
    data = rows(s)["sft" if stage == "sft" else "pairs"]
    out = workdir() / f"zephyr_{stage}_{layout}_{'ds' if deepspeed else 'plain'}"
    raw = zephyr_recipe(stage, model_dir(s, dev), data, out)
    raw.update(torch_dtype=s.dtype, bf16=s.dtype == "bfloat16", max_length=s.max_length, max_steps=s.steps,
               per_device_train_batch_size=s.batch, optim="adamw_torch", learning_rate=LR[stage],
               gradient_checkpointing=False, deepspeed=str(deepspeed) if deepspeed else None)
    if stage == "dpo":  # max_prompt_length 256 (no prompt is cut) unless max_length is shorter (smoke)
        raw.update(dpo_layout=layout, max_prompt_length=min(raw["max_prompt_length"], s.max_length // 2))
    free(dev)
    with zephyr_steps() as steps:
        summary = run(build_config(raw, source="benchmarks/gpu_e2e.py"))
    tl = summary["timeline"]
    fig = timed_figures([x["end"] for x in steps], [x["tokens"] for x in steps], [x["pairs"] for x in steps], s.warmup)
    fig.update(peak_mem_bytes=free(dev), rows=[x["row"] for x in steps], zero_stage=summary.get("zero_stage"),
               ref_pass_s=(tl["reference"] - tl["model"]) if "reference" in tl else None,
               settings={"attention_backend": "flex" if (stage, layout, dev.type) == ("dpo", "prefix_shared", "cuda")
                         else resolve_backend("auto", dev, getattr(torch, s.dtype)),  # what ``auto`` picks here
                         "dpo_layout": layout if stage == "dpo" else None,
                         "deepspeed": str(deepspeed) if deepspeed else None, "gradient_checkpointing": False})
    shutil.rmtree(out, ignore_errors=True)
    return fig


# -------------------- TRL at its fastest documented settings

def importable(name: str) -> bool:
    try:
        return importlib.import_module(name) is not None
    except Exception:
        return False


def trl_settings(stage: str, dev: torch.device) -> dict:
    """TRL's fastest settings here, with the reason for each one that is off.

    DPO ``padding_free``: TRL 1.16's DPOTrainer warns and falls back to padding ("temporarily
    unavailable" since its refactor), and its docs allow it only with FlashAttention 2/3.
    """
    if not (importable("trl") and importable("datasets")):
        pytest.skip("trl / datasets do not import on this machine (carry their wheels in .whl/)")
    from trl import DPOTrainer

    flash = dev.type == "cuda" and importable("flash_attn")
    liger = dev.type == "cuda" and importable("liger_kernel")  # Triton kernels: CUDA only
    out = {"attn_implementation": "flash_attention_2" if flash else "sdpa", "use_liger_kernel": liger,
           "gradient_checkpointing": False, "notes": []}
    if stage == "dpo":
        disabled = "temporarily unavailable" in inspect.getsource(DPOTrainer.__init__)
        out.update(precompute_ref_log_probs=True, padding_free=flash and not disabled)
        out["notes"] += ["padding_free off: " + ("this TRL's DPOTrainer disables it (pads instead)" if disabled
                         else "TRL allows it only with FlashAttention (no flash_attn)")] * (not out["padding_free"])
    else:
        out.update(packing=True, packing_strategy="bfd", padding_free=True)
    if not out["use_liger_kernel"]:
        out["notes"].append("use_liger_kernel off: " + ("liger_kernel does not import" if dev.type == "cuda"
                                                        else "its Triton kernels need CUDA"))
    return out


def _real_tokens(inputs: dict) -> tuple:
    """``(real tokens, pairs)`` of a TRL batch: attention-mask sum (padded) or every token (padding-free)."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else int(ids.numel())
    return tokens, (ids.shape[0] // 2 if "ref_chosen_logps" in inputs else 0)


def _timed_trainer(base, probe: dict, dev: torch.device) -> tuple:
    """``(base subclass, callback)``: DPOTrainer / SFTTrainer counting each step's real tokens and timing its
    reference pass; the callback appends ``perf_counter()`` at each step's end, CUDA synchronised."""

    class Timed(base):
        def training_step(self, model, inputs, *args, **kwargs):
            for key, n in zip(("tokens", "pairs"), _real_tokens(inputs)):
                probe[key].append(n)
            return super().training_step(model, inputs, *args, **kwargs)

        def _precompute_ref_logps(self, *args, **kwargs):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            probe["ref_pass_s"] = probe.get("ref_pass_s", 0.0) + time.perf_counter() - t
            return out

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sync(dev)
            probe["ends"].append(time.perf_counter())

    return Timed, Clock()


def run_trl(s: Size, stage: str, dev: torch.device) -> dict:
    """TRL's DPOTrainer / SFTTrainer for ``s.steps`` steps of ``s.batch``; figures over the timed steps."""
    st = trl_settings(stage, dev)  # skips the benchmark when TRL does not import
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    mdir, out = model_dir(s, dev), workdir() / f"trl_{stage}"
    tok, ds = trl_inputs(mdir, rows(s)["sft" if stage == "sft" else "pairs"], cache_dir=out / "hf")
    common = dict(output_dir=str(out), per_device_train_batch_size=s.batch, max_steps=s.steps, max_length=s.max_length,
                  logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, seed=42,
                  bf16=s.dtype == "bfloat16", use_cpu=dev.type != "cuda", learning_rate=LR[stage], optim="adamw_torch",
                  lr_scheduler_type="linear", use_liger_kernel=st["use_liger_kernel"],  # no checkpointing (default)
                  padding_free=st["padding_free"],
                  model_init_kwargs={"dtype": s.dtype, "attn_implementation": st["attn_implementation"]})
    if stage == "dpo":
        args, base = DPOConfig(**common, beta=0.1, loss_type="sigmoid", precompute_ref_log_probs=True), DPOTrainer
    else:
        args, base = SFTConfig(**common, packing=True, packing_strategy="bfd"), SFTTrainer
    probe = {"tokens": [], "pairs": [], "ends": []}
    timed, clock = _timed_trainer(base, probe, dev)
    saved, forward = dict(vars(modeling_mistral)), modeling_mistral.MistralForCausalLM.forward
    free(dev)
    try:  # Liger patches modeling_mistral module-wide: restored so that later zephyr_fast runs get stock models
        timed(model=str(mdir), args=args, train_dataset=ds, processing_class=tok, callbacks=[clock]).train()
    finally:
        peak = free(dev)
        for k, v in saved.items():
            setattr(modeling_mistral, k, v)
        modeling_mistral.MistralForCausalLM.forward = forward
    shutil.rmtree(out, ignore_errors=True)
    fig = timed_figures(probe["ends"], probe["tokens"], probe["pairs"], s.warmup)
    fig.update(peak_mem_bytes=peak, ref_pass_s=probe.get("ref_pass_s"), settings=st)
    return fig


# -------------------- recording

def fill(b, c, s: Size, suite: str, provider: str, variant: str, fig: dict) -> None:
    """A pytest-benchmark row: stats from the timed steps, ``record`` keys, the figures and MFU."""
    steps = sorted(fig["step_s"])
    b.stats = SimpleNamespace(median=statistics.median(steps), min=steps[0], max=steps[-1], rounds=len(steps))
    peak = detect_peak_tflops(c.dev)
    mfu = 6.0 * matmul_params(s) * fig["tokens_per_s"] / (peak * 1e12) if peak else None
    record(b, suite=suite, provider=provider, mode="full", shape=s.shape, dtype=s.dtype, dev=c.dev, variant=variant,
           steps=s.steps, batch=s.batch, max_length=s.max_length, smoke=c.smoke or None,
           **{k: v for k, v in fig.items() if k not in ("step_s", "rows", "peak_mem_bytes")})
    b.extra_info.update(peak_mem_bytes=fig.get("peak_mem_bytes"), mfu=mfu)
    c.log(f"{suite} {provider} {variant}: {[(k, b.extra_info.get(k)) for k in ('pairs_per_s', 'mfu', 'ref_pass_s')]}")


def bench_run(c, name: str, need_s: float, fn: Callable) -> None:
    """``c.bench(name, fn)`` unless fewer than ``need_s`` seconds (on the GPU; smoke: 1) are left."""
    need_s = 1.0 if c.smoke else need_s
    if c.left() < need_s:
        c.log(f"{name}: time guard ({c.left():.0f}s left, needs ~{need_s:.0f}s)")
        return
    c.bench(name, fn)


def section_e2e_dpo(c) -> None:
    """zephyr_fast vs TRL DPOTrainer: pairs/s, peak memory, MFU (suite ``gpu_e2e_dpo``)."""
    s = SMOKE if c.smoke else GPU
    bench_run(c, "gpu_e2e_dpo[zephyr_fast]", 40, lambda b: fill(
        b, c, s, "gpu_e2e_dpo", SUT, "separate", _cached_zephyr_dpo(c, s, "separate")))
    bench_run(c, "gpu_e2e_dpo[trl]", 60, lambda b: fill(
        b, c, s, "gpu_e2e_dpo", "trl", "precompute_ref", run_trl(s, "dpo", c.dev)))


def section_e2e_sft(c) -> None:
    """zephyr_fast vs TRL SFTTrainer (bfd packing, padding-free): tokens/s, peak memory, MFU (``gpu_e2e_sft``)."""
    s = SMOKE if c.smoke else GPU
    bench_run(c, "gpu_e2e_sft[zephyr_fast]", 30, lambda b: fill(
        b, c, s, "gpu_e2e_sft", SUT, "packed", run_zephyr(s, "sft", c.dev)))
    bench_run(c, "gpu_e2e_sft[trl]", 45, lambda b: fill(
        b, c, s, "gpu_e2e_sft", "trl", "bfd+padding_free", run_trl(s, "sft", c.dev)))


def _cached_zephyr_dpo(c, s: Size, layout: str) -> dict:
    """The plain zephyr_fast DPO run of ``layout`` (shared by e2e_dpo, prefix_shared and zero3)."""
    key = ("zephyr_dpo", s.shape, layout)
    if key not in _CACHE:
        _CACHE[key] = run_zephyr(s, "dpo", c.dev, layout=layout)
    return _CACHE[key]


def section_prefix_shared(c) -> None:
    """``dpo_layout: prefix_shared`` vs ``separate`` on the same pairs (suite ``gpu_prefix_shared``)."""
    s = SMOKE if c.smoke else GPU
    for layout in ("separate", "prefix_shared"):
        bench_run(c, f"gpu_prefix_shared[{layout}]", 120 if layout == "prefix_shared" else 30,
                  lambda b, lay=layout: fill(b, c, s, "gpu_prefix_shared", SUT, lay, _cached_zephyr_dpo(c, s, lay)))


def compare_steps(ds_rows: list, plain_rows: list, rtol: float = LOSS_RTOL) -> dict:
    """Step-1 loss and policy log-probs of two runs: max relative difference, equal within ``rtol``."""
    keys = [k for k in ("loss", "logps/chosen", "logps/rejected") if k in ds_rows[0] and k in plain_rows[0]]
    rel = {k: abs(ds_rows[0][k] - plain_rows[0][k]) / max(abs(plain_rows[0][k]), 1e-12) for k in keys}
    gn = [r.get("grad_norm") for r in (ds_rows[0], plain_rows[0])]
    return {"loss": ds_rows[0]["loss"], "plain_loss": plain_rows[0]["loss"], "loss_rel_diff": max(rel.values()),
            "compared": ",".join(keys), "loss_equal": max(rel.values()) <= rtol, "loss_rtol": rtol,
            "grad_norm_rel_diff": abs(gn[0] - gn[1]) / max(abs(gn[1]), 1e-12) if None not in gn else None}


def section_zero3(c) -> None:
    """1-rank DeepSpeed ZeRO-3 DPO vs the plain run: step-1 loss equal (rtol 1e-3), tokens/s (``gpu_zero3``)."""
    s = SMOKE if c.smoke else GPU
    env = {"DS_BUILD_OPS": "0", **({"DS_ACCELERATOR": "cpu"} if c.dev.type == "cpu" else {})}

    def zero3(b):
        if not importable("deepspeed"):
            pytest.skip("deepspeed does not import on this machine (carry its wheel in .whl/)")
        plain = _cached_zephyr_dpo(c, s, "separate")
        try:
            fig = run_zephyr(s, "dpo", c.dev, deepspeed=ZERO3_JSON)
        finally:
            teardown()
        fill(b, c, s, "gpu_zero3", SUT, "zero3", dict(fig, **compare_steps(fig["rows"], plain["rows"])))

    with mock.patch.dict(os.environ, {k: os.environ.get(k, v) for k, v in env.items()}):
        bench_run(c, "gpu_zero3[zero3]", 60, zero3)


# GPU seconds (prefix_shared: compiling FlexAttention); zero3 last: its ZeRO-3 hooks stay out of the other runs
SECTIONS = (("e2e_dpo", section_e2e_dpo, 110), ("e2e_sft", section_e2e_sft, 75),
            ("prefix_shared", section_prefix_shared, 120), ("zero3", section_zero3, 60))
