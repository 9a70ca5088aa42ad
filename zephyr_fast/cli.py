"""``zephyr-fast`` console script: one entry point for the pipeline's stages.

    zephyr-fast train RECIPE.yaml [--key=value ...]      # stage from the recipe (sft | ref_logps | dpo)
    zephyr-fast ref-logps RECIPE.yaml [--key=value ...]  # only the offline reference pass of a DPO recipe
    zephyr-fast binarize IN OUT [--seed N] [--score ...] # UltraFeedback raw/flat -> ultrafeedback_binarized
    zephyr-fast plot OUT.png LABEL=metrics.jsonl ...     # loss / reward-margin plot of finished runs
    zephyr-fast demo [--fast]                            # dSFT -> ref log-probs -> dDPO -> MT-Bench, tiny CPU model
    zephyr-fast generate PROMPTS OUT_DIR --pool NAME=MODEL_DIR ... # AIF: completions from N pool models per prompt
    zephyr-fast judge IN OUT [--base-url URL --judge-model M]      # AIF: UltraFeedback 4-aspect ratings via an OpenAI API
    zephyr-fast aif recipes/aif.yaml [--key=value ...]             # AIF: generate -> judge -> binarize from one recipe
    zephyr-fast mt-bench MODEL_DIR [--out DIR]                     # MT-Bench answers + single-answer grading report

Multi-GPU training goes through a launcher: ``deepspeed --num_gpus N zephyr_fast/train.py RECIPE``.
"""

from __future__ import annotations

import sys

USAGE = __doc__.split("\n\n")[1]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from zephyr_fast.train import main as train_main

        return train_main(rest)
    if cmd in ("ref-logps", "ref_logps"):
        from zephyr_fast.train import main as train_main

        return train_main(rest + ["--stage=ref_logps"])
    if cmd == "binarize":
        from zephyr_fast.data.binarize import main as binarize_main

        return binarize_main(rest)
    if cmd == "plot":
        from zephyr_fast.training.metrics import plot_runs

        if len(rest) < 2 or any("=" not in r for r in rest[1:]):
            print("usage: zephyr-fast plot OUT.png LABEL=metrics.jsonl [LABEL=metrics.jsonl ...]", file=sys.stderr)
            return 2
        print(plot_runs(dict(r.split("=", 1) for r in rest[1:]), rest[0]))
        return 0
    if cmd == "demo":
        from zephyr_fast.demo import main as demo_main

        return demo_main(rest)
    if cmd == "generate":
        from zephyr_fast.aif.generate import main as generate_main

        return generate_main(rest)
    if cmd == "judge":
        from zephyr_fast.aif.judge import main as judge_main

        return judge_main(rest)
    if cmd == "aif":
        from zephyr_fast.aif.pipeline import main as aif_main

        return aif_main(rest)
    if cmd in ("mt-bench", "mt_bench"):
        from zephyr_fast.eval.mt_bench import main as mt_bench_main

        return mt_bench_main(rest)
    print(f"zephyr-fast: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
