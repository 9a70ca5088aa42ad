"""``zephyr-fast`` console script: one entry point for the pipeline's stages.

    zephyr-fast train RECIPE.yaml [--key=value ...]      # stage from the recipe (sft | ref_logps | dpo); --help: keys
    zephyr-fast sft RECIPE.yaml [--key=value ...]        # train, stage sft (refused if the recipe has DPO keys)
    zephyr-fast dpo RECIPE.yaml [--key=value ...]        # train, stage dpo (refused if the recipe is SFT data)
    zephyr-fast plan RECIPE.yaml [--key=value ...]       # what the run would do, without training
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

import importlib
import sys

USAGE = __doc__.split("\n\n")[1]

# command -> (module, function taking argv, extra argv); each module is imported only when its command
# runs, so `zephyr-fast binarize` or `--help` does not pay for torch, transformers or the Hub
COMMANDS = {
    "train": ("zephyr_fast.train", "main", []),
    "sft": ("zephyr_fast.train", "main", ["--stage=sft"]),
    "dpo": ("zephyr_fast.train", "main", ["--stage=dpo"]),
    "ref-logps": ("zephyr_fast.train", "main", ["--stage=ref_logps"]),
    "plan": ("zephyr_fast.training.preview", "main", []),
    "binarize": ("zephyr_fast.data.binarize", "main", []),
    "plot": ("zephyr_fast.training.metrics", "plot_main", []),
    "demo": ("zephyr_fast.demo", "main", []),
    "generate": ("zephyr_fast.aif.generate", "main", []),
    "judge": ("zephyr_fast.aif.judge", "main", []),
    "aif": ("zephyr_fast.aif.pipeline", "main", []),
    "mt-bench": ("zephyr_fast.eval.mt_bench", "main", []),
}
ALIASES = {"ref_logps": "ref-logps", "mt_bench": "mt-bench"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = ALIASES.get(argv[0], argv[0]), argv[1:]
    if cmd not in COMMANDS:
        print(f"zephyr-fast: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module, func, extra = COMMANDS[cmd]
    # the one deferred import of the package (see COMMANDS): the command's own module
    return getattr(importlib.import_module(module), func)(rest + extra)


if __name__ == "__main__":
    sys.exit(main())
