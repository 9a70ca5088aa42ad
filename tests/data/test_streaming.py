"""Streamed data (issue 21: "reading data is streamed, memory independent of file size"): JSON Lines
read in two streamed passes into a memory-mapped Arrow file, the tokenisers' compact examples, the
lazy packing of them -- each giving exactly what the whole-file / list-of-dicts / eager code gives,
and the structure that bounds memory (what is held per row and per token) checked directly."""

import json
import tracemalloc

import numpy as np
import pytest
import torch

from zephyr_fast.data import loading
from zephyr_fast.data.examples import DPOExamples, SFTExamples, TokenIdsNotKept, example_indices
from zephyr_fast.data.packing import LazyPackedBatches, pack_dpo, pack_sft
from zephyr_fast.data.preference import build_dpo_examples
from zephyr_fast.data.sft import tokenize_sft
from zephyr_fast.data.validate import DataValidationError, JsonLinesReader
from zephyr_fast.training.plan import micro_stats
from zephyr_fast.training.reference import examples_fingerprint


def _lines(path, lines):
    path.write_bytes(b"".join(x if isinstance(x, bytes) else x.encode() + b"\n" for x in lines))
    return str(path)


def _rows(path, rows):
    return _lines(path, [json.dumps(r) for r in rows])


def _msgs(i, extra=None):
    m = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    if extra:
        m[0].update(extra)
    return m


# each case: the lines of a file; several need more than one chunk (JSON_CHUNK_ROWS = 2 below) to
# reach the join of the chunks' types
CASES = {
    "plain": [json.dumps({"messages": _msgs(i), "id": i}) for i in range(5)],
    "int_then_float": [json.dumps({"s": v}) for v in (1, 2, 3, 2.5, 7)],
    "null_column_first": [json.dumps({"a": None, "b": "x"})] * 3 + [json.dumps({"a": "s", "b": "y"})],
    "struct_fields_grow": [json.dumps({"messages": _msgs(i)}) for i in range(3)]
                          + [json.dumps({"messages": _msgs(3, {"name": "n", "w": 1.5})}),
                             json.dumps({"messages": _msgs(4, {"w": 2})})],
    "empty_lists_first": [json.dumps({"l": []})] * 3 + [json.dumps({"l": [{"x": 1}]}), json.dumps({"l": None})],
    "nested_int_float": [json.dumps({"m": {"a": 1}})] * 2 + [json.dumps({"m": {"a": 1.5, "b": [1]}})]
                        + [json.dumps({"m": {"b": [2.5]}})],
    "schema_conflict": [json.dumps({"chosen": _msgs(i), "rejected": _msgs(i)}) for i in range(4)]
                       + [json.dumps({"chosen": "a string", "rejected": _msgs(9)})],
    "column_only_in_a_conflict_row": [json.dumps({"a": "x"})] * 3 + [json.dumps({"a": 1, "z": "only here"})],
    "bad_lines": [b"\xef\xbb\xbf" + json.dumps({"t": "bom"}).encode() + b"\r\n", "", "   ", "{not json",
                  b'{"t": "\xff"}\n', "[1, 2]", json.dumps({"t": "last"}), b'{"t": "no newline"}'],
    "load_error_first": ["{broken", json.dumps({"t": "x"}), json.dumps({"t": "y"})],
    "nested_type_clash": [json.dumps({"m": {"a": 1}})] * 2 + [json.dumps({"m": {"a": "x"}})],
    "int_too_big_for_double": [json.dumps({"a": 2 ** 63 - 1})] * 2 + [json.dumps({"a": 1.5})],
    "all_invalid": ["{x", "[1]", "nope"],
    "whitespace_only": ["  ", "\t"],
    "one_object_of_columns": [json.dumps({"chosen": [1, 2], "rejected": [3, 4]})],
    "pretty_document": ['{"a": [1, 2],', ' "b": [3, 4]}'],
    "list_document": [json.dumps([{"a": 1}, {"a": 2}])],
    "object_then_garbage": [json.dumps({"a": 1}), "garbage", json.dumps({"a": 2})],
}


# read whole: a JSON document, or a first line that is no complete value alone (only the whole read
# can tell a broken line from the start of a document)
WHOLE = {"list_document", "load_error_first", "one_object_of_columns", "pretty_document"}


def _read(fn, path):
    try:
        ds = fn(path)
        return ("ok", ds.column_names, ds.features, ds.to_list())
    except (DataValidationError, ValueError) as e:
        return ("error", type(e).__name__, str(e))


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_json_lines_give_the_whole_reads_dataset_or_error(tmp_path, monkeypatch, case):
    monkeypatch.setattr(loading, "JSON_CHUNK_ROWS", 2)
    path = _lines(tmp_path / f"{case}.jsonl", CASES[case])
    streamed = _read(loading._read_json, path)
    assert streamed == _read(loading._read_json_whole, path)
    if streamed[0] == "ok":
        assert bool(loading._read_json(path).cache_files) == (case not in WHOLE)  # memory-mapped when streamed


def test_streamed_json_lines_of_the_real_samples_are_memory_mapped(assets_dir, monkeypatch):
    monkeypatch.setattr(loading, "JSON_CHUNK_ROWS", 3)
    for name in ("ultrachat_200k/sample16.jsonl", "ultrafeedback_binarized/sample16.jsonl",
                 "ultrafeedback_binarized/flat1k.jsonl"):
        path = str(assets_dir / "data" / name)
        ds, whole = loading._read_json(path), loading._read_json_whole(path)
        assert ds.cache_files and ds.features == whole.features and ds.to_list() == whole.to_list()
        assert ds.data.schema == whole.data.schema


def test_a_file_changed_between_the_passes_is_refused(tmp_path):
    path = _rows(tmp_path / "r.jsonl", [{"a": i} for i in range(4)])
    reader = JsonLinesReader.open(path)
    _rows(tmp_path / "r.jsonl", [{"a": i} for i in range(5)])
    with pytest.raises(DataValidationError, match="changed while it was being read"):
        list(reader.chunks())


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_json_lines_holds_one_chunk_not_the_file(tmp_path, monkeypatch, uc_rows):
    """4x the rows: the streamed read's peak Python memory stays about the same (a chunk of rows and
    8 bytes a row); the whole read's grows with the file (every row is a dict at once)."""
    monkeypatch.setattr(loading, "JSON_CHUNK_ROWS", 16)
    small = _rows(tmp_path / "small.jsonl", uc_rows * 8)  # 128 rows, ~1 MB
    big = _rows(tmp_path / "big.jsonl", uc_rows * 32)  # 512 rows, ~4 MB
    streamed = [_peak(lambda p=p: loading._read_json(p)) for p in (small, big)]
    whole = [_peak(lambda p=p: loading._read_json_whole(p)) for p in (small, big)]
    assert whole[1] > 3 * whole[0]  # the measure sees the rows when they are held
    assert streamed[1] < 1.3 * streamed[0] and streamed[1] < whole[1] / 5


# --- compact examples and their lazy packing ------------------------------------------------------


def _sft_rows(uc_rows, n):
    return [{"messages": [dict(m, content=m["content"][:400]) for m in r["messages"][:6]]}
            for r in (uc_rows * (n // len(uc_rows) + 1))[:n]]


def test_sft_examples_are_flat_arrays_equal_to_the_dicts(tok, uc_rows):
    rows = _sft_rows(uc_rows, 20)
    ex, rep = tokenize_sft(rows, tok, max_length=256, show_progress=False)
    assert isinstance(ex, SFTExamples) and ex.ids.values.dtype == np.int32
    dicts = list(ex)
    assert all(isinstance(d["input_ids"], list) and isinstance(d["input_ids"][0], int) for d in dicts)
    assert ex[-1] == dicts[-1] and ex[2:4] == dicts[2:4] and ex == dicts
    assert rep.tokens == sum(len(d["input_ids"]) for d in dicts)
    assert rep.target_tokens == sum(sum(d["loss_mask"][1:]) for d in dicts)
    bare, bare_rep = tokenize_sft(rows, tok, max_length=256, show_progress=False, keep_ids=False)
    assert str(bare_rep) == str(rep) and not bare.has_token_ids
    assert bare.lengths.tolist() == ex.lengths.tolist() and bare.targets.tolist() == ex.targets.tolist()
    assert all(bare.loss_mask(i).tolist() == d["loss_mask"] for i, d in enumerate(dicts))
    with pytest.raises(TokenIdsNotKept):
        bare[0]
    # per example: 8 (index) + 8 (offset) + 8 (targets) + 8 (lengths) + the mask bits
    assert bare.nbytes <= 40 * len(bare) + 2 * len(bare) + rep.tokens // 8 + 64


def test_dpo_examples_keep_their_fingerprint_without_token_ids(tok, uf_rows):
    ex, rep = build_dpo_examples(uf_rows, tok, max_length=300, max_prompt_length=100, show_progress=False)
    assert isinstance(ex, DPOExamples)
    dicts = list(ex)
    assert examples_fingerprint(ex) == examples_fingerprint(dicts)  # the reference cache key's bytes
    bare, bare_rep = build_dpo_examples(uf_rows, tok, max_length=300, max_prompt_length=100, show_progress=False,
                                        keep_ids=False)
    assert str(bare_rep) == str(rep) and not bare.has_token_ids and len(bare) == len(ex)
    assert examples_fingerprint(bare) == examples_fingerprint(dicts)
    assert bare.index.tolist() == [d["index"] for d in dicts]


def _same_batches(lazy, eager):
    assert isinstance(lazy, LazyPackedBatches) and len(lazy) == len(eager)
    assert str(lazy.stats) == str(eager.stats)
    for k, e in enumerate(eager):
        b = lazy[k]
        for f in ("input_ids", "position_ids", "cu_seqlens", "labels", "segment_ids", "pair_index", "part_ids",
                  "extra_rows", "extra_labels", "extra_segment_ids"):
            x, y = getattr(b, f), getattr(e, f)
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), f
        assert (b.max_seqlen, b.num_segments, b.layout) == (e.max_seqlen, e.num_segments, e.layout)
        assert lazy.counts(k) == vars(micro_stats(e))


@pytest.mark.parametrize("overlong,max_tokens,shards", [("truncate", 2048, 1), ("truncate", 100, 2),
                                                         ("split", 100, 3)])
def test_lazy_sft_packing_builds_the_eager_batches(tok, uc_rows, overlong, max_tokens, shards):
    ex, _ = tokenize_sft(_sft_rows(uc_rows, 24), tok, max_length=256, show_progress=False)
    eager = pack_sft(list(ex), max_tokens, seed=3, overlong=overlong, num_shards=shards)
    _same_batches(pack_sft(ex, max_tokens, seed=3, overlong=overlong, num_shards=shards), eager)
    bare, _ = tokenize_sft(_sft_rows(uc_rows, 24), tok, max_length=256, show_progress=False,
                           keep_ids=False)  # the counts need no token ids
    lazy = pack_sft(bare, max_tokens, seed=3, overlong=overlong, num_shards=shards)
    assert lazy.bins == pack_sft(ex, max_tokens, seed=3, overlong=overlong, num_shards=shards).bins
    assert [lazy.counts(k) for k in range(len(lazy))] == [vars(micro_stats(b)) for b in eager]


@pytest.mark.parametrize("layout", ["separate", "prefix_shared"])
def test_lazy_dpo_packing_builds_the_eager_batches(tok, uf_rows, layout):
    ex, _ = build_dpo_examples(uf_rows, tok, max_length=300, max_prompt_length=100, show_progress=False)
    eager = pack_dpo(list(ex), 1400, layout=layout, seed=5, num_shards=2)
    _same_batches(pack_dpo(ex, 1400, layout=layout, seed=5, num_shards=2), eager)
    with pytest.raises(ValueError, match="DPO pairs do not fit max_tokens=50") as lazy_err:
        pack_dpo(ex, 50, layout=layout)
    with pytest.raises(ValueError, match="DPO pairs do not fit max_tokens=50") as eager_err:
        pack_dpo(list(ex), 50, layout=layout)
    assert str(lazy_err.value) == str(eager_err.value)


def test_a_pass_over_memory_mapped_rows_releases_the_pages_it_read(tmp_path, uc_rows):
    """iter_chunks advises the rows' read-only file mapping away after each chunk: the same values on
    every pass (the pages come back from the page cache), and only that file's mapping is touched."""
    import os

    from zephyr_fast.data.identity import _rows_digest
    from zephyr_fast.data.validate import MappedPages

    ds = loading._read_json(_rows(tmp_path / "r.jsonl", uc_rows * 4)).shuffle(seed=1)
    pages = MappedPages.of(ds)
    assert pages is not None and len(pages.ranges) == 1
    (lo, hi), size = pages.ranges[0], os.path.getsize(ds.cache_files[0]["filename"])
    assert size <= hi - lo < size + 2 * os.sysconf("SC_PAGE_SIZE")  # the whole Arrow file, nothing else
    first = ds.to_list()
    digests = {_rows_digest(ds) for _ in range(2)}
    pages.release()
    assert len(digests) == 1 and ds.to_list() == first
    assert MappedPages.of([{"a": 1}]) is None and MappedPages.of(loading._read_json_whole(
        _rows(tmp_path / "w.jsonl", uc_rows))) is None  # nothing memory-mapped: nothing to release


def test_example_indices_read_the_compact_array_or_the_dicts(tok, uf_rows):
    ex, _ = build_dpo_examples(uf_rows, tok, max_length=300, max_prompt_length=100, show_progress=False)
    dicts = list(ex)
    want = [d["index"] for d in dicts]
    assert example_indices(ex).tolist() == want and example_indices(dicts).tolist() == want
    bare, _ = build_dpo_examples(uf_rows, tok, max_length=300, max_prompt_length=100, show_progress=False,
                                 keep_ids=False)
    assert example_indices(bare).tolist() == want  # no token ids needed
    assert example_indices(bare).dtype == np.int64 and example_indices([]).tolist() == []
