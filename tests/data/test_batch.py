"""PackedBatch.validate catches broken batches; loss_inputs appends the prefix-shared extra rows."""

from dataclasses import replace

import pytest
import torch

from zephyr_fast.data.batch import loss_inputs
from zephyr_fast.data.packing import dpo_batch, sft_batch

PAIRS = [{"index": 4, "prompt_ids": [1, 10], "chosen_ids": [20, 2], "rejected_ids": [30, 31, 2]}]


def test_valid_batches_pass():
    sft_batch([([1, 2, 3], [0, 1, 1])]).validate()
    dpo_batch(PAIRS, "separate").validate()
    dpo_batch(PAIRS, "prefix_shared").validate()


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: replace(b, labels=torch.tensor([-100, 20, 2, -100, 31, 2, 7])), "crosses a sequence boundary"),
    (lambda b: replace(b, cu_seqlens=b.cu_seqlens.long()), "int32"),
    (lambda b: replace(b, max_seqlen=3), "max_seqlen"),
    (lambda b: replace(b, position_ids=b.position_ids + 1), "restart at 0"),
    (lambda b: replace(b, segment_ids=b.segment_ids + 1), "out of"),
    (lambda b: replace(b, pair_index=None), "pair_index"),
    (lambda b: replace(b, extra_rows=torch.tensor([3])), "last prompt token"),
    (lambda b: replace(b, extra_segment_ids=torch.tensor([0])), "2i\\+1"),
    (lambda b: replace(b, part_ids=None), "needs part_ids"),
])
def test_broken_batches_are_rejected(mutate, msg):
    with pytest.raises(ValueError, match=msg):
        mutate(dpo_batch(PAIRS, "prefix_shared")).validate()


def test_loss_inputs_appends_extra_rows():
    b = dpo_batch(PAIRS, "prefix_shared")
    hidden = torch.arange(b.num_tokens, dtype=torch.float32)[:, None].repeat(1, 3)
    rows, labels, segs = loss_inputs(hidden, b)
    assert rows.shape == (b.num_tokens + 1, 3) and torch.equal(rows[-1], hidden[1])  # last prompt row
    assert labels.tolist() == [-100, 20, 2, -100, 31, 2, -100, 30]
    assert segs.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    sep = dpo_batch(PAIRS, "separate")
    assert loss_inputs(hidden, sep)[0] is hidden


@pytest.mark.parametrize("layout", ["separate", "prefix_shared"])
def test_loss_rows_travel_with_the_batch_and_compact_the_loss_inputs(layout):
    """``to()`` records the loss rows on the host; ``compact=True`` keeps exactly those (then the
    prefix-shared extras), so the fused loss sees the same (label, segment) multiset."""
    b = dpo_batch(PAIRS, layout)
    assert b.loss_rows is None
    moved = b.to("cpu")
    assert moved.loss_rows.tolist() == (b.labels != -100).nonzero().squeeze(1).tolist()
    hidden = torch.randn(b.num_tokens, 3)
    full = loss_inputs(hidden, moved)
    rows, labels, segs = loss_inputs(hidden, moved, compact=True)
    keep = full[1] != -100
    assert torch.equal(rows, full[0][keep]) and torch.equal(labels, full[1][keep]) and torch.equal(segs, full[2][keep])
    assert (labels != -100).all()
