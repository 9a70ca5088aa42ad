"""``zephyr-fast aif``: one recipe chains generate -> judge -> binarize; the pairs load as DPO data."""

import json

import pytest
import yaml

from tests.aif.fake_openai import Faults, start_in_thread
from tests.aif.helpers import REPO, save_tiny_model
from zephyr_fast.aif.pipeline import RecipeError, load_recipe, main, run_aif
from zephyr_fast.cli import main as cli
from zephyr_fast.data import DataConfig, build_dpo_examples, load_rows, load_tokenizer

SAMPLE = str(REPO / "assets" / "data" / "ultrafeedback_binarized" / "sample16.jsonl")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("aifpool")
    return {"one": save_tiny_model(d / "one", seed=11), "two": save_tiny_model(d / "two", seed=12)}


def recipe(tmp_path, pool, url):
    r = {"output_dir": str(tmp_path / "aif"),
         "generate": {"prompts": SAMPLE, "pool": pool, "limit": 4, "n_models": 2, "max_new_tokens": 4},
         "judge": {"base_url": url, "model": "fake-judge", "api_key": "x", "concurrency": 2, "backoff": 0.01},
         "binarize": {"seed": 1}}
    path = tmp_path / "aif.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


def test_recipe_chains_generate_judge_binarize_and_pairs_load_for_dpo(pool, tmp_path, tokenizer_dir):
    srv, url = start_in_thread(Faults(fail_status=429, fail_count=2))
    try:
        res = run_aif(load_recipe(recipe(tmp_path, pool, url)), progress=False)
        again = run_aif(load_recipe(recipe(tmp_path, pool, url)), progress=False)  # all resumed / cached
    finally:
        srv.shutdown()
    assert res["generate"].generated == 8 and res["judge"].judged == 32 and res["judge"].usage["retries"] == 2
    assert again["generate"].generated == 0 and again["judge"].judged == 0 and again["judge"].cached == 32
    b = res["binarize"]
    assert b.rows == 4 and b.written + b.ties_dropped + b.identical_dropped == 4 and b.written >= 1
    pairs = [json.loads(x) for x in open(res["pairs"])]
    assert set(pairs[0]) == {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}
    assert all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    rows = load_rows(DataConfig(dataset_mixer={res["pairs"]: 1.0}))["train"]
    examples, _ = build_dpo_examples(rows, load_tokenizer(str(tokenizer_dir)), max_length=512, max_prompt_length=256)
    assert len(examples) == len(pairs)


def test_recipe_errors_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"generate": {"prompts": SAMPLE, "pool": {"a": "x"}}, "judge": {"concurency": 2}}))
    with pytest.raises(RecipeError, match="did you mean 'concurrency'"):
        load_recipe(str(path))
    assert main([str(path)]) == 2 and "judge.concurency" in capsys.readouterr().err
    assert cli(["aif", str(path)]) == 2 and "judge.concurency" in capsys.readouterr().err  # zephyr-fast aif
    assert load_recipe(str(REPO / "recipes" / "aif.yaml"), ["--generate.limit=2"])["generate"]["limit"] == 2
