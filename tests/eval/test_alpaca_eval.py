"""``zephyr-fast alpaca-eval``: answers, AlpacaEval 1 and 2 annotators through a real served judge, the
cache, and leaderboard rows from published annotations."""

import json
import os
import pathlib
import random

import pytest

from tests.aif.helpers import save_tiny_model
from zephyr_fast.eval.alpaca import is_switched, logprob_preference, main, parse_ranking
from zephyr_fast.eval.alpaca_metrics import import_alpaca_eval, win_rate

EXCERPT = pathlib.Path(__file__).parent / "data" / "zephyr-7b-beta.alpaca_eval_gpt4.excerpt.json"
ANNOTATORS = ("alpaca_eval_gpt4", "weighted_alpaca_eval_gpt4_turbo")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("alpaca") / "tiny-chat", seed=1)


def test_answers_judged_by_both_annotators_then_cached(model_dir, judge, tmp_path, capsys):
    out = str(tmp_path / "ae")
    # --lc no: the length-control GLM needs the Hub (offline here it would retry for 25 s)
    argv = [model_dir, "--out", out, "--limit", "3", "--max-new-tokens", "6", "--lc", "no", *judge]
    assert main(argv) == 0
    report = json.load(open(os.path.join(out, "leaderboard.json")))
    assert report["n_instructions"] == 3
    for name in ANNOTATORS:
        row = report["annotators"][name]
        annotations = json.load(open(os.path.join(out, f"annotations.{name}.json")))
        assert len(annotations) == 3 and {a["generator_2"] for a in annotations} == {"tiny-chat"}
        judged = [a["preference"] for a in annotations if a["status"] == "ok"]
        assert row["n_total"] == len(judged) and row["unparseable"] == 3 - len(judged)
        assert judged and all(1 <= p <= 2 for p in judged)  # the constrained judge answers with a verdict
        assert row["n_wins"] + row["n_wins_base"] + row["n_draws"] == row["n_total"]
        assert row["usage"]["requests"] >= 3
    outputs = json.load(open(os.path.join(out, "model_outputs.json")))
    assert [o["generator"] for o in outputs] == ["tiny-chat"] * 3
    parts = open(os.path.join(out, "model_outputs.parts.jsonl")).read()
    assert main(argv) == 0  # rerun: every answer and every verdict comes from disk
    again = json.load(open(os.path.join(out, "leaderboard.json")))
    assert all(again["annotators"][n]["usage"]["requests"] == 0 for n in ANNOTATORS)
    assert open(os.path.join(out, "model_outputs.parts.jsonl")).read() == parts
    for name in ANNOTATORS:
        assert {k: v for k, v in again["annotators"][name].items() if k != "usage"} == \
            {k: v for k, v in report["annotators"][name].items() if k != "usage"}


def test_from_annotations_gives_the_published_row_on_real_annotations(capsys):
    assert main(["--from-annotations", str(EXCERPT)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 26 published GPT-4 verdicts on zephyr-7b-beta: 19 wins, 5 losses, 1 draw (0), 1 never judged (null)
    assert (row["n_wins"], row["n_wins_base"], row["n_draws"], row["n_total"]) == (19, 5, 1, 25)
    assert row["win_rate"] == pytest.approx(78.0)
    assert row["annotator"] == "alpaca_eval_gpt4" and row["model"] == "zephyr-7b-beta"


def test_win_rate_is_alpaca_evals_own():
    ae = import_alpaca_eval()
    if ae is None:
        pytest.skip("alpaca_eval not installed")
    rows = json.load(open(EXCERPT))
    rng = random.Random(0)
    rows += [{"preference": rng.choice([1.0, 2.0, 1.5, rng.uniform(1, 2)])} for _ in range(40)]
    ours, theirs = win_rate([r["preference"] for r in rows]), ae.metrics.get_winrate(rows)
    for k, v in theirs.items():
        assert ours[k] == pytest.approx(float(v), rel=1e-12), k


def test_order_switch_and_parsers_follow_alpaca_eval():
    ae = import_alpaca_eval()
    if ae is not None:
        import pandas as pd
        from alpaca_eval.processors import RandomSwitchTwoColumnsProcessor

        instructions = [f"instruction {i}" for i in range(40)]
        df = pd.DataFrame({"instruction": instructions, "output_1": "a", "output_2": "b"})
        proc = RandomSwitchTwoColumnsProcessor(two_columns_to_switch=["output_1", "output_2"],
                                               random_seed_columns=["instruction"], _switch_column="is_switched_outputs",
                                               seed=0)  # the seed every AlpacaEval annotator passes (its default)
        assert list(proc.preprocess(df)["is_switched_outputs"]) == [is_switched(i) for i in instructions]
    assert len({is_switched(f"x{i}") for i in range(20)}) == 2
    assert parse_ranking("[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]") == 2.0
    assert parse_ranking("[{'model': 'model_1', 'rank': 3}]") is None
    assert parse_ranking("__import__('os').system('true')") is None  # read as a literal, never run
    assert logprob_preference([("M", -0.1, {"M": -0.1, "m": -2.4})], "M") == pytest.approx(
        2 - 1 / (1 + 2.718281828459045 ** 2.3))
    assert logprob_preference(None, "m") == 1.0 and logprob_preference(None, "x") is None


@pytest.mark.parametrize("record, field", [({"instruction": "i", "output_1": "a", "output_2": "b", "preference": 3},
                                            "preference"),
                                           ({"instruction": "i", "output_1": "a", "preference": 1}, "output_2")])
def test_bad_annotation_file_is_one_line(tmp_path, capsys, record, field):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps([{"instruction": "j", "output_1": "a", "output_2": "b", "preference": 1}, record]))
    assert main(["--from-annotations", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith(f"error: {path}: row 1: field '{field}'")


def test_length_control_removes_a_pure_length_preference(tmp_path, monkeypatch):
    """AlpacaEval's own GLM through our annotations frame: a judge that only likes longer answers gives a
    high raw win rate and a length-controlled one near 50% (a frame with output_1 / output_2 or the
    instruction index mixed up would not). The GLM's Hub data (gamed baselines, instruction difficulty)
    is synthetic here, drawn from the same length-only judge."""
    ae = import_alpaca_eval()
    if ae is None:
        pytest.skip("alpaca_eval not installed")
    import math

    import pandas as pd

    from zephyr_fast.eval.alpaca_metrics import length_controlled

    rng = random.Random(0)
    judge = lambda d: 1 / (1 + math.exp(2.0 * math.tanh(d)))  # noqa: E731 - p(output_2 wins): longer wins
    gamed = [{"model": m, "index": i, "instruction_difficulty": rng.gauss(0, 1), "not_gamed_baseline": False,
              "std_delta_len": (d := rng.gauss(0, 1)), "preference": judge(d)}
             for m in ("gpt4_gamed_concise", "gpt4_gamed_verbose") for i in range(805)]
    path = tmp_path / "df_gamed.csv"
    pd.DataFrame(gamed).to_csv(path, index=False)
    monkeypatch.setattr(ae.metrics.glm_winrate, "hf_hub_download", lambda **kw: str(path))
    rows = []
    for i in range(805):
        base, model = rng.randint(200, 1200), rng.randint(400, 2400)  # the model writes longer on average
        rows.append({"index": i, "output_1": "b" * base, "output_2": "m" * model, "generator_1": "baseline",
                     "generator_2": "verbose-model", "instruction": f"i{i}"})
    std = pd.Series([len(r["output_1"]) - len(r["output_2"]) for r in rows]).std()
    for r in rows:
        r["preference"] = 1 + judge((len(r["output_1"]) - len(r["output_2"])) / std)
    raw = win_rate([r["preference"] for r in rows])["win_rate"]
    lc = length_controlled(rows)["length_controlled_winrate"]
    assert raw > 65 and abs(lc - 50) < 5, (raw, lc)


def test_answers_are_regenerated_when_the_chat_template_changes(tmp_path):
    """The weights' fingerprint does not cover the tokenizer: an answer is keyed by its rendered prompt."""
    import shutil

    from zephyr_fast.eval.alpaca_answers import answer_instructions

    model = shutil.copytree(save_tiny_model(tmp_path / "m", seed=2), tmp_path / "copy")
    out, ins = str(tmp_path / "out"), ["Name a colour.", "Count to three."]
    answer_instructions(str(model), ins, out, max_new_tokens=3, progress=False)
    parts = os.path.join(out, "model_outputs.parts.jsonl")
    before = open(parts).read().splitlines()
    answer_instructions(str(model), ins, out, max_new_tokens=3, progress=False)
    assert open(parts).read().splitlines() == before  # the same prompts: reused
    assert (model / "chat_template.jinja").is_file()  # where transformers keeps the template
    (model / "chat_template.jinja").write_text("{% for m in messages %}### {{ m['content'] }}\n{% endfor %}### Answer:\n")
    answer_instructions(str(model), ins, out, max_new_tokens=3, progress=False)
    assert len(open(parts).read().splitlines()) == len(before) + 2  # new prompts: answered again
