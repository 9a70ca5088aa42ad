"""Measuring the 'measured' inputs of benchmarks/scaling/inputs.json (issue 13): token counts, Σ len²,
packing efficiency and padding waste from the bundled data with the real Mistral-7B tokenizer, and the
calibration figures of benchmarks/results/gpu.json. Run by ``python -m benchmarks.scaling --measure``;
not run by the tests.
"""

from __future__ import annotations

import json
import os

from benchmarks.model_cases import real_pairs
from benchmarks.scaling.model import ROOT, load_inputs
from zephyr_fast.data.chat import load_tokenizer
from zephyr_fast.data.measure import padded_waste
from zephyr_fast.data.packing import pack_dpo, pack_sft
from zephyr_fast.data.preference import build_dpo_examples
from zephyr_fast.data.sft import tokenize_sft
from zephyr_fast.training.plan import micro_stats

HOW = "python -m benchmarks.scaling --measure, real Mistral-7B tokenizer (assets/tokenizers/mistral-7b-v0.1): "
GPU = "benchmarks/results/gpu.json (NVIDIA H200, 2026-11-28, benchmarks/gpu_check.sh) "


def measure(root: str = ROOT) -> dict:
    """The ``measured`` section of the inputs: ``{key: {"value", "source"}}``, in the committed order."""
    out = {}

    def put(key, value, source):
        out[key] = {"value": value, "source": source}

    tok = load_tokenizer(os.path.join(root, "assets", "tokenizers", "mistral-7b-v0.1"))
    _measure_ultrachat(_jsonl(root, "assets", "data", "ultrachat_200k", "sample16.jsonl"), tok, put)
    _measure_ultrafeedback(_jsonl(root, "assets", "data", "ultrafeedback_binarized", "flat1k.jsonl"), tok, put)
    with open(os.path.join(root, "benchmarks", "results", "gpu.json"), encoding="utf-8") as f:
        _measure_gpu({b["name"]: b for b in json.load(f)["benchmarks"]}, put)
    return out


def remeasure(path: str) -> dict:
    """Re-measure the ``measured`` section of the inputs JSON at ``path`` and rewrite the file; the new inputs."""
    inputs = load_inputs(path)
    inputs["measured"] = measure()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(inputs, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return inputs


def _jsonl(root: str, *path: str) -> list:
    with open(os.path.join(root, *path), encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def _measure_ultrachat(uc: list, tok, put) -> None:
    """Tokens and Σ len² of the 16 bundled UltraChat conversations."""
    lens = [len(e["input_ids"]) for e in tokenize_sft(uc, tok, max_length=2048, show_progress=False)[0]]
    s_uc = HOW + "assets/data/ultrachat_200k/sample16.jsonl (16 real rows), max_length 2048, Zephyr template"
    put("sft_sample_rows", len(lens), s_uc)
    put("sft_sample_tokens", sum(lens), s_uc)
    put("sft_sample_attn_sq", sum(n * n for n in lens), s_uc + " (Σ len², one attention segment per conversation)")


def _measure_ultrafeedback(flat: list, tok, put) -> None:
    """Per-pair tokens and Σ len² by layout, TRL's padding waste, and SFT packing efficiency, from the
    1000 bundled UltraFeedback pairs."""
    dpo, _ = build_dpo_examples(flat, tok, max_length=1024, max_prompt_length=512, skip_invalid_rows=True,
                                show_progress=False)
    s_uf = HOW + "assets/data/ultrafeedback_binarized/flat1k.jsonl (1000 real pairs), max_length 1024, prompt 512"
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
        HOW + "flat1k prompt+chosen as 1000 SFT rows, pack_sft best-fit-decreasing into 8192-token micro-batches "
        "(the 16 UltraChat rows are too few to fill bins)")


def _measure_gpu(gpu: dict, put) -> None:
    """Calibration figures from benchmarks/results/gpu.json (by benchmark name)."""
    pf = gpu["model[packed+fused-1b]"]
    put("cal_packed_fused_time_s", pf["stats"]["median"],
        GPU + "model[packed+fused-1b] median (fwd+bwd, bf16, no checkpointing)")
    put("cal_packed_fused_peak_bytes", pf["extra_info"]["peak_mem_bytes"],
        GPU + "model[packed+fused-1b] peak_mem_bytes (growth beyond the resident weights)")
    put("cal_tokens", pf["extra_info"]["real_tokens"], GPU + "model[packed+fused-1b] real_tokens")
    pairs = real_pairs(pf["extra_info"]["seqs"] // 2)
    seqs = [p + c for p, c, _ in pairs] + [p + j for p, _, j in pairs]
    if sum(len(x) for x in seqs) != pf["extra_info"]["real_tokens"]:
        raise SystemExit("benchmarks.model_cases.real_pairs no longer gives the sequences gpu.json measured")
    put("cal_attn_sq", sum(len(x) ** 2 for x in seqs),
        "Σ len² of the 32 sequences of model[packed+fused-1b] (benchmarks.model_cases.real_pairs(16))")
    zf = gpu["lm_head[ce-zephyr_fast-mistral-7b]"]["extra_info"]
    nv = gpu["lm_head[ce-naive_torch-mistral-7b]"]["extra_info"]
    put("cal_fused_head_workspace_bytes", zf["workspace_bytes"],
        GPU + "lm_head[ce-zephyr_fast-mistral-7b] workspace_bytes (N 8192, D 4096, V 32000; beyond x, W, dX, dW)")
    put("logits_bytes_per_token", nv["workspace_bytes"] / nv["n"],
        GPU + "lm_head[ce-naive_torch-mistral-7b] workspace_bytes / N (materialised logits + fp32 softmax + grad)")
