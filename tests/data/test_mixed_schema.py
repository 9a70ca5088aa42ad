"""A JSON file whose rows give one field different types (a string ``chosen`` among message lists)
names the line, row and field of each odd row, instead of refusing the whole file as unparsable;
``skip_invalid_rows`` skips exactly those rows; identical chosen/rejected pairs are kept and counted."""

import json

import pytest

from zephyr_fast.data.chat import load_tokenizer
from zephyr_fast.data.loading import DataConfig, load_rows
from zephyr_fast.data.preference import build_dpo_examples
from zephyr_fast.data.validate import DataValidationError, read_json_rows

from ..conftest import ASSETS, TOKENIZER_DIR


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def uf_rows():
    with open(ASSETS / "data" / "ultrafeedback_binarized" / "sample16.jsonl") as f:
        return [json.loads(line) for line in f][:8]


def _odd(rows):
    rows = [dict(r) for r in rows]
    rows[5]["chosen"] = rows[5]["chosen"][-1]["content"]  # a string where the others hold message lists
    return rows


def test_mixed_field_types_name_line_row_and_field(tmp_path, uf_rows):
    path = _write(tmp_path / "prefs.jsonl", _odd(uf_rows))
    with pytest.raises(DataValidationError) as exc:
        build_dpo_examples(load_rows(DataConfig(dataset_mixer={path: 1.0}, dataset_splits=["train"]))["train"],
                           load_tokenizer(str(TOKENIZER_DIR)), max_length=1024, show_progress=False)
    msg = str(exc.value)
    assert msg == (f"{path}: line 6 (row 5), field 'chosen': a string, where 7 other rows (e.g. line 1) hold a list "
                   "of objects (fix the data, or set skip_invalid_rows: true to skip the row)")
    assert "ArrowInvalid" not in msg


def test_skip_invalid_rows_skips_exactly_the_odd_rows(tmp_path, uf_rows):
    path = _write(tmp_path / "prefs.jsonl", _odd(uf_rows))
    rows = load_rows(DataConfig(dataset_mixer={path: 1.0}, dataset_splits=["train"], skip_invalid_rows=True))["train"]
    ex, rep = build_dpo_examples(rows, load_tokenizer(str(TOKENIZER_DIR)), max_length=1024, skip_invalid_rows=True,
                                 show_progress=False)
    source_rows = rows["_source_row"]  # load_rows shuffles: map each example back to its line
    assert sorted(source_rows[e["index"]] for e in ex) == [0, 1, 2, 3, 4, 6, 7]
    assert rep.skipped.num_skipped == 1 and dict(rep.skipped.by_kind) == {"schema": 1}


def test_nulls_and_empty_lists_fit_any_column(tmp_path):
    rows = [{"a": [{"x": 1}], "b": None}, {"a": [], "b": "s"}, {"a": None, "b": "t"}]
    assert read_json_rows(_write(tmp_path / "r.jsonl", rows)) == rows
    mostly_empty = [{"tools": []}, {"tools": []}, {"tools": []}, {"tools": [{"name": "f"}]}]
    assert read_json_rows(_write(tmp_path / "t.jsonl", mostly_empty)) == mostly_empty
    clash = [{"tools": []}, {"tools": []}, {"tools": [{"name": "f"}]}, {"tools": ["g"]}, {"tools": ["h"]}]
    marked = read_json_rows(_write(tmp_path / "c.jsonl", clash))
    assert [r.get("tools") for r in marked] == [[], [], None, ["g"], ["h"]]  # objects among strings: row 2 odd


def test_identical_pair_is_kept_and_counted(uf_rows):
    rows = [dict(r) for r in uf_rows[:3]]
    rows[1]["rejected"] = rows[1]["chosen"]
    ex, rep = build_dpo_examples(rows, load_tokenizer(str(TOKENIZER_DIR)), max_length=1024, show_progress=False)
    assert len(ex) == 3 and rep.identical == 1 and ex[1]["chosen_ids"] == ex[1]["rejected_ids"]
