"""The analytical model behind docs/SCALING.md (issue 13): a Zephyr-7B dSFT and dDPO step on N GPUs.

Every figure is computed from ``benchmarks/scaling/inputs.json`` (each input carries its source).
Model, per micro-step of one rank:

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

import json
import math
import os

from zephyr_fast.training.metrics import train_flops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INPUTS = os.path.join(ROOT, "benchmarks", "scaling", "inputs.json")
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

    # -- the recipe ----------------------------------------------------------------------------------
    def recipe(self, world: int, mfus: tuple) -> dict:
        """The recipe's dSFT and dDPO on ``world`` GPUs, per MFU: steps, epoch times, the offline reference
        pass and dDPO's total (its epochs + the reference pass); memory at the recipe's micro-batches."""
        sft = {m: self.step("sft", world, m) for m in mfus}
        dpo = {m: self.step("dpo", world, m) for m in mfus}
        sft_epoch = {m: self.epoch_time("sft", world, m) for m in mfus}
        dpo_epoch = {m: self.epoch_time("dpo", world, m) for m in mfus}
        ref = {m: self.reference_pass_time(world, m) for m in mfus}
        n_dpo_ep = val(self.i, "recipe.dpo_epochs")
        return {"sft_step": sft, "dpo_step": dpo, "sft_epoch": sft_epoch, "dpo_epoch": dpo_epoch, "ref_pass": ref,
                "dpo_epochs": n_dpo_ep, "dpo_total": {m: n_dpo_ep * dpo_epoch[m] + ref[m] for m in mfus},
                "sft_memory": self.memory(world, sft[mfus[0]]["tokens"], "sft"),
                "dpo_memory": self.memory(world, dpo[mfus[0]]["tokens"], "dpo")}

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

    def _pub(self, key: str):
        return val(self.i, f"published.{key}")

    def published(self) -> dict:
        """The published zephyr-7b-beta dDPO / dSFT runs and the later handbook dDPO, as this model reads them."""
        return {"dpo": self._published_dpo(), "sft": self._published_sft(), "handbook_dpo": self._published_handbook()}

    def _published_dpo(self) -> dict:
        """Pairs per step from the logged rates; TRL computed the reference forward every step;
        train_runtime includes the in-training evaluations (every eval_steps)."""
        p, g, peak = self._pub, self._pub("num_gpus"), self.peak
        steps = p("dpo_steps_per_second") * p("dpo_runtime_s")
        evals = math.floor(steps / p("dpo_eval_steps"))
        train_s = p("dpo_runtime_s") - evals * p("dpo_eval_runtime_s")
        pairs_per_step = p("dpo_train_samples") * p("dpo_epochs") / steps
        waste = self.m["dpo_padding_waste_2_pairs"]
        real = p("dpo_train_samples") * p("dpo_epochs") * self.dpo_tokens_per_pair("separate")
        attn = p("dpo_train_samples") * p("dpo_epochs") * self.dpo_attn_sq_per_pair("separate")
        useful = self.flops(real, attn)
        done = (useful + self.flops(real, attn) / 3.0) / (1 - waste)  # + reference forward, on padded rows
        return {"steps": steps, "evals": evals, "train_s": train_s, "pairs_per_step": pairs_per_step,
                "per_device_pairs": pairs_per_step / g, "useful_flops": useful, "executed_flops": done, "waste": waste,
                "mfu_useful": useful / (train_s * g * peak), "mfu_executed": done / (train_s * g * peak),
                "gpu_hours": p("dpo_runtime_s") * g / 3600, "train_gpu_hours": train_s * g / 3600,
                "step_s": train_s / steps}

    def _published_sft(self) -> dict:
        """TRL ConstantLengthDataset with __len__ = raw rows: the epoch fraction counts chunks."""
        p, g, peak = self._pub, self._pub("num_gpus"), self.peak
        L = p("sft_packed_seq_length")
        chunks = p("sft_epoch_reached") * val(self.i, "data.ultrachat_train_rows")
        tokens = chunks * L
        f = self.flops(tokens, chunks * L * L)
        train_s = p("sft_runtime_s") - p("sft_eval_runtime_s")
        ours = self.flops(tokens, tokens * self.sft_context)  # the same tokens packed per conversation
        return {"chunks": chunks, "tokens": tokens, "tokens_per_row": tokens / val(self.i, "data.ultrachat_train_rows"),
                "flops": f, "train_s": train_s, "mfu": f / (train_s * g * peak),
                "mfu_if_8": f / (train_s * 8 * peak), "gpu_hours": p("sft_runtime_s") * g / 3600,
                "train_gpu_hours": train_s * g / 3600, "planned_steps": p("sft_steps_per_second") * p("sft_runtime_s"),
                "attention_saving": 1 - ours / f}

    def _published_handbook(self) -> dict:
        p, hg = self._pub, self._pub("handbook_dpo_num_gpus")
        return {"gpu_hours": p("handbook_dpo_runtime_s") * hg / 3600,
                "pairs_per_s_per_gpu": p("handbook_dpo_train_samples") / p("handbook_dpo_runtime_s") / hg}
