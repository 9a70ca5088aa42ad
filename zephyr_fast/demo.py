"""The whole Zephyr pipeline on the bundled real sample data, small enough for 2 CPU cores.

    python -m zephyr_fast.demo            (or: bash scripts/demo.sh, zephyr-fast demo)

1. dSFT of a random-init Mistral-architecture model (hidden 256, 4 layers, the real Mistral-7B
   tokenizer, vocab 32000) on the UltraChat-200k sample            -- recipes/tiny/sft.yaml
2. AIF (docs/AIF.md): completions for the UltraFeedback sample's prompts from a pool of two models
   (the dSFT model and its random init) with UltraFeedback's principle system prompts; rated on the
   four UltraFeedback aspects by a judge served locally (``transformers serve`` of the dSFT model on
   127.0.0.1, answers constrained to a rating token); binarised (best = chosen, random lower = rejected)
3. reference log-probs of the dSFT model on those pairs, computed once and cached (``stage: ref_logps``)
4. dDPO (beta 0.1) from the dSFT model on the AIF pairs, reading the cache  -- recipes/tiny/dpo.yaml
5. MT-Bench: the dDPO model answers one question per category (both turns, the training chat
   template, FastChat temperatures), graded by the same local judge with FastChat's prompts
6. ``zephyr-fast eval`` of the dDPO run (docs/EVAL.md): each epoch's checkpoint and the final model,
   training preference accuracy and AlpacaEval (4 instructions) by the same judge, table and plot
7. a summary on stdout, ``outputs/demo/demo.png`` (loss and reward margins per step),
   ``outputs/demo/mt_bench/`` (report.json, report.md, radar.png) and ``outputs/demo/eval/`` (eval.md, eval.png)

A GPU is used when present (same command). The models are tiny and trained for minutes, and the
judge is one of them: its ratings are samples from a near-random distribution over the rating
tokens, so the pairs and the MT-Bench scores mean nothing. The demo shows the pipeline, its
plumbing and its measurements, not quality.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import time

import torch
from transformers import AutoConfig

from zephyr_fast.aif.client import JudgeConfig
from zephyr_fast.aif.pipeline import dpo_data_override, run_aif
from zephyr_fast.aif.serve import serve_local
from zephyr_fast.config import load_config
from zephyr_fast.data.chat import load_tokenizer
from zephyr_fast.eval.mt_bench import run_mt_bench
from zephyr_fast.eval.run_eval import markdown_table, run_eval
from zephyr_fast.fileio import atomic_open
from zephyr_fast.model import load_model
from zephyr_fast.train import run
from zephyr_fast.training.metrics import plot_runs, read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]
UF_PROMPTS = REPO / "assets" / "data" / "ultrafeedback_binarized" / "sample16.jsonl"
# transformers serve samples only when asked through the generation config (greedy otherwise, and a
# greedy random judge gives every completion the same rating: every pair would tie)
SAMPLE_JUDGE = {"generation_config": json.dumps({"do_sample": True})}


def _first_last(rows: list, key: str):
    vals = [r[key] for r in rows if key in r]
    return (vals[0], vals[-1]) if vals else (float("nan"), float("nan"))


def _save_random_init(sft_dir: str, out_dir: str) -> str:
    """The dSFT model's architecture at random init (seed 0): the pool's second, weaker model."""
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        torch.manual_seed(0)
        load_model(config=AutoConfig.from_pretrained(sft_dir)).save_pretrained(out_dir)
        load_tokenizer(sft_dir).save_pretrained(out_dir)
    return out_dir


def _aif(out: str, server, args) -> dict:
    """Step 2: generate -> judge (the served model) -> binarize; returns the pipeline's result."""
    recipe = {"output_dir": f"{out}/aif",
              "generate": {"prompts": str(UF_PROMPTS), "limit": args.aif_prompts, "n_models": 2, "seed": 0,
                           "pool": {"dsft": f"{out}/sft", "init": _save_random_init(f"{out}/sft", f"{out}/init")},
                           "max_new_tokens": args.max_new_tokens, "batch_size": 8},
              "judge": {"base_url": server.base_url, "model": server.model, "api_key": "local",
                        "endpoint_id": server.endpoint_id,
                        "constrain_tokenizer": server.model, "temperature": 1.0, "concurrency": 2,
                        "extra_body": SAMPLE_JUDGE},
              "binarize": {"seed": 42}}
    return run_aif(recipe, progress=False)


def _judge(server) -> JudgeConfig:
    """The served judge, forced to answer with a rating / verdict token, sampled."""
    return JudgeConfig(base_url=server.base_url, model=server.model, api_key="local", endpoint_id=server.endpoint_id,
                       constrain_tokenizer=server.model, temperature=1.0, concurrency=2, extra_body=SAMPLE_JUDGE)


def _mt_bench(out: str, server, args) -> dict:
    """Step 5: MT-Bench answers of the dDPO model graded by the served judge."""
    return run_mt_bench(f"{out}/dpo", f"{out}/mt_bench", _judge(server), per_category=args.questions,
                        max_new_tokens=args.max_new_tokens, progress=False)


def _eval(out: str, server, args) -> list:
    """Step 6 (docs/EVAL.md): every dDPO checkpoint (one per epoch) and the final model -- training
    preference accuracy and AlpacaEval on the first 4 instructions -- table and plot by epoch."""
    return run_eval(f"{out}/dpo", f"{out}/eval", _judge(server), benches=("preference", "alpaca-eval"),
                    alpaca_limit=4, max_new_tokens=args.max_new_tokens, lc=False, progress=False)


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m zephyr_fast.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "outputs" / "demo"))
    ap.add_argument("--sft_epochs", type=float, default=8)
    ap.add_argument("--dpo_epochs", type=float, default=4)
    ap.add_argument("--aif_prompts", type=int, default=16, help="UltraFeedback sample prompts for AIF")
    ap.add_argument("--questions", type=int, default=1, help="MT-Bench questions per category")
    ap.add_argument("--max_new_tokens", type=int, default=40)
    ap.add_argument("--fast", action="store_true", help="one epoch each, 8 AIF prompts (smoke test)")
    args = ap.parse_args(argv)
    if args.fast:
        args.sft_epochs, args.dpo_epochs, args.aif_prompts, args.max_new_tokens = 1, 1, 8, 16
    return args


@contextlib.contextmanager
def _timed(times: dict, phase: str):
    t = time.time()
    yield
    times[phase] = time.time() - t


def _pipeline(out: str, args, times: dict) -> dict:
    """Steps 1-6; returns each step's result by name."""
    r = {}
    with _timed(times, "dSFT"):  # 1. dSFT
        r["sft"] = run(load_config("recipes/tiny/sft.yaml", [f"--output_dir={out}/sft",
                                                             f"--num_train_epochs={args.sft_epochs}"]))
    with serve_local(f"{out}/sft") as server:  # the local judge, on 127.0.0.1, for steps 2 and 5
        with _timed(times, "AIF"):  # 2. AIF: generate -> judge -> binarize
            r["aif"] = _aif(out, server, args)
        dpo_over = [f"--model_name_or_path={out}/sft", f"--ref_logps_dir={out}/ref_logps",
                    f"--num_train_epochs={args.dpo_epochs}", dpo_data_override(r["aif"]["pairs"])]
        with _timed(times, "ref log-probs"):  # 3. reference log-probs (stage ref_logps), cached beside the DPO run
            r["ref"] = run(load_config("recipes/tiny/dpo.yaml", dpo_over + ["--stage=ref_logps",
                                                                             f"--output_dir={out}/ref"]))
        with _timed(times, "dDPO"):  # 4. dDPO, reading the cache; a checkpoint per epoch for step 6
            r["dpo"] = run(load_config("recipes/tiny/dpo.yaml", dpo_over + [f"--output_dir={out}/dpo",
                                                                             "--save_strategy=epoch"]))
        assert r["dpo"]["ref_logps_train_reused"], "dDPO should reuse the reference log-probs of step 3"
        with _timed(times, "MT-Bench"):  # 5. MT-Bench answers + grading with the dDPO model
            r["mt"] = _mt_bench(out, server, args)
        with _timed(times, "eval by epoch"):  # 6. every dDPO checkpoint: preference accuracy, AlpacaEval
            r["by_epoch"] = _eval(out, server, args)
    return r


def _summary(r: dict, out: str, png: str) -> dict:
    sft, dpo, aif, mt = r["sft"], r["dpo"], r["aif"], r["mt"]
    sft_rows, dpo_rows = read_jsonl(sft["metrics_path"]), read_jsonl(dpo["metrics_path"])
    return {
        "sft": {"loss_first_last": _first_last(sft_rows, "loss"), "eval_loss_first_last": _first_last(sft_rows, "eval_loss"),
                "train_tokens_per_second": sft["train_tokens_per_second"], "steps": sft["global_step"]},
        "aif": {"generate": str(aif["generate"]), "judge": str(aif["judge"]), "binarize": str(aif["binarize"]),
                "pairs": aif["pairs"], "judge_usage": aif["judge"].usage},
        "ref_logps": {k: v for k, v in r["ref"].items() if k.startswith("ref_logps_")},
        "dpo": {"loss_first_last": _first_last(dpo_rows, "loss"),
                "rewards/margins_first_last": _first_last(dpo_rows, "rewards/margins"),
                "rewards/accuracies_first_last": _first_last(dpo_rows, "rewards/accuracies"),
                "eval": dpo["eval_metrics"], "train_tokens_per_second": dpo["train_tokens_per_second"],
                "train_pairs_per_second": dpo.get("train_pairs_per_second"), "steps": dpo["global_step"]},
        "mt_bench": {k: mt[k] for k in ("overall", "turn_1", "turn_2", "categories", "graded", "failures", "radar")},
        "mt_bench_table": mt["table"],
        "eval_by_epoch": markdown_table(r["by_epoch"], "train"), "eval_plot": f"{out}/eval/eval.png",
        "plot": png, "model_dir": f"{out}/dpo",
    }


def main(argv=None) -> int:
    args = _parse(argv)
    os.chdir(REPO)  # recipes name repo-relative data and tokenizer paths
    out = os.path.abspath(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"zephyr_fast demo on {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else
                                              f" ({torch.get_num_threads()} threads)") + f" -> {out}")
    t0, times = time.time(), {}
    r = _pipeline(out, args, times)
    # 7. plot + summary
    png = plot_runs({"dSFT": r["sft"]["metrics_path"], "dDPO": r["dpo"]["metrics_path"]}, os.path.join(out, "demo.png"))
    summary = {"device": device, "total_seconds": time.time() - t0, "phase_seconds": times, **_summary(r, out, png)}
    with atomic_open(os.path.join(out, "summary.json")) as f:
        json.dump(summary, f, indent=2)
    _print_summary(summary)
    return 0


def _print_summary(s: dict) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nzephyr_fast demo: dSFT -> AIF -> ref log-probs -> dDPO -> MT-Bench -> eval  ({s['device']}, "
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
    for k in ("generate", "judge", "binarize"):
        print(f"  AIF {s['aif'][k]}")
    mt = s["mt_bench"]
    print(f"  MT-Bench (tiny model graded by a tiny constrained judge: the numbers mean nothing): overall "
          f"{mt['overall']}, {mt['graded']} graded, {mt['failures']} failed; radar: {mt['radar']}")
    print("\n".join("    " + line for line in s["mt_bench_table"].splitlines()))
    print("  by epoch (zephyr-fast eval): training preference accuracy, AlpacaEval (tiny judge: meaningless)")
    print("\n".join("    " + line for line in s["eval_by_epoch"].splitlines()) + f"\n    plot: {s['eval_plot']}")
    print(f"  plot: {s['plot']}\n  model: {s['model_dir']}\n{bar}")


if __name__ == "__main__":
    raise SystemExit(main())
