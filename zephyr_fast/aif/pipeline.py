"""``zephyr-fast aif RECIPE.yaml``: generate -> judge -> binarize (-> optional dDPO) from one recipe.

Recipe sections (see ``recipes/aif.yaml``; every key optional except ``generate.prompts`` and
``generate.pool``)::

    output_dir: outputs/aif            # completions/, judged.jsonl (+ cache, failures), pairs.jsonl
    overwrite_output_dir: false        # write into an existing folder zephyr_fast did not create
    generate: {prompts, pool: {name: model_dir | hub id | URL#MODEL | {base_url, model, ...}}, limit,
               n_models, seed, max_new_tokens, temperature, top_p, batch_size, backend, dtype,
               concurrency, max_retries, timeout}
    judge:    {base_url, model, serve_local: model_dir, constrain, concurrency, max_retries, max_reasks,
               timeout, temperature, max_tokens, top_logprobs, price_input_per_mtok, price_output_per_mtok,
               aspects, retry_failed, completions_per_request}
    binarize: {seed, score, skip_invalid_rows}
    train:    {recipe: recipes/tiny/dpo.yaml, overrides: [--key=value, ...]}   # optional dDPO on pairs.jsonl

``judge.serve_local`` starts ``transformers serve`` on 127.0.0.1 for the run (the served model is
the judge); ``judge.constrain`` then forces its answers to rating tokens (for tiny local judges).
Otherwise ``base_url`` / ``model`` / key come from the recipe or the environment
(``ZEPHYR_JUDGE_BASE_URL``, ``ZEPHYR_JUDGE_MODEL``, ``ZEPHYR_JUDGE_API_KEY``).

Every step resumes: rerunning the command after a crash regenerates and re-judges only what is
missing.  ``--dry-run`` prints what the run would do -- prompts, completions, judge requests,
estimated tokens and cost -- without loading a model or sending a request (``plan.py``).  Overrides: ``--generate.limit=4 --judge.concurrency=2``, parsed by each key's type (``recipe.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import fields

from ..config import load_config
from .binarize import binarize_rows
from ..training.run import run
from ..outputs import claim_folder
from .client import JudgeConfig, cli_status
from .generate import GenerateReport, generate_completions, load_prompts
from .judge import judge_file
from .plan import describe, dry_run
from .recipe import GEN_KEYS, load_recipe
from .serve import serve_local
from .store import read_input_jsonl, write_jsonl_atomic
from .ultrafeedback import ASPECTS

def _judge_config(j: dict, server) -> JudgeConfig:
    keys = {f.name for f in fields(JudgeConfig)}
    kw = {k: v for k, v in j.items() if k in keys}
    if server is not None:  # a fresh port each run: the cache names the served model's content instead
        kw.update(base_url=server.base_url, model=server.model, api_key=kw.get("api_key") or "local",
                  endpoint_id=server.endpoint_id)
        if j.get("constrain"):
            kw["constrain_tokenizer"] = server.model
    return JudgeConfig.from_env(**kw)


def run_aif(recipe: dict, *, progress: bool = True) -> dict:
    """Run the recipe's steps; returns their reports and output paths.

    Raises:
        JudgeRequestError: the judge endpoint failed for good (rerun to finish).
    """
    out = recipe.get("output_dir", "outputs/aif")
    g, j = recipe["generate"], recipe.get("judge", {})
    inputs = {"generate.prompts": g["prompts"], "judge.serve_local": j.get("serve_local"),
              **{f"generate.pool.{k}": v for k, v in g["pool"].items() if isinstance(v, str)}}
    with claim_folder(out, "aif", inputs=inputs, overwrite=bool(recipe.get("overwrite_output_dir"))):
        return _run_steps(recipe, out, progress)


def _run_steps(recipe: dict, out: str, progress: bool) -> dict:
    g, j, b = recipe["generate"], recipe.get("judge", {}), recipe.get("binarize", {})
    early = _judge_config({**j, "model": j.get("model") or j.get("serve_local")}, None)
    early.check()  # a bad judge setting is one line before any generation (never the config: it holds the key)
    prompts = load_prompts(g["prompts"], g.get("limit"))
    gen_kw = {k: g[k] for k in GEN_KEYS if k in g}
    gen: GenerateReport = generate_completions(prompts, g["pool"], os.path.join(out, "completions"),
                                               progress=progress, inputs={"generate.prompts": g["prompts"]}, **gen_kw)
    print(gen)
    judged = os.path.join(out, "judged.jsonl")
    with (serve_local(j["serve_local"]) if j.get("serve_local") else contextlib.nullcontext()) as server:
        jrep = judge_file(gen.output, judged, _judge_config(j, server), aspects=j.get("aspects", ASPECTS),
                          progress=progress, retry_failed=bool(j.get("retry_failed")),
                          per_request=j.get("completions_per_request", 1))
    print(jrep)
    pairs, brep = binarize_rows(read_input_jsonl(judged), seed=b.get("seed", 42), score=b.get("score", "auto"),
                                skip_invalid_rows=b.get("skip_invalid_rows", False), dataset_name=judged)
    pairs_path = os.path.join(out, "pairs.jsonl")
    write_jsonl_atomic(pairs_path, pairs)
    print(f"{brep} -> {pairs_path}")
    result = {"generate": gen, "judge": jrep, "binarize": brep, "completions": gen.output, "judged": judged,
              "pairs": pairs_path}
    if recipe.get("train"):
        result["train"] = train_dpo(recipe["train"], pairs_path)
    return result


def train_dpo(train: dict, pairs_path: str) -> dict:
    """dDPO (``stage: dpo``) on the AIF pairs: the recipe's dataset replaced by ``pairs_path``."""
    return run(load_config(train["recipe"], [dpo_data_override(pairs_path), "--stage=dpo", *train.get("overrides", [])]))


def dpo_data_override(pairs_path: str, test_split_size: int = 2) -> str:
    """``--dataset_mixture=...`` override pointing a DPO recipe at the AIF pairs file."""
    return (f"--dataset_mixture={{datasets: [{{id: {pairs_path}, split: train, columns: [chosen, rejected]}}], "
            f"seed: 0, test_split_size: {test_split_size}}}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zephyr-fast aif", description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="print prompts, completions, judge requests, estimated tokens and cost; load and send nothing")
    args, overrides = ap.parse_known_args(argv)

    def body():
        recipe = load_recipe(args.recipe, overrides)
        if args.dry_run:
            print(describe(dry_run(recipe, _judge_config)))
        else:
            run_aif(recipe, progress=not args.no_progress)
    return cli_status(body)


if __name__ == "__main__":
    sys.exit(main())
