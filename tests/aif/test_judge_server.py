"""The judge client against a real OpenAI-compatible server: ``transformers serve`` with a tiny
random-init model on CPU, started by the test on 127.0.0.1 (no mock of the client).

A random model writes garbage text, so: (1) with ``constrain_tokenizer`` the judge's answer is
forced to a rating token through ``logit_bias`` — the plumbing (request, constraint, parse, cache,
accounting, binarize) is real, the ratings are the random model's; (2) unconstrained, its garbage
is counted, re-asked and recorded as FAILED.
"""

import json

import pytest

from tests.aif.helpers import raw_rows, write_jsonl
from zephyr_fast.aif.client import JudgeClient, JudgeConfig
from zephyr_fast.aif.judge import judge_file
from zephyr_fast.aif.store import JudgeCache
from zephyr_fast.aif.binarize import binarize_rows
from zephyr_fast.eval.grading import grade_single
from zephyr_fast.eval.mt_bench import judge_prompts, load_questions, references

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(served_tiny):
    return served_tiny


def config(server, **kw):
    return JudgeConfig(**{"base_url": server.base_url, "model": server.model, "api_key": "local",
                          "concurrency": 2, "timeout": 60.0, **kw})


def test_constrained_judge_rates_caches_and_feeds_binarize(server, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", raw_rows(2, 2))
    out = str(tmp_path / "out.jsonl")
    cfg = config(server, constrain_tokenizer=server.model, temperature=1.0,
                 extra_body={"generation_config": json.dumps({"do_sample": True})})
    rep = judge_file(inp, out, cfg, aspects=["helpfulness", "honesty"], progress=False)
    assert rep.judged == 8 and rep.unparseable == 0 and rep.request_errors == 0
    assert rep.usage["requests"] == 8 and rep.usage["prompt_tokens"] > 8 * 300 and rep.usage["completion_tokens"] == 8
    rows = [json.loads(line) for line in open(out)]
    for c in (c for r in rows for c in r["completions"]):
        assert set(c["annotations"]) == {"helpfulness", "honesty"} and c["judge"]["failed_aspects"] == []
        assert all(a["Rating"] in ("1", "2", "3", "4", "5") for a in c["annotations"].values())
        assert c["judge"]["template_version"].endswith("+constrained") and 1 <= c["fine-grained_score"] <= 5
    again = judge_file(inp, out, cfg, aspects=["helpfulness", "honesty"], progress=False)
    assert again.cached == 8 and again.judged == 0 and again.usage["requests"] == 0
    pairs, brep = binarize_rows(rows)
    assert brep.rows == 2 and brep.written + brep.ties_dropped == 2
    assert all(p["score_chosen"] > p["score_rejected"] for p in pairs)


def test_unconstrained_random_judge_garbage_is_counted_reasked_and_recorded(server, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", raw_rows(1, 2))
    out = str(tmp_path / "out.jsonl")
    rep = judge_file(inp, out, config(server, max_tokens=8, max_reasks=1), aspects=["honesty"], progress=False)
    assert rep.unparseable == 2 and rep.reasks == 2 and rep.usage["requests"] == 4
    fails = [json.loads(line) for line in open(out + ".failures.jsonl")]
    assert [(f["completion"], f["aspect"]) for f in fails] == [(0, "honesty"), (1, "honesty")]
    assert all(f["raw"] for f in fails)


def test_rating_bias_maps_digits_to_single_tokens(server):
    bias = JudgeClient(config(server, constrain_tokenizer=server.model)).rating_bias(("1", "2", "3", "4", "5"))
    assert sorted(bias) == ["28740", "28750", "28770", "28781", "28782"] and set(bias.values()) == {100.0}


def test_mt_bench_grading_through_transformers_serve(server, tmp_path):
    questions = load_questions(per_category=1)[:4]
    answers = {q["question_id"]: ["First answer.", "Second answer."] for q in questions}
    client = JudgeClient(config(server, constrain_tokenizer=server.model))
    single = grade_single(questions, answers, client, JudgeCache(str(tmp_path / "cache.jsonl")), judge_prompts(),
                          references(), progress=False)
    assert len(single) == 8 and all(j["status"] == "ok" and 1 <= j["score"] <= 9 for j in single)
    assert client.usage.requests == 8 and client.usage.completion_tokens == 8


def test_multi_text_request_through_transformers_serve(server, tmp_path):
    """UltraFeedback's multi-text request to a real server: one request rates both completions; the
    random model's garbage fails the request's every text (re-asked first), never half of it."""
    inp = write_jsonl(tmp_path / "in.jsonl", raw_rows(1, 2))
    out = str(tmp_path / "out.jsonl")
    rep = judge_file(inp, out, config(server, max_tokens=8, max_reasks=1), aspects=["honesty"], progress=False,
                     per_request=2)
    assert rep.usage["requests"] == 2 and rep.reasks == 1 and rep.unparseable == 2 and rep.usage["prompt_tokens"] > 300
    fails = [json.loads(line) for line in open(out + ".failures.jsonl")]
    assert [(f["completion"], f["aspect"]) for f in fails] == [(0, "honesty"), (1, "honesty")]
