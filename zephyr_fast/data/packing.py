"""Padding-free packing of SFT examples and DPO pairs into :class:`PackedBatch` micro-batches.

Each bin of ``max_tokens`` tokens is one micro-batch (the token budget, not a row count, sizes
it).  Bins are filled by best-fit-decreasing — longest item first, into the fullest bin that still
has room — which wastes a few percent of capacity at most on real length distributions
(docs/DATA.md).  Ties in length are broken by a seeded permutation and the finished bins are
shuffled by the same seed, so the result is a deterministic function of ``(examples, max_tokens,
seed)``.  A DPO pair is never split: its chosen and rejected sequences land in the same bin.

Examples held compactly (:mod:`zephyr_fast.data.examples`, what the tokenisers return) are packed
lazily: the bins, their :class:`PackingStats` and each bin's counts (:meth:`LazyPackedBatches.counts`)
come from the examples' lengths and loss-mask bits alone, and a bin's :class:`PackedBatch` is built
when it is asked for -- the same batch the eager packing of the same examples as dicts gives.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from .batch import IGNORE_INDEX, PackedBatch
from .examples import DPOExamples, SFTExamples


@dataclass
class PackingStats:
    """Occupancy of the packed bins.  ``efficiency = real_tokens / (num_batches * max_tokens)``."""

    max_tokens: int
    num_batches: int = 0
    num_examples: int = 0  # SFT examples or DPO pairs
    num_sequences: int = 0  # attention segments
    real_tokens: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    split_pieces: int = 0

    @property
    def capacity(self) -> int:
        return self.num_batches * self.max_tokens

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.capacity if self.capacity else 0.0

    def __str__(self) -> str:
        extra = ""
        if self.truncated:
            extra += f"; {self.truncated} truncated to the bin ({self.truncated_tokens} tokens cut)"
        if self.split_pieces:
            extra += f"; over-long sequences split into {self.split_pieces} pieces"
        return (
            f"packed {self.num_examples} examples ({self.num_sequences} sequences, {self.real_tokens} tokens) "
            f"into {self.num_batches} micro-batches of <= {self.max_tokens} tokens: "
            f"efficiency {100 * self.efficiency:.1f}%{extra}"
        )


class PackedBatches(list):
    """``list[PackedBatch]`` that also carries the :class:`PackingStats` of how it was packed."""

    def __init__(self, batches=(), stats: Optional[PackingStats] = None):
        super().__init__(batches)
        self.stats = stats


# counts of one micro-batch, as zephyr_fast.training.plan.micro_stats reads them off its PackedBatch
COUNT_FIELDS = ("tokens", "targets", "pairs", "attn_sq", "examples")


class LazyPackedBatches(Sequence):
    """The bins of compactly held examples: ``len``, :attr:`stats`, :meth:`counts` without building
    anything; ``batches[k]`` builds bin ``k``'s :class:`PackedBatch` (``list(batches)``: all of them)."""

    def __init__(self, bins: list, build, counts: dict, stats: PackingStats):
        self.bins, self._build, self._counts, self.stats = bins, build, counts, stats

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self._build(self.bins[j]) for j in range(*k.indices(len(self)))]
        return self._build(self.bins[k])

    def counts(self, k: int) -> dict:
        """``{tokens, targets, pairs, attn_sq, examples}`` of bin ``k`` (ints), as its batch's micro-stats."""
        return {f: int(self._counts[f][k]) for f in COUNT_FIELDS}


def _bin_sums(bins: list, values: dict) -> dict:
    """Per-bin sums of per-unit ``values`` (``{name: (units,) int64}``), int64 throughout."""
    unit = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=sum(len(b) for b in bins))
    owner = np.repeat(np.arange(len(bins), dtype=np.int64), [len(b) for b in bins])
    out = {}
    for name, v in values.items():
        acc = np.zeros(len(bins), dtype=np.int64)
        np.add.at(acc, owner, np.asarray(v, dtype=np.int64)[unit])
        out[name] = acc
    return out


def example_counts(examples, layout: str = "separate") -> dict:
    """Per-example ``{tokens, targets, pairs, attn_sq, examples}`` arrays of examples collated one per
    segment (``batch_by: examples``): what :func:`sft_batch` / :func:`dpo_batch` of a group holds is the
    sum over its examples. ``examples``: an :class:`SFTExamples` / :class:`DPOExamples` or dicts."""
    if isinstance(examples, SFTExamples):
        n, tokens, targets = len(examples), examples.lengths.astype(np.int64), examples.targets
        return {"tokens": tokens, "targets": targets, "pairs": np.zeros(n, np.int64), "attn_sq": tokens * tokens,
                "examples": np.ones(n, np.int64)}
    if isinstance(examples, DPOExamples):
        p, c, r = (x.astype(np.int64) for x in (examples.prompt_lengths, examples.chosen_lengths,
                                                examples.rejected_lengths))
        return _pair_counts(p, c, r, layout)
    if examples and "prompt_ids" in examples[0]:
        p, c, r = (np.array([len(ex[f]) for ex in examples], dtype=np.int64)
                   for f in ("prompt_ids", "chosen_ids", "rejected_ids"))
        return _pair_counts(p, c, r, layout)
    lens = np.array([len(ex["input_ids"]) for ex in examples], dtype=np.int64)
    targets = np.array([int(np.sum(np.asarray(ex["loss_mask"])[1:])) for ex in examples], dtype=np.int64)
    return {"tokens": lens, "targets": targets, "pairs": np.zeros(len(lens), np.int64), "attn_sq": lens * lens,
            "examples": np.ones(len(lens), np.int64)}


def _pair_counts(p: np.ndarray, c: np.ndarray, r: np.ndarray, layout: str) -> dict:
    """What one pair puts into a micro-batch (``dpo_batch``): its tokens, its ``c + r`` targets (the
    prefix-shared layout's first rejected target is its extra row), one pair, its attention segments."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    separate = layout == "separate"
    tokens = 2 * p + c + r if separate else p + c + r
    attn_sq = (p + c) ** 2 + (p + r) ** 2 if separate else (p + c + r) ** 2
    ones = np.ones(len(p), np.int64)
    return {"tokens": tokens, "targets": c + r, "pairs": ones, "attn_sq": attn_sq, "examples": ones}


def best_fit_decreasing(lengths: Sequence[int], capacity: int, *, seed: int = 0, num_shards: int = 1) -> list:
    """Bin-pack item indices; every bin's total length is ``<= capacity``.

    Args:
        lengths: item sizes, each ``<= capacity``.
        num_shards: the number of bins is made a multiple of this (data-parallel ranks must run the
            same number of micro-batches under ZeRO-3) by moving single items out of multi-item bins.
    Returns:
        list of bins, each a list of item indices, in a seeded-shuffled order.
    """
    rng = random.Random(seed)
    tiebreak = list(range(len(lengths)))
    rng.shuffle(tiebreak)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tiebreak[i]))
    bins: list = []
    free: list = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has {n} tokens > bin capacity {capacity}")
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            rem, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (rem - n, b))
    short = (-len(bins)) % num_shards
    if short:
        donors = sorted((b for b in bins if len(b) > 1), key=len, reverse=True)
        if sum(len(b) - 1 for b in donors) < short:
            raise ValueError(f"only {len(lengths)} items: cannot fill a multiple of num_shards={num_shards} micro-batches")
        k = 0
        while short:
            donor = donors[k % len(donors)]
            if len(donor) > 1:
                bins.append([donor.pop()])
                short -= 1
            k += 1
    rng.shuffle(bins)
    return bins


# --- SFT -----------------------------------------------------------------------------------------


def _shifted_labels(ids: np.ndarray, mask: np.ndarray, lens: Sequence[int]) -> np.ndarray:
    """labels[t] = ids[t+1] where token t+1 is a target, -100 elsewhere and at each sequence end."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(mask[1:] != 0, ids[1:], IGNORE_INDEX)
    ends = np.cumsum(lens) - 1
    labels[ends] = IGNORE_INDEX
    return labels


def _positions(lens: Sequence[int]) -> np.ndarray:
    starts = np.repeat(np.cumsum([0] + list(lens[:-1])), lens)
    return np.arange(int(sum(lens)), dtype=np.int64) - starts


def _i64(chunks) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(chunks).astype(np.int64))


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)


def sft_batch(pieces: Sequence[tuple]) -> PackedBatch:
    """One SFT micro-batch from ``[(input_ids, loss_mask), ...]`` (segment ``i`` = piece ``i``)."""
    lens = [len(p[0]) for p in pieces]
    ids = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in pieces])
    mask = np.concatenate([np.asarray(p[1], dtype=np.int8) for p in pieces])
    # the first token of a piece is never a target: the previous position belongs to another sequence
    return PackedBatch(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(_positions(lens)),
        cu_seqlens=_cu(lens),
        max_seqlen=max(lens),
        labels=torch.from_numpy(_shifted_labels(ids, mask, lens)),
        segment_ids=torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)),
        num_segments=len(lens),
        layout="sft",
    )


def pack_sft(examples: Sequence[dict], max_tokens: int, *, seed: int = 0, overlong: str = "truncate",
             num_shards: int = 1) -> PackedBatches:
    """Pack :func:`tokenize_sft` examples into micro-batches of at most ``max_tokens`` tokens.

    Args:
        examples: ``{"input_ids": list[int], "loss_mask": list[int], ...}``.
        overlong: a sequence longer than a bin is cut to its first ``max_tokens`` tokens
            (``"truncate"``) or cut into consecutive pieces that are packed independently
            (``"split"``; the last token of a piece then predicts nothing).
        num_shards: make the number of micro-batches a multiple of the data-parallel world size.
    Returns:
        :class:`PackedBatches` (a list of ``layout="sft"`` :class:`PackedBatch`) with ``.stats``;
        for :class:`SFTExamples` the same bins as a :class:`LazyPackedBatches`.
    """
    if overlong not in ("truncate", "split"):
        raise ValueError(f"overlong must be 'truncate' or 'split', got {overlong!r}")
    if isinstance(examples, SFTExamples):
        return _pack_sft_lazy(examples, max_tokens, seed=seed, overlong=overlong, num_shards=num_shards)
    stats = PackingStats(max_tokens=max_tokens, num_examples=len(examples))
    pieces = []
    for ex in examples:
        ids, mask = ex["input_ids"], ex["loss_mask"]
        if len(ids) <= max_tokens:
            pieces.append((ids, mask))
        elif overlong == "truncate":
            stats.truncated += 1
            stats.truncated_tokens += len(ids) - max_tokens
            pieces.append((ids[:max_tokens], mask[:max_tokens]))
        else:
            chunks = [(ids[a : a + max_tokens], mask[a : a + max_tokens]) for a in range(0, len(ids), max_tokens)]
            stats.split_pieces += len(chunks)
            pieces += chunks
    pieces = [p for p in pieces if len(p[0]) > 0]
    bins = best_fit_decreasing([len(p[0]) for p in pieces], max_tokens, seed=seed, num_shards=num_shards)
    out = PackedBatches([sft_batch([pieces[i] for i in b]) for b in bins], stats)
    stats.num_batches, stats.num_sequences = len(out), len(pieces)
    stats.real_tokens = sum(len(p[0]) for p in pieces)
    return out


def _pack_sft_lazy(examples: SFTExamples, max_tokens: int, *, seed: int, overlong: str,
                   num_shards: int) -> LazyPackedBatches:
    """:func:`pack_sft` of compact examples: the same pieces and bins from the lengths alone; a piece is
    ``(example, start, end)`` and a bin's batch is built from the token ids when asked for."""
    n = len(examples)
    stats = PackingStats(max_tokens=max_tokens, num_examples=n)
    lens = examples.lengths.astype(np.int64)
    over = lens > max_tokens
    if overlong == "truncate":
        counts = np.ones(n, dtype=np.int64)
        stats.truncated = int(over.sum())
        stats.truncated_tokens = int((lens[over] - max_tokens).sum())
    else:
        counts = np.where(over, -(-lens // max_tokens), 1)
        stats.split_pieces = int(counts[over].sum())
    piece_ex = np.repeat(np.arange(n, dtype=np.int64), counts)
    first = np.cumsum(counts) - counts  # each example's first piece
    start = (np.arange(len(piece_ex), dtype=np.int64) - np.repeat(first, counts)) * max_tokens
    end = np.minimum(start + max_tokens, lens[piece_ex])
    keep = end > start
    piece_ex, start, end = piece_ex[keep], start[keep], end[keep]
    plen = end - start
    targets = examples.targets[piece_ex].astype(np.int64)
    for k in np.flatnonzero((start > 0) | (end < lens[piece_ex])):  # a cut piece: count its own targets
        targets[k] = int(examples.loss_mask(int(piece_ex[k]))[start[k] + 1:end[k]].sum())
    bins = best_fit_decreasing(plen.tolist(), max_tokens, seed=seed, num_shards=num_shards)
    stats.num_batches, stats.num_sequences, stats.real_tokens = len(bins), len(plen), int(plen.sum())
    counts_by_bin = _bin_sums(bins, {"tokens": plen, "targets": targets, "attn_sq": plen * plen,
                                     "examples": np.ones(len(plen), np.int64)})
    counts_by_bin["pairs"] = np.zeros(len(bins), np.int64)

    def build(b: list) -> PackedBatch:
        pieces = []
        for k in b:
            e, a, z = int(piece_ex[k]), int(start[k]), int(end[k])
            pieces.append((examples.ids.get(e)[a:z], examples.loss_mask(e)[a:z]))
        return sft_batch(pieces)

    return LazyPackedBatches(bins, build, counts_by_bin, stats)


def unpack_sft(batch: PackedBatch) -> list:
    """Inverse of :func:`sft_batch` for tests/debugging: ``[(input_ids, target_mask), ...]``,
    ``target_mask[0]`` is always 0 (position 0 of a sequence is never predicted)."""
    out = []
    cu = batch.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        ids = batch.input_ids[a:b].tolist()
        mask = [0] + [int(x != IGNORE_INDEX) for x in batch.labels[a : b - 1].tolist()]
        out.append((ids, mask))
    return out


# --- DPO -----------------------------------------------------------------------------------------

LAYOUTS = ("separate", "prefix_shared")


def pair_tokens(ex: dict, layout: str) -> int:
    """Tokens a pair occupies in a packed batch."""
    p, c, r = len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"])
    return (2 * p + c + r) if layout == "separate" else (p + c + r)


def dpo_batch(pairs: Sequence[dict], layout: str = "separate") -> PackedBatch:
    """One DPO micro-batch; pair ``j`` of ``pairs`` gets segments ``2j`` (chosen), ``2j+1`` (rejected).

    ``separate``: sequences ``prompt+chosen``, ``prompt+rejected`` (two attention segments).
    ``prefix_shared``: one attention segment ``[prompt, chosen, rejected]`` per pair; rejected
    positions continue from the prompt; ``part_ids`` 0/1/2; the first rejected token is the extra
    prediction from the last prompt row (``extra_rows/extra_labels/extra_segment_ids``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ids, pos, lab, seg, parts, lens = [], [], [], [], [], []
    extra_rows, extra_labels, extra_seg = [], [], []
    offset = 0
    for j, ex in enumerate(pairs):
        p = np.asarray(ex["prompt_ids"], dtype=np.int64)
        c = np.asarray(ex["chosen_ids"], dtype=np.int64)
        r = np.asarray(ex["rejected_ids"], dtype=np.int64)
        if len(p) == 0 or len(c) == 0 or len(r) == 0:
            raise ValueError(f"DPO pair {ex.get('index', j)}: prompt, chosen and rejected must be non-empty")
        P = len(p)
        if layout == "separate":
            for s, comp in ((2 * j, c), (2 * j + 1, r)):
                seq = np.concatenate([p, comp])
                lab_s = np.full(len(seq), IGNORE_INDEX, dtype=np.int64)
                lab_s[P - 1 : -1] = comp  # position t predicts seq[t+1]
                ids.append(seq)
                pos.append(np.arange(len(seq)))
                lab.append(lab_s)
                seg.append(np.full(len(seq), s))
                lens.append(len(seq))
        else:
            seq = np.concatenate([p, c, r])
            C, R = len(c), len(r)
            lab_s = np.full(len(seq), IGNORE_INDEX, dtype=np.int64)
            lab_s[P - 1 : P + C - 1] = c
            lab_s[P + C : P + C + R - 1] = r[1:]
            ids.append(seq)
            lab.append(lab_s)
            lens.append(len(seq))
            pos.append(np.concatenate([np.arange(P), P + np.arange(C), P + np.arange(R)]))
            seg.append(np.concatenate([np.full(P + C, 2 * j), np.full(R, 2 * j + 1)]))
            parts.append(np.concatenate([np.zeros(P), np.ones(C), np.full(R, 2)]).astype(np.int8))
            # the last prompt row predicts chosen[0] in-line and rejected[0] as an extra row
            extra_rows.append(offset + P - 1)
            extra_labels.append(int(r[0]))
            extra_seg.append(2 * j + 1)
            offset += len(seq)
    batch = PackedBatch(
        input_ids=_i64(ids),
        position_ids=_i64(pos),
        cu_seqlens=_cu(lens),
        max_seqlen=max(lens),
        labels=_i64(lab),
        segment_ids=_i64(seg),
        num_segments=2 * len(pairs),
        layout=layout,
        pair_index=torch.tensor([int(ex["index"]) for ex in pairs], dtype=torch.int64),
    )
    if layout == "prefix_shared":
        batch.part_ids = torch.from_numpy(np.concatenate(parts))
        batch.extra_rows = torch.tensor(extra_rows, dtype=torch.int64)
        batch.extra_labels = torch.tensor(extra_labels, dtype=torch.int64)
        batch.extra_segment_ids = torch.tensor(extra_seg, dtype=torch.int64)
    return batch


def unpack_dpo(batch: PackedBatch) -> list:
    """Inverse of :func:`dpo_batch` for tests/debugging: the pairs as ``build_dpo_examples`` made them."""
    cu = batch.cu_seqlens.tolist()
    ids, labels = batch.input_ids.tolist(), batch.labels.tolist()
    out = []
    for j, index in enumerate(batch.pair_index.tolist()):
        if batch.layout == "prefix_shared":
            a, b = cu[j], cu[j + 1]
            parts = batch.part_ids[a:b].tolist()
            seq = ids[a:b]
            out.append({"index": index, "prompt_ids": [t for t, q in zip(seq, parts) if q == 0],
                        "chosen_ids": [t for t, q in zip(seq, parts) if q == 1],
                        "rejected_ids": [t for t, q in zip(seq, parts) if q == 2]})
        else:
            (a0, b0), (a1, b1) = (cu[2 * j], cu[2 * j + 1]), (cu[2 * j + 1], cu[2 * j + 2])
            # the first target is predicted from the last prompt position
            p = next(t for t in range(a0, b0) if labels[t] != IGNORE_INDEX) - a0 + 1
            out.append({"index": index, "prompt_ids": ids[a0 : a0 + p], "chosen_ids": ids[a0 + p : b0],
                        "rejected_ids": ids[a1 + p : b1]})
    return out


def pack_dpo(examples: Sequence[dict], max_tokens: int, *, layout: str = "separate", seed: int = 0,
             num_shards: int = 1) -> PackedBatches:
    """Pack :func:`build_dpo_examples` pairs into micro-batches of at most ``max_tokens`` tokens.

    A pair is the packing unit (``2p+c+r`` tokens separate, ``p+c+r`` prefix-shared); it is never
    split.  Raises ``ValueError`` naming the pair when one does not fit a bin. For
    :class:`DPOExamples` the same bins come as a :class:`LazyPackedBatches`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(examples, DPOExamples):
        return _pack_dpo_lazy(examples, max_tokens, layout=layout, seed=seed, num_shards=num_shards)
    sizes = [pair_tokens(ex, layout) for ex in examples]
    too_big = [(ex["index"], n) for ex, n in zip(examples, sizes) if n > max_tokens]
    if too_big:
        idx, n = too_big[0]
        raise _too_big(len(too_big), idx, n, max_tokens, layout)
    bins = best_fit_decreasing(sizes, max_tokens, seed=seed, num_shards=num_shards)
    out = PackedBatches([dpo_batch([examples[i] for i in b], layout) for b in bins])
    out.stats = PackingStats(
        max_tokens=max_tokens, num_batches=len(out), num_examples=len(examples),
        num_sequences=len(examples) * (2 if layout == "separate" else 1), real_tokens=sum(sizes),
    )
    return out


def _too_big(n: int, idx: int, need: int, max_tokens: int, layout: str) -> ValueError:
    return ValueError(
        f"{n} DPO pairs do not fit max_tokens={max_tokens} in the {layout!r} layout "
        f"(first: row {idx} needs {need}); raise max_tokens (>= 2 * max_length for 'separate') or lower max_length"
    )


def _pack_dpo_lazy(examples: DPOExamples, max_tokens: int, *, layout: str, seed: int,
                   num_shards: int) -> LazyPackedBatches:
    """:func:`pack_dpo` of compact pairs: the same checks and bins from the lengths alone."""
    p, c, r = (x.astype(np.int64) for x in (examples.prompt_lengths, examples.chosen_lengths,
                                            examples.rejected_lengths))
    counts = _pair_counts(p, c, r, layout)
    sizes = counts["tokens"]
    big = np.flatnonzero(sizes > max_tokens)
    if len(big):
        raise _too_big(len(big), int(examples.index[big[0]]), int(sizes[big[0]]), max_tokens, layout)
    bins = best_fit_decreasing(sizes.tolist(), max_tokens, seed=seed, num_shards=num_shards)
    empty = (p == 0) | (c == 0) | (r == 0)
    if empty.any():  # as dpo_batch refuses it, building the bins in order
        first = next(i for b in bins for i in b if empty[i])
        raise ValueError(f"DPO pair {int(examples.index[first])}: prompt, chosen and rejected must be non-empty")
    stats = PackingStats(max_tokens=max_tokens, num_batches=len(bins), num_examples=len(examples),
                         num_sequences=len(examples) * (2 if layout == "separate" else 1), real_tokens=int(sizes.sum()))
    return LazyPackedBatches(bins, lambda b: dpo_batch([examples.arrays(i) for i in b], layout),
                             _bin_sums(bins, counts), stats)
