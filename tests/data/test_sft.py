"""SFT tokenisation: ids == tokenise(render(conversation)); labels exactly on assistant turns."""

import copy

import pytest

from zephyr_fast.data.chat import ZEPHYR_CHAT_TEMPLATE, render
from zephyr_fast.data.sft import tokenize_sft

MULTI = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]


def _targets(tok, ex):
    return tok.decode([i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m], skip_special_tokens=False)


def test_ids_are_the_tokenised_rendering(tok, uc_rows):
    ex, rep = tokenize_sft(uc_rows, tok, max_length=100_000, show_progress=False)
    assert rep.examples == 16 and rep.truncated == 0
    for e in ex:
        msgs = [{"role": "system", "content": ""}] + uc_rows[e["index"]]["messages"]
        assert e["input_ids"] == tok(render(msgs, tokenizer=tok))["input_ids"]


def test_assistant_only_labels_multi_turn(tok):
    (ex,), _ = tokenize_sft([{"messages": MULTI}], tok, max_length=512, show_progress=False)
    # both assistant turns, each with its EOS and the template's newline, nothing else
    assert _targets(tok, ex) == "Hello! How can I help?</s>\nBlue.</s>\n"
    eos_pos = [t for t, i in enumerate(ex["input_ids"]) if i == tok.eos_token_id]
    trained_eos = [t for t in eos_pos if ex["loss_mask"][t]]
    assert len(eos_pos) == 5 and len(trained_eos) == 2  # system, user, assistant, user, assistant


def test_all_tokens_mode(tok):
    (ex,), rep = tokenize_sft([{"messages": MULTI}], tok, max_length=512, assistant_only_loss=False,
                              add_empty_system=False, show_progress=False)
    assert all(ex["loss_mask"]) and rep.target_tokens == len(ex["input_ids"]) - 1


def test_truncation_keeps_start_and_counts(tok, uc_rows):
    full, _ = tokenize_sft(uc_rows, tok, max_length=100_000, show_progress=False)
    ex, rep = tokenize_sft(uc_rows, tok, max_length=1400, show_progress=False)
    n_long = sum(len(e["input_ids"]) > 1400 for e in full)
    assert rep.truncated == n_long > 0
    assert rep.truncated_tokens == sum(max(0, len(e["input_ids"]) - 1400) for e in full)
    for a, b in zip(full, ex):
        assert b["input_ids"] == a["input_ids"][:1400] and b["loss_mask"] == a["loss_mask"][:1400]
    assert "truncated" in str(rep)


def test_generic_template_path_matches_zephyr_fast_path(tok, uc_rows):
    # the same template with an extra Jinja comment is not string-equal, so it takes the generic
    # prefix-rendering path; both must give identical ids and masks
    t = copy.deepcopy(tok)
    t.chat_template = "{# same #}" + ZEPHYR_CHAT_TEMPLATE
    fast, _ = tokenize_sft(uc_rows[:4], tok, max_length=4096, show_progress=False)
    slow, _ = tokenize_sft(uc_rows[:4], t, max_length=4096, show_progress=False)
    assert fast == slow


def test_non_prefix_consistent_template_is_refused(tok):
    t = copy.deepcopy(tok)
    t.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="prefix-consistent"):
        tokenize_sft([{"messages": MULTI}], t, max_length=512, show_progress=False)


def test_assistant_only_loss_needs_a_fast_tokenizer(tok):
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast"):
        tokenize_sft([{"messages": MULTI}], Slow(), max_length=64, show_progress=False)
