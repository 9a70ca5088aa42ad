"""``zephyr-fast aif``: one recipe chains generate -> judge -> binarize; the pairs load as DPO data."""

import json

import pytest
import yaml

from tests.aif.fake_openai import Faults, start_in_thread
from tests.aif.helpers import REPO, save_tiny_model
from zephyr_fast.aif.pipeline import main, run_aif
from zephyr_fast.aif.recipe import RecipeError, load_recipe
from zephyr_fast.cli import main as cli
from zephyr_fast.config import ConfigError
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


def test_judge_config_error_is_one_line_without_the_key_before_any_work(tmp_path, pool, monkeypatch, capsys):
    key = "sk-PLANTED-aif-key-0123456789"
    monkeypatch.setenv("ZEPHYR_JUDGE_API_KEY", key)
    path = recipe(tmp_path, pool, "http://127.0.0.1:9/v1")
    assert main([path, "--judge.concurrency=0", "--judge.api_key=null"]) == 2
    assert capsys.readouterr().err == "error: judge: concurrency must be an integer >= 1, got 0\n"
    assert not (tmp_path / "aif" / "completions").exists()


def test_output_dir_refusals(tmp_path, pool, capsys):
    path = recipe(tmp_path, pool, "http://127.0.0.1:9/v1")
    assert main([path, f"--output_dir={pool['one']}"]) == 2
    assert "is also the run's input (generate.pool.one)" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "pairs.jsonl").write_text("precious\n")
    assert main([path, f"--output_dir={tmp_path / 'mine'}"]) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (tmp_path / "mine" / "pairs.jsonl").read_text() == "precious\n"


def test_overrides_are_parsed_by_the_keys_type(tmp_path):
    aif = str(REPO / "recipes" / "aif.yaml")
    r = load_recipe(aif, ["--judge.model=null", "--binarize.score=auto", "--judge.aspects=honesty,helpfulness",
                          "--judge.timeout=30", "--generate.temperature=1", "--judge.constrain=no",
                          "--judge.extra_body={a: 1}", "--output_dir=no"])
    assert r["judge"]["model"] is None and r["judge"]["aspects"] == ["honesty", "helpfulness"]
    assert r["judge"]["timeout"] == 30.0 and isinstance(r["generate"]["temperature"], float)
    assert r["judge"]["constrain"] is False and r["judge"]["extra_body"] == {"a": 1}
    assert r["output_dir"] == "no"  # a string key stays the text, not YAML's false
    for bad, msg in [("--generate.limit=two", r"^command line --generate.limit: expected int, got 'two'"),
                     ("--judge.concurrency=2.5", r"^command line --judge.concurrency: expected int"),
                     ("--judge.concurency=2", r"unknown key judge.concurency; did you mean 'concurrency'\?"),
                     ("--judge=2", r"judge is a section"),
                     ("judge.model=x", r"must look like --section.key=value")]:
        with pytest.raises(ConfigError, match=msg):  # RecipeError is a ConfigError: one line, exit 2
            load_recipe(aif, [bad])


def test_recipe_values_are_coerced_and_checked_by_type(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"generate": {"prompts": SAMPLE, "pool": {"a": "x"}, "max_new_tokens": "8",
                                                 "top_p": 1}}))
    g = load_recipe(str(path))["generate"]
    assert g["max_new_tokens"] == 8 and g["top_p"] == 1.0 and isinstance(g["top_p"], float)
    path.write_text(yaml.safe_dump({"generate": {"prompts": SAMPLE, "pool": {"a": "x"}, "n_models": [1]}}))
    with pytest.raises(ConfigError, match=r"r.yaml: generate.n_models: expected int, got \[1\]"):
        load_recipe(str(path))
