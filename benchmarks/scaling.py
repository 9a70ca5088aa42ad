"""8xA100 on paper: an explicit analytical model of a Zephyr-7B dSFT and dDPO step (issue 13).

    python -m benchmarks.scaling             # inputs JSON -> docs/SCALING.md
    python -m benchmarks.scaling --measure   # re-measure the 'measured' inputs first (tokenizer, gpu.json)
    python -m benchmarks.scaling --check     # exit 1 if docs/SCALING.md is not what the inputs give

Every figure in docs/SCALING.md is computed here from ``benchmarks/scaling_inputs.json`` (each
input carries its source); the document is never edited by hand. Model, per micro-step of one rank:

* FLOPs: :func:`zephyr_fast.training.metrics.train_flops` (PaLM: ``6·N·tokens + 12·L·d·Σ len²``,
  N = matmul parameters incl. the LM head), as the trainer logs MFU.
* ZeRO-3 traffic per rank (ZeRO paper, arXiv 1910.02054, 3Ψ): bf16 all-gather of the parameters
  in the forward, again in the (recomputing) backward, and a bf16 reduce-scatter of the gradients,
  each ``2·P·(W-1)/W`` bytes, every micro-step (gradient accumulation does not amortise them:
  ZeRO-3 re-gathers and reduce-scatters each micro-step). Time = bytes / NCCL bus bandwidth.
* Memory: model states ``(2 + 2 + K)·P / W`` (bf16 params + bf16 grads + K optimiser bytes),
  live gathered parameters, layer-boundary checkpoints ``L·d·2`` bytes per token, one layer's
  working set, the LM head (fused: measured constant workspace; logits: measured bytes/token).
* Time: ``flops / (W·peak·MFU)`` for compute; comm overlapped (max) or not (sum).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from zephyr_fast.training.metrics import train_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUTS = os.path.join(ROOT, "benchmarks", "scaling_inputs.json")
DOC = os.path.join(ROOT, "docs", "SCALING.md")
GIB = 2 ** 30


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def load_inputs(path: str = INPUTS) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def val(inputs: dict, dotted: str):
    """The ``value`` of the input at ``a.b.c``."""
    node = inputs
    for k in dotted.split("."):
        node = node[k]
    return node["value"]


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
def shape(inputs: dict, section: str = "model") -> dict:
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    return {k: val(inputs, f"{section}.{k}") for k in keys}


def param_counts(s: dict) -> tuple:
    """``(total, matmul)`` parameters of a Mistral/Llama decoder: ``matmul`` excludes the input
    embedding table (as :func:`zephyr_fast.training.metrics.count_matmul_params`), keeps the head."""
    d, f, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    d_kv = d * s["num_key_value_heads"] // s["num_attention_heads"]
    per_layer = d * (d + 2 * d_kv) + d * d + 3 * d * f + 2 * d  # q,k,v,o; gate,up,down; 2 RMSNorms
    body = L * per_layer + d  # final norm
    emb = V * d
    head = V * d  # untied head, or the tied table used as the head
    total = body + emb + (0 if s["tie_word_embeddings"] else head)
    return total, body + head


def layer_act_bytes_per_token(s: dict) -> int:
    """bf16 activations one decoder layer saves for backward, per token (FlashAttention: no len²
    term): RMSNorm inputs (2d), normed inputs to attention and MLP (2d), q + k + v after RoPE
    (d + 2·d_kv), attention output (d), gate and up (2f), silu(gate) (f), down's input (f)."""
    d, f = s["hidden_size"], s["intermediate_size"]
    d_kv = d * s["num_key_value_heads"] // s["num_attention_heads"]
    return 2 * (5 * d + d + 2 * d_kv) + 2 * (4 * f)


def attention_flops_term(s: dict, attn_sq: float) -> float:
    return 12.0 * s["num_hidden_layers"] * s["hidden_size"] * attn_sq


def zero3_comm_bytes(n_params: int, world: int, micro_steps: int = 1, bytes_per_param: int = 2) -> dict:
    """Per-rank bytes of one optimiser step under ZeRO-3 (each collective moves ``(W-1)/W`` of the
    full tensor through every rank): forward all-gather, backward all-gather, gradient reduce-scatter,
    all repeated every micro-step."""
    per = bytes_per_param * n_params * (world - 1) / world
    return {"forward_all_gather": per * micro_steps, "backward_all_gather": per * micro_steps,
            "reduce_scatter": per * micro_steps, "total": 3 * per * micro_steps}


def zero2_comm_bytes(n_params: int, world: int, micro_steps: int = 1, bytes_per_param: int = 2) -> dict:
    """ZeRO-2: parameters replicated; gradients reduce-scattered every micro-step, the updated
    parameters all-gathered once per optimiser step."""
    per = bytes_per_param * n_params * (world - 1) / world
    return {"reduce_scatter": per * micro_steps, "param_all_gather": per, "total": per * (micro_steps + 1)}


def model_state_bytes(n_params: int, world: int, optimizer_bytes: int, stage: int = 3) -> float:
    """bf16 params + bf16 grads + optimiser states (fp32 master + moments), per rank."""
    if stage == 3:
        return (2 + 2 + optimizer_bytes) * n_params / world
    if stage == 2:
        return 2 * n_params + (2 + optimizer_bytes) * n_params / world
    raise ValueError(f"stage must be 2 or 3, got {stage}")


def busbw(inputs: dict, world: int, fabric: dict) -> float:
    """NCCL bus bandwidth (bytes/s) of a collective over ``world`` ranks: NVLink within a node,
    the node's NICs (times the achieved fraction) once it spans nodes."""
    if world <= val(inputs, "hardware.gpus_per_node"):
        return val(inputs, "hardware.nccl_busbw_intra_node_gbs") * 1e9
    frac = fabric.get("achieved_fraction") or val(inputs, "hardware.inter_node_achieved_fraction")
    return fabric["node_link_gbs"] * frac * 1e9


class Model:
    """The analytical model over one inputs dict; all methods return SI units (bytes, s, FLOPs)."""

    def __init__(self, inputs: dict):
        self.i = inputs
        self.s = shape(inputs)
        self.n_total, self.n_mm = param_counts(self.s)
        m = inputs.get("measured") or {}
        self.m = {k: v["value"] for k, v in m.items()}
        self.peak = val(inputs, "hardware.peak_bf16_tflops") * 1e12
        self.hbm = val(inputs, "hardware.hbm_gib") * GIB
        self.fabrics = val(inputs, "hardware.inter_node_fabrics")

    # -- data ---------------------------------------------------------------------------------
    @property
    def sft_tokens_per_row(self) -> float:
        return self.m["sft_sample_tokens"] / self.m["sft_sample_rows"]

    @property
    def sft_context(self) -> float:
        """Σ len² / Σ len: the mean attention context of a packed SFT token."""
        return self.m["sft_sample_attn_sq"] / self.m["sft_sample_tokens"]

    def dpo_tokens_per_pair(self, layout: str = None) -> float:
        layout = layout or val(self.i, "recipe.dpo_layout")
        return self.m[f"dpo_tokens_{layout}"] / self.m["dpo_pairs"]

    def dpo_attn_sq_per_pair(self, layout: str = None) -> float:
        layout = layout or val(self.i, "recipe.dpo_layout")
        return self.m[f"dpo_attn_sq_{layout}"] / self.m["dpo_pairs"]

    # -- per micro-step ---------------------------------------------------------------------------
    def sft_micro_tokens(self) -> float:
        return val(self.i, "recipe.sft_micro_batch_token_budget") * self.m["sft_packing_efficiency_8192"]

    def sft_step_tokens(self) -> float:
        return self.sft_micro_tokens() * val(self.i, "recipe.sft_gradient_accumulation_8gpu") * 8

    def micro(self, stage: str, world: int) -> dict:
        """One rank's micro-step at the recipe's global batch: tokens, attn_sq, micro-steps per step."""
        if stage == "sft":
            step_tokens = self.sft_step_tokens()
            budget = self.sft_micro_tokens()
            per_rank = step_tokens / world
            ga = max(1, math.ceil(per_rank / budget))
            tokens = per_rank / ga
            return {"tokens": tokens, "attn_sq": tokens * self.sft_context, "ga": ga, "feasible": True,
                    "per_rank_step_tokens": per_rank, "examples": tokens / self.sft_tokens_per_row}
        pairs_step = val(self.i, "recipe.dpo_global_pairs_per_step")
        per_rank_pairs = pairs_step / world
        cap = val(self.i, "recipe.dpo_pairs_per_micro_batch")
        ga = max(1, math.ceil(per_rank_pairs / cap))
        pairs = per_rank_pairs / ga
        return {"tokens": pairs * self.dpo_tokens_per_pair(), "attn_sq": pairs * self.dpo_attn_sq_per_pair(),
                "ga": ga, "feasible": per_rank_pairs >= 1, "examples": pairs,
                "per_rank_step_tokens": per_rank_pairs * self.dpo_tokens_per_pair()}

    def flops(self, tokens: float, attn_sq: float) -> float:
        return train_flops(self.n_mm, self.s["num_hidden_layers"], self.s["hidden_size"], tokens, attn_sq)

    def compute_time(self, flops: float, mfu: float) -> float:
        return flops / (self.peak * mfu)

    def comm_time(self, world: int, fabric: dict, micro_steps: int = 1, variant: str = "zero3") -> float:
        """Seconds of ZeRO traffic per optimiser step on one rank."""
        if world == 1:
            return 0.0
        bw = busbw(self.i, world, fabric)
        if variant == "zero3":
            return zero3_comm_bytes(self.n_total, world, micro_steps)["total"] / bw
        if variant == "zero2":
            return zero2_comm_bytes(self.n_total, world, micro_steps)["total"] / bw
        if variant == "zero++":  # hpZ + qwZ + qgZ
            b = val(self.i, "assumptions.zeropp_bytes_per_param")
            frac = (world - 1) / world
            g = val(self.i, "hardware.gpus_per_node")
            intra = busbw(self.i, min(world, g), fabric)
            node = min(world, g)
            cross = self.n_total * frac * (b["forward_all_gather"] + b["reduce_scatter"]) / bw
            within = self.n_total * (node - 1) / node * b["backward_all_gather_intra"] / intra
            return micro_steps * (cross + within)
        raise ValueError(variant)

    def optimizer_time(self, world: int, optim: str) -> float:
        per = val(self.i, "assumptions.optimizer_step_bytes_per_param")[optim]
        return per * self.n_total / world / (val(self.i, "hardware.hbm_bandwidth_gbs") * 1e9)

    def step(self, stage: str, world: int, mfu: float, fabric: dict = None, variant: str = "zero3") -> dict:
        fabric = fabric or self.fabrics[0]
        mb = self.micro(stage, world)
        f_micro = self.flops(mb["tokens"], mb["attn_sq"])
        t_c = self.compute_time(f_micro, mfu)
        t_m = self.comm_time(world, fabric, 1, variant)
        optim = "adamw" if stage == "sft" else "rmsprop"
        t_opt = self.optimizer_time(world, optim)
        return {**mb, "flops_micro": f_micro, "flops_step": f_micro * mb["ga"] * world,
                "t_compute": t_c, "t_comm": t_m,
                "t_step_overlap": mb["ga"] * max(t_c, t_m) + t_opt,
                "t_step_serial": mb["ga"] * (t_c + t_m) + t_opt, "t_opt": t_opt,
                "comm_bytes_step": zero3_comm_bytes(self.n_total, world, mb["ga"])["total"]}

    def threshold_tokens(self, world: int, mfu: float, fabric: dict = None, variant: str = "zero3") -> float:
        """Micro-batch tokens per rank below which ZeRO traffic takes longer than the compute."""
        fabric = fabric or self.fabrics[0]
        t_m = self.comm_time(world, fabric, 1, variant)
        per_token = self.flops(1, 0) / (self.peak * mfu)
        return t_m / per_token

    # -- epochs ---------------------------------------------------------------------------------
    def sft_epoch_tokens(self) -> float:
        return val(self.i, "data.ultrachat_train_rows") * self.sft_tokens_per_row

    def dpo_epoch_steps(self) -> float:
        return val(self.i, "data.ultrafeedback_train_pairs") / val(self.i, "recipe.dpo_global_pairs_per_step")

    def sft_epoch_steps(self) -> float:
        return self.sft_epoch_tokens() / self.sft_step_tokens()

    def epoch_time(self, stage: str, world: int, mfu: float, overlap: bool = True, **kw) -> float:
        st = self.step(stage, world, mfu, **kw)
        steps = self.sft_epoch_steps() if stage == "sft" else self.dpo_epoch_steps()
        return steps * (st["t_step_overlap"] if overlap else st["t_step_serial"])

    def reference_pass_time(self, world: int, mfu: float) -> float:
        """The offline reference log-prob pass over the train pairs (forward only: 2·N per token
        + a third of the attention term), once for all epochs."""
        pairs = val(self.i, "data.ultrafeedback_train_pairs")
        tokens = pairs * self.dpo_tokens_per_pair()
        f = self.flops(tokens, pairs * self.dpo_attn_sq_per_pair()) / 3.0
        return f / (world * self.peak * mfu)

    # -- memory ---------------------------------------------------------------------------------
    def act_bytes_per_token(self) -> dict:
        """Per-token activation bytes with full-layer checkpointing: the layer-boundary checkpoints
        (L·d·2) + the working set of the one layer being recomputed (calibrated)."""
        cal = self.activation_calibration()["scale"]
        ckpt = self.s["num_hidden_layers"] * self.s["hidden_size"] * 2
        layer = layer_act_bytes_per_token(self.s) * cal * val(self.i, "assumptions.layer_working_set_factor")
        head_io = 2 * 2 * self.s["hidden_size"]  # bf16 hidden into the head and its gradient
        return {"checkpoints": ckpt, "layer": layer, "head_io": head_io}

    def activation_calibration(self) -> dict:
        """Measured activation bytes/token/layer of the 1B fwd+bwd (no checkpointing) vs the formula."""
        s1 = shape(self.i, "calibration_model")
        n1, _ = param_counts(s1)
        peak = self.m["cal_packed_fused_peak_bytes"]
        ws = self.m["cal_fused_head_workspace_bytes"]
        per = (peak - 2 * n1 - ws) / self.m["cal_tokens"] / s1["num_hidden_layers"]
        formula = layer_act_bytes_per_token(s1)
        return {"measured": per, "formula": formula, "scale": per / formula}

    def memory(self, world: int, tokens: float, stage: str = "sft", head: str = "fused", zero: int = 3,
               hpz: bool = False) -> dict:
        optim = val(self.i, f"recipe.{'sft' if stage == 'sft' else 'dpo'}_optimizer_state_bytes_per_param")
        a = self.act_bytes_per_token()
        parts = {
            "model states": model_state_bytes(self.n_total, world, optim, zero),
            "gathered params (stage3_max_live_parameters)": 2 * min(val(self.i, "recipe.stage3_max_live_parameters"),
                                                                      self.n_total) if zero == 3 else 0.0,
            "hpZ secondary copy": 2 * self.n_total / val(self.i, "hardware.gpus_per_node") if hpz else 0.0,
            "layer checkpoints": a["checkpoints"] * tokens,
            "recomputed layer working set": a["layer"] * tokens,
            "LM head": (self.m["cal_fused_head_workspace_bytes"] if head == "fused"
                        else self.m["logits_bytes_per_token"] * tokens) + a["head_io"] * tokens,
        }
        parts["total"] = sum(parts.values())
        return parts

    def usable_hbm(self) -> float:
        return self.hbm * (1 - val(self.i, "assumptions.memory_reserve_fraction"))

    def max_micro_tokens(self, world: int, stage: str = "sft", head: str = "fused", zero: int = 3,
                         hpz: bool = False) -> float:
        fixed = self.memory(world, 0, stage, head, zero, hpz)["total"]
        per = self.memory(world, 1, stage, head, zero, hpz)["total"] - fixed
        return max(0.0, (self.usable_hbm() - fixed) / per)

    # -- calibration & published ------------------------------------------------------------------
    def calibration_mfu(self) -> dict:
        """MFU of the measured 1B packed+fused fwd+bwd on one H200 (no checkpointing, no comm), and
        the same hardware efficiency carried to a checkpointed step (÷ recompute factor)."""
        s1 = shape(self.i, "calibration_model")
        _, nmm = param_counts(s1)
        f = train_flops(nmm, s1["num_hidden_layers"], s1["hidden_size"], self.m["cal_tokens"], self.m["cal_attn_sq"])
        peak = val(self.i, "hardware.calibration_peak_bf16_tflops") * 1e12
        hfu = f / self.m["cal_packed_fused_time_s"] / peak
        return {"flops": f, "mfu_measured": hfu, "mfu_checkpointed": hfu / val(self.i, "assumptions.recompute_factor"),
                "n_mm": nmm}

    def mfu_range(self) -> tuple:
        return self.calibration_mfu()["mfu_checkpointed"], val(self.i, "assumptions.mfu_reference_high")

    def published(self) -> dict:
        p = lambda k: val(self.i, f"published.{k}")  # noqa: E731
        g, peak = p("num_gpus"), self.peak
        # dDPO: pairs per step from the logged rates; TRL computed the reference forward every step;
        # train_runtime includes the in-training evaluations (every eval_steps)
        steps = p("dpo_steps_per_second") * p("dpo_runtime_s")
        evals = math.floor(steps / p("dpo_eval_steps"))
        train_s = p("dpo_runtime_s") - evals * p("dpo_eval_runtime_s")
        pairs_per_step = p("dpo_train_samples") * p("dpo_epochs") / steps
        waste = self.m["dpo_padding_waste_2_pairs"]
        real = p("dpo_train_samples") * p("dpo_epochs") * self.dpo_tokens_per_pair("separate")
        attn = p("dpo_train_samples") * p("dpo_epochs") * self.dpo_attn_sq_per_pair("separate")
        useful = self.flops(real, attn)
        done = (useful + self.flops(real, attn) / 3.0) / (1 - waste)  # + reference forward, on padded rows
        dpo = {"steps": steps, "evals": evals, "train_s": train_s, "pairs_per_step": pairs_per_step,
               "per_device_pairs": pairs_per_step / g, "useful_flops": useful, "executed_flops": done, "waste": waste,
               "mfu_useful": useful / (train_s * g * peak), "mfu_executed": done / (train_s * g * peak),
               "gpu_hours": p("dpo_runtime_s") * g / 3600, "train_gpu_hours": train_s * g / 3600,
               "step_s": train_s / steps}
        # dSFT: TRL ConstantLengthDataset with __len__ = raw rows: the epoch fraction counts chunks
        L = p("sft_packed_seq_length")
        chunks = p("sft_epoch_reached") * val(self.i, "data.ultrachat_train_rows")
        tokens = chunks * L
        f = self.flops(tokens, chunks * L * L)
        train_s = p("sft_runtime_s") - p("sft_eval_runtime_s")
        ours = self.flops(tokens, tokens * self.sft_context)  # the same tokens packed per conversation
        sft = {"chunks": chunks, "tokens": tokens, "tokens_per_row": tokens / val(self.i, "data.ultrachat_train_rows"),
               "flops": f, "train_s": train_s, "mfu": f / (train_s * g * peak),
               "mfu_if_8": f / (train_s * 8 * peak), "gpu_hours": p("sft_runtime_s") * g / 3600,
               "train_gpu_hours": train_s * g / 3600, "planned_steps": p("sft_steps_per_second") * p("sft_runtime_s"),
               "attention_saving": 1 - ours / f}
        hg = p("handbook_dpo_num_gpus")
        hb = {"gpu_hours": p("handbook_dpo_runtime_s") * hg / 3600,
              "pairs_per_s_per_gpu": p("handbook_dpo_train_samples") / p("handbook_dpo_runtime_s") / hg}
        return {"dpo": dpo, "sft": sft, "handbook_dpo": hb}


# ----------------------------------------------------------------------------------------------
# measuring the 'measured' inputs (tokenizer + benchmarks/results/gpu.json); not run by the tests
# ----------------------------------------------------------------------------------------------
def measure(root: str = ROOT) -> dict:
    from benchmarks.model_cases import real_pairs
    from zephyr_fast.data.chat import load_tokenizer
    from zephyr_fast.data.measure import padded_waste
    from zephyr_fast.data.packing import pack_dpo, pack_sft
    from zephyr_fast.data.preference import build_dpo_examples
    from zephyr_fast.data.sft import tokenize_sft
    from zephyr_fast.training.plan import micro_stats

    def jsonl(*p):
        with open(os.path.join(root, *p), encoding="utf-8") as f:
            return [json.loads(x) for x in f if x.strip()]

    out = {}

    def put(key, value, source):
        out[key] = {"value": value, "source": source}

    tok = load_tokenizer(os.path.join(root, "assets", "tokenizers", "mistral-7b-v0.1"))
    how = "python -m benchmarks.scaling --measure, real Mistral-7B tokenizer (assets/tokenizers/mistral-7b-v0.1): "
    uc = jsonl("assets", "data", "ultrachat_200k", "sample16.jsonl")
    lens = [len(e["input_ids"]) for e in tokenize_sft(uc, tok, max_length=2048, show_progress=False)[0]]
    s_uc = how + "assets/data/ultrachat_200k/sample16.jsonl (16 real rows), max_length 2048, Zephyr template"
    put("sft_sample_rows", len(lens), s_uc)
    put("sft_sample_tokens", sum(lens), s_uc)
    put("sft_sample_attn_sq", sum(n * n for n in lens), s_uc + " (Σ len², one attention segment per conversation)")

    flat = jsonl("assets", "data", "ultrafeedback_binarized", "flat1k.jsonl")
    dpo, _ = build_dpo_examples(flat, tok, max_length=1024, max_prompt_length=512, skip_invalid_rows=True,
                                show_progress=False)
    s_uf = how + "assets/data/ultrafeedback_binarized/flat1k.jsonl (1000 real pairs), max_length 1024, prompt 512"
    put("dpo_pairs", len(dpo), s_uf)
    for layout in ("separate", "prefix_shared"):
        st = [micro_stats(x) for x in pack_dpo(dpo, 8192, layout=layout, seed=0)]
        put(f"dpo_tokens_{layout}", sum(x.tokens for x in st), s_uf + f", layout {layout}")
        put(f"dpo_attn_sq_{layout}", sum(x.attn_sq for x in st),
            s_uf + f", layout {layout}, Σ len² as zephyr_fast.training.plan.micro_stats counts it")
    rows = [[len(e["prompt_ids"]) + len(e["chosen_ids"]), len(e["prompt_ids"]) + len(e["rejected_ids"])] for e in dpo]
    put("dpo_padding_waste_2_pairs", round(padded_waste(rows, 2), 6),
        s_uf + "; zephyr_fast.data.measure.padded_waste(rows, 2): 2 pairs = 4 rows padded to the longest, seed 0 "
        "(TRL's batch at zephyr-7b-beta's 2 pairs per device)")
    uf_sft, _ = tokenize_sft([{"messages": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["chosen"]}]} for r in flat],
                             tok, max_length=2048, show_progress=False)
    put("sft_packing_efficiency_8192", round(pack_sft(uf_sft, 8192, seed=0).stats.efficiency, 6),
        how + "flat1k prompt+chosen as 1000 SFT rows, pack_sft best-fit-decreasing into 8192-token micro-batches "
        "(the 16 UltraChat rows are too few to fill bins)")

    with open(os.path.join(root, "benchmarks", "results", "gpu.json"), encoding="utf-8") as f:
        gpu = {b["name"]: b for b in json.load(f)["benchmarks"]}
    pf = gpu["model[packed+fused-1b]"]
    g = "benchmarks/results/gpu.json (NVIDIA H200, 2026-11-28, benchmarks/gpu_check.sh) "
    put("cal_packed_fused_time_s", pf["stats"]["median"],
        g + "model[packed+fused-1b] median (fwd+bwd, bf16, no checkpointing)")
    put("cal_packed_fused_peak_bytes", pf["extra_info"]["peak_mem_bytes"],
        g + "model[packed+fused-1b] peak_mem_bytes (growth beyond the resident weights)")
    put("cal_tokens", pf["extra_info"]["real_tokens"], g + "model[packed+fused-1b] real_tokens")
    pairs = real_pairs(pf["extra_info"]["seqs"] // 2)
    seqs = [p + c for p, c, _ in pairs] + [p + j for p, _, j in pairs]
    if sum(len(x) for x in seqs) != pf["extra_info"]["real_tokens"]:
        raise SystemExit("benchmarks.model_cases.real_pairs no longer gives the sequences gpu.json measured")
    put("cal_attn_sq", sum(len(x) ** 2 for x in seqs),
        "Σ len² of the 32 sequences of model[packed+fused-1b] (benchmarks.model_cases.real_pairs(16))")
    zf = gpu["lm_head[ce-zephyr_fast-mistral-7b]"]["extra_info"]
    nv = gpu["lm_head[ce-naive_torch-mistral-7b]"]["extra_info"]
    put("cal_fused_head_workspace_bytes", zf["workspace_bytes"],
        g + "lm_head[ce-zephyr_fast-mistral-7b] workspace_bytes (N 8192, D 4096, V 32000; beyond x, W, dX, dW)")
    put("logits_bytes_per_token", nv["workspace_bytes"] / nv["n"],
        g + "lm_head[ce-naive_torch-mistral-7b] workspace_bytes / N (materialised logits + fp32 softmax + grad)")
    return out


# ----------------------------------------------------------------------------------------------
# the document
# ----------------------------------------------------------------------------------------------
def _n(x: float, nd: int = 0) -> str:
    return f"{x:,.{nd}f}"


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB"


def _t(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.2f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _bound(st: dict) -> str:
    r = st["t_comm"] / st["t_compute"]
    return f"compute-bound, comm ÷ compute {r:.2f}" if r < 1 else f"comm-bound, comm ÷ compute {r:.2f}"


def render(inputs: dict) -> str:
    M = Model(inputs)
    V = lambda k: val(inputs, k)  # noqa: E731
    lo, hi = M.mfu_range()
    cal = M.calibration_mfu()
    act = M.activation_calibration()
    pub = M.published()
    fab = M.fabrics
    L = []
    w = L.append
    w("# 8×A100 on paper: Zephyr-7B dSFT and dDPO with ZeRO-3 and packing")
    w("")
    w("Generated by `python -m benchmarks.scaling` from `benchmarks/scaling_inputs.json` (every input with its")
    w("source; `--measure` refreshes the measured ones). Do not edit: `tests/benchmarks/test_scaling.py` checks")
    w("that regenerating reproduces this file. This is a model on paper — no 8-GPU run has been made.")
    w("")

    # ---- headline
    s8 = {m: M.step("sft", 8, m) for m in (lo, hi)}
    d8 = {m: M.step("dpo", 8, m) for m in (lo, hi)}
    sft_ep = {m: M.epoch_time("sft", 8, m) for m in (lo, hi)}
    dpo_ep = {m: M.epoch_time("dpo", 8, m) for m in (lo, hi)}
    ref8 = {m: M.reference_pass_time(8, m) for m in (lo, hi)}
    n_dpo_ep = V("recipe.dpo_epochs")
    dpo_total = {m: n_dpo_ep * dpo_ep[m] + ref8[m] for m in (lo, hi)}
    mem_sft = M.memory(8, s8[lo]["tokens"], "sft")
    mem_dpo = M.memory(8, d8[lo]["tokens"], "dpo")
    w("## Headline (8× A100-80GB, ZeRO-3, packed, fused LM head)")
    w("")
    w(f"- **Model**: {V('model.name')}, {_n(M.n_total / 1e9, 2)} B parameters "
      f"({_n(M.n_mm / 1e9, 2)} B in matmuls incl. the LM head).")
    w(f"- **dSFT step** ({_n(M.sft_step_tokens())} packed tokens, {s8[lo]['ga']} micro-steps of "
      f"{_n(s8[lo]['tokens'])} tokens per GPU): {s8[lo]['flops_step'] / 1e15:,.0f} PFLOP; "
      f"{_t(s8[hi]['t_step_overlap'])}–{_t(s8[lo]['t_step_overlap'])} at MFU {_pct(hi)}–{_pct(lo)}; "
      f"epoch ({_n(M.sft_epoch_steps(), 0)} steps) **{_t(sft_ep[hi])}–{_t(sft_ep[lo])}**.")
    w(f"- **dDPO step** ({V('recipe.dpo_global_pairs_per_step')} pairs, "
      f"{_n(d8[lo]['examples'], 0)} per GPU = {_n(d8[lo]['tokens'])} tokens): "
      f"{d8[lo]['flops_step'] / 1e15:,.1f} PFLOP; "
      f"{_t(d8[hi]['t_step_overlap'])}–{_t(d8[lo]['t_step_overlap'])}; {n_dpo_ep} epochs + the offline reference "
      f"pass **{_t(dpo_total[hi])}–{_t(dpo_total[lo])}**.")
    w(f"- **ZeRO-3 traffic** per GPU per micro-step: {_gb(zero3_comm_bytes(M.n_total, 8)['total'])} "
      f"({_t(M.comm_time(8, fab[0]))} at {V('hardware.nccl_busbw_intra_node_gbs')} GB/s NCCL bus bandwidth); "
      f"hidden behind compute while a GPU's micro-batch holds ≥ {_n(M.threshold_tokens(8, hi))} tokens "
      f"(at MFU {_pct(hi)}). dSFT micro-batches are {_n(s8[lo]['tokens'])} tokens ({_bound(s8[hi])}), dDPO's "
      f"{_n(d8[lo]['tokens'])} ({_bound(d8[hi])}) on one node.")
    w(f"- **Memory per GPU**: dSFT {_gib(mem_sft['total'])}, dDPO {_gib(mem_dpo['total'])} of "
      f"{V('hardware.hbm_gib')} GiB; the largest micro-batch that fits is "
      f"{_n(M.max_micro_tokens(8, 'sft'))} tokens (dSFT, AdamW) / {_n(M.max_micro_tokens(8, 'dpo'))} (dDPO, RMSprop) "
      f"with the fused head, {_n(M.max_micro_tokens(8, 'sft', head='logits'))} / "
      f"{_n(M.max_micro_tokens(8, 'dpo', head='logits'))} if logits were materialised.")
    w(f"- **Published zephyr-7b-beta**: dDPO {_t(V('published.dpo_runtime_s'))} on "
      f"{V('published.num_gpus')} A100s ({_t(pub['dpo']['train_s'])} without its evaluations) = "
      f"{_n(pub['dpo']['train_gpu_hours'], 0)} GPU-hours, implied MFU {_pct(pub['dpo']['mfu_useful'])}; this model: "
      f"{_n(dpo_total[hi] * 8 / 3600, 1)}–{_n(dpo_total[lo] * 8 / 3600, 1)} GPU-hours. dSFT "
      f"{_t(V('published.sft_runtime_s'))} = {_n(pub['sft']['train_gpu_hours'], 0)} GPU-hours "
      f"(implied MFU {_pct(pub['sft']['mfu'])}); this model: {_n(sft_ep[hi] * 8 / 3600, 1)}–"
      f"{_n(sft_ep[lo] * 8 / 3600, 1)} GPU-hours.")
    d16s = {fb["name"]: M.step("dpo", 16, hi, fb) for fb in fab}
    s64 = max((M.step("sft", 64, hi, fb) for fb in fab), key=lambda st: st["t_comm"] / st["t_compute"])
    w(f"- **At 16 and 64 GPUs**: dSFT keeps {_n(M.micro('sft', 64)['tokens'])} tokens per micro-step at any W "
      f"(worst case at 64: {_bound(s64)}). "
      f"dDPO's 32-pair step leaves {_n(M.micro('dpo', 16)['tokens'])} tokens per GPU at 16, comm ÷ compute "
      + ", ".join(f"{v['t_comm'] / v['t_compute']:.2f} ({k})" for k, v in d16s.items()) +
      " at MFU " + _pct(hi) + ", and cannot be split over 64. Knobs: §7.")
    w("")

    # ---- inputs
    w("## Inputs")
    w("")
    w("| input | value | source |")
    w("|---|---|---|")
    for sec in ("model", "recipe", "data", "hardware", "assumptions", "published", "measured"):
        for k, node in inputs.get(sec, {}).items():
            v = node["value"]
            if isinstance(v, (list, dict)):
                v = json.dumps(v, separators=(", ", ": "))
            w(f"| `{sec}.{k}` | {v} | {node['source']} |")
    w("")

    # ---- 1 model and data
    w("## 1. Model and data")
    w("")
    d, f_, Lr = M.s["hidden_size"], M.s["intermediate_size"], M.s["num_hidden_layers"]
    w(f"- Parameters from the config: {_n(M.n_total)} in all; {_n(M.n_mm)} in matmuls (the input embedding "
      f"table excluded, the untied head kept), the N of `train_flops`.")
    w(f"- dSFT: {_n(M.sft_tokens_per_row, 0)} tokens per UltraChat conversation ({M.m['sft_sample_rows']}-row "
      f"sample, cut at {V('recipe.sft_max_seq_length')}), "
      f"mean attention context Σlen²/Σlen = {_n(M.sft_context, 0)}; {V('data.ultrachat_train_rows'):,} "
      f"rows → {M.sft_epoch_tokens() / 1e6:,.0f} M tokens per epoch. Cross-check from the published run: its "
      f"{_n(pub['sft']['chunks'], 0)} packed {V('published.sft_packed_seq_length')}-token chunks (epoch "
      f"{V('published.sft_epoch_reached')} × "
      f"rows, since TRL's packed dataset reported the raw row count as its length) give "
      f"{_n(pub['sft']['tokens_per_row'], 0)} tokens per row.")
    w(f"- Packing: best-fit-decreasing fills {_pct(M.m['sft_packing_efficiency_8192'])} of an 8192-token micro-batch "
      f"({M.m['dpo_pairs'] + 1:,} real rows), so a dSFT micro-batch carries {_n(M.sft_micro_tokens())} tokens.")
    for lay in ("separate", "prefix_shared"):
        w(f"- dDPO, `{lay}` layout: {_n(M.dpo_tokens_per_pair(lay), 1)} tokens and Σlen² "
          f"{_n(M.dpo_attn_sq_per_pair(lay))} per pair ({M.m['dpo_pairs']} real pairs, max_length 1024, prompt ≤ 512).")
    w(f"- A padded batch of 2 pairs (TRL, zephyr-7b-beta's per-device batch) is "
      f"{_pct(M.m['dpo_padding_waste_2_pairs'])} padding.")
    w("")

    # ---- 2 FLOPs
    w("## 2. FLOPs per step")
    w("")
    w("`train_flops(N, L, d, tokens, Σlen²) = 6·N·tokens + 12·L·d·Σlen²` (zephyr_fast/training/metrics.py, the")
    w("function the trainer's MFU uses; recomputation is not credited). Per GPU per micro-step and per step at 8 GPUs:")
    w("")
    w("| stage | tokens / micro-step / GPU | micro-steps | FLOPs / micro-step | FLOPs / step (8 GPUs) | "
      "attention share |")
    w("|---|---:|---:|---:|---:|---:|")
    for name, st in (("dSFT", s8[lo]), ("dDPO", d8[lo])):
        att = attention_flops_term(M.s, st["attn_sq"]) / st["flops_micro"]
        w(f"| {name} | {_n(st['tokens'])} | {st['ga']} | {st['flops_micro'] / 1e12:,.1f} TFLOP | "
          f"{st['flops_step'] / 1e15:,.1f} PFLOP | {_pct(att)} |")
    ref_flops = M.flops(V("data.ultrafeedback_train_pairs") * M.dpo_tokens_per_pair(),
                        V("data.ultrafeedback_train_pairs") * M.dpo_attn_sq_per_pair()) / 3.0
    pol_epoch = M.dpo_epoch_steps() * d8[lo]["flops_step"]
    w("")
    w(f"dDPO reference log-probs: one forward pass over the {V('data.ultrafeedback_train_pairs'):,} pairs, "
      f"offline, = {ref_flops / 1e18:.2f} EFLOP once, i.e. {_pct(ref_flops / n_dpo_ep / pol_epoch)} of a policy epoch "
      f"({pol_epoch / 1e18:.2f} EFLOP) per epoch over {n_dpo_ep} epochs — TRL's in-step reference model adds "
      f"{_pct(1 / 3)} every epoch.")
    w("")

    # ---- 3 comm
    w("## 3. ZeRO-3 communication per step")
    w("")
    c8 = zero3_comm_bytes(M.n_total, 8)
    w(f"Per GPU per micro-step (bf16, `2·P·(W−1)/W` each, P = {_n(M.n_total / 1e9, 2)} B): forward all-gather "
      f"{_gb(c8['forward_all_gather'])}, backward all-gather (the checkpointed layer is re-gathered for its "
      f"recompute + backward) {_gb(c8['backward_all_gather'])}, gradient reduce-scatter {_gb(c8['reduce_scatter'])}: "
      f"**{_gb(c8['total'])}**. ZeRO-3 repeats all three every micro-step, so gradient accumulation does not "
      f"amortise them; only a larger micro-batch does.")
    w("")
    w(f"Bandwidth: NVLink is {V('hardware.nvlink_bidirectional_gbs')} GB/s per GPU counting both directions "
      f"({V('hardware.nvlink_bidirectional_gbs') // 2} GB/s each way); a ring collective is limited by one "
      f"direction, and NCCL achieves a bus bandwidth of about {V('hardware.nccl_busbw_intra_node_gbs')} GB/s "
      f"on 8× A100-SXM4-80GB (nccl-tests, measured by others), which is what the model uses (time = bytes / busbw, "
      f"nccl-tests' definition). Across nodes the bus bandwidth is the node's NICs × "
      f"{V('hardware.inter_node_achieved_fraction')}:")
    w("")
    w("| fabric | busbw | per micro-step (8 → 16 → 64 GPUs) |")
    w("|---|---:|---|")
    w(f"| NVLink, one node | {V('hardware.nccl_busbw_intra_node_gbs')} GB/s | {_t(M.comm_time(8, fab[0]))} at 8 |")
    for fb in fab:
        w(f"| {fb['name']} | {busbw(inputs, 16, fb) / 1e9:.0f} GB/s | "
          f"{_t(M.comm_time(16, fb))} at 16, {_t(M.comm_time(64, fb))} at 64 |")
    w("")
    w("Overlap: DeepSpeed prefetches the next layers' parameters and reduce-scatters gradient buckets during the")
    w("backward (`overlap_comm: true` in recipes/deepspeed/zero3.json), so the step takes max(compute, comm) when")
    w("comm ≤ compute and approaches the sum when it is not. Compute per micro-step vs comm at 8 GPUs:")
    w("")
    w("| stage | compute (MFU hi–lo) | ZeRO-3 comm | comm ÷ compute (at MFU hi) | overlap threshold "
      "(tokens/GPU/micro-step) |")
    w("|---|---:|---:|---:|---:|")
    for name, st in (("dSFT", s8), ("dDPO", d8)):
        w(f"| {name} | {_t(st[hi]['t_compute'])}–{_t(st[lo]['t_compute'])} | {_t(st[lo]['t_comm'])} | "
          f"{st[hi]['t_comm'] / st[hi]['t_compute']:.2f} | {_n(M.threshold_tokens(8, hi))} |")
    w("")
    w("Threshold = comm time × peak × MFU ÷ (6·N): below it a micro-step waits on the network.")
    w("")

    # ---- 4 memory
    w("## 4. Memory per GPU and the micro-batch that fits")
    w("")
    w(f"Model states under ZeRO-3: `(2 + 2 + K)·P / W` — bf16 parameters and gradients + K optimiser bytes "
      f"(AdamW K = {V('recipe.sft_optimizer_state_bytes_per_param')}: fp32 master, m, v; RMSprop "
      f"K = {V('recipe.dpo_optimizer_state_bytes_per_param')}: fp32 master, square average). Activations with "
      f"full-layer checkpointing: the layer inputs (L·d·2 = {_n(M.act_bytes_per_token()['checkpoints'])} "
      f"B/token) + the "
      f"working set of the one layer being recomputed ({_n(M.act_bytes_per_token()['layer'])} B/token, calibrated §6). "
      f"LM head: fused = measured constant workspace {_gib(M.m['cal_fused_head_workspace_bytes'])}; "
      f"materialised logits = "
      f"{_n(M.m['logits_bytes_per_token'])} B/token measured (V = {M.s['vocab_size']}). "
      f"Usable HBM: {_gib(M.usable_hbm())} ({_pct(1 - V('assumptions.memory_reserve_fraction'))} of "
      f"{V('hardware.hbm_gib')} GiB).")
    w("")
    w("| part | dSFT, 8 GPUs | dDPO, 8 GPUs |")
    w("|---|---:|---:|")
    for k in mem_sft:
        w(f"| {k} | {_gib(mem_sft[k])} | {_gib(mem_dpo[k])} |")
    w("")
    w("Largest micro-batch (tokens per GPU) that fits, by world size:")
    w("")
    w("| W | model states (AdamW / RMSprop) | dSFT fused | dSFT logits | dDPO fused | dDPO logits |")
    w("|---:|---:|---:|---:|---:|---:|")
    for W in (1, 2, 4) + tuple(V("scales")):
        ms = M.memory(W, 0, "sft")["model states"], M.memory(W, 0, "dpo")["model states"]
        w(f"| {W} | {_gib(ms[0])} / {_gib(ms[1])} | {_n(M.max_micro_tokens(W, 'sft'))} | "
          f"{_n(M.max_micro_tokens(W, 'sft', head='logits'))} | {_n(M.max_micro_tokens(W, 'dpo'))} | "
          f"{_n(M.max_micro_tokens(W, 'dpo', head='logits'))} |")
    w("")
    w(f"The recipes use {_n(s8[lo]['tokens'])} (dSFT) and {_n(d8[lo]['tokens'])} (dDPO) tokens per micro-step: "
      f"memory is not what limits them on 8 GPUs; it is what a larger micro-batch (§7) spends.")
    w("")

    # ---- 5 time
    w("## 5. Time per step and per epoch; the published run")
    w("")
    w(f"MFU range: {_pct(lo)} (the H200 calibration carried to a checkpointed step, §6) to {_pct(hi)} "
      f"(llm-foundry's measured MPT-7B, FSDP full-shard + checkpointing, 8× A100-80GB).")
    w("")
    w("| stage (8× A100) | step, overlapped | step, no overlap | steps / epoch | epoch | total |")
    w("|---|---:|---:|---:|---:|---:|")
    for mfu in (hi, lo):
        st = s8[mfu]
        w(f"| dSFT @ MFU {_pct(mfu)} | {_t(st['t_step_overlap'])} | {_t(st['t_step_serial'])} | "
          f"{_n(M.sft_epoch_steps())} | {_t(sft_ep[mfu])} | {_t(sft_ep[mfu] * V('recipe.sft_epochs'))} |")
    for mfu in (hi, lo):
        st = d8[mfu]
        w(f"| dDPO @ MFU {_pct(mfu)} | {_t(st['t_step_overlap'])} | {_t(st['t_step_serial'])} | "
          f"{_n(M.dpo_epoch_steps())} | {_t(dpo_ep[mfu])} | {_t(dpo_total[mfu])} (incl. reference pass "
          f"{_t(ref8[mfu])}) |")
    w("")
    pd, ps, hb = pub["dpo"], pub["sft"], pub["handbook_dpo"]
    w("Published (the `all_results.json` of the released models; hardware from the paper as quoted — see inputs):")
    w("")
    w(f"- zephyr-7b-beta dDPO: {_t(V('published.dpo_runtime_s'))} for {V('published.dpo_epochs')} "
      f"epochs of {V('published.dpo_train_samples'):,} pairs; {_n(pd['steps'])} steps → "
      f"{_n(pd['pairs_per_step'], 1)} pairs per step = {_n(pd['per_device_pairs'], 1)} per GPU on "
      f"{V('published.num_gpus')} GPUs. Less its {pd['evals']} in-training evaluations "
      f"({_t(pd['evals'] * V('published.dpo_eval_runtime_s'))}): {_t(pd['train_s'])} of training, "
      f"{_t(pd['step_s'])} per step. TRL ran the reference model every step on padded rows "
      f"({_pct(pd['waste'])} padding at 2 pairs): implied MFU {_pct(pd['mfu_useful'])} on real-token training FLOPs, "
      f"{_pct(pd['mfu_executed'])} counting the padded and reference FLOPs it executed. "
      f"{_n(pd['train_gpu_hours'], 0)} training GPU-hours vs this model's {_n(dpo_total[hi] * 8 / 3600, 1)}–"
      f"{_n(dpo_total[lo] * 8 / 3600, 1)} (÷ {pd['train_gpu_hours'] / (dpo_total[lo] * 8 / 3600):.1f}–"
      f"{pd['train_gpu_hours'] / (dpo_total[hi] * 8 / 3600):.1f}).")
    over_peak = (" — more than the hardware has, so the 16 is consistent"
                 if ps["mfu_if_8"] * V("assumptions.recompute_factor") > 1 else "")
    w(f"- mistral-7b-sft-beta dSFT: {_t(V('published.sft_runtime_s'))} ({_t(ps['train_s'])} less its "
      f"evaluation), {_n(ps['tokens'] / 1e6, 0)} M tokens in {V('published.sft_packed_seq_length')}-token "
      f"chunks with attention over the whole chunk: "
      f"implied MFU {_pct(ps['mfu'])} on {V('published.num_gpus')} A100s (on 8 it would be "
      f"{_pct(ps['mfu_if_8'])}, {_pct(ps['mfu_if_8'] * V('assumptions.recompute_factor'))} of peak with the "
      f"checkpointed recompute{over_peak}). {_n(ps['train_gpu_hours'], 0)} "
      f"training GPU-hours vs this model's {_n(sft_ep[hi] * 8 / 3600, 1)}–{_n(sft_ep[lo] * 8 / 3600, 1)}: the "
      f"published dSFT was already efficient; per-conversation attention saves {_pct(ps['attention_saving'])} of "
      f"its FLOPs, and the rest of any gain has to come from MFU.")
    w(f"- The later handbook recipe (β 0.01, 1 epoch, {V('published.handbook_dpo_pairs_per_step')} pairs/step) "
      f"on {V('published.handbook_dpo_num_gpus')} "
      f"GPUs: {_t(V('published.handbook_dpo_runtime_s'))} = {_n(hb['gpu_hours'], 1)} GPU-hours, "
      f"{hb['pairs_per_s_per_gpu']:.2f} pairs/s/GPU (GPU type not stated); this model at 8× A100: "
      f"{V('data.ultrafeedback_train_pairs') / dpo_ep[hi] / 8:.2f}–"
      f"{V('data.ultrafeedback_train_pairs') / dpo_ep[lo] / 8:.2f} pairs/s/GPU.")
    w(f"- What the paper says, as found: \"{V('published.paper_hours_quote')}\" (the PDF was not retrieved; if the "
      f"GPUs were not A100s, every implied MFU above scales by {V('hardware.peak_bf16_tflops'):.0f} ÷ their "
      "peak TFLOP/s).")
    w("")

    # ---- 6 calibration
    w("## 6. Calibration")
    w("")
    w(f"- **Compute efficiency** (benchmarks/results/gpu.json, NVIDIA H200): the 1B packed + fused-head "
      f"forward+backward "
      f"of {M.m['cal_tokens']:,} real tokens took {_t(M.m['cal_packed_fused_time_s'])} = "
      f"{cal['flops'] / 1e12:,.1f} TFLOP by `train_flops` (N = {_n(cal['n_mm'] / 1e9, 3)} B) → MFU "
      f"**{_pct(cal['mfu_measured'])}** of {V('hardware.calibration_peak_bf16_tflops'):.0f} TFLOP/s, without "
      f"checkpointing, optimiser or communication. Carried to a checkpointed step (÷ "
      f"{V('assumptions.recompute_factor'):.3f} for the recomputed forward): {_pct(lo)} — the low end. It is "
      f"a 1B model at d = 2048; 7B matmuls (d = 4096, f = 14336) run closer to peak, which is why the "
      f"high end is llm-foundry's measured 7B figure.")
    w(f"- **Activation memory**: the same run's peak growth, less the bf16 gradients and the fused head's "
      f"workspace, is "
      f"{_n(act['measured'])} B per token per layer; the per-layer formula of §4 gives {_n(act['formula'])} for that "
      f"shape, so the 7B layer working set is scaled by {act['scale']:.3f} (RMSNorm's fp32 upcast, the residual "
      f"stream and embeddings are what the formula leaves out).")
    w("- **LM head**: the fused head's workspace and the materialised-logits bytes per token are the measured "
      "Mistral-7B-shape figures of the same file (N 8192, D 4096, V 32000).")
    w("- **2-rank CPU DeepSpeed run** (tests/train/test_deepspeed.py): it checks that ZeRO-3 on 2 ranks gives the "
      "1-process losses and gradients; it records no throughput, and a CPU gloo run would say nothing about NVLink. "
      "The calibration therefore uses the GPU figures only.")
    w("")

    # ---- 7 scaling
    w("## 7. 16 and 64 GPUs: which knob")
    w("")
    w("Fixed global batch (the recipe's): tokens per GPU per step fall as 1/W while ZeRO-3 traffic per micro-step")
    w("stays ≈ 6·P bytes — and leaves NVLink for the node's NICs.")
    w("")
    w(f"| stage | W | fabric | tokens / GPU / micro-step | micro-steps | compute / micro-step (MFU {_pct(hi)}) | "
      f"ZeRO-3 comm | ZeRO++ comm | step (overlapped) | epoch |")
    w("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for stage, name in (("sft", "dSFT"), ("dpo", "dDPO")):
        for W in V("scales"):
            for fb in (fab if W > V("hardware.gpus_per_node") else fab[:1]):
                mb = M.micro(stage, W)
                fname = fb["name"] if W > V("hardware.gpus_per_node") else "NVLink"
                if not mb["feasible"]:
                    w(f"| {name} | {W} | {fname} | — | — | — | — | — | — | "
                      f"not splittable: {V('recipe.dpo_global_pairs_per_step')} pairs < {W} GPUs |")
                    continue
                st = M.step(stage, W, hi, fb)
                zpp = M.comm_time(W, fb, 1, "zero++") if W > V("hardware.gpus_per_node") else st["t_comm"]
                w(f"| {name} | {W} | {fname} | {_n(mb['tokens'])} | {mb['ga']} | {_t(st['t_compute'])} | "
                  f"{_t(st['t_comm'])} | {_t(zpp)} | {_t(st['t_step_overlap'])} | "
                  f"{_t(M.epoch_time(stage, W, hi, fabric=fb))} |")
    w("")
    w("Overlap threshold (tokens per GPU per micro-step below which comm > compute), at MFU " + _pct(hi) + ":")
    w("")
    w("| fabric | W = 8 | W = 16 | W = 64 | W = 64 with ZeRO++ |")
    w("|---|---:|---:|---:|---:|")
    for fb in fab:
        w(f"| {fb['name']} | {_n(M.threshold_tokens(8, hi, fb))} | {_n(M.threshold_tokens(16, hi, fb))} | "
          f"{_n(M.threshold_tokens(64, hi, fb))} | {_n(M.threshold_tokens(64, hi, fb, 'zero++'))} |")
    w("")
    d16 = M.micro("dpo", 16)
    thr16 = {fb["name"]: M.threshold_tokens(16, hi, fb) for fb in fab}
    w("Knobs, in order:")
    w("")
    thr_max = max(M.threshold_tokens(64, hi, fb) for fb in fab)
    fits2 = "fits" if M.max_micro_tokens(64, "sft") > 2 * V("recipe.sft_micro_batch_token_budget") else "does not fit"
    w(f"1. **dSFT at 16 and 64 GPUs: "
      f"{'none needed' if M.micro('sft', 64)['tokens'] > thr_max else 'the micro-batch'}.** "
      f"{_n(M.micro('sft', 64)['tokens'])} tokens per micro-step against a largest threshold of {_n(thr_max)}; "
      f"the recipe's {_n(M.sft_step_tokens())}-token step still gives each of 64 GPUs "
      f"{M.micro('sft', 64)['ga']} micro-steps. Keep the {V('recipe.sft_micro_batch_token_budget')}-token "
      f"budget and cut accumulation; if anything, raise the budget to "
      f"{_n(2 * V('recipe.sft_micro_batch_token_budget'))} "
      f"({fits2}: §4) and halve accumulation again — fewer micro-steps, ZeRO-3 traffic per step falls with them.")
    short = [n for n, t in thr16.items() if d16["tokens"] < 1.1 * t]
    title = (f"the micro-batch is the knob on {', '.join(short)} (under 1.1× its threshold)" if short
             else "fine as it is; the micro-batch is the knob if the fabric is thinner")
    w(f"2. **dDPO at 16 GPUs: {title}.** {V('recipe.dpo_global_pairs_per_step')} pairs over 16 GPUs is "
      f"{_n(d16['examples'], 0)} pairs = "
      f"{_n(d16['tokens'])} tokens per GPU, against thresholds of " +
      ", ".join(f"{_n(t)} ({n})" for n, t in thr16.items()) +
      ". Gradient accumulation cannot help (ZeRO-3 pays per micro-step). Either raise the global batch "
      f"(the later handbook recipe uses {V('published.handbook_dpo_pairs_per_step')} pairs/step: "
      f"{V('published.handbook_dpo_pairs_per_step') // 16} pairs = "
      f"{_n(V('published.handbook_dpo_pairs_per_step') / 16 * M.dpo_tokens_per_pair())} tokens per GPU at 16) — "
      f"a hyper-parameter change to re-validate — or turn "
      "on ZeRO++ (hpZ keeps the backward all-gather on NVLink for 2·P/8 bytes more per GPU; qwZ/qgZ quantise the "
      "cross-node traffic): the ZeRO++ column above.")
    big = V("published.handbook_dpo_pairs_per_step")
    t2 = big / 64 * M.dpo_tokens_per_pair()
    r64 = {fb["name"]: M.comm_time(64, fb) / M.compute_time(M.flops(t2, big / 64 * M.dpo_attn_sq_per_pair()), hi)
           for fb in fab}
    w(f"3. **dDPO at 64 GPUs: do not.** {V('recipe.dpo_global_pairs_per_step')} pairs cannot feed 64 ranks; "
      f"even {big} pairs/step is {big // 64} pairs = {_n(t2)} tokens per GPU, comm ÷ compute "
      + ", ".join(f"{r:.2f} ({k})" for k, r in r64.items()) +
      f", for an epoch of {_n(V('data.ultrafeedback_train_pairs') / big)} steps. The whole 3-epoch dDPO "
      f"takes {_t(dpo_total[hi])}–{_t(dpo_total[lo])} on one 8-GPU node; run it there (or several seeds/β values "
      f"side by side, one per node).")
    z2 = M.memory(8, d8[lo]["tokens"], "dpo", zero=2)["total"]
    w(f"4. **ZeRO-2 for dDPO on one node**: 7B bf16 parameters replicated + RMSprop states sharded = "
      f"{_gib(z2)} per GPU at the recipe's micro-batch (fits), and traffic per step drops from "
      f"{_gb(zero3_comm_bytes(M.n_total, 8)['total'])} to {_gb(zero2_comm_bytes(M.n_total, 8)['total'])} per GPU "
      f"(gradient reduce-scatter + one parameter all-gather). Worth it once the per-GPU micro-batch nears the "
      f"threshold; on 8 GPUs at {V('recipe.dpo_pairs_per_micro_batch')} pairs the step is {_bound(d8[hi])}.")
    w(f"5. **Sequence packing length**: the packed token budget, not a row count, sets tokens per micro-step. For "
      f"dDPO, `prefix_shared` carries "
      f"{_pct(1 - M.dpo_tokens_per_pair('prefix_shared') / M.dpo_tokens_per_pair('separate'))} "
      f"fewer tokens for the same pairs: less compute per pair against the same ZeRO-3 bytes, so at 16+ GPUs pair "
      f"it with more pairs per micro-step (a larger budget) to stay above the threshold.")
    w("")

    # ---- assumed vs measured
    w("## Assumed vs measured")
    w("")
    w("- **Measured here** (bundled samples, real tokenizer; `--measure`): tokens and Σlen² per UltraChat row and per "
      "UltraFeedback pair, packing efficiency, padding waste. **Measured in this repo on a GPU**: the H200 1B "
      "step time and peak memory, the LM-head workspace and logits bytes (gpu.json).")
    w("- **Measured by others** (cited): A100 NCCL bus bandwidth intra-node and over 4× HDR, llm-foundry's 7B MFU, "
      "the published runtimes.")
    w("- **Taken from specs**: model shape, peak TFLOP/s, HBM size and bandwidth, NVLink and NIC line rates.")
    w(f"- **Assumed**: the layer working-set factor, the {_pct(V('assumptions.memory_reserve_fraction'))} memory "
      "reserve, optimiser-step bytes, that the 1B H200 "
      "efficiency carries to 7B on A100 (low end), the offline reference pass runs at the training MFU, "
      "perfect overlap in the 'overlapped' column, ZeRO++ byte counts "
      "from its paper, and 16 A100s for the published runs (the paper as quoted; the result files name no hardware).")
    w("")
    w("## Left out")
    w("")
    w("- No 8-GPU (or any multi-GPU) run exists yet; every multi-GPU figure here is the model's.")
    w("- UltraChat lengths come from 16 rows (the cross-check against the published run's chunk count agrees within "
      f"{_pct(abs(M.sft_tokens_per_row / pub['sft']['tokens_per_row'] - 1))}).")
    w("- Evaluation passes, checkpoint saves, data loading and start-up are not in the step times; nor is DeepSpeed's "
      "parameter-persistence threshold (small tensors kept resident) or NCCL latency at small buckets.")
    w("- The attention FLOPs of the prefix-shared layout are counted as the trainer counts them (one segment "
      "per pair), "
      "an over-count of what the masked kernel does.")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", default=INPUTS)
    ap.add_argument("--out", default=DOC)
    ap.add_argument("--measure", action="store_true", help="re-measure the 'measured' inputs and rewrite the JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 if --out differs from what the inputs give")
    a = ap.parse_args(argv)
    inputs = load_inputs(a.inputs)
    if a.measure:
        inputs["measured"] = measure()
        with open(a.inputs, "w", encoding="utf-8") as f:
            json.dump(inputs, f, indent=2, ensure_ascii=False)
            f.write("\n")
    text = render(inputs)
    if a.check:
        with open(a.out, encoding="utf-8") as f:
            ok = f.read() == text
        print(f"{a.out}: {'up to date' if ok else 'STALE: run python -m benchmarks.scaling'}")
        return 0 if ok else 1
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
