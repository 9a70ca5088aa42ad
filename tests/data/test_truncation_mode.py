"""``max_completion_length`` (older TRL) and ``truncation_mode: keep_start`` (TRL 1.16): each sequence keeps its first max_length tokens, the prompt
is never cut, and a pair whose prompt alone fills max_length is dropped and counted; without it the
alignment-handbook truncation (prompt from the left to max_prompt_length) stays the default."""

import pytest

from zephyr_fast.data.chat import load_tokenizer
from zephyr_fast.data.loading import DataConfig
from zephyr_fast.data.preference import build_dpo_examples

from ..conftest import TOKENIZER_DIR

LONG = " ".join(f"word{i}" for i in range(120))
MID = " ".join(f"word{i}" for i in range(30))  # a prompt over max_prompt_length=32, under max_length=256
ROWS = [{"prompt": "Say hi. " + MID, "chosen": "Hi there, " + LONG, "rejected": "No. " + LONG},
        {"prompt": "Short?", "chosen": "Yes " + LONG, "rejected": "No " + LONG},
        {"prompt": LONG + " " + LONG + " " + LONG, "chosen": "a", "rejected": "b"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TOKENIZER_DIR))


def test_keep_start_keeps_the_prompt_and_cuts_the_ends(tok):
    full, _ = build_dpo_examples(ROWS[:2], tok, max_length=4096, show_progress=False)
    ex, rep = build_dpo_examples(ROWS, tok, max_length=256, max_prompt_length=32, truncation_mode="keep_start",
                                 show_progress=False)
    assert [e["index"] for e in ex] == [0, 1] and rep.prompt_fills == 1 and "1 dropped" in str(rep)
    for e, f in zip(ex, full):
        assert e["prompt_ids"] == f["prompt_ids"]  # never cut, whatever max_prompt_length says
        for side in ("chosen_ids", "rejected_ids"):
            assert e[side] == f[side][: 256 - len(e["prompt_ids"])]  # the first max_length tokens
            assert len(e["prompt_ids"]) + len(e[side]) <= 256


def test_the_default_is_the_handbooks_truncation(tok):
    ex, rep = build_dpo_examples(ROWS[:1], tok, max_length=256, max_prompt_length=32, show_progress=False)
    assert len(ex[0]["prompt_ids"]) == 32 and rep.prompt_truncated == 1


def test_keep_end_is_refused_with_a_pointer():
    with pytest.raises(ValueError, match="truncation_mode: 'keep_end' is not supported: 'keep_start'"):
        DataConfig(dataset_mixer={"x.jsonl": 1.0}, truncation_mode="keep_end")


def test_max_completion_length_cuts_each_completion_first(tok):
    full, _ = build_dpo_examples(ROWS[1:2], tok, max_length=4096, show_progress=False)
    ex, rep = build_dpo_examples(ROWS[1:2], tok, max_length=4096, max_completion_length=20, show_progress=False)
    assert ex[0]["prompt_ids"] == full[0]["prompt_ids"] and rep.completion_truncated == 1
    assert ex[0]["chosen_ids"] == full[0]["chosen_ids"][:20] and ex[0]["rejected_ids"] == full[0]["rejected_ids"][:20]
    p = len(full[0]["prompt_ids"])  # also cut to max_length afterwards: still one truncated pair
    ex, rep = build_dpo_examples(ROWS[1:2], tok, max_length=p + 10, max_completion_length=20, show_progress=False)
    assert len(ex[0]["chosen_ids"]) == 10 and rep.completion_truncated == 1
