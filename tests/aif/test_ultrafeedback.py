"""UltraFeedback protocol pieces: single-text templates, principles, the rating parser, weighting."""

import math
import random

import pytest

from zephyr_fast.aif.scoring import weighted_rating
from zephyr_fast.aif.ultrafeedback import (ASPECTS, judge_messages, parse_rating, pick_principle, principles,
                                           system_prompt, template)


@pytest.mark.parametrize("aspect", ASPECTS)
def test_single_text_templates_keep_the_rubric_and_drop_texts_2_to_4(aspect):
    t = template(aspect)
    assert "{instruction}" in t and "{text_1}" in t and "<text 1>" in t and "Output for Text 1" in t
    assert not any(f"<text {k}>" in t or f"Output for Text {k}" in t or f"text_{k}" in t for k in (2, 3, 4))
    assert "**Scoring**" in t or "Score 1 to 5" in t
    if aspect in ("truthfulness", "helpfulness"):
        assert "{world_knowledge}" in template(aspect, with_world_knowledge=True) and "{world_knowledge}" not in t
    msgs = judge_messages(aspect, "Say {hi}", "Hello {there}", world_knowledge=None)
    assert msgs[0]["content"] == system_prompt() and "Instruction: Say {hi}" in msgs[1]["content"]
    assert "<text 1> Hello {there}" in msgs[1]["content"] and msgs[1]["content"].endswith("### Output\n")


def test_system_prompt_speaks_of_one_text():
    sp = system_prompt()
    assert "one text output" in sp and "four" not in sp


def test_parse_full_lenient_constrained_and_failures():
    text = "#### Output for Text 1\nRating: 4\nRationale: Correct and confident."
    assert parse_rating("honesty", text) == {"Rating": "4", "Rationale": "Correct and confident.", "parse": "full",
                                             "rating_offset": text.index("4"), "rating_text": "4"}
    assert parse_rating("honesty", "**Rating**: N/A\n**Rationale**: creative task")["Rating"] == "N/A"
    t = "Type: 1, 3\nRationale: contradicts itself\nRating: 2\nRationale: severe"
    assert parse_rating("truthfulness", t)["Rating"] == "2" and parse_rating("truthfulness", t)["Rationale"] == "severe"
    assert parse_rating("truthfulness", "Type: None\nRationale: x\nRating: N/A\nRationale: y") is None  # no N/A here
    assert parse_rating("helpfulness", "I think... Rating: 5 overall")["parse"] == "lenient"
    assert parse_rating("helpfulness", "3")["parse"] == "constrained"
    for bad in ("Rating: 7\nRationale: out of range", "no rating at all", "", "Rating: high\nRationale: x"):
        assert parse_rating("instruction_following", bad) is None


def test_weighted_rating_reads_the_rating_token():
    text = "Rating: 4\nRationale: ok"
    lp = [("Rating:", 0.0, {}), (" 4", math.log(0.6), {" 4": math.log(0.6), " 5": math.log(0.3), "x": -1.0}),
          ("\nRationale: ok", 0.0, {})]
    off = parse_rating("honesty", text)["rating_offset"]
    assert weighted_rating(lp, text, off, ("1", "2", "3", "4", "5"), "4") == pytest.approx((4 * .6 + 5 * .3) / .9)
    assert weighted_rating(None, text, off, ("4",)) is None
    assert weighted_rating([("Rating: ", 0.0, {}), ("1", 0.0, {"1": 0.0})], "Rating: 10", 8, ("1",), "10") is None


def test_principles_drawn_like_ultrafeedback():
    assert set(principles()) == {"helpfulness", "harmlessness", "honesty", "verbalized_calibration", "truthfulness"}
    draws = [pick_principle("evol_instruct", random.Random(i))[0] for i in range(50)]
    assert set(draws) == {"helpfulness"}
    draws = [pick_principle("truthful_qa", random.Random(i))[0] for i in range(400)]
    assert set(draws) == {"honesty", "truthfulness", "verbalized_calibration"}


@pytest.mark.parametrize("field", ["4.5", "-3", "10", "55", "4 or 5", "+4", "4.0", "0", "6/5", "high"])
def test_a_rating_off_the_scale_or_inexact_is_unparseable_never_truncated(field):
    for text in (f"Rating: {field}\nRationale: r", f"#### Output for Text 1\n**Rating**: {field}\n**Rationale**: r"):
        assert parse_rating("instruction_following", text) is None, text
    assert parse_rating("honesty", field) is None  # a bare answer too ("10" is not "1", "55" not "5")


def test_exact_ratings_still_parse_and_two_different_ratings_are_ambiguous():
    assert parse_rating("honesty", "Rating: 4/5\nRationale: ok")["Rating"] == "4"
    assert parse_rating("honesty", "Rating: 4 out of 5 (good)\nRationale: ok")["Rating"] == "4"
    assert parse_rating("honesty", "Rating:\n3\nRationale: ok")["Rating"] == "3"
    assert parse_rating("honesty", "Rating: 3\nRationale: a\nRating: 3\nRationale: b")["Rating"] == "3"
    assert parse_rating("honesty", "Rating: 3\nRationale: a\nRating: 4\nRationale: b") is None
    assert parse_rating("honesty", " 5\n")["parse"] == "constrained"


def test_parsing_is_linear_on_adversarial_answers():
    """The old regex parser took ~200 s on the first of these 21 KB answers (nested lazy quantifiers
    over repeated Type/Rationale lines); a pass over the lines takes milliseconds.  SIGALRM at 60 s
    (over 1000x the linear parser's time) turns a regression into a failure, not a hung suite."""
    import signal

    def stop(*_):
        raise TimeoutError("parse_rating is not linear")

    texts = ["Type: 1\nRationale: r\n" * 1000, "Rating:" * 20000 + "\n" * 20000 + "Rationale: x",
             "Rating: 3\n" * 5000 + "Rationale: x", "[[" * 40000]
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    try:
        for text in texts:
            for aspect in ASPECTS:
                parse_rating(aspect, text)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert parse_rating("truthfulness", texts[0]) is None and parse_rating("honesty", texts[2])["Rating"] == "3"
