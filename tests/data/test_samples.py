"""The bundled real sample files load through load_rows and produce valid packed batches."""

import pytest

from zephyr_fast.data.chat import render
from zephyr_fast.data.loading import DataConfig, load_rows
from zephyr_fast.data.packing import pack_dpo, pack_sft
from zephyr_fast.data.preference import build_dpo_examples
from zephyr_fast.data.sft import tokenize_sft


def _rows(path, tmp_path, **kw):
    return load_rows(DataConfig(dataset_mixer={str(path): 1.0}, cache_dir=str(tmp_path / "cache"), **kw))["train"]


def test_ultrachat_sample_to_sft_batches(assets_dir, tmp_path, tok):
    rows = _rows(assets_dir / "data" / "ultrachat_200k" / "sample16.jsonl", tmp_path)
    assert len(rows) == 16
    ex, rep = tokenize_sft(rows, tok, max_length=2048, show_progress=False)
    batches = pack_sft(ex, 4096, seed=0)
    for b in batches:
        b.validate()
        assert b.num_tokens <= 4096
    assert rep.examples == 16 and batches.stats.real_tokens == rep.tokens


@pytest.mark.parametrize("layout", ["separate", "prefix_shared"])
def test_ultrafeedback_samples_to_dpo_batches(assets_dir, tmp_path, tok, layout):
    uf = _rows(assets_dir / "data" / "ultrafeedback_binarized" / "sample16.jsonl", tmp_path)
    flat = _rows(assets_dir / "data" / "ultrafeedback_binarized" / "flat1k.jsonl", tmp_path)
    assert len(uf) == 16 and len(flat) == 1000
    for rows in (uf, flat):
        # flat1k has one pair whose chosen and rejected texts are identical: kept (as TRL) and counted
        ex, rep = build_dpo_examples(rows, tok, max_length=1024, max_prompt_length=512, show_progress=False)
        assert rep.pairs == len(rows) and rep.skipped.num_skipped == 0
        batches = pack_dpo(ex, 4096, layout=layout, seed=0)
        for b in batches:
            b.validate()
        assert sum(b.num_pairs for b in batches) == rep.pairs
    assert rep.identical == 1 and "1 with identical chosen and rejected (kept" in str(rep)
    same = [e for e in ex if e["chosen_ids"] == e["rejected_ids"]]
    assert len(same) == 1 and flat[same[0]["index"]]["chosen"] == flat[same[0]["index"]]["rejected"]


def test_mt_bench_questions_render_generation_prompts(assets_dir, tmp_path, tok):
    rows = _rows(assets_dir / "data" / "mt_bench" / "question.jsonl", tmp_path)
    assert len(rows) == 80 and all(len(t) == 2 for t in rows["turns"])
    text = render([{"role": "user", "content": rows[0]["turns"][0]}], add_generation_prompt=True, tokenizer=tok)
    assert text == f"<|user|>\n{rows[0]['turns'][0]}</s>\n<|assistant|>\n"
