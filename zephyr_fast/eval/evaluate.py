"""``zephyr-fast evaluate RECIPE [--split train|test] [--model DIR] [--out FILE] [--key=value ...]``: the
recipe's loss -- and, for a DPO recipe, TRL's metrics (``rewards/accuracies``, ``rewards/margins``,
``rewards/chosen``, ``rewards/rejected``, ``logps/chosen``, ``logps/rejected``) -- on any split of its
data, without training.

The recipe's data is tokenised and packed exactly as training does; the split is evaluated with the
trainer's own evaluation (``training.loop.evaluate``: the same loss heads, denominators and metric
names, prefixed by the split: ``train_rewards/accuracies``). DPO: the reference is the recipe's
(``ref_model_name_or_path`` or ``model_name_or_path``), its log-probs read from the run's reference
cache when they are there (verified) and computed otherwise; ``--model`` is the policy scored against
it -- a trained model or any checkpoint folder (checkpoints are Hugging Face folders). Without
``--model`` the recipe's own model is scored (for DPO: the reference itself, every reward 0).

:class:`Evaluator` prepares the data and the reference once and scores several models
(``zephyr-fast eval RUN_DIR`` scores every checkpoint of a run with it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Optional

import torch

from zephyr_fast.config import Config, ConfigError, load_config
from zephyr_fast.data.validate import DataValidationError
from zephyr_fast.fileio import atomic_open, first_line
from zephyr_fast.model.forward import unwrap_model
from zephyr_fast.objectives import LossModule, make_stage
from zephyr_fast.training import distributed
from zephyr_fast.training.build import build_model, seed_everything
from zephyr_fast.training.loop import evaluate
from zephyr_fast.training.plan import Micro, micro_stats, prepare
from zephyr_fast.training.reference import StaleRefLogpsError
from zephyr_fast.training.run import batching, recipe_tokenizer, reference_pass

__all__ = ["Evaluator", "check_model_folder", "main"]

SPLITS = ("train", "test")


def check_model_folder(path: str) -> None:
    """A folder ``from_pretrained`` reads, else one line (an older checkpoint: ``zephyr-fast export`` it)."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{path}: not a Hugging Face model folder (no config.json); for a checkpoint written "
                          f"before checkpoints were model folders run: zephyr-fast export {path}")


class Evaluator:
    """The recipe's data (and DPO reference log-probs) prepared once; :meth:`score` evaluates a model on it."""

    def __init__(self, cfg: Config, split: str = "test", *, log=print):
        if split not in SPLITS:
            raise ConfigError(f"{cfg.source}: --split: {split!r} is not one of {', '.join(SPLITS)}")
        self.cfg, self.split, self.log = cfg, split, log
        t = cfg.training
        self.dist = distributed.setup(t, bf16=t.bf16 or cfg.model.dtype == "bfloat16")
        seed_everything(t.seed)
        self.stage = make_stage(cfg)
        if not self.stage.trains:
            raise ConfigError(f"{cfg.source}: stage {t.stage!r} has no loss to evaluate (sft or dpo)")
        self.tokenizer = recipe_tokenizer(cfg)
        b = batching(cfg, self.stage, self.dist.world_size)
        data = prepare(cfg.data, self.stage, self.tokenizer, b, log=log)
        self.data = self._split_data(data, b)
        self.refs = self._reference() if self.stage.uses_reference else None

    def _split_data(self, data: dict, b) -> dict:
        """Only the evaluated split, packed as the trainer packs an evaluation split."""
        if self.split == "test":
            if data["test"] is None:
                raise ConfigError(f"{self.cfg.source}: the recipe's data has no test split; use --split train")
            return {"test": data["test"]}
        sd = data["train"]
        batches = self.stage.pack(sd.examples, self.cfg.data, b.eval_max_tokens, seed=b.seed,
                                  num_shards=b.world_size)
        sd.micros = [Micro(batch, micro_stats(batch)) for batch in batches]
        return {"train": sd}

    def _reference(self):
        """The split's reference log-probs (the recipe's reference model, the run's cache)."""
        m = self.cfg.model
        path = self.stage.model_path(m.model_name_or_path)
        ref_model = build_model(m, self.dist, seed=self.cfg.training.seed, path=path)
        compute = reference_pass(self.cfg, self.dist, self.stage, unwrap_model(ref_model), path, self.data, self.tokenizer,
                             {"timeline": {}}, self.log)
        refs = compute(unwrap_model(ref_model))
        self.reference_model = ref_model
        return refs[self.split]

    def _policy(self, model_path: Optional[str]):
        if model_path is None:
            if self.stage.uses_reference:
                return self.reference_model
            return build_model(self.cfg.model, self.dist, seed=self.cfg.training.seed,
                               path=self.cfg.model.model_name_or_path)
        check_model_folder(model_path)
        m = copy.deepcopy(self.cfg.model)
        m.model_name_or_path, m.model_init, m.use_peft = model_path, {}, False
        return build_model(m, self.dist, seed=self.cfg.training.seed, path=model_path)

    def score(self, model_path: Optional[str] = None) -> dict:
        """``{split}_loss`` (+ DPO's TRL metrics) of ``model_path`` (None: the recipe's model) on the split."""
        lm = LossModule(self._policy(model_path), self.stage).to(self.dist.device)
        with torch.no_grad():
            out = evaluate(lm, self.stage, self.data[self.split], self.refs, dist=self.dist)
        return {f"{self.split}_{k[len('eval_'):]}": v for k, v in out.items()}


def _stderr(*args) -> None:
    print(*args, file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="zephyr-fast evaluate", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("recipe")
    p.add_argument("--split", default="test", help="train or test (default test)")
    p.add_argument("--model", default=None, help="the model (folder, checkpoint) to score; default the recipe's")
    p.add_argument("--out", default=None, help="also write the metrics here (JSON)")
    args, overrides = p.parse_known_args(argv)
    try:
        if args.model is not None:
            check_model_folder(args.model)  # before any data work
        ev = Evaluator(load_config(args.recipe, overrides), args.split, log=_stderr)  # stdout: the JSON only
        metrics = ev.score(args.model)
    except (ConfigError, DataValidationError, StaleRefLogpsError) as e:  # bad input: one line
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    text = json.dumps({"recipe": args.recipe, "model": args.model, "split": args.split, **metrics}, indent=1)
    print(text)
    if args.out:
        with atomic_open(args.out) as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
