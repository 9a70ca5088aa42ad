"""load_rows: local files, both alignment-handbook mixture schemas, errors naming the file."""

import json
import shutil

import pytest

from zephyr_fast.data.loading import DataConfig, load_rows
from zephyr_fast.data.sft import tokenize_sft
from zephyr_fast.data.validate import DataValidationError


@pytest.fixture()
def uc_dir(tmp_path, assets_dir):
    """A local dataset directory with one file per split, as a hub dataset would have."""
    src = assets_dir / "data" / "ultrachat_200k" / "sample16.jsonl"
    lines = src.read_text().splitlines()
    d = tmp_path / "ultrachat"
    d.mkdir()
    (d / "train_sft.jsonl").write_text("\n".join(lines[:12]) + "\n")
    (d / "test_sft.jsonl").write_text("\n".join(lines[12:]) + "\n")
    return d


def test_old_schema_mixer_and_splits(uc_dir, tmp_path):
    cfg = DataConfig(dataset_mixer={str(uc_dir): 0.5}, dataset_splits=["train_sft", "test_sft"], seed=0,
                     cache_dir=str(tmp_path / "cache"))
    rows = load_rows(cfg)
    assert len(rows["train"]) == 6 and len(rows["test"]) == 4  # the fraction applies to train only
    assert set(rows["train"]["_source_row"]) <= set(range(12))
    assert set(rows["train"]["_source"]) == {f"{uc_dir}[train_sft]"}


def test_new_schema_weights_and_test_split(uc_dir, assets_dir, tmp_path):
    uf = assets_dir / "data" / "ultrachat_200k" / "sample16.jsonl"
    cfg = DataConfig(dataset_mixture={
        "datasets": [
            {"id": str(uc_dir), "split": "train_sft", "columns": ["messages"], "weight": 0.5},
            {"id": str(uf), "split": "train", "columns": ["messages"], "weight": 2.0},
        ],
        "seed": 0, "test_split_size": 5}, cache_dir=str(tmp_path / "cache"))
    rows = load_rows(cfg)
    assert len(rows["train"]) + len(rows["test"]) == 6 + 32 and len(rows["test"]) == 5
    assert set(rows["train"].column_names) == {"messages", "_source", "_source_row"}
    again = load_rows(cfg)
    assert rows["train"]["_source_row"] == again["train"]["_source_row"]  # deterministic given the seed


def test_parquet_and_arrow_files(tmp_path, assets_dir):
    import datasets

    ds = datasets.load_dataset("json", data_files=str(assets_dir / "data" / "mt_bench" / "question.jsonl"),
                               split="train", cache_dir=str(tmp_path / "c0"))
    ds.to_parquet(str(tmp_path / "q.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    shutil.copy(arrow, tmp_path / "q.arrow")
    for path in (tmp_path / "q.parquet", tmp_path / "q.arrow", tmp_path / "saved"):
        cfg = DataConfig(dataset_mixture={"datasets": [{"id": str(path), "split": "train"}]}, cache_dir=str(tmp_path / "c"))
        assert len(load_rows(cfg)["train"]) == 80


def test_errors_name_source_file_and_row_after_shuffling(uc_dir, tmp_path, tok):
    bad = json.loads((uc_dir / "train_sft.jsonl").read_text().splitlines()[3])
    bad["messages"][1]["content"] = ""
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([(uc_dir / "train_sft.jsonl").read_text().splitlines()[0], json.dumps(bad)]) + "\n")
    cfg = DataConfig(dataset_mixture={"datasets": [{"id": str(path)}, {"id": str(uc_dir), "split": "test_sft"}]},
                     cache_dir=str(tmp_path / "cache"))
    rows = load_rows(cfg)["train"]
    with pytest.raises(DataValidationError, match=rf"{path}: row 1, field 'messages\[1\]\.content': empty content"):
        tokenize_sft(rows, tok, max_length=4096, show_progress=False)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        DataConfig()
    with pytest.raises(DataValidationError, match=rf"^{tmp_path / 'nope.jsonl'}: no such file or directory$"):
        load_rows(DataConfig(dataset_mixer={str(tmp_path / "nope.jsonl"): 1.0}))
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2 \(row 1\): invalid JSON"):
        load_rows(DataConfig(dataset_mixer={str(bad): 1.0}, cache_dir=str(tmp_path / "c")))


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DataValidationError) as info:
        load_rows(DataConfig(dataset_mixer={"HuggingFaceH4/ultrachat_200k": 1.0}, dataset_splits=["train_sft"]))
    msg = str(info.value)
    assert msg.startswith("HuggingFaceH4/ultrachat_200k[train_sft]: is not a local path and the Hugging Face Hub")
    assert "Pass a local path instead" in msg and "\n" not in msg


def test_chunked_processing_matches_one_chunk(monkeypatch, tok, uc_dir, assets_dir, tmp_path):
    """Rows are converted and tokenised in slices; slice boundaries must not change anything,
    for a datasets.Dataset (with its _source columns) as for a list of dicts."""
    from zephyr_fast.data import preference, sft
    from zephyr_fast.data.preference import build_dpo_examples

    ds = load_rows(DataConfig(dataset_mixer={str(uc_dir): 1.0}, dataset_splits=["train_sft"],
                              cache_dir=str(tmp_path / "c")))["train"]
    uf = str(assets_dir / "data" / "ultrafeedback_binarized" / "sample16.jsonl")
    prefs = load_rows(DataConfig(dataset_mixer={uf: 1.0}, cache_dir=str(tmp_path / "c")))["train"]
    one_sft = tokenize_sft(ds, tok, max_length=1024, skip_invalid_rows=True, show_progress=False)
    one_dpo = build_dpo_examples(prefs, tok, max_length=512, show_progress=False)
    monkeypatch.setattr(sft, "TOKENIZE_CHUNK", 5)
    monkeypatch.setattr(preference, "TOKENIZE_CHUNK", 5)
    many_sft = tokenize_sft(ds, tok, max_length=1024, skip_invalid_rows=True, show_progress=False)
    many_dpo = build_dpo_examples(prefs, tok, max_length=512, show_progress=False)
    assert many_sft[0] == one_sft[0] and str(many_sft[1]) == str(one_sft[1]) and one_sft[1].skipped.num_skipped == 1
    assert many_dpo[0] == one_dpo[0] and str(many_dpo[1]) == str(one_dpo[1])
    assert many_dpo[0] == build_dpo_examples(prefs.to_list(), tok, max_length=512, show_progress=False)[0]
