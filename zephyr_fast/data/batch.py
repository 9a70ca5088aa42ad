"""The one packed representation that flows from the data layer through the model to the losses.

Every batch in zephyr_fast — SFT or DPO, either DPO layout — is a :class:`PackedBatch`: a single
row of ``N`` real tokens (no padding) cut into attention segments by ``cu_seqlens``, exactly the
layout ``flash_attn_varlen_func`` consumes.

Conventions (all tensors 1-D, on the same device):

* ``input_ids: (N,) int64``
* ``position_ids: (N,) int64`` — reset to 0 at each sequence start.  In the prefix-shared DPO
  layout the rejected completion continues from the prompt (``p, p+1, ...``), not from chosen.
* ``cu_seqlens: (S+1,) int32`` — attention-segment boundaries, ``cu_seqlens[0] == 0``,
  ``cu_seqlens[-1] == N``.  ``max_seqlen`` is a Python ``int`` (no host sync needed to read it).
* ``labels: (N,) int64`` — already shifted: ``labels[t]`` is the token predicted *from* position
  ``t``; ``-100`` where no loss is taken (prompt tokens, non-assistant turns, and the last position
  of every sequence, so no target ever crosses a sequence boundary).
* ``segment_ids: (N,) int64`` in ``[0, num_segments)`` — the loss segment of each token.  SFT: the
  index of the sequence in the batch.  DPO: ``2*i`` for pair ``i``'s chosen tokens and ``2*i+1`` for
  its rejected tokens (prompt tokens carry the id of the completion that their labels belong to).
* DPO only: ``pair_index: (P,) int64`` — the dataset row of each pair (keys the reference cache);
  ``num_segments == 2 * P``.
* Prefix-shared DPO layout only (``layout == "prefix_shared"``): each pair is one attention segment
  ``[prompt, chosen, rejected]``; ``part_ids: (N,) int8`` is 0 for prompt, 1 for chosen, 2 for
  rejected tokens, and attention must never let a rejected token see a chosen token.  The first
  rejected token is predicted from the *last prompt position*, which already predicts the first
  chosen token; that extra prediction is carried as ``extra_rows (P,) int64`` (row of the last
  prompt token), ``extra_labels (P,) int64`` (first rejected token) and ``extra_segment_ids (P,)``
  (``2*i+1``).  :func:`loss_inputs` appends them so the loss code never special-cases the layout.
* ``loss_rows: (M,) int64`` or None — the rows whose label is not ``-100``, computed on the host
  when the batch leaves the CPU (:meth:`PackedBatch.to`), so that the LM-head loss on a GPU gets
  only the rows that carry a loss without a device-to-host read (:func:`loss_inputs`, ``compact``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

IGNORE_INDEX = -100

LAYOUTS = ("sft", "separate", "prefix_shared")


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    labels: torch.Tensor
    segment_ids: torch.Tensor
    num_segments: int
    layout: str = "sft"
    pair_index: Optional[torch.Tensor] = None
    part_ids: Optional[torch.Tensor] = None
    extra_rows: Optional[torch.Tensor] = None
    extra_labels: Optional[torch.Tensor] = None
    extra_segment_ids: Optional[torch.Tensor] = None
    loss_rows: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_pairs(self) -> int:
        return 0 if self.pair_index is None else int(self.pair_index.numel())

    def to(self, device, non_blocking: bool = True) -> "PackedBatch":
        src = self
        if self.loss_rows is None and self.labels.device.type == "cpu":
            # host-side (free on CPU): the loss rows travel with the batch, no sync on the device
            src = replace(self, loss_rows=(self.labels != IGNORE_INDEX).nonzero().squeeze(1))
        moved = {}
        for f in fields(src):
            v = getattr(src, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
        return replace(src, **moved)

    def validate(self) -> None:
        """Cheap structural checks (host-side; call in tests and data code, not in the hot loop)."""
        n = self.num_tokens
        for name in ("input_ids", "position_ids", "labels", "segment_ids"):
            t = getattr(self, name)
            if t.dim() != 1 or t.numel() != n:
                raise ValueError(f"PackedBatch.{name} must be (N={n},), got {tuple(t.shape)}")
        if self.cu_seqlens.dtype != torch.int32:
            raise ValueError(f"PackedBatch.cu_seqlens must be int32, got {self.cu_seqlens.dtype}")
        if int(self.cu_seqlens[0]) != 0 or int(self.cu_seqlens[-1]) != n:
            raise ValueError("PackedBatch.cu_seqlens must start at 0 and end at N")
        lens = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        if bool((lens <= 0).any()) or int(lens.max()) != self.max_seqlen:
            raise ValueError("PackedBatch: empty segment or max_seqlen != max(cu_seqlens diff)")
        # the last position of every attention segment predicts nothing
        if bool((self.labels[self.cu_seqlens[1:].long() - 1] != IGNORE_INDEX).any()):
            raise ValueError("PackedBatch.labels: a target crosses a sequence boundary")
        if n and (int(self.segment_ids.min()) < 0 or int(self.segment_ids.max()) >= self.num_segments):
            raise ValueError("PackedBatch.segment_ids out of [0, num_segments)")
        if self.layout not in LAYOUTS:
            raise ValueError(f"PackedBatch.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "prefix_shared" and (self.part_ids is None or self.extra_rows is None):
            raise ValueError("prefix_shared PackedBatch needs part_ids and extra_rows/labels/segment_ids")
        if n and bool((self.position_ids[self.cu_seqlens[:-1].long()] != 0).any()):
            raise ValueError("PackedBatch.position_ids must restart at 0 at every sequence start")
        if self.layout != "sft":
            p = self.num_pairs
            if self.pair_index is None or self.num_segments != 2 * p:
                raise ValueError(f"DPO PackedBatch needs pair_index (P,) and num_segments == 2P, got "
                                 f"P={p}, num_segments={self.num_segments}")
        if self.layout == "prefix_shared":
            p = self.num_pairs
            if self.part_ids.shape != (n,):
                raise ValueError(f"PackedBatch.part_ids must be (N={n},)")
            for name in ("extra_rows", "extra_labels", "extra_segment_ids"):
                if getattr(self, name).shape != (p,):
                    raise ValueError(f"PackedBatch.{name} must be (P={p},)")
            if p and (int(self.extra_rows.min()) < 0 or int(self.extra_rows.max()) >= n
                      or bool((self.part_ids[self.extra_rows] != 0).any())):
                raise ValueError("PackedBatch.extra_rows must index the last prompt token of each pair")
            if bool((self.extra_segment_ids % 2 != 1).any()):
                raise ValueError("PackedBatch.extra_segment_ids must be rejected segments (2i+1)")


def loss_inputs(hidden: torch.Tensor, batch: PackedBatch, compact: bool = False):
    """Rows, targets and segments that the fused losses consume.

    Args:
        hidden: (N, D) final hidden states of ``batch`` (any float dtype).
        compact: keep only the rows that carry a loss (``batch.loss_rows``, known on the host
            since the batch left the CPU).  For CUDA: the kernels' default CUDA path never reads a
            count back, so it would otherwise run its GEMMs over prompt rows too.  (On CPU the
            torch path compacts by itself.)
    Returns:
        ``(hidden_rows (M, D), labels (M,) int64, segment_ids (M,) int64)`` where ``M = N`` except
        in the prefix-shared layout, where the ``P`` extra predictions are appended, and with
        ``compact`` (and ``loss_rows`` known), where only the loss rows (then the extras) remain.
    """
    rows, labels, segs = hidden, batch.labels, batch.segment_ids
    if compact and batch.loss_rows is not None:
        rows, labels, segs = (x.index_select(0, batch.loss_rows) for x in (hidden, labels, segs))
    if batch.extra_rows is None:
        return rows, labels, segs
    return (
        torch.cat([rows, hidden.index_select(0, batch.extra_rows)], 0),
        torch.cat([labels, batch.extra_labels]),
        torch.cat([segs, batch.extra_segment_ids]),
    )


def concat_batches(batches) -> PackedBatch:
    """Concatenate packed batches of one layout into one (segments, rows and pairs renumbered).

    Used to run several micro-batches in one forward (e.g. the offline reference pass) and in tests.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("concat_batches: no batches")
    layout = batches[0].layout
    if any(b.layout != layout for b in batches):
        raise ValueError("concat_batches: all batches must have the same layout")
    row_off, seg_off = [], []
    n = s = 0
    for b in batches:
        row_off.append(n)
        seg_off.append(s)
        n += b.num_tokens
        s += b.num_segments
    cu = [batches[0].cu_seqlens[:1]] + [b.cu_seqlens[1:] + o for b, o in zip(batches, row_off)]
    out = PackedBatch(
        input_ids=torch.cat([b.input_ids for b in batches]),
        position_ids=torch.cat([b.position_ids for b in batches]),
        cu_seqlens=torch.cat(cu).to(torch.int32),
        max_seqlen=max(b.max_seqlen for b in batches),
        labels=torch.cat([b.labels for b in batches]),
        segment_ids=torch.cat([b.segment_ids + o for b, o in zip(batches, seg_off)]),
        num_segments=s,
        layout=layout,
    )
    if batches[0].pair_index is not None:
        out.pair_index = torch.cat([b.pair_index for b in batches])
    if layout == "prefix_shared":
        out.part_ids = torch.cat([b.part_ids for b in batches])
        out.extra_rows = torch.cat([b.extra_rows + o for b, o in zip(batches, row_off)])
        out.extra_labels = torch.cat([b.extra_labels for b in batches])
        out.extra_segment_ids = torch.cat([b.extra_segment_ids + o for b, o in zip(batches, seg_off)])
    return out


def dense_attention_mask(batch: PackedBatch) -> torch.Tensor:
    """Reference ``(N, N) bool`` mask, ``True`` where query row ``q`` may attend to key row ``k``.

    Causal within each ``cu_seqlens`` segment; in the prefix-shared layout a rejected token
    (``part_ids == 2``) additionally never sees a chosen token (``part_ids == 1``).  O(N^2): for
    tests and small reference runs only — the model uses varlen/flex kernels.
    """
    n = batch.num_tokens
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    idx = torch.arange(n, device=seq.device)
    mask = (seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])
    if batch.layout == "prefix_shared":
        part = batch.part_ids.long()
        mask &= ~((part[:, None] == 2) & (part[None, :] == 1))
    return mask
