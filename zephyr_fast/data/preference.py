"""DPO pairs: ``prompt_ids`` + ``chosen_ids`` / ``rejected_ids`` with alignment-handbook truncation.

Accepted row formats (auto-detected per row):

* ``chosen`` / ``rejected`` full conversations (``ultrafeedback_binarized``): the prompt is the shared
  prefix ``chosen[:-1] == rejected[:-1]``, the completion is the last (assistant) turn;
* ``prompt`` (string or message list) + ``chosen`` / ``rejected`` as strings or as one-message
  assistant lists (TRL's explicit-prompt format).

The generation prompt ``<|assistant|>\\n`` belongs to the prompt side (as in alignment-handbook), so
a completion is ``"{content}</s>\\n"`` and ``prompt + completion`` is byte-identical to rendering the
whole conversation.  Ids are taken from tokenising the *whole* text, so word boundaries at the seam
are the ones the model sees at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from .chat import render_fast, tokenize_kwargs
from .examples import DPOBuilder
from .sft import TOKENIZE_CHUNK, with_empty_system
from .validate import (
    LOAD_ERROR_COL,
    ROLES,
    DataError,
    SkipReport,
    check_messages,
    check_string,
    column_names,
    iter_chunks,
    load_errors,
    resolve,
    DataValidationError,
)


@dataclass
class DPOReport:
    """What :func:`build_dpo_examples` did; ``str(report)`` is the line the trainer logs."""

    rows: int = 0
    pairs: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    seam_retokenized: int = 0
    identical: int = 0  # pairs whose chosen and rejected completions are the same text (trained on, as TRL)
    prompt_fills: int = 0  # truncation_mode keep_start: pairs dropped, the prompt alone fills max_length (TRL)
    prompt_tokens: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    max_length: int = 0
    max_prompt_length: Optional[int] = None
    skipped: SkipReport = field(default_factory=SkipReport)

    def __str__(self) -> str:
        return (
            f"DPO: {self.pairs}/{self.rows} pairs; tokens prompt/chosen/rejected "
            f"{self.prompt_tokens}/{self.chosen_tokens}/{self.rejected_tokens}; truncated (max_length="
            f"{self.max_length}, max_prompt_length={self.max_prompt_length}): {self.prompt_truncated} prompts "
            f"from the left, {self.completion_truncated} pairs' completions from the right; "
            f"{self.identical} with identical chosen and rejected (kept, as TRL: no gradient); "
            + (f"{self.prompt_fills} dropped: the prompt alone fills max_length (truncation_mode keep_start); "
               if self.prompt_fills else "") + f"{self.skipped}"
        )


def _completion_role_error(role, *, ds, row, fld) -> DataError:
    """A one-message completion whose role is not ``assistant`` (an unknown one lists the accepted roles)."""
    if role not in ROLES:
        return DataError(ds, row, fld, f"unknown role {role!r} (expected one of {ROLES}); a completion is an "
                         "'assistant' turn", "bad_role")
    return DataError(ds, row, fld, f"a completion is an 'assistant' turn, got {role!r}", "role_order")


def _as_assistant(value, *, ds, row, fld):
    """A completion given as a string or as ``[{"role": "assistant", ...}]``."""
    if isinstance(value, str) or value is None:
        errs = check_string(value, dataset=ds, row=row, field=fld)
        return ({"role": "assistant", "content": value} if not errs else None), errs
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], dict):
        m = value[0]
        if m.get("role") != "assistant":
            return None, [_completion_role_error(m.get("role"), ds=ds, row=row, fld=fld + "[0].role")]
        errs = check_string(m.get("content"), dataset=ds, row=row, field=fld + "[0].content")
        return (m if not errs else None), errs
    got = f"a list of {len(value)} messages" if isinstance(value, (list, tuple)) else type(value).__name__
    return None, [DataError(ds, row, fld, f"expected a string, a one-message assistant list or a whole conversation, "
                            f"got {got}", "wrong_type")]


def parse_pair(row: dict, *, ds: str, r: int):
    """``(prompt_messages, chosen_message, rejected_message, errors)`` for one row, any format."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    errs = []
    # a whole conversation: several turns, or one that opens a conversation (TRL's explicit-prompt
    # completion is one turn); check_messages checks its roles, so 'human' is named as an unknown role
    full = (
        isinstance(chosen, (list, tuple)) and chosen and isinstance(chosen[0], dict)
        and (len(chosen) > 1 or chosen[0].get("role") in ("system", "user"))
    )
    if full:
        errs += check_messages(chosen, dataset=ds, row=r, field="chosen", last_role="assistant")
        errs += check_messages(rejected, dataset=ds, row=r, field="rejected", last_role="assistant")
        if errs:
            return None, None, None, errs
        if list(chosen[:-1]) != list(rejected[:-1]):
            turn = next((j for j, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b), min(len(chosen), len(rejected)) - 1)
            return None, None, None, [DataError(ds, r, f"rejected[{turn}]", "chosen and rejected have different prompts "
                                                "(every turn but the last must be identical)", "prompt_mismatch")]
        prompt_msgs, c, rj = list(chosen[:-1]), chosen[-1], rejected[-1]
    else:
        if isinstance(prompt, str) or prompt is None:
            errs += check_string(prompt, dataset=ds, row=r, field="prompt")
            prompt_msgs = [{"role": "user", "content": prompt}]
        else:
            errs += check_messages(prompt, dataset=ds, row=r, field="prompt", need_assistant=False, last_role="user")
            prompt_msgs = list(prompt) if isinstance(prompt, (list, tuple)) else None
        c, e1 = _as_assistant(chosen, ds=ds, row=r, fld="chosen")
        rj, e2 = _as_assistant(rejected, ds=ds, row=r, fld="rejected")
        errs += e1 + e2
        if errs:
            return None, None, None, errs
    return prompt_msgs, c, rj, []


def truncate_pair(p: list, c: list, r: list, *, max_length: int, max_prompt_length: Optional[int], bos_id: Optional[int]):
    """alignment-handbook / TRL ``keep_end`` truncation, applied only when the pair is too long.

    1. prompt cut from the *left* to ``max_prompt_length`` (a leading BOS is kept);
    2. completions cut from the *right* to ``max_length - len(prompt)``.
    Returns ``(p, c, r, prompt_cut, completion_cut)``.
    """
    prompt_cut = completion_cut = False
    if len(p) + max(len(c), len(r)) > max_length:
        if max_prompt_length is not None and len(p) > max_prompt_length:
            keep_bos = bos_id is not None and p and p[0] == bos_id
            p = ([p[0]] + p[len(p) - max_prompt_length + 1 :]) if keep_bos else p[len(p) - max_prompt_length :]
            prompt_cut = True
        room = max_length - len(p)
        if room > 0 and max(len(c), len(r)) > room:
            c, r = c[:room], r[:room]
            completion_cut = True
    return p, c, r, prompt_cut, completion_cut


def build_dpo_examples(
    rows,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: Optional[int] = None,
    add_empty_system: bool = True,
    skip_invalid_rows: bool = False,
    dataset_name: str = "dpo",
    show_progress: bool = True,
    truncation_mode: Optional[str] = None,
    max_completion_length: Optional[int] = None,
    keep_ids: bool = True,
):
    """Tokenise preference rows into DPO pairs, streamed: ``TOKENIZE_CHUNK`` rows at a time.

    Args:
        rows: ``datasets.Dataset`` or list of dicts (formats in the module docstring).
        max_length: cap on ``len(prompt) + len(completion)`` for chosen and for rejected.
        max_prompt_length: prompts of over-long pairs are cut from the left to this many tokens.
        truncation_mode: None (alignment-handbook's TRL: the prompt, then the completions) or TRL 1.16's
            ``"keep_start"``: each sequence keeps its first ``max_length`` tokens (the prompt is never
            cut; ``max_prompt_length`` is not used) and a pair whose prompt alone fills ``max_length``
            is dropped and counted, as TRL drops it.
        max_completion_length: older TRL's cap: each completion is cut from the right to it before
            the ``max_length`` rules (counted as a completion truncation).
        add_empty_system: prepend an empty system turn (alignment-handbook's Zephyr default).
        keep_ids: keep the token ids (default); without them only the lengths and the
            examples fingerprint are kept, which is all a plan needs.
    Returns:
        ``(examples, report)``; ``examples`` a :class:`~zephyr_fast.data.examples.DPOExamples`, a
        sequence of ``{"index": int (position in rows), "prompt_ids": list[int], "chosen_ids":
        list[int], "rejected_ids": list[int]}`` held as flat arrays, not Python lists.
    Raises:
        DataValidationError: invalid rows (all listed) unless ``skip_invalid_rows``.
    """
    from tqdm.auto import tqdm

    names = column_names(rows)
    missing = [c for c in ("chosen", "rejected") if c not in names]
    if missing:
        raise DataValidationError([DataError(dataset_name, -1, c, f"column missing for DPO (columns present: "
                                             f"{sorted(names)})", "missing_column") for c in missing])
    n = len(rows)
    report = DPOReport(rows=n, max_length=max_length, max_prompt_length=max_prompt_length)
    kw = tokenize_kwargs(tokenizer)
    bos_id = tokenizer.bos_token_id if kw.get("add_special_tokens", True) else None
    errors, examples = [], DPOBuilder(keep_ids)
    bar = tqdm(total=n, desc="tokenize DPO", unit="pair", disable=not show_progress or n < 4096)
    for c0, cols, origins in iter_chunks(rows, ("prompt", "chosen", "rejected", LOAD_ERROR_COL), TOKENIZE_CHUNK,
                                         dataset_name):
        keep, ptxt, ctxt, rtxt = [], [], [], []
        for j, (ds, r) in enumerate(origins):
            errs = load_errors(cols[LOAD_ERROR_COL][j], dataset=ds, row=r)
            if not errs:
                pm, c, rj, errs = parse_pair({f: cols[f][j] for f in ("prompt", "chosen", "rejected")}, ds=ds, r=r)
            if errs:
                errors += [replace(e, position=c0 + j) for e in errs]
                continue
            if add_empty_system:
                pm = with_empty_system(pm)
            keep.append(j)
            ptxt.append(render_fast(pm, tokenizer, add_generation_prompt=True))
            ctxt.append(render_fast(pm + [c], tokenizer))
            rtxt.append(render_fast(pm + [rj], tokenizer))
            if not (ctxt[-1].startswith(ptxt[-1]) and rtxt[-1].startswith(ptxt[-1])):
                raise ValueError("the tokenizer's chat template is not prefix-consistent: the prompt rendered with "
                                 "add_generation_prompt=True is not a prefix of the rendered conversation")
        P, C, R = ((tokenizer(t, **kw)["input_ids"] if t else []) for t in (ptxt, ctxt, rtxt))
        for t, (p, cf, rf) in enumerate(zip(P, C, R)):
            j = keep[t]
            comps = []
            for full, text in ((cf, ctxt[t]), (rf, rtxt[t])):
                if full[: len(p)] == p:
                    comps.append(full[len(p) :])
                else:  # a token merged across the seam: tokenise the completion alone
                    report.seam_retokenized += 1
                    comps.append(tokenizer(text[len(ptxt[t]) :], add_special_tokens=False)["input_ids"])
            capped = max_completion_length is not None and max(len(x) for x in comps) > max_completion_length
            if capped:
                comps = [x[:max_completion_length] for x in comps]
            keep_start = truncation_mode == "keep_start"
            pp, cc, rr, pcut, ccut = truncate_pair(list(p), comps[0], comps[1], max_length=max_length,
                                                  max_prompt_length=None if keep_start else max_prompt_length,
                                                  bos_id=bos_id)
            if keep_start and len(pp) >= max_length:
                report.prompt_fills += 1
                continue
            if len(pp) >= max_length:
                ds, r = origins[j]
                errors.append(DataError(ds, r, "prompt", f"the prompt alone has {len(pp)} tokens >= max_length="
                                        f"{max_length}; set max_prompt_length below max_length or raise max_length",
                                        "prompt_too_long", position=c0 + j))
                continue
            report.prompt_truncated += pcut
            report.completion_truncated += ccut or capped  # a pair counts once
            report.identical += cc == rr  # kept, as TRL does: its DPO gradient is zero
            examples.add(c0 + j, pp, cc, rr)
        examples.flush()
        del P, C, R, ptxt, ctxt, rtxt
        bar.update(len(origins))
    bar.close()

    report.skipped = resolve(errors, skip_invalid_rows=skip_invalid_rows, total_rows=n)
    examples = examples.finish()
    report.pairs = len(examples)
    report.prompt_tokens = int(examples.prompt_lengths.sum())
    report.chosen_tokens = int(examples.chosen_lengths.sum())
    report.rejected_tokens = int(examples.rejected_lengths.sum())
    return examples, report
