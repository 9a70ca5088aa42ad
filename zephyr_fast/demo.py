"""The whole Zephyr pipeline on the bundled real sample data, small enough for 2 CPU cores.

    python -m zephyr_fast.demo            (or: bash scripts/demo.sh, zephyr-fast demo)

1. dSFT of a random-init Mistral-architecture model (hidden 256, 4 layers, the real Mistral-7B
   tokenizer, vocab 32000) on the UltraChat-200k sample            -- recipes/tiny/sft.yaml
2. reference log-probs of the dSFT model on the UltraFeedback sample, computed once and cached
   (``stage: ref_logps``)                                           -- recipes/tiny/dpo.yaml
3. dDPO (beta 0.1) from the dSFT model, reading the cache (no reference model in memory)
4. greedy answers to a few MT-Bench questions (one per category) with the dDPO model
5. a summary on stdout and ``outputs/demo/demo.png`` (loss and reward margins per step)

A GPU is used when present (same command). The model is tiny and trained for minutes, so its
answers are not meaningful text: the demo shows the pipeline and its measurements, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
MT_BENCH = REPO / "assets" / "data" / "mt_bench" / "question.jsonl"


def mt_bench_questions(n: int) -> list:
    """The first question of ``n`` different MT-Bench categories (file order)."""
    seen, out = set(), []
    with open(MT_BENCH) as f:
        for line in f:
            q = json.loads(line)
            if q["category"] not in seen:
                seen.add(q["category"])
                out.append(q)
            if len(out) == n:
                break
    return out


def _first_last(rows: list, key: str):
    vals = [r[key] for r in rows if key in r]
    return (vals[0], vals[-1]) if vals else (float("nan"), float("nan"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zephyr_fast.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "outputs" / "demo"))
    ap.add_argument("--sft_epochs", type=float, default=8)
    ap.add_argument("--dpo_epochs", type=float, default=4)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=40)
    ap.add_argument("--fast", action="store_true", help="one epoch each, two questions (smoke test)")
    args = ap.parse_args(argv)
    if args.fast:
        args.sft_epochs, args.dpo_epochs, args.questions, args.max_new_tokens = 1, 1, 2, 16

    import torch

    from zephyr_fast.config import load_config
    from zephyr_fast.training.metrics import plot_runs, read_jsonl
    from zephyr_fast.train import run

    os.chdir(REPO)  # recipes name repo-relative data and tokenizer paths
    out = os.path.abspath(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"zephyr_fast demo on {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else
                                              f" ({torch.get_num_threads()} threads)") + f" -> {out}")
    t0 = time.time()
    times = {}

    # 1. dSFT
    sft = run(load_config("recipes/tiny/sft.yaml", [f"--output_dir={out}/sft", f"--num_train_epochs={args.sft_epochs}"]))
    times["dSFT"] = time.time() - t0

    # 2. reference log-probs (stage ref_logps), cached next to the DPO run
    dpo_over = [f"--model_name_or_path={out}/sft", f"--ref_logps_dir={out}/ref_logps",
                f"--num_train_epochs={args.dpo_epochs}"]
    t = time.time()
    ref = run(load_config("recipes/tiny/dpo.yaml", dpo_over + ["--stage=ref_logps", f"--output_dir={out}/ref"]))
    times["ref log-probs"] = time.time() - t

    # 3. dDPO, reading the cache
    t = time.time()
    dpo = run(load_config("recipes/tiny/dpo.yaml", dpo_over + [f"--output_dir={out}/dpo"]))
    times["dDPO"] = time.time() - t
    assert dpo["ref_logps_train_reused"], "dDPO should reuse the reference log-probs of step 2"

    # 4. MT-Bench generations with the dDPO model
    from zephyr_fast.data.chat import load_tokenizer
    from zephyr_fast.model import generate, load_model

    t = time.time()
    model = load_model(f"{out}/dpo").to(device).eval()
    tok = load_tokenizer(f"{out}/dpo")
    qs = mt_bench_questions(args.questions)
    answers = generate(model, tok, [[{"role": "user", "content": q["turns"][0]}] for q in qs],
                       max_new_tokens=args.max_new_tokens)
    times["generation"] = time.time() - t

    # 5. plot + summary
    png = plot_runs({"dSFT": sft["metrics_path"], "dDPO": dpo["metrics_path"]}, os.path.join(out, "demo.png"))
    total = time.time() - t0
    sft_rows, dpo_rows = read_jsonl(sft["metrics_path"]), read_jsonl(dpo["metrics_path"])
    summary = {
        "device": device, "total_seconds": total, "phase_seconds": times,
        "sft": {"loss_first_last": _first_last(sft_rows, "loss"), "eval_loss_first_last": _first_last(sft_rows, "eval_loss"),
                "train_tokens_per_second": sft["train_tokens_per_second"], "steps": sft["global_step"]},
        "ref_logps": {k: v for k, v in ref.items() if k.startswith("ref_logps_")},
        "dpo": {"loss_first_last": _first_last(dpo_rows, "loss"),
                "rewards/margins_first_last": _first_last(dpo_rows, "rewards/margins"),
                "rewards/accuracies_first_last": _first_last(dpo_rows, "rewards/accuracies"),
                "eval": dpo["eval_metrics"], "train_tokens_per_second": dpo["train_tokens_per_second"],
                "train_pairs_per_second": dpo.get("train_pairs_per_second"), "steps": dpo["global_step"]},
        "generations": [{"question_id": q["question_id"], "category": q["category"], "question": q["turns"][0],
                         "answer": a} for q, a in zip(qs, answers)],
        "plot": png, "model_dir": f"{out}/dpo",
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _print_summary(summary)
    return 0


def _print_summary(s: dict) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nzephyr_fast demo: dSFT -> reference log-probs -> dDPO -> MT-Bench  ({s['device']}, "
          f"{s['total_seconds']:.0f} s)\n{bar}")
    for k, v in s["phase_seconds"].items():
        print(f"  {k:<15} {v:7.1f} s")
    sft, dpo = s["sft"], s["dpo"]
    print(f"  dSFT  loss {sft['loss_first_last'][0]:.3f} -> {sft['loss_first_last'][1]:.3f}   eval_loss "
          f"{sft['eval_loss_first_last'][0]:.3f} -> {sft['eval_loss_first_last'][1]:.3f}   "
          f"{sft['train_tokens_per_second']:.0f} tokens/s")
    for split in ("train", "test"):
        tps = s["ref_logps"].get(f"ref_logps_{split}_tokens_per_second")
        if tps:
            print(f"  ref log-probs ({split}) {tps:.0f} tokens/s -> {s['ref_logps'][f'ref_logps_{split}_path']}")
    print(f"  dDPO  loss {dpo['loss_first_last'][0]:.3f} -> {dpo['loss_first_last'][1]:.3f}   rewards/margins "
          f"{dpo['rewards/margins_first_last'][0]:.3f} -> {dpo['rewards/margins_first_last'][1]:.3f}   "
          f"rewards/accuracies {dpo['rewards/accuracies_first_last'][0]:.2f} -> "
          f"{dpo['rewards/accuracies_first_last'][1]:.2f}")
    print(f"        {dpo['train_tokens_per_second']:.0f} tokens/s, {dpo['train_pairs_per_second']:.2f} pairs/s; "
          f"eval: " + ", ".join(f"{k}={v:.3f}" for k, v in dpo["eval"].items() if "rewards" in k or k == "eval_loss"))
    print("  MT-Bench (tiny model, minutes of training: not meaningful text)")
    for g in s["generations"]:
        print(f"   [{g['category']}] {g['question'][:70]!r}\n      -> {g['answer'][:120]!r}")
    print(f"  plot: {s['plot']}\n  model: {s['model_dir']}\n{bar}")


if __name__ == "__main__":
    raise SystemExit(main())
