"""Bad input: each case gets a message naming dataset, row and field; skip_invalid_rows counts them."""

import pytest

from zephyr_fast.data.preference import build_dpo_examples
from zephyr_fast.data.sft import tokenize_sft
from zephyr_fast.data.validate import DataValidationError

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
GOOD_SFT = {"messages": [U("Hi"), A("Hello")]}
GOOD_DPO = {"chosen": [U("Hi"), A("Hello")], "rejected": [U("Hi"), A("Go away")]}

SFT_CASES = [
    ({"messages": "Hi there"}, "field 'messages': expected a list of messages, got str"),
    ({"messages": None}, "field 'messages': missing"),
    ({"messages": []}, "field 'messages': empty conversation"),
    ({"messages": [U("Hi"), A("")]}, r"field 'messages\[1\]\.content': empty content"),
    ({"messages": [U("Hi"), A(42)]}, r"field 'messages\[1\]\.content': content must be a string, got int"),
    ({"messages": [A("Hello"), U("Hi")]}, r"field 'messages\[0\]\.role': roles out of order: expected 'user', got 'assistant'"),
    ({"messages": [U("Hi"), U("Hi again"), A("x")]}, r"field 'messages\[1\]\.role': roles out of order"),
    ({"messages": [U("Hi"), {"role": "bot", "content": "x"}]}, r"field 'messages\[1\]\.role': unknown role 'bot'"),
    ({"messages": [U("Hi"), {"content": "x"}]}, r"field 'messages\[1\]': expected a dict with 'role' and 'content'"),
    ({"messages": [U("Hi")]}, "field 'messages': no assistant turn"),
    ({"messages": [U("x " * 400), A("y")]}, "field 'messages': no assistant token within max_length=64"),
]


@pytest.mark.parametrize("bad,msg", SFT_CASES, ids=[m.split(":")[0][:30] + str(i) for i, (_, m) in enumerate(SFT_CASES)])
def test_sft_bad_row_is_named(tok, bad, msg):
    rows = [GOOD_SFT, bad, GOOD_SFT]
    with pytest.raises(DataValidationError, match=r"ultrachat_local: row 1, " + msg):
        tokenize_sft(rows, tok, max_length=64, dataset_name="ultrachat_local", show_progress=False)
    ex, rep = tokenize_sft(rows, tok, max_length=64, skip_invalid_rows=True, show_progress=False)
    assert [e["index"] for e in ex] == [0, 2] and rep.skipped.num_skipped == 1 and "1 rows skipped" in str(rep)


DPO_CASES = [
    ({"chosen": [U("Hi"), A("Hello")], "rejected": [U("Hey"), A("Go away")]},
     r"field 'rejected\[0\]': chosen and rejected have different prompts"),
    ({"chosen": [U("Hi"), A("Hello")], "rejected": [U("Hi")]}, r"field 'rejected\[0\]\.role': last turn must be 'assistant'"),
    ({"prompt": "Hi", "chosen": 3, "rejected": "x"}, "field 'chosen': expected a string, a one-message assistant list or a whole conversation, got int"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt': empty string"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "field 'prompt': missing"),
    ({"prompt": "Hi", "chosen": [{"role": "tool", "content": "x"}], "rejected": "b"},
     r"field 'chosen\[0\]\.role': unknown role 'tool' \(expected one of \('system', 'user', 'assistant'\)\); "
     r"a completion is an 'assistant' turn"),
    ({"prompt": "Hi", "chosen": [U("x")], "rejected": "b"}, r"field 'chosen\[0\]\.role': last turn must be 'assistant'"),
    ({"prompt": "x " * 400, "chosen": "a", "rejected": "b"}, "field 'prompt': the prompt alone has 4.. tokens >= max_length=64"),
]


@pytest.mark.parametrize("bad,msg", DPO_CASES, ids=[str(i) for i in range(len(DPO_CASES))])
def test_dpo_bad_row_is_named(tok, bad, msg):
    rows = [GOOD_DPO, GOOD_DPO, bad]
    with pytest.raises(DataValidationError, match=r"uf_local: row 2, " + msg):
        build_dpo_examples(rows, tok, max_length=64, dataset_name="uf_local", show_progress=False)
    ex, rep = build_dpo_examples(rows, tok, max_length=64, skip_invalid_rows=True, show_progress=False)
    assert [e["index"] for e in ex] == [0, 1] and rep.skipped.num_skipped == 1


def test_missing_columns_fail_before_rows(tok):
    with pytest.raises(DataValidationError, match="sftset: all rows, field 'messages': column missing"):
        tokenize_sft([{"text": "x"}], tok, max_length=64, dataset_name="sftset", show_progress=False)
    with pytest.raises(DataValidationError, match="prefs: all rows, field 'rejected': column missing"):
        build_dpo_examples([{"chosen": "x"}], tok, max_length=64, dataset_name="prefs", show_progress=False)


def test_all_errors_are_collected_in_one_summary(tok):
    rows = [{"messages": [A("x")]}, GOOD_SFT, {"messages": [U("a"), A("")]}, {"messages": 5}]
    with pytest.raises(DataValidationError) as info:
        tokenize_sft(rows, tok, max_length=64, show_progress=False)
    text = str(info.value)
    assert text.startswith("3 of 4 rows are invalid; 3 problems (empty: 1, role_order: 1, wrong_type: 1)")
    assert "row 0" in text and "row 2" in text and "row 3" in text and "skip_invalid_rows" in text
    assert len(info.value.errors) == 3
    _, rep = tokenize_sft(rows, tok, max_length=64, skip_invalid_rows=True, show_progress=False)
    assert rep.skipped.num_skipped == 3 and dict(rep.skipped.by_kind) == {"empty": 1, "role_order": 1, "wrong_type": 1}
