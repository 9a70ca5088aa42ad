"""Tokenised examples held compactly: what :func:`~zephyr_fast.data.sft.tokenize_sft` and
:func:`~zephyr_fast.data.preference.build_dpo_examples` return.

A split's token ids live in one flat ``int32`` buffer per sequence kind (SFT: the conversation; DPO:
prompt, chosen, rejected) with ``int64`` offsets, its SFT loss masks as bits (each example's bits
start on a byte), its dataset positions in one ``int64`` array -- about 4 bytes a token instead of the
~36 of a Python ``int`` in a list. Both containers are read-only sequences of the dicts the tokenisers
always returned (``ex["input_ids"]`` a ``list[int]``, ...), so every caller that indexes or iterates
them sees the same values; :meth:`arrays` gives the same fields as numpy views (no copy) for the
packers.

Without token ids (the tokenisers' ``keep_ids=False``, what ``zephyr-fast plan`` uses): only the lengths, the SFT
loss-mask bits and the DPO examples fingerprint are kept -- a few bytes per example and one bit per
SFT token, so a plan's memory does not grow with the rows' text. Indexing such a container raises;
its lengths, target counts and fingerprint are all the plan needs.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from typing import Optional

import numpy as np

class TokenIdsNotKept(RuntimeError):
    """Token ids of a container built with ``keep_ids=False`` were asked for."""


class Ragged:
    """``len(offsets) - 1`` variable-length sequences in one flat array (``values`` None: lengths only)."""

    __slots__ = ("values", "offsets")

    def __init__(self, values: Optional[np.ndarray], offsets: np.ndarray):
        self.values, self.offsets = values, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> np.ndarray:
        if self.values is None:
            raise TokenIdsNotKept("these examples were tokenised without their token ids (keep_ids=False)")
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + (self.values.nbytes if self.values is not None else 0)


def _int64(values: array) -> np.ndarray:
    return np.frombuffer(values, dtype=np.int64).copy() if len(values) else np.zeros(0, dtype=np.int64)


class _RaggedBuilder:
    """Appends sequences; per tokenisation chunk the pending ones become one block (few numpy objects)."""

    def __init__(self, dtype, keep: bool = True):
        self.dtype, self.keep = dtype, keep
        self._blocks: list = []
        self._pending: list = []
        self._lengths = array("q")  # 8 bytes an example, not a Python int

    def add(self, seq, n: Optional[int] = None) -> None:
        self._lengths.append(len(seq) if n is None else n)
        if self.keep:
            self._pending.append(np.asarray(seq, dtype=self.dtype))

    def flush(self) -> None:
        if self._pending:
            self._blocks.append(np.concatenate(self._pending))
            self._pending = []

    def finish(self) -> Ragged:
        self.flush()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(_int64(self._lengths), out=offsets[1:])
        self._lengths = array("q")
        values = None
        if self.keep:
            values = np.concatenate(self._blocks) if self._blocks else np.zeros(0, dtype=self.dtype)
        self._blocks = []
        return Ragged(values, offsets)


def example_indices(examples) -> np.ndarray:
    """``(n,) int64`` dataset positions of ``examples`` in order: the compact containers' own array (no token
    converted to Python), or each dict's ``"index"`` for a plain list."""
    if isinstance(examples, _Examples):
        return np.asarray(examples.index, dtype=np.int64)
    return np.fromiter((ex["index"] for ex in examples), dtype=np.int64, count=len(examples))


class _Examples(Sequence):
    """Common part: ``index`` (dataset positions), dict access, slicing to lists of dicts."""

    index: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._dict(k) for k in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} out of range ({n} examples)")
        return self._dict(i)

    def __iter__(self):
        for i in range(len(self)):
            yield self._dict(i)

    def __eq__(self, other):  # compares like the list of dicts it stands for
        if isinstance(other, (list, tuple, _Examples)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        kept = "token ids" if self.has_token_ids else "lengths only"
        return f"{type(self).__name__}({len(self)} examples, {self.num_tokens} tokens, {kept}, {self.nbytes} bytes)"

    def _dict(self, i: int) -> dict:
        raise NotImplementedError


class SFTExamples(_Examples):
    """SFT examples: ``{"index", "input_ids", "loss_mask"}`` each (see :func:`tokenize_sft`)."""

    def __init__(self, index: np.ndarray, ids: Ragged, mask_bits: Ragged, targets: np.ndarray):
        self.index, self.ids, self.mask_bits, self.targets = index, ids, mask_bits, targets
        self.lengths = ids.lengths()  # tokens of each example

    @property
    def has_token_ids(self) -> bool:
        return self.ids.values is not None

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + self.ids.nbytes + self.mask_bits.nbytes + self.targets.nbytes + self.lengths.nbytes

    def loss_mask(self, i: int) -> np.ndarray:
        """``(len,) int8``: 1 where token ``t`` of example ``i`` is a target (kept without token ids too)."""
        return np.unpackbits(self.mask_bits.get(i), count=int(self.lengths[i])).astype(np.int8)

    def arrays(self, i: int) -> dict:
        """Example ``i`` with numpy fields (``input_ids`` an ``int32`` view)."""
        return {"index": int(self.index[i]), "input_ids": self.ids.get(i), "loss_mask": self.loss_mask(i)}

    def _dict(self, i: int) -> dict:
        return {"index": int(self.index[i]), "input_ids": self.ids.get(i).tolist(),
                "loss_mask": self.loss_mask(i).tolist()}


class SFTBuilder:
    """Collects :class:`SFTExamples` one example at a time (``keep``: the token ids too)."""

    def __init__(self, keep: bool = True):
        self._index, self._targets = array("q"), array("q")
        self._ids = _RaggedBuilder(np.int32, keep)
        self._bits = _RaggedBuilder(np.uint8)

    def add(self, index: int, ids, mask: np.ndarray) -> None:
        """``mask``: ``(len(ids),) int8``; position 0 never counts as a target."""
        self._index.append(index)
        self._targets.append(int(mask[1:].sum()))
        self._ids.add(ids)
        self._bits.add(np.packbits(mask.astype(np.uint8, copy=False)))

    def flush(self) -> None:
        self._ids.flush()
        self._bits.flush()

    def finish(self) -> SFTExamples:
        return SFTExamples(_int64(self._index), self._ids.finish(), self._bits.finish(), _int64(self._targets))


def pair_line(index: int, prompt_ids: list, chosen_ids: list, rejected_ids: list) -> bytes:
    """One pair's contribution to the examples fingerprint (``reference.examples_fingerprint``)."""
    return json.dumps([index, prompt_ids, chosen_ids, rejected_ids]).encode()


class DPOExamples(_Examples):
    """DPO pairs: ``{"index", "prompt_ids", "chosen_ids", "rejected_ids"}`` each (see :func:`build_dpo_examples`)."""

    def __init__(self, index: np.ndarray, prompt: Ragged, chosen: Ragged, rejected: Ragged,
                 fingerprint: Optional[str] = None):
        self.index, self.prompt, self.chosen, self.rejected = index, prompt, chosen, rejected
        self.prompt_lengths, self.chosen_lengths, self.rejected_lengths = (prompt.lengths(), chosen.lengths(),
                                                                           rejected.lengths())
        self._fingerprint = fingerprint

    @property
    def has_token_ids(self) -> bool:
        return self.prompt.values is not None

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_lengths.sum() + self.chosen_lengths.sum() + self.rejected_lengths.sum())

    @property
    def nbytes(self) -> int:
        return (self.index.nbytes + self.prompt.nbytes + self.chosen.nbytes + self.rejected.nbytes
                + 3 * self.prompt_lengths.nbytes)

    def arrays(self, i: int) -> dict:
        """Pair ``i`` with numpy fields (``int32`` views)."""
        return {"index": int(self.index[i]), "prompt_ids": self.prompt.get(i), "chosen_ids": self.chosen.get(i),
                "rejected_ids": self.rejected.get(i)}

    def _dict(self, i: int) -> dict:
        return {"index": int(self.index[i]), "prompt_ids": self.prompt.get(i).tolist(),
                "chosen_ids": self.chosen.get(i).tolist(), "rejected_ids": self.rejected.get(i).tolist()}

    def fingerprint(self) -> str:
        """sha256 of every pair's :func:`pair_line`, in order (computed once; kept without token ids too)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for i in range(len(self)):
                h.update(pair_line(int(self.index[i]), self.prompt.get(i).tolist(), self.chosen.get(i).tolist(),
                                   self.rejected.get(i).tolist()))
            self._fingerprint = h.hexdigest()
        return self._fingerprint


class DPOBuilder:
    """Collects :class:`DPOExamples`; without token ids it hashes each pair as it comes (the fingerprint)."""

    def __init__(self, keep: bool = True):
        self.keep = keep
        self._index = array("q")
        self._parts = [_RaggedBuilder(np.int32, keep) for _ in range(3)]
        self._hash = None if keep else hashlib.sha256()

    def add(self, index: int, prompt_ids: list, chosen_ids: list, rejected_ids: list) -> None:
        self._index.append(index)
        for part, seq in zip(self._parts, (prompt_ids, chosen_ids, rejected_ids)):
            part.add(seq)
        if self._hash is not None:
            self._hash.update(pair_line(index, prompt_ids, chosen_ids, rejected_ids))

    def flush(self) -> None:
        for part in self._parts:
            part.flush()

    def finish(self) -> DPOExamples:
        p, c, r = (part.finish() for part in self._parts)
        return DPOExamples(_int64(self._index), p, c, r,
                           fingerprint=None if self._hash is None else self._hash.hexdigest())
