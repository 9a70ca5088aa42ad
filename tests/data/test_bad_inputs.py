"""Issue 12 bad inputs: each is reproduced from a file in tmp_path and ends in one line naming the
file, the line (row) and what is wrong -- or, for cached data, in the file's current rows."""

import json
import os

import pytest

from zephyr_fast.data.loading import DataConfig, load_rows, rows_digest
from zephyr_fast.data.preference import build_dpo_examples
from zephyr_fast.data.sft import tokenize_sft
from zephyr_fast.data.validate import DataValidationError

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


def line(row) -> bytes:
    return json.dumps(row).encode() + b"\n"


def sft_row(text):
    return {"messages": [U(f"Say {text}"), A(text)]}


def mixture(path, tmp_path, **kw):
    return DataConfig(dataset_mixture={"datasets": [{"id": str(path)}], **kw.pop("mixture", {})}, shuffle=False,
                      cache_dir=str(tmp_path / "cache"), **kw)


def write_bad_encoding(tmp_path):
    """Four SFT rows; line 3 (row 2) has a Latin-1 byte in it."""
    path = tmp_path / "latin1.jsonl"
    bad = line(sft_row("caf\u00e9")).replace("\\u00e9".encode(), b"\xe9")
    path.write_bytes(line(sft_row("a")) + line(sft_row("b")) + bad + line(sft_row("d")))
    return path


# --- 1. non-UTF-8 bytes: a row error naming file, line and row; skip_invalid_rows skips it ----------

def test_non_utf8_line_is_a_named_row_error(tmp_path, tok):
    path = write_bad_encoding(tmp_path)
    with pytest.raises(DataValidationError) as info:
        load_rows(mixture(path, tmp_path))
    assert f"{path}: line 3 (row 2): not valid UTF-8: byte 0xe9 at column" in str(info.value)
    assert [e.kind for e in info.value.errors] == ["encoding"]


def test_non_utf8_line_is_skipped_and_counted(tmp_path, tok):
    path = write_bad_encoding(tmp_path)
    rows = load_rows(mixture(path, tmp_path, skip_invalid_rows=True))["train"]
    assert len(rows) == 4  # the unreadable row keeps its place
    examples, report = tokenize_sft(rows, tok, max_length=256, skip_invalid_rows=True, show_progress=False)
    assert [e["index"] for e in examples] == [0, 1, 3]
    assert report.skipped.num_skipped == 1 and dict(report.skipped.by_kind) == {"encoding": 1}
    assert "line 3 (row 2): not valid UTF-8" in str(report)
    with pytest.raises(DataValidationError, match=r"latin1.jsonl: line 3 \(row 2\): not valid UTF-8"):
        tokenize_sft(rows, tok, max_length=256, show_progress=False)


def test_unreadable_rows_mix_with_clean_files(tmp_path, tok):
    bad, clean = write_bad_encoding(tmp_path), tmp_path / "clean.jsonl"
    clean.write_bytes(line(sft_row("e")) + line(sft_row("f")))
    cfg = DataConfig(dataset_mixture={"datasets": [{"id": str(clean)}, {"id": str(bad)}], "seed": 0,
                                      "test_split_size": 2}, skip_invalid_rows=True, cache_dir=str(tmp_path / "c"))
    rows = load_rows(cfg)
    reports = [tokenize_sft(rows[s], tok, max_length=256, skip_invalid_rows=True, show_progress=False)[1]
               for s in ("train", "test")]
    assert sum(r.rows for r in reports) == 6 and sum(r.skipped.num_skipped for r in reports) == 1
    assert sum("latin1.jsonl: line 3 (row 2): not valid UTF-8" in str(r) for r in reports) == 1


def test_non_utf8_line_in_dpo_rows_is_skipped(tmp_path, tok):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}
    path.write_bytes(line(good) + b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n' + line(good))
    rows = load_rows(mixture(path, tmp_path, skip_invalid_rows=True))["train"]
    examples, report = build_dpo_examples(rows, tok, max_length=64, skip_invalid_rows=True, show_progress=False)
    assert [e["index"] for e in examples] == [0, 2] and dict(report.skipped.by_kind) == {"encoding": 1}


# --- 2. a malformed JSON line names its line -------------------------------------------------------

def test_malformed_json_line_names_the_line(tmp_path, tok):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(line(sft_row("a")) + b"\n" + b'{"messages": [}\n' + line(sft_row("c")))
    with pytest.raises(DataValidationError, match=r"broken.jsonl: line 3 \(row 1\): invalid JSON: .*\(column 15\)"):
        load_rows(mixture(path, tmp_path))
    rows = load_rows(mixture(path, tmp_path, skip_invalid_rows=True))["train"]
    examples, report = tokenize_sft(rows, tok, max_length=256, skip_invalid_rows=True, show_progress=False)
    assert len(examples) == 2 and dict(report.skipped.by_kind) == {"invalid_json": 1}


def test_malformed_json_array_document_names_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [,]}\n]\n')
    with pytest.raises(DataValidationError, match=r"rows.json: line 3: invalid JSON") as info:
        load_rows(mixture(path, tmp_path))
    assert "\n" not in str(info.value)


# --- 3. an empty file says so, in one line ---------------------------------------------------------

@pytest.mark.parametrize("name,content", [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n"), ("empty.json", b""),
                                          ("empty.parquet", b""), ("empty_list.json", b" [] "),
                                          ("empty_columns.json", b'{"messages": []}')])
def test_empty_file_says_it_is_empty(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataValidationError) as info:
        load_rows(mixture(path, tmp_path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: the file is empty") and "\n" not in msg


# --- 4. test_split_size larger than the data -------------------------------------------------------

@pytest.mark.parametrize("size,shown", [(4, "4 (4 rows)"), (10, "10 (10 rows)"), (0.99, "0.99 (4 rows)")])
def test_test_split_size_larger_than_the_data(tmp_path, size, shown):
    path = tmp_path / "four.jsonl"
    path.write_bytes(b"".join(line(sft_row(t)) for t in "abcd"))
    with pytest.raises(ValueError) as info:
        load_rows(mixture(path, tmp_path, mixture={"test_split_size": size}))
    msg = str(info.value)
    assert msg.startswith(f"dataset_mixture.test_split_size: {shown} leaves no training rows") and "only 4 rows" in msg
    assert "\n" not in msg
    rows = load_rows(mixture(path, tmp_path, mixture={"test_split_size": 3}))
    assert len(rows["train"]) == 1 and len(rows["test"]) == 3


# --- 5. messages ------------------------------------------------------------------------------------

def test_dpo_unknown_role_is_named(tmp_path, tok):
    path = tmp_path / "human.jsonl"
    human = {"role": "human", "content": "Hi"}
    good = {"chosen": [U("Hi"), A("Hello")], "rejected": [U("Hi"), A("Go away")]}
    path.write_bytes(line(good) + line({"chosen": [human, A("Hello")], "rejected": [human, A("Go away")]}))
    rows = load_rows(mixture(path, tmp_path))["train"]
    with pytest.raises(DataValidationError) as info:
        build_dpo_examples(rows, tok, max_length=64, show_progress=False)
    assert (f"{path}: row 1, field 'chosen[0].role': unknown role 'human' "
            "(expected one of ('system', 'user', 'assistant'))") in str(info.value)
    assert "got list" not in str(info.value)


@pytest.mark.parametrize("row, field, needle", [
    ({"prompt": "Hi", "chosen": [{"role": "gpt", "content": "Hello"}], "rejected": [A("Go away")]}, "chosen[0].role",
     "unknown role 'gpt' (expected one of ('system', 'user', 'assistant')); a completion is an 'assistant' turn"),
    ({"prompt": "Hi", "chosen": [A("Hello")], "rejected": [U("Go away")]}, "rejected[0].role",
     "a completion is an 'assistant' turn, got 'user'"),
    ({"chosen": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
      "rejected": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Go"}]}, "chosen[0]",
     "expected a dict with 'role' and 'content', got keys ['from', 'value']"),
])
def test_dpo_completion_roles_and_message_keys_are_named(tok, row, field, needle):
    """The explicit-prompt form names a completion's unknown role with the accepted ones, and a
    message in another schema (ShareGPT's from/value) names the keys it has."""
    with pytest.raises(DataValidationError) as info:
        build_dpo_examples([row], tok, max_length=64, show_progress=False, dataset_name="p.jsonl")
    assert f"p.jsonl: row 0, field '{field}': {needle}" in str(info.value)


def test_sft_conversation_ending_on_a_user_turn_is_refused(tmp_path, tok):
    path = tmp_path / "trailing_user.jsonl"
    path.write_bytes(line(sft_row("a")) + line({"messages": [U("Hi"), A("Hello"), U("And then?")]}))
    rows = load_rows(mixture(path, tmp_path))["train"]
    with pytest.raises(DataValidationError, match=rf"{path}: row 1, field 'messages\[2\]\.role': last turn must be "
                                                  r"'assistant', got 'user'"):
        tokenize_sft(rows, tok, max_length=256, show_progress=False)
    examples, report = tokenize_sft(rows, tok, max_length=256, skip_invalid_rows=True, show_progress=False)
    assert [e["index"] for e in examples] == [0] and report.skipped.num_skipped == 1


# --- 6. data identity follows content ---------------------------------------------------------------

@pytest.mark.parametrize("ext", ["jsonl", "parquet", "folder"])
def test_content_change_with_the_same_mtime_is_not_served_from_cache(tmp_path, ext):
    """A file, or a folder in the hub layout (data/train-*.parquet, read by ``datasets.load_dataset``)."""
    import datasets

    path = tmp_path / ("ds" if ext == "folder" else f"data.{ext}")
    target = path / "data" / "train-00000-of-00001.parquet" if ext == "folder" else path

    def write(texts):
        rows = [sft_row(t) for t in texts]
        target.parent.mkdir(parents=True, exist_ok=True)
        if ext == "jsonl":
            path.write_bytes(b"".join(line(r) for r in rows))
        else:
            datasets.Dataset.from_list(rows).to_parquet(str(target))
        os.utime(target, ns=(10**18, 10**18))  # the same mtime for both versions
        if ext == "folder":
            os.utime(target.parent, ns=(10**18, 10**18))
            os.utime(path, ns=(10**18, 10**18))
        return rows

    first = write(["old-1", "old-2"])
    rows = load_rows(mixture(path, tmp_path))["train"]
    assert rows["messages"] == [r["messages"] for r in first]
    digest = rows_digest(rows)
    second = write(["new-1", "new-2"])
    rows = load_rows(mixture(path, tmp_path))["train"]
    assert rows["messages"] == [r["messages"] for r in second]
    assert rows_digest(rows) != digest


def test_rows_digest_is_the_content_actually_used(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    data = b"".join(line(sft_row(t)) for t in "abcdef")
    a.write_bytes(data)
    b.write_bytes(data)
    cfg = lambda p, **m: mixture(p, tmp_path, mixture={"seed": 0, "test_split_size": 2, **m})  # noqa: E731
    ra, rb = load_rows(cfg(a))["train"], load_rows(cfg(b))["train"]
    assert rows_digest(ra) == rows_digest(rb) == rows_digest(ra.to_list())  # content, not path; Dataset == list
    assert rows_digest(ra) != rows_digest(load_rows(cfg(a, seed=1))["train"])  # another split -> other rows
    b.write_bytes(data + line(sft_row("g")))
    assert rows_digest(load_rows(mixture(a, tmp_path))["train"]) != rows_digest(load_rows(mixture(b, tmp_path))["train"])
    os.utime(a)  # touching (or rewriting the same bytes) changes nothing
    a.write_bytes(data)
    assert rows_digest(load_rows(cfg(a))["train"]) == rows_digest(ra)


def test_rows_digest_of_a_dataset_is_computed_once(tmp_path, monkeypatch):
    """The reference cache key and the checkpoint's data identity share one digest per Dataset."""
    from zephyr_fast.data import identity

    a = tmp_path / "a.jsonl"
    a.write_bytes(b"".join(line(sft_row(t)) for t in "abcd"))
    rows = load_rows(mixture(a, tmp_path))["train"]
    calls = []
    real = identity._rows_digest
    monkeypatch.setattr(identity, "_rows_digest", lambda r: calls.append(1) or real(r))
    assert rows_digest(rows) == rows_digest(rows) == real(rows.to_list()) and len(calls) == 1
    assert rows_digest(rows.to_list()) == rows_digest(rows) and len(calls) == 2  # a list is digested each time
