"""Measure packing efficiency and padding waste on the bundled real samples (numbers in docs/DATA.md).

    python -m zephyr_fast.data.measure [--tokenizer assets/tokenizers/mistral-7b-v0.1]

Prints markdown tables:

* packing efficiency = real tokens / (micro-batches x max_tokens), SFT (UltraChat rows) and DPO
  (1k real UltraFeedback pairs) in both layouts, for several token budgets;
* tokens saved by the prefix-shared layout (the prompt is stored once per pair);
* the padding a padded batch would have had: rows of a seeded-shuffled batch padded to the
  batch's longest row, as TRL / transformers collators do (``pad_to_multiple_of`` off);
* tokenisation time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from .chat import load_tokenizer
from .packing import pack_dpo, pack_sft
from .preference import build_dpo_examples
from .sft import tokenize_sft

BUDGETS = (2048, 4096, 8192)


def padded_waste(lengths_per_item, batch_size: int, seed: int = 0) -> float:
    """Fraction of a padded batch that is padding.  ``lengths_per_item``: per item, the lengths of
    its rows (1 row for SFT, 2 for a DPO pair: prompt+chosen, prompt+rejected); every row of a
    batch is padded to the batch's longest row."""
    order = list(range(len(lengths_per_item)))
    random.Random(seed).shuffle(order)
    real = padded = 0
    for a in range(0, len(order), batch_size):
        rows = [n for i in order[a : a + batch_size] for n in lengths_per_item[i]]
        real += sum(rows)
        padded += len(rows) * max(rows)
    return 1 - real / padded


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def measure(assets: str, tokenizer: str, *, max_length_sft=2048, max_length_dpo=1024, max_prompt_length=512) -> str:
    tok = load_tokenizer(tokenizer)
    out = []
    uc = _jsonl(os.path.join(assets, "data", "ultrachat_200k", "sample16.jsonl"))
    flat = _jsonl(os.path.join(assets, "data", "ultrafeedback_binarized", "flat1k.jsonl"))

    t0 = time.perf_counter()
    sft_ex, sft_rep = tokenize_sft(uc * 63, tok, max_length=max_length_sft, show_progress=False)
    t_sft = time.perf_counter() - t0
    sft_ex = sft_ex[: len(uc)]  # the 16 distinct conversations
    t0 = time.perf_counter()
    dpo_ex, dpo_rep = build_dpo_examples(flat, tok, max_length=max_length_dpo, max_prompt_length=max_prompt_length,
                                         skip_invalid_rows=True, show_progress=False)
    t_dpo = time.perf_counter() - t0

    out.append(f"Tokeniser: {tokenizer}. SFT max_length={max_length_sft}; DPO max_length={max_length_dpo}, "
               f"max_prompt_length={max_prompt_length}.\n")
    out.append(f"- SFT: {len(sft_ex)} UltraChat conversations, {sum(len(e['input_ids']) for e in sft_ex)} tokens")
    out.append(f"- DPO: {dpo_rep}\n")
    out.append("| data | layout | max_tokens | micro-batches | real tokens | efficiency |")
    out.append("|---|---|---:|---:|---:|---:|")
    # a 1k-row SFT length distribution: the UltraFeedback prompts with their chosen answers
    uf_sft, _ = tokenize_sft([{"messages": [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["chosen"]}]} for r in flat],
                             tok, max_length=max_length_sft, show_progress=False)
    for name, exs in (("UltraChat 16 rows", sft_ex), ("UltraFeedback 1k prompt+chosen", uf_sft)):
        for mt in BUDGETS:
            b = pack_sft(exs, mt, seed=0)
            out.append(f"| {name} | sft | {mt} | {b.stats.num_batches} | {b.stats.real_tokens} | "
                       f"{100 * b.stats.efficiency:.1f}% |")
    real = {}
    for layout in ("separate", "prefix_shared"):
        for mt in BUDGETS:
            b = pack_dpo(dpo_ex, mt, layout=layout, seed=0)
            real[layout] = b.stats.real_tokens
            out.append(f"| UltraFeedback 1k pairs | {layout} | {mt} | {b.stats.num_batches} | {b.stats.real_tokens} | "
                       f"{100 * b.stats.efficiency:.1f}% |")
    saved = 1 - real["prefix_shared"] / real["separate"]
    out.append(f"\nPrefix-shared stores {real['prefix_shared']} tokens instead of {real['separate']} "
               f"(-{100 * saved:.1f}% tokens through the model).\n")

    out.append("| data | padded batch | padding waste |")
    out.append("|---|---|---:|")
    sft_rows = [[len(e["input_ids"])] for e in sft_ex]
    dpo_rows = [[len(e["prompt_ids"]) + len(e["chosen_ids"]), len(e["prompt_ids"]) + len(e["rejected_ids"])] for e in dpo_ex]
    for bs in (4, 16):
        out.append(f"| UltraChat 16 rows | {bs} rows, padded to longest | {100 * padded_waste(sft_rows, bs):.1f}% |")
    for bs in (4, 8, 16):
        out.append(f"| UltraFeedback 1k pairs | {bs} pairs ({2 * bs} rows), padded to longest | "
                   f"{100 * padded_waste(dpo_rows, bs):.1f}% |")
    out.append(f"| UltraFeedback 1k pairs | rows padded to max_length={max_length_dpo} | "
               f"{100 * (1 - real['separate'] / (2 * len(dpo_ex) * max_length_dpo)):.1f}% |")
    out.append(f"\nTokenisation: {len(uc) * 63} SFT conversations in {t_sft:.2f} s "
               f"({sft_rep.tokens} tokens); {len(flat)} DPO rows in {t_dpo:.2f} s.")
    return "\n".join(out)


def main(argv=None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    assets = os.path.join(here, "..", "..", "assets")
    ap = argparse.ArgumentParser(prog="python -m zephyr_fast.data.measure")
    ap.add_argument("--assets", default=os.path.normpath(assets))
    ap.add_argument("--tokenizer", default=os.path.normpath(os.path.join(assets, "tokenizers", "mistral-7b-v0.1")))
    args = ap.parse_args(argv)
    print(measure(args.assets, args.tokenizer))


if __name__ == "__main__":
    main()
