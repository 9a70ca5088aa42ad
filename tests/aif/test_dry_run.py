"""``zephyr-fast aif RECIPE --dry-run``: the plan before any model load or request, and its request
count equal to what the run then sends (a local and a served pool model, a real judge server)."""

import json

import pytest
import yaml

from tests.aif.fake_openai import Faults, start_in_thread
from tests.aif.helpers import REPO, save_tiny_model
from zephyr_fast.aif import backends
from zephyr_fast.aif.pipeline import _judge_config, main, run_aif
from zephyr_fast.aif.recipe import load_recipe
from zephyr_fast.aif.plan import dry_run

pytestmark = pytest.mark.slow
SAMPLE = str(REPO / "assets" / "data" / "ultrafeedback_binarized" / "sample16.jsonl")


@pytest.fixture
def judge_log(tmp_path):
    log = str(tmp_path / "judge.log")
    srv, url = start_in_thread(Faults(log=log))
    yield url, log
    srv.shutdown()


def recipe(tmp_path, served, url, per_request):
    local = save_tiny_model(tmp_path / "local", seed=21)
    r = {"output_dir": str(tmp_path / "aif"),
         "generate": {"prompts": SAMPLE, "limit": 3, "n_models": 2, "max_new_tokens": 4, "concurrency": 2,
                      "pool": {"local": local, "srv": {"base_url": served.base_url, "model": served.model,
                                                       "api_key": "local", "endpoint_id": "tiny-served-seed3",
                                                       "price_input_per_mtok": 1.0}}},
         "judge": {"base_url": url, "model": "fake-judge", "api_key": "x", "concurrency": 2, "max_tokens": 100,
                   "completions_per_request": per_request, "price_input_per_mtok": 2.0,
                   "price_output_per_mtok": 8.0}}
    path = tmp_path / "aif.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


def requests_sent(log) -> int:
    try:
        return sum(1 for line in open(log) if line.strip())
    except FileNotFoundError:
        return 0


def test_dry_run_loads_and_sends_nothing_and_counts_what_the_run_sends(served_tiny, judge_log, tmp_path, monkeypatch,
                                                                       capsys):
    url, log = judge_log
    path = recipe(tmp_path, served_tiny, url, per_request=2)

    def no_model(*a, **k):
        raise AssertionError("a dry run loaded a model")

    with monkeypatch.context() as m:
        m.setattr(backends, "load_causal_lm", no_model)
        assert main([path, "--dry-run"]) == 0
        text = capsys.readouterr().out
        plan = dry_run(load_recipe(path), _judge_config)
    assert "6 to generate (3 in process, 3 endpoint requests" in text and "12 requests (2 completions per request)" in text
    assert requests_sent(log) == 0 and not (tmp_path / "aif").exists()
    g, j = plan["generate"], plan["judge"]
    assert (g["to_generate"], g["requests"], j["ratings"], j["requests"]) == (6, 3, 24, 12)
    assert j["output_tokens"] == 12 * 100 and g["output_tokens"] == 3 * 4 and 0 < j["cost"] and 0 < g["cost"]

    res = run_aif(load_recipe(path), progress=False)
    assert res["generate"].usage["requests"] == g["requests"] and res["judge"].usage["requests"] == j["requests"]
    assert requests_sent(log) == j["requests"]

    after = dry_run(load_recipe(path), _judge_config)
    assert after["generate"]["to_generate"] == 0 and after["judge"]["requests"] == 0 and after["judge"]["cached"] == 24
    single = dry_run(load_recipe(path, ["--judge.completions_per_request=1"]), _judge_config)
    rerun = run_aif(load_recipe(path, ["--judge.completions_per_request=1"]), progress=False)
    assert single["judge"]["requests"] == rerun["judge"].usage["requests"] > 0  # completions known: exact
    assert single["requests"] == rerun["generate"].usage.get("requests", 0) + rerun["judge"].usage["requests"]
    judged = [json.loads(x) for x in open(res["judged"])]
    assert len(judged) == 3 and all(len(r["completions"]) == 2 for r in judged)
