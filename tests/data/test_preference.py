"""DPO pairs (all input formats, handbook truncation) and packed DPO batches in both layouts."""

from collections import Counter

import pytest
import torch

from zephyr_fast.data.batch import IGNORE_INDEX, concat_batches, dense_attention_mask, loss_inputs
from zephyr_fast.data.chat import render
from zephyr_fast.data.packing import dpo_batch, pack_dpo, pair_tokens, unpack_dpo
from zephyr_fast.data.preference import build_dpo_examples

SYS = {"role": "system", "content": ""}


def test_completion_byte_exact_after_prompt(tok):
    (e,), rep = build_dpo_examples(
        [{"prompt": "How are you?", "chosen": "I am doing well, thanks!", "rejected": "Bad."}], tok, max_length=100,
        show_progress=False)
    assert tok.decode(e["chosen_ids"]) == "I am doing well, thanks!</s>\n"
    assert tok.decode(e["rejected_ids"]) == "Bad.</s>\n"
    assert tok.decode(e["prompt_ids"]).endswith("How are you?</s>\n<|assistant|>\n")
    full = render([SYS, {"role": "user", "content": "How are you?"},
                   {"role": "assistant", "content": "I am doing well, thanks!"}], tokenizer=tok)
    assert e["prompt_ids"] + e["chosen_ids"] == tok(full)["input_ids"]
    assert e["prompt_ids"].count(tok.bos_token_id) == 1 and e["prompt_ids"][0] == tok.bos_token_id
    assert rep.pairs == 1 and rep.prompt_truncated == rep.completion_truncated == 0


def test_ultrafeedback_rows_give_whole_conversation_ids(tok, uf_rows):
    ex, rep = build_dpo_examples(uf_rows, tok, max_length=100_000, show_progress=False)
    assert rep.pairs == 16 and rep.seam_retokenized == 0
    for e in ex:
        row = uf_rows[e["index"]]
        for side in ("chosen", "rejected"):
            assert e["prompt_ids"] + e[f"{side}_ids"] == tok(render([SYS] + row[side], tokenizer=tok))["input_ids"]


def test_multi_turn_prompt(tok):
    U = lambda c: {"role": "user", "content": c}  # noqa: E731
    A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    row = {"chosen": [U("Hi"), A("Hello!"), U("A colour?"), A("Blue.")],
           "rejected": [U("Hi"), A("Hello!"), U("A colour?"), A("Seven.")]}
    (e,), _ = build_dpo_examples([row], tok, max_length=128, show_progress=False)
    assert tok.decode(e["prompt_ids"]).endswith("<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nA colour?</s>\n<|assistant|>\n")
    assert tok.decode(e["chosen_ids"]) == "Blue.</s>\n" and tok.decode(e["rejected_ids"]) == "Seven.</s>\n"
    assert e["prompt_ids"] + e["rejected_ids"] == tok(render([SYS] + row["rejected"], tokenizer=tok))["input_ids"]


def test_explicit_prompt_message_lists(tok):
    row = {"prompt": [{"role": "user", "content": "Hi"}],
           "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}
    flat = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    full = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
    a, b, c = (build_dpo_examples([r], tok, max_length=64, show_progress=False)[0][0] for r in (row, flat, full))
    assert a == b == c


def _long_pair(tok):
    words = " ".join(f"w{i}" for i in range(200))
    return {"prompt": words, "chosen": "good " * 80, "rejected": "bad " * 40}


def test_truncation_prompt_left_completion_right(tok):
    row = _long_pair(tok)
    (full,), _ = build_dpo_examples([row], tok, max_length=100_000, show_progress=False)
    (e,), rep = build_dpo_examples([row], tok, max_length=128, max_prompt_length=48, show_progress=False)
    # prompt: BOS kept, then its last 47 tokens (the end with "<|assistant|>\n" survives)
    assert e["prompt_ids"] == [tok.bos_token_id] + full["prompt_ids"][-47:]
    assert e["chosen_ids"] == full["chosen_ids"][:80] and e["rejected_ids"] == full["rejected_ids"][:80]
    assert len(e["prompt_ids"]) + len(e["chosen_ids"]) == 128
    assert rep.prompt_truncated == 1 and rep.completion_truncated == 1


def test_no_truncation_when_pair_fits(tok):
    row = {"prompt": " ".join(f"w{i}" for i in range(60)), "chosen": "yes", "rejected": "no"}
    (full,), _ = build_dpo_examples([row], tok, max_length=100_000, show_progress=False)
    (e,), rep = build_dpo_examples([row], tok, max_length=1024, max_prompt_length=16, show_progress=False)
    assert e == full and rep.prompt_truncated == 0  # handbook: the prompt is cut only when the pair is too long


PAIRS = [
    {"index": 7, "prompt_ids": [1, 10, 11], "chosen_ids": [20, 21, 2], "rejected_ids": [30, 2]},
    {"index": 3, "prompt_ids": [1, 12], "chosen_ids": [22, 2], "rejected_ids": [31, 32, 33, 2]},
]


def test_separate_layout_exact():
    b = dpo_batch(PAIRS, "separate")
    b.validate()
    assert b.input_ids.tolist() == [1, 10, 11, 20, 21, 2, 1, 10, 11, 30, 2, 1, 12, 22, 2, 1, 12, 31, 32, 33, 2]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert b.cu_seqlens.tolist() == [0, 6, 11, 15, 21]
    assert b.labels.tolist() == [-100, -100, 20, 21, 2, -100, -100, -100, 30, 2, -100,
                                 -100, 22, 2, -100, -100, 31, 32, 33, 2, -100]
    assert b.segment_ids.tolist() == [0] * 6 + [1] * 5 + [2] * 4 + [3] * 6
    assert b.pair_index.tolist() == [7, 3] and b.num_segments == 4 and b.max_seqlen == 6
    assert b.part_ids is None and b.extra_rows is None


def test_prefix_shared_layout_exact():
    b = dpo_batch(PAIRS, "prefix_shared")
    b.validate()
    assert b.input_ids.tolist() == [1, 10, 11, 20, 21, 2, 30, 2, 1, 12, 22, 2, 31, 32, 33, 2]
    # rejected positions continue from the prompt (3, 4 / 2, 3, ...), not from chosen
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 0, 1, 2, 3, 2, 3, 4, 5]
    assert b.part_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2, 2, 2]
    assert b.cu_seqlens.tolist() == [0, 8, 16]
    assert b.labels.tolist() == [-100, -100, 20, 21, 2, -100, 2, -100, -100, 22, 2, -100, 32, 33, 2, -100]
    assert b.segment_ids.tolist() == [0] * 6 + [1] * 2 + [2] * 4 + [3] * 4
    assert b.extra_rows.tolist() == [2, 9] and b.extra_labels.tolist() == [30, 31]
    assert b.extra_segment_ids.tolist() == [1, 3] and b.pair_index.tolist() == [7, 3]
    mask = dense_attention_mask(b)
    rej0 = 6  # first rejected token of pair 0 sees the prompt and itself, never chosen
    assert mask[rej0].nonzero().flatten().tolist() == [0, 1, 2, 6]
    assert not mask[8:, :8].any()  # no attention across pairs


def _targets(batch):
    """Every prediction as (segment, visible (token, position) context, target): what a causal
    position-aware model sees, so equal multisets mean equal per-segment log-probs."""
    mask = dense_attention_mask(batch)
    rows = torch.arange(batch.num_tokens)
    if batch.extra_rows is not None:
        rows = torch.cat([rows, batch.extra_rows])
    _, labels, segs = loss_inputs(torch.zeros(batch.num_tokens, 1), batch)
    out = Counter()
    for row, lab, seg in zip(rows.tolist(), labels.tolist(), segs.tolist()):
        if lab == IGNORE_INDEX:
            continue
        vis = mask[row].nonzero().flatten()
        ctx = tuple(sorted(zip(batch.position_ids[vis].tolist(), batch.input_ids[vis].tolist())))
        out[(int(batch.pair_index[seg // 2]), seg % 2, ctx, lab)] += 1
    return out


def test_prefix_shared_predicts_exactly_what_separate_predicts(tok, uf_rows):
    ex, _ = build_dpo_examples(uf_rows[:6], tok, max_length=256, max_prompt_length=128, show_progress=False)
    sep = concat_batches(pack_dpo(ex, 1024, layout="separate"))
    pre = concat_batches(pack_dpo(ex, 1024, layout="prefix_shared"))
    t_sep, t_pre = _targets(sep), _targets(pre)
    assert t_sep == t_pre
    assert sum(t_sep.values()) == sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ex)


def test_pack_dpo_keeps_pairs_together(tok, flat_rows):
    ex, rep = build_dpo_examples(flat_rows[:200], tok, max_length=1024, max_prompt_length=512,
                                 skip_invalid_rows=True, show_progress=False)
    for layout in ("separate", "prefix_shared"):
        batches = pack_dpo(ex, 4096, layout=layout, seed=0)
        seen = []
        for b in batches:
            b.validate()
            assert b.num_tokens <= 4096 and b.num_segments == 2 * b.num_pairs
            assert torch.equal(torch.unique(b.segment_ids), torch.arange(b.num_segments))  # both halves present
            seen += b.pair_index.tolist()
        assert sorted(seen) == sorted(e["index"] for e in ex)
        back = sorted((p for b in batches for p in unpack_dpo(b)), key=lambda p: p["index"])
        assert back == sorted(ex, key=lambda p: p["index"])  # round-trip to the unpacked pairs
        assert batches.stats.real_tokens == sum(pair_tokens(e, layout) for e in ex)
        assert batches.stats.efficiency > 0.9


def test_pack_dpo_pair_too_big_names_the_row():
    with pytest.raises(ValueError, match="row 7 needs 11"):
        pack_dpo(PAIRS, 10, layout="separate")
    with pytest.raises(ValueError, match="layout"):
        pack_dpo(PAIRS, 64, layout="padded")


def test_non_prefix_consistent_template_is_refused(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="prefix-consistent"):
        build_dpo_examples([{"prompt": "Hi", "chosen": "a", "rejected": "b"}], t, max_length=64, show_progress=False)
