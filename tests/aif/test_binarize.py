"""AIF binarisation rules on hand-built raw UltraFeedback rows, flat pairs and the CLI."""

import hashlib
import json

import pytest

from zephyr_fast.aif.binarize import binarize_rows, main, mean_rating
from zephyr_fast.data.validate import DataValidationError


def comp(resp, overall=None, ratings=None):
    c = {"model": "m-" + resp, "response": resp}
    if overall is not None:
        c["overall_score"] = overall
    if ratings is not None:
        c["annotations"] = {a: {"Rating": str(r), "Rationale": "..."} for a, r in
                            zip(("instruction_following", "honesty", "truthfulness", "helpfulness"), ratings)}
    return c


def raw(*completions, instruction="Say hi"):
    return {"source": "test", "instruction": instruction, "models": [], "completions": list(completions)}


def test_chosen_is_best_rejected_is_random_lower_and_seeded():
    row = raw(comp("a", 7.0), comp("b", 9.0), comp("c", 5.0), comp("d", 9.0))
    picks = set()
    for seed in range(40):
        (p,), rep = binarize_rows([row], seed=seed)
        assert p["chosen"][-1]["content"] == "b" and p["score_chosen"] == 9.0  # first of the tied best
        assert p["rejected"][-1]["content"] in ("a", "c")  # never the other 9.0
        assert p["score_rejected"] == {"a": 7.0, "c": 5.0}[p["rejected"][-1]["content"]]
        picks.add(p["rejected"][-1]["content"])
        assert binarize_rows([row], seed=seed)[0] == [p]  # same seed, same pick
    assert picks == {"a", "c"}


def test_pick_does_not_depend_on_other_rows():
    rows = [raw(comp(f"x{i}", 1.0), comp(f"y{i}", 2.0), comp(f"z{i}", 3.0), comp(f"w{i}", 4.0)) for i in range(10)]
    alone = binarize_rows(rows[:5], seed=1)[0]
    assert binarize_rows(rows, seed=1)[0][:5] == alone


def test_all_tied_rows_are_dropped_and_counted():
    rows = [raw(comp("a", 6.0), comp("b", 6.0)), raw(comp("a", 6.0), comp("b", 8.0))]
    pairs, rep = binarize_rows(rows)
    assert len(pairs) == 1 and rep.ties_dropped == 1 and rep.written == 1 and "1 rows whose scores all tie" in str(rep)


def test_fine_grained_vs_overall_score():
    # critique-based overall_score prefers "a"; the mean of the aspect ratings prefers "b"
    row = raw(comp("a", 9.0, [2, 2, 3, 2]), comp("b", 6.0, [5, 5, "N/A", 4]), comp("c", 4.0, [1, 1, 1, 1]))
    (o,), _ = binarize_rows([row], score="overall")
    (m,), _ = binarize_rows([row], score="mean_rating")
    (auto,), _ = binarize_rows([row], score="auto")
    assert o["chosen"][-1]["content"] == "a" and o["score_chosen"] == 9.0
    assert m["chosen"][-1]["content"] == "b" and m["score_chosen"] == pytest.approx(14 / 3)  # N/A ignored
    assert auto == o
    assert mean_rating({"fine-grained_score": 3.25}) == 3.25


def test_output_schema():
    (p,), _ = binarize_rows([raw(comp("hello", 8.0), comp("bye", 2.0), instruction="Greet me")])
    assert list(p) == ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"]
    assert p["prompt_id"] == hashlib.sha256(b"Greet me").hexdigest()
    assert p["chosen"] == p["messages"] == [{"content": "Greet me", "role": "user"}, {"content": "hello", "role": "assistant"}]
    assert p["rejected"][0] == p["chosen"][0]


def test_missing_score_names_row_and_field():
    rows = [raw(comp("a", 8.0), comp("b", 2.0)), raw(comp("a", 8.0), comp("b"))]
    with pytest.raises(DataValidationError, match=r"row 1, field 'completions\[1\]\.overall_score\|annotations'"):
        binarize_rows(rows, dataset_name="uf_raw")
    pairs, rep = binarize_rows(rows, skip_invalid_rows=True)
    assert len(pairs) == 1 and rep.skipped.num_skipped == 1


def test_flat_pairs(flat_rows):
    pairs, rep = binarize_rows(flat_rows[:50])
    assert rep.formats == {"flat": 50}
    for p, r in zip(pairs, flat_rows):
        assert p["chosen"][-1]["content"] == r["chosen"] and p["score_chosen"] == r["metadata"]["rating_chosen"]
    tie = {"prompt": "p", "chosen": "a", "rejected": "b", "metadata": {"rating_chosen": 3.0, "rating_rejected": 3.0}}
    assert binarize_rows([tie])[1].ties_dropped == 1
    with pytest.raises(DataValidationError, match="field 'score_rejected'"):
        binarize_rows([{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": 5}])


def test_binarized_rows_pass_through(uf_rows):
    pairs, rep = binarize_rows(uf_rows)
    assert pairs == uf_rows and rep.formats == {"binarized": 16}


def test_cli(tmp_path, capsys):
    src = tmp_path / "raw.jsonl"
    rows = [raw(comp("a", 8.0), comp("b", 3.0), comp("c", 1.0)), raw(comp("a", 5.0), comp("b", 5.0))]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "bin.jsonl"
    assert main([str(src), str(out), "--seed", "3"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == 1 and got[0]["chosen"][-1]["content"] == "a"
    assert "1 rows whose scores all tie" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    assert main([str(bad), str(out)]) == 2
    assert "bad.jsonl: line 2 (row 1): invalid JSON: Expecting property name" in capsys.readouterr().err


@pytest.mark.parametrize("name, bad_line, kind, needle", [
    ("latin1.jsonl", b'{"instruction": "caf\xe9"}\n', "encoding", "line 2 (row 1): not valid UTF-8: byte 0xe9 at column"),
    ("broken.jsonl", b'{"instruction": \n', "invalid_json", "line 2 (row 1): invalid JSON: Expecting value"),
])
def test_cli_unreadable_line_names_file_and_line_and_is_skippable(tmp_path, capsys, name, bad_line, kind, needle):
    """Issue 12: binarize reads JSON Lines with the loader's reader, so a line that is not UTF-8 (a bare
    UnicodeDecodeError before) or not JSON is a row error naming file and line, and
    --skip-invalid-rows skips and counts it like any other bad row."""
    src, out = tmp_path / name, tmp_path / "bin.jsonl"
    good = (json.dumps(raw(comp("a", 8.0), comp("b", 3.0))) + "\n").encode()
    src.write_bytes(good + bad_line + good)
    assert main([str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}: {needle}" in err and "Traceback" not in err and not out.exists()
    assert "pass --skip-invalid-rows" in err and "skip_invalid_rows: true" not in err  # this command's switch
    assert main([str(src), str(out), "--skip-invalid-rows"]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert f"1 rows skipped ({kind}: 1); first: {src}: {needle}" in capsys.readouterr().out


def test_cli_reads_a_json_document_and_refuses_an_empty_file(tmp_path, capsys):
    src, out = tmp_path / "rows.json", tmp_path / "bin.jsonl"
    src.write_text(json.dumps([raw(comp("a", 8.0), comp("b", 3.0)), "not a row"]))
    assert main([str(src), str(out), "--skip-invalid-rows"]) == 0
    assert len(out.read_text().splitlines()) == 1 and "list item 1: expected a JSON object" in capsys.readouterr().out
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert main([str(empty), str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {empty}: the file is empty (0 bytes)"


def test_weighted_rating_score_and_judge_failures_counted():
    def judged(resp, ratings, weighted):
        c = comp(resp, ratings=ratings)
        for a, w in zip(c["annotations"].values(), weighted):
            if w is not None:
                a["Weighted Rating"] = w
        return c

    row = raw(judged("a", [4, 4, 4, 4], [3.2, 3.2, None, 3.2]), judged("b", [3, 3, 3, "FAILED"], [3.9, 3.9, 3.9, None]))
    (p,), rep = binarize_rows([row], score="mean_rating")
    assert p["chosen"][-1]["content"] == "a" and p["score_rejected"] == 3.0 and rep.judge_failed == 1
    assert "1 judge ratings FAILED" in str(rep)
    (p,), _ = binarize_rows([row], score="weighted_rating")  # a: (3.2*3 + 4)/4 = 3.4 < b: 3.9
    assert p["chosen"][-1]["content"] == "b" and p["score_chosen"] == pytest.approx(3.9)
