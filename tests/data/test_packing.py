"""Best-fit-decreasing bins and SFT packing: capacity, determinism, round-trip, no cross-sequence targets."""

import random
from collections import Counter

import pytest
import torch

from zephyr_fast.data.batch import IGNORE_INDEX, concat_batches
from zephyr_fast.data.packing import best_fit_decreasing, pack_sft, sft_batch, unpack_sft
from zephyr_fast.data.sft import tokenize_sft


def _reference_bfd(lengths, cap):
    """Textbook BFD: longest first, into the bin with the least room that still fits."""
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))
            bins[b].append(i)
            free[b] -= lengths[i]
        else:
            bins.append([i])
            free.append(cap - lengths[i])
    return bins


def _synthetic_examples(n, seed=0, lo=3, hi=400):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        L = rng.randint(lo, hi)
        out.append({"index": k, "input_ids": [rng.randrange(3, 32000) for _ in range(L)],
                    "loss_mask": [int(rng.random() < 0.6) for _ in range(L)]})
    return out


def test_bfd_matches_textbook_bins():
    lengths = random.Random(1).sample(range(1, 1000), 300)  # distinct: no tie-breaking involved
    got = best_fit_decreasing(lengths, 1024, seed=3)
    assert sorted(map(sorted, got)) == sorted(map(sorted, _reference_bfd(lengths, 1024)))


def test_bfd_capacity_coverage_determinism():
    lengths = [random.Random(i).randint(1, 500) for i in range(500)]
    a = best_fit_decreasing(lengths, 512, seed=7)
    assert all(sum(lengths[i] for i in b) <= 512 for b in a)
    assert sorted(i for b in a for i in b) == list(range(500))
    assert a == best_fit_decreasing(lengths, 512, seed=7)
    assert a != best_fit_decreasing(lengths, 512, seed=8)  # bin order is shuffled by seed
    # FFD/BFD guarantee: at most 11/9 OPT + 6/9 bins, OPT >= total / capacity
    assert len(a) <= 11 / 9 * (sum(lengths) / 512) + 1


def test_bfd_num_shards_gives_a_multiple_and_keeps_everything():
    lengths = [random.Random(i).randint(1, 300) for i in range(101)]
    bins = best_fit_decreasing(lengths, 1024, seed=0, num_shards=8)
    assert len(bins) % 8 == 0
    assert sorted(i for b in bins for i in b) == list(range(101))
    with pytest.raises(ValueError, match="num_shards"):
        best_fit_decreasing([10, 10], 1024, num_shards=4)


def test_sft_batch_labels_are_shifted_within_sequences():
    b = sft_batch([([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1]), ([10, 11, 12, 13], [1, 0, 1, 1])])
    b.validate()
    assert b.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 9] and b.cu_seqlens.dtype == torch.int32
    assert b.labels.tolist() == [6, 7, -100, 9, -100, -100, 12, 13, -100]
    assert b.segment_ids.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert b.max_seqlen == 4 and b.num_segments == 3


def test_pack_sft_roundtrip_and_no_cross_sequence_target():
    ex = _synthetic_examples(200)
    batches = pack_sft(ex, 1000, seed=1)
    assert batches.stats.real_tokens == sum(len(e["input_ids"]) for e in ex)
    assert all(b.num_tokens <= 1000 for b in batches)
    got = Counter()
    for b in batches:
        b.validate()
        ends = set((b.cu_seqlens[1:] - 1).tolist())
        for t, lab in enumerate(b.labels.tolist()):
            if lab != IGNORE_INDEX:
                assert t not in ends and lab == int(b.input_ids[t + 1])
                assert int(b.segment_ids[t]) == int(b.segment_ids[t + 1])
        for ids, mask in unpack_sft(b):
            got[(tuple(ids), tuple(mask))] += 1
    want = Counter((tuple(e["input_ids"]), tuple([0] + e["loss_mask"][1:])) for e in ex)
    assert got == want
    assert 0.9 < batches.stats.efficiency <= 1.0 and "efficiency" in str(batches.stats)


def test_pack_sft_overlong_truncate_or_split():
    ex = [{"index": 0, "input_ids": list(range(3, 253)), "loss_mask": [1] * 250},
          {"index": 1, "input_ids": list(range(3, 53)), "loss_mask": [1] * 50}]
    t = pack_sft(ex, 100, overlong="truncate")
    assert t.stats.truncated == 1 and t.stats.truncated_tokens == 150 and t.stats.real_tokens == 150
    s = pack_sft(ex, 100, overlong="split")
    pieces = sorted(tuple(ids) for b in s for ids, _ in unpack_sft(b))
    assert s.stats.split_pieces == 3 and s.stats.real_tokens == 300
    assert pieces == [tuple(range(3, 53)), tuple(range(3, 103)), tuple(range(103, 203)), tuple(range(203, 253))]
    with pytest.raises(ValueError, match="overlong"):
        pack_sft(ex, 100, overlong="drop")


def test_pack_sft_real_sample(tok, uc_rows):
    ex, _ = tokenize_sft(uc_rows, tok, max_length=2048, show_progress=False)
    batches = pack_sft(ex, 4096, seed=0)
    for b in batches:
        b.validate()
    assert sum(b.num_tokens for b in batches) == sum(len(e["input_ids"]) for e in ex)
    again = pack_sft(ex, 4096, seed=0)
    assert len(again) == len(batches)
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels) for x, y in zip(batches, again))


def test_concat_batches_renumbers():
    ex = _synthetic_examples(20, hi=60)
    batches = pack_sft(ex, 128)
    cat = concat_batches(batches)
    cat.validate()
    assert cat.num_segments == sum(b.num_segments for b in batches)
    assert sorted(map(tuple, (ids for ids, _ in unpack_sft(cat)))) == sorted(tuple(e["input_ids"]) for e in ex)
    assert torch.equal(torch.unique_consecutive(cat.segment_ids), torch.arange(cat.num_segments))
