"""``judge --completions-per-request N``: UltraFeedback's multi-text request (a prompt's completions in
one request per aspect), exact keys per mode, exact parsing of every section, against a real HTTP server."""

import json

import pytest

from tests.aif.fake_openai import Faults, answer_for, start_in_thread
from tests.aif.helpers import REPO, TOKENIZER, fake_config, raw_rows, write_jsonl
from zephyr_fast.aif.judge import judge_file, main
from zephyr_fast.aif.store import iter_sealed, seal
from zephyr_fast.aif.ultrafeedback import (MULTI_TEMPLATE_VERSION, TEMPLATE_VERSION, judge_messages_multi,
                                           parse_ratings, system_prompt, template)


@pytest.fixture
def fake():
    srv, url = start_in_thread(Faults(logprobs=True))
    yield url
    srv.shutdown()


def read(path):
    return [json.loads(line) for line in open(path)]


def test_four_completions_one_request_per_aspect_rated_as_answered(fake, tmp_path):
    rows = raw_rows(2, 4)
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), str(tmp_path / "out.jsonl")
    rep = judge_file(inp, out, fake_config(fake, top_logprobs=5), progress=False, per_request=4)
    assert rep.items == 32 and rep.judged == 8 and rep.usage["requests"] == 8 and rep.unparseable == 0
    for row, judged in zip(rows, read(out)):
        for aspect in ("instruction_following", "honesty", "truthfulness", "helpfulness"):
            msgs = judge_messages_multi(aspect, row["instruction"], [c["response"] for c in row["completions"]])
            want = [t["Rating"] for t in parse_ratings(aspect, answer_for(msgs), 4)["texts"]]
            got = [c["annotations"][aspect] for c in judged["completions"]]
            assert [a["Rating"] for a in got] == want and all("Weighted Rating" in a for a in got)
        assert {c["judge"]["template_version"] for c in judged["completions"]} == {MULTI_TEMPLATE_VERSION}
    again = judge_file(inp, out, fake_config(fake, top_logprobs=5), progress=False, per_request=4)
    assert again.usage["requests"] == 0 and again.cached == 32


def test_each_mode_has_its_own_exact_keys(fake, tmp_path):
    inp, out = write_jsonl(tmp_path / "in.jsonl", raw_rows(1, 4)), str(tmp_path / "out.jsonl")
    assert judge_file(inp, out, fake_config(fake), progress=False).usage["requests"] == 16  # one per rating
    again = judge_file(inp, out, fake_config(fake), progress=False, per_request=4)
    assert again.cached == 0 and again.usage["requests"] == 4  # another request: asked, never reused
    three = judge_file(inp, out, fake_config(fake), progress=False, per_request=3)  # groups of 3 + 1
    assert three.cached == 4 and three.usage["requests"] == 4  # the lone 4th is the single-text request
    versions = {c["judge"]["template_version"] for c in read(out)[0]["completions"]}
    assert versions == {MULTI_TEMPLATE_VERSION, TEMPLATE_VERSION}


def test_an_edited_multi_text_record_is_asked_again(fake, tmp_path):
    inp, out = write_jsonl(tmp_path / "in.jsonl", raw_rows(1, 2)), str(tmp_path / "out.jsonl")
    judge_file(inp, out, fake_config(fake), progress=False, per_request=2, aspects=["honesty"])
    cache = out + ".cache.jsonl"
    rec = next(iter_sealed(cache))
    texts = rec["parsed"]["texts"]
    texts[0]["Rating"] = "5" if texts[0]["Rating"] != "5" else "1"
    open(cache, "w").write(json.dumps(seal(rec)) + "\n")  # resealed: the digest verifies, the answer does not
    rep = judge_file(inp, out, fake_config(fake), progress=False, per_request=2, aspects=["honesty"])
    assert rep.damaged_cache_lines == 1 and rep.usage["requests"] == 1


def test_a_garbled_multi_text_answer_is_reasked_then_failed_for_every_text(tmp_path):
    srv, url = start_in_thread(Faults(garbage=True))
    try:
        inp, out = write_jsonl(tmp_path / "in.jsonl", raw_rows(1, 3)), str(tmp_path / "out.jsonl")
        rep = judge_file(inp, out, fake_config(url, max_reasks=1), progress=False, per_request=3, aspects=["honesty"])
    finally:
        srv.shutdown()
    assert rep.usage["requests"] == 2 and rep.reasks == 1 and rep.unparseable == 3
    assert [(f["completion"], f["aspect"]) for f in read(out + ".failures.jsonl")] == [(0, "honesty"), (1, "honesty"),
                                                                                      (2, "honesty")]


def test_sections_are_parsed_exactly():
    one, two = "Rating: 4\nRationale: good", "Rating: 2\nRationale: weak"
    assert [t["Rating"] for t in parse_ratings("honesty", f"### Output for Text 1\n{one}\n\n"
                                               f"### Output for Text 2\n{two}", 2)["texts"]] == ["4", "2"]
    assert [t["Rating"] for t in parse_ratings("honesty", f"{one}\n\n{two}", 2)["texts"]] == ["4", "2"]  # UF's split
    assert parse_ratings("honesty", f"Output for Text 2\n{one}\nOutput for Text 1\n{two}", 2) is None  # order
    assert parse_ratings("honesty", f"{one}\n\n{two}\n\nRating: 3\nRationale: x", 2) is None  # a third block
    assert parse_ratings("honesty", f"{one}\n\nRating: 4.5\nRationale: x", 2) is None  # one section off the scale
    assert parse_ratings("honesty", f"{one}\nRating: 5\n\n{two}", 2) is None  # a section that disagrees with itself
    text = f"**Output for Text 1**\n{one}\n\nOutput for Text 2\n{two}"
    at = parse_ratings("honesty", text.replace("**", "##"), 2)["texts"][1]["rating_offset"]
    assert text.replace("**", "##")[at] == "2"


def test_multi_text_template_is_ultrafeedbacks_own():
    data = json.loads((REPO / "zephyr_fast" / "aif" / "data" / "ultrafeedback_templates.json").read_text())["templates"]
    assert template("honesty", n=4) == data["honesty_template"] and system_prompt(4) == data["system_prompt"]
    two = template("helpfulness", n=2)
    assert "{text_2}" in two and "{text_3}" not in two and "Output for Text 3" not in two
    assert "two text outputs" in system_prompt(2)


def test_constrained_judge_with_several_texts_is_one_line(tmp_path, capsys, fake):
    inp = write_jsonl(tmp_path / "in.jsonl", raw_rows(1, 2))
    argv = [inp, str(tmp_path / "out.jsonl"), "--base-url", fake, "--judge-model", "j", "--no-progress",
            "--constrain-tokenizer", str(TOKENIZER), "--completions-per-request", "2"]
    assert main(argv) == 2
    assert capsys.readouterr().err == ("error: judge: completions_per_request > 1 needs an unconstrained judge "
                                       "(a constrained one answers a single rating token)\n")
    assert main(argv[:-4] + ["--completions-per-request", "5"]) == 2
    assert "completions_per_request must be 1 to 4, got 5" in capsys.readouterr().err
