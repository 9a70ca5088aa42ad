"""SFT examples from ``messages`` conversations (the UltraChat-200k schema).

Each conversation is rendered once with the chat template and tokenised in batches through the
(fast) tokenizer; which tokens are trained is decided from character offsets, so the ids are exactly
``tokenizer(render(messages))`` — never a per-turn tokenisation whose word boundaries differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .chat import ZEPHYR_CHAT_TEMPLATE, render, tokenize_kwargs
from .examples import SFTBuilder
from .validate import (
    LOAD_ERROR_COL,
    DataError,
    SkipReport,
    check_columns,
    check_messages,
    column_names,
    iter_chunks,
    load_errors,
    resolve,
)

# rows tokenised per call: bounds the tokeniser's transient memory (ids, offsets and Rust encodings of a
# chunk, ~100 MB for 256 UltraChat rows at max_length 2048), not the results
TOKENIZE_CHUNK = 256


@dataclass
class SFTReport:
    """What :func:`tokenize_sft` did; ``str(report)`` is the line the trainer logs."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    tokens: int = 0
    target_tokens: int = 0
    max_length: int = 0
    skipped: SkipReport = field(default_factory=SkipReport)

    def __str__(self) -> str:
        return (
            f"SFT: {self.examples}/{self.rows} rows -> {self.tokens} tokens ({self.target_tokens} trained); "
            f"{self.truncated} truncated to max_length={self.max_length} ({self.truncated_tokens} tokens cut); "
            f"{self.skipped}"
        )


def with_empty_system(messages: list) -> list:
    """alignment-handbook's ``auto_insert_empty_system_msg``: prepend ``{"role": "system", "content": ""}``."""
    if messages and messages[0].get("role") == "system":
        return list(messages)
    return [{"role": "system", "content": ""}] + list(messages)


def _zephyr_text_and_spans(messages, eos: str):
    """Fast path for the Zephyr template: text plus assistant-turn char spans (content+EOS+\\n)."""
    parts, spans, pos = [], [], 0
    for m in messages:
        header = f"<|{m['role']}|>\n"
        body = m["content"] + eos + "\n"
        if m["role"] == "assistant":
            spans.append((pos + len(header), pos + len(header) + len(body)))
        parts.append(header + body)
        pos += len(header) + len(body)
    return "".join(parts), spans


def _generic_text_and_spans(messages, tokenizer):
    """Any prefix-consistent template: turn k spans render(m[:k], gen=True) .. render(m[:k+1])."""
    text = render(messages, tokenizer=tokenizer)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:k], add_generation_prompt=True, tokenizer=tokenizer))
        end_text = render(messages[: k + 1], tokenizer=tokenizer)
        if not text.startswith(end_text):
            raise ValueError(
                "the tokenizer's chat template is not prefix-consistent (rendering a conversation prefix "
                "is not a prefix of the full rendering); use assistant_only_loss=False"
            )
        spans.append((start, len(end_text)))
    return text, spans


def conversation_text(messages, tokenizer):
    """``(text, assistant_spans)`` for one conversation with ``tokenizer``'s template."""
    template = getattr(tokenizer, "chat_template", None) or ZEPHYR_CHAT_TEMPLATE
    if template == ZEPHYR_CHAT_TEMPLATE:
        return _zephyr_text_and_spans(messages, str(tokenizer.eos_token))
    return _generic_text_and_spans(messages, tokenizer)


def _mask_from_offsets(offsets: np.ndarray, spans) -> np.ndarray:
    """1 for tokens whose first character lies inside an assistant span."""
    if not spans or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=np.int8)
    starts, ends = offsets[:, 0], offsets[:, 1]
    bounds = np.asarray(spans, dtype=np.int64).reshape(-1)  # sorted, disjoint
    # inside a span <=> the insertion point in [s0, e0, s1, e1, ...] is odd
    inside = (np.searchsorted(bounds, starts, side="right") % 2) == 1
    return (inside & (ends > starts)).astype(np.int8)


def tokenize_sft(
    rows,
    tokenizer,
    *,
    max_length: int,
    assistant_only_loss: bool = True,
    messages_field: str = "messages",
    add_empty_system: bool = True,
    skip_invalid_rows: bool = False,
    dataset_name: str = "sft",
    show_progress: bool = True,
    keep_ids: bool = True,
):
    """Tokenise conversations into SFT examples, streamed: ``TOKENIZE_CHUNK`` rows at a time.

    Args:
        rows: ``datasets.Dataset`` or list of dicts with a ``messages`` column
            (``[{"role", "content"}, ...]``, optional system turn, then user/assistant alternating,
            ending on an assistant turn).
        tokenizer: a fast Hugging Face tokenizer with a chat template (see :func:`load_tokenizer`).
        max_length: sequences are cut to their first ``max_length`` tokens (counted in the report).
        assistant_only_loss: train only on assistant turns (content, ``</s>`` and the turn's
            trailing newline); ``False`` trains on every token.
        add_empty_system: prepend an empty system turn as alignment-handbook does for Zephyr.
        skip_invalid_rows: skip bad rows (counted) instead of raising :class:`DataValidationError`.
        keep_ids: keep the token ids (default); without them only lengths and loss-mask
            bits are kept, which is all a plan needs.
    Returns:
        ``(examples, report)``; ``examples`` an :class:`~zephyr_fast.data.examples.SFTExamples`, a
        sequence of ``{"index": int, "input_ids": list[int], "loss_mask": list[int]}`` —
        ``loss_mask[t] == 1`` when token ``t`` is a training *target* (unshifted; the packer shifts it
        into ``PackedBatch.labels``) — held as flat arrays, not Python lists.
    """
    from tqdm.auto import tqdm

    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if assistant_only_loss and not getattr(tokenizer, "is_fast", False):
        raise ValueError("assistant_only_loss needs a fast (Rust) tokenizer for character offsets; "
                         "load it with use_fast=True or set assistant_only_loss=False")
    check_columns(column_names(rows), [messages_field], dataset=dataset_name, what="SFT")
    report = SFTReport(rows=len(rows), max_length=max_length)
    kw = tokenize_kwargs(tokenizer)
    errors, examples = [], SFTBuilder(keep_ids)
    bar = tqdm(total=len(rows), desc="tokenize SFT", unit="row", disable=not show_progress or len(rows) < 4096)
    for c0, cols, origins in iter_chunks(rows, [messages_field, LOAD_ERROR_COL], TOKENIZE_CHUNK, dataset_name):
        texts, spans, keep = [], [], []
        for j, msgs in enumerate(cols[messages_field]):
            ds, r = origins[j]
            errs = (load_errors(cols[LOAD_ERROR_COL][j], dataset=ds, row=r)
                    or check_messages(msgs, dataset=ds, row=r, field=messages_field, last_role="assistant"))
            if errs:
                errors += [replace(e, position=c0 + j) for e in errs]
                continue
            text, sp = conversation_text(with_empty_system(msgs) if add_empty_system else list(msgs), tokenizer)
            texts.append(text)
            spans.append(sp)
            keep.append(j)
        enc = tokenizer(texts, return_offsets_mapping=assistant_only_loss, **kw) if texts else {"input_ids": []}
        for t, ids in enumerate(enc["input_ids"]):
            j = keep[t]
            if assistant_only_loss:
                mask = _mask_from_offsets(np.asarray(enc["offset_mapping"][t], dtype=np.int64).reshape(-1, 2), spans[t])
            else:
                mask = np.ones(len(ids), dtype=np.int8)
            if len(ids) > max_length:
                report.truncated += 1
                report.truncated_tokens += len(ids) - max_length
                ids, mask = ids[:max_length], mask[:max_length]
            # position 0 is never a target (nothing predicts it)
            if int(mask[1:].sum()) == 0:
                ds, r = origins[j]
                errors.append(
                    DataError(ds, r, messages_field, f"no assistant token within max_length={max_length} "
                              "(the prompt alone fills it); raise max_length or shorten the conversation",
                              "prompt_too_long", position=c0 + j)
                )
                continue
            examples.add(c0 + j, ids, mask)
        examples.flush()
        del enc, texts, spans
        bar.update(len(cols[messages_field]))
    bar.close()

    report.skipped = resolve(errors, skip_invalid_rows=skip_invalid_rows, total_rows=len(rows))
    examples = examples.finish()
    report.examples = len(examples)
    report.tokens = int(examples.lengths.sum())
    report.target_tokens = int(examples.targets.sum())
    return examples, report
