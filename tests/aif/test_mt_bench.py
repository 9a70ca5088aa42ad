"""MT-Bench: FastChat prompts and parsers, per-category temperatures, resumable answers, grading
through the judge client against a real (fake-judge) HTTP server, the report files, pairwise."""

import json
import os

import pytest

from tests.aif.fake_openai import Faults, start_in_thread
from tests.aif.helpers import fake_config, save_tiny_model
from zephyr_fast.eval.grading import parse_score, parse_verdict, single_request
from zephyr_fast.eval.mt_bench import (TEMPERATURE, _gen_by_temperature, answer_questions, judge_prompts,
                                       load_questions, main, read_answers, references, run_mt_bench)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("mtb") / "tiny", seed=5)


@pytest.fixture
def judge():
    srv, url = start_in_thread(Faults(logprobs=True))
    yield url
    srv.shutdown()


def test_parsers_follow_fastchat():
    assert parse_score("Good. Rating: [[7]]")["score"] == 7.0
    assert parse_score("Rating: [[8.5]] later [[8.5]]")["score"] == 8.5
    assert parse_score("Rating: [[8.5]] later [[2]]") is None  # two different scores: ambiguous
    assert parse_score("I give it [6].")["score"] == 6.0  # FastChat's backup pattern
    assert parse_score(" 4 ")["score"] == 4.0  # a constrained judge's bare digit
    assert parse_score("Rating: [[11]]") is None and parse_score("no idea") is None
    assert parse_verdict("so [[B]]") == {"verdict": "B"} and parse_verdict("C") == {"verdict": "C"}
    assert parse_verdict("A is better") is None
    assert parse_verdict("[[A]] at first, then [[B]]") is None  # two verdicts: ambiguous


def test_questions_prompts_and_references():
    qs = load_questions()
    assert len(qs) == 80 and {q["category"] for q in qs} == set(TEMPERATURE)
    assert len(load_questions(per_category=1)) == 8
    prompts, refs = judge_prompts(), references()
    math_q = next(q for q in qs if q["category"] == "math")
    name, msgs = single_request(math_q, 2, ["A1", "A2"], prompts, refs, constrained=False)
    assert name == "single-math-v1-multi-turn" and refs[math_q["question_id"]][1] in msgs[1]["content"]
    assert msgs[0]["content"] == prompts[name]["system_prompt"] and "A2" in msgs[1]["content"]
    writing = qs[0]
    name, msgs = single_request(writing, 1, ["A1", "A2"], prompts, refs, constrained=False)
    assert name == "single-v1" and "[The Start of Assistant's Answer]\nA1\n" in msgs[1]["content"]


def test_temperature_per_category():
    calls = []

    def fake_generate(model, tok, convs, **kw):
        calls.append((len(convs), kw["do_sample"], kw["temperature"]))
        return ["x"] * len(convs)

    qs = [q for q in load_questions(per_category=1)]
    out = _gen_by_temperature(fake_generate, None, None, qs, [[]] * len(qs), 4, 0)
    assert out == ["x"] * 8
    assert sorted(calls) == [(2, True, 0.1), (2, True, 0.7), (4, False, 1.0)]


def test_answers_resume_without_regenerating(model_dir, tmp_path):
    path = str(tmp_path / "answers.jsonl")
    qs = load_questions(per_category=1)[:3]
    first = answer_questions(model_dir, qs[:2], path, max_new_tokens=4, progress=False)
    before = open(path).read()
    both = answer_questions(model_dir, qs, path, max_new_tokens=4, progress=False)
    assert open(path).read().startswith(before) and len(open(path).readlines()) == 3
    assert {k: both[k] for k in first} == first and all(len(t) == 2 for t in both.values())
    rec = json.loads(open(path).readline())
    assert set(rec) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "identity", "digest"}


def test_grading_report_files_and_cache(model_dir, tmp_path, judge):
    out = str(tmp_path / "mtb")
    rep = run_mt_bench(model_dir, out, fake_config(judge, top_logprobs=3), per_category=1, max_new_tokens=4,
                       progress=False)
    assert rep["graded"] == 16 and rep["failures"] == 0 and rep["usage"]["requests"] == 16
    assert set(rep["categories"]) == set(TEMPERATURE) and 1 <= rep["overall"] <= 10
    judgments = [json.loads(x) for x in open(os.path.join(out, "judgments.jsonl"))]
    assert sum(j["score"] for j in judgments) / 16 == pytest.approx(rep["overall"])
    assert all(j["weighted"] is not None for j in judgments if j["score"] < 10)
    assert {j["judge_prompt"] for j in judgments} == {"single-v1", "single-v1-multi-turn", "single-math-v1",
                                                      "single-math-v1-multi-turn"}
    assert open(os.path.join(out, "radar.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| **overall** |" in open(os.path.join(out, "report.md")).read()
    assert json.load(open(os.path.join(out, "report.json")))["overall"] == rep["overall"]
    again = run_mt_bench(model_dir, out, fake_config(judge, top_logprobs=3), per_category=1, max_new_tokens=4,
                         progress=False)
    assert again["usage"]["requests"] == 0 and again["overall"] == rep["overall"]


def test_garbage_judge_failures_counted_not_averaged(model_dir, tmp_path):
    srv, url = start_in_thread(Faults(garbage=True))
    try:
        out, answers = str(tmp_path / "mtb"), str(tmp_path / "answers.jsonl")
        answer_questions(model_dir, load_questions(per_category=1), answers, max_new_tokens=2, progress=False)
        rc = main(["--answers", answers, "--out", out, "--per-category", "1", "--base-url", url,
                   "--judge-model", "g", "--max-reasks", "1", "--no-progress"])
    finally:
        srv.shutdown()
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rc == 0 and rep["failures"] == 16 and rep["graded"] == 0 and rep["overall"] is None
    assert len(rep["failed_items"]) == 16 and rep["usage"]["requests"] == 32


def test_pairwise_both_orders_and_win_rate(model_dir, tmp_path, judge):
    out, answers = str(tmp_path / "mtb"), str(tmp_path / "answers.jsonl")
    qs = load_questions(per_category=1)
    answer_questions(model_dir, qs, answers, max_new_tokens=2, progress=False)
    base = str(tmp_path / "baseline.jsonl")
    with open(base, "w") as f:
        for qid in read_answers(answers):
            f.write(json.dumps({"question_id": qid, "choices": [{"index": 0, "turns": ["B1", "B2"]}]}) + "\n")
    rep = run_mt_bench(None, out, fake_config(judge), answers_path=answers, per_category=1,
                       baseline=base, progress=False)
    pairs = [json.loads(x) for x in open(os.path.join(out, "pairwise.jsonl"))]
    assert len(pairs) == 16 and rep["usage"]["requests"] == 16 + 32
    for p in pairs:
        assert p["winner"] == (p["order_1"] if p["order_1"] == p["order_2"] else "tie")
    pw = rep["pairwise"]
    assert pw["wins"] + pw["losses"] + pw["ties"] == 16
    assert pw["win_rate"] == pytest.approx((pw["wins"] + pw["ties"] / 2) / 16)


def test_a_retrained_model_answers_and_is_graded_again(model_dir, tmp_path, judge):
    """The issue's case: the same MODEL_DIR retrained (new weights, same path) must not reuse the old
    answers nor their grades; an edited answer line is not reused either."""
    import shutil

    model = str(tmp_path / "model")
    shutil.copytree(model_dir, model)
    out, kw = str(tmp_path / "mtb"), dict(per_category=1, max_new_tokens=4, progress=False)
    run_mt_bench(model, out, fake_config(judge), **kw)
    save_tiny_model(model, seed=6)  # retrained in place
    rep = run_mt_bench(model, out, fake_config(judge), **kw)
    lines = [json.loads(x) for x in open(os.path.join(out, "answers.jsonl"))]
    assert len(lines) == 16 and len({r["identity"] for r in lines}) == 16  # 8 answers of each model
    old, new = ([r["choices"][0]["turns"] for r in part] for part in (lines[:8], lines[8:]))
    changed = sum((a[0] != b[0]) + (a != b) for a, b in zip(old, new))  # grading requests whose text changed
    assert changed > 0 and rep["usage"]["requests"] == changed  # an unchanged request keeps its grade
    with open(os.path.join(out, "answers.jsonl"), "a") as f:  # an edited copy of an answer (digest now wrong)
        f.write(json.dumps({**lines[8], "choices": [{"index": 0, "turns": ["edited", "edited"]}]}) + "\n")
    answers = answer_questions(model, load_questions(per_category=1), os.path.join(out, "answers.jsonl"),
                               max_new_tokens=4, progress=False)
    assert "edited" not in json.dumps(answers)
    assert len(open(os.path.join(out, "answers.jsonl")).readlines()) == 17  # nothing regenerated either


def test_output_folder_refusals_and_lock(model_dir, tmp_path, judge, capsys):
    from zephyr_fast.outputs import claim_folder

    argv = ["--per-category", "1", "--max-new-tokens", "2", "--base-url", judge, "--judge-model", "j", "--no-progress"]
    assert main([model_dir, "--out", model_dir, *argv]) == 2
    assert "is also the run's input (model_dir)" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main([model_dir, "--out", str(foreign), *argv]) == 2
    assert "not written by zephyr_fast" in capsys.readouterr().err and (foreign / "keep.txt").read_text() == "mine"
    with claim_folder(str(tmp_path / "busy"), "mt-bench"):
        assert main([model_dir, "--out", str(tmp_path / "busy"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another writer holds it (zephyr-fast mt-bench" in err
