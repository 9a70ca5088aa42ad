"""Row validation: every problem names the dataset, row and field; nothing is dropped silently.

Validation collects *all* problems of a dataset first, then either stops the run with one summary
(:class:`DataValidationError`, the default) or, with ``skip_invalid_rows=True``, drops exactly the
bad rows and reports how many were skipped and why.

Reading JSON / JSON Lines (:func:`read_json_rows`, used by the loader and by binarize) follows the
same rule: a line that is not UTF-8 or not JSON becomes a row error naming the file and the line.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

ROLES = ("system", "user", "assistant")  # the roles a chat message may have (data/chat.py renders them)

MAX_LISTED = 20


@dataclass(frozen=True)
class DataError:
    """One problem with one row.  ``kind`` is a short stable tag used for the skip counts."""

    dataset: str
    row: int
    field: str
    message: str
    kind: str = "invalid"
    # position of the row in the rows being processed (== row unless a mixture reordered them)
    position: int = -1
    # 1-based line in the file, for problems found while reading it (0: not known / not a line)
    line: int = 0

    def __str__(self) -> str:
        if self.line:
            where = f"line {self.line} (row {self.row})" if self.row >= 0 else f"line {self.line}"
        else:
            where = f"row {self.row}" if self.row >= 0 else "all rows" if self.field else ""
        what = ", ".join(p for p in (where, f"field '{self.field}'" if self.field else "") if p)
        return f"{self.dataset}: {what}: {self.message}" if what else f"{self.dataset}: {self.message}"


class DataValidationError(ValueError):
    """Raised before training when rows are invalid and ``skip_invalid_rows`` is off."""

    def __init__(self, errors: Sequence[DataError], total_rows: Optional[int] = None):
        self.errors = list(errors)
        if all(e.row < 0 for e in self.errors):  # whole-file problems: skipping rows cannot help
            super().__init__("\n".join(str(e) for e in self.errors))
            return
        if len(self.errors) == 1:  # one bad row: one line naming file, line/row and field
            super().__init__(f"{self.errors[0]} (fix the data, or set skip_invalid_rows: true to skip the row)")
            return
        counts = Counter(e.kind for e in self.errors)
        rows = len({(e.dataset, e.row) for e in self.errors})
        of = f" of {total_rows}" if total_rows is not None else ""
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        lines = [f"{rows}{of} rows are invalid; {len(self.errors)} problems ({kinds}):"]
        lines += [f"  {e}" for e in self.errors[:MAX_LISTED]]
        if len(self.errors) > MAX_LISTED:
            lines.append(f"  ... and {len(self.errors) - MAX_LISTED} more")
        lines.append("Fix the data, or set skip_invalid_rows: true to skip these rows (they are counted).")
        super().__init__("\n".join(lines))


@dataclass
class SkipReport:
    """Rows skipped because of :class:`DataError` s (only with ``skip_invalid_rows``)."""

    rows: set = field(default_factory=set)  # positions in the processed rows
    by_kind: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        if not self.rows:
            return "0 rows skipped"
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_kind.items()))
        return f"{len(self.rows)} rows skipped ({kinds}); first: {self.examples[0]}"


def resolve(errors: Iterable[DataError], *, skip_invalid_rows: bool, total_rows: Optional[int] = None) -> SkipReport:
    """Raise all collected errors at once, or turn them into a skip report."""
    errors = list(errors)
    report = SkipReport()
    if not errors:
        return report
    if not skip_invalid_rows:
        raise DataValidationError(errors, total_rows)
    for e in errors:
        pos = e.position if e.position >= 0 else e.row
        if pos not in report.rows:
            report.by_kind[e.kind] += 1
        report.rows.add(pos)
        if len(report.examples) < MAX_LISTED:
            report.examples.append(str(e))
    return report


def check_messages(
    messages,
    *,
    dataset: str,
    row: int,
    field: str,
    need_assistant: bool = True,
    last_role: Optional[str] = None,
) -> list:
    """Check a conversation: list of {role, content} dicts, known roles in order, non-empty strings.

    Order rule: an optional ``system`` turn first, then ``user``/``assistant`` alternating,
    starting with ``user``.
    """
    errs = []

    def err(msg, kind, sub=""):
        errs.append(DataError(dataset, row, field + sub, msg, kind))

    if messages is None:
        err("missing (None)", "missing_field")
        return errs
    if not isinstance(messages, (list, tuple)):
        err(f"expected a list of messages, got {type(messages).__name__}", "wrong_type")
        return errs
    if not messages:
        err("empty conversation", "empty")
        return errs
    expected = "user"
    for j, m in enumerate(messages):
        sub = f"[{j}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            got = f"got keys {sorted(m)}" if isinstance(m, dict) else f"got {type(m).__name__}"
            err(f"expected a dict with 'role' and 'content', {got}", "wrong_type", sub)
            return errs
        role, content = m["role"], m["content"]
        if role not in ROLES:
            err(f"unknown role {role!r} (expected one of {ROLES})", "bad_role", sub + ".role")
            return errs
        if not isinstance(content, str):
            err(f"content must be a string, got {type(content).__name__}", "wrong_type", sub + ".content")
        elif not content.strip():
            err("empty content", "empty", sub + ".content")
        if role == "system":
            if j != 0:
                err("a system turn is only allowed first", "role_order", sub + ".role")
                return errs
            continue
        if role != expected:
            err(f"roles out of order: expected {expected!r}, got {role!r}", "role_order", sub + ".role")
            return errs
        expected = "assistant" if role == "user" else "user"
    if need_assistant and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        err("no assistant turn to train on", "no_assistant")
    if last_role is not None and messages[-1].get("role") != last_role:
        err(f"last turn must be {last_role!r}, got {messages[-1].get('role')!r}", "role_order", f"[{len(messages) - 1}].role")
    return errs


def check_string(value, *, dataset: str, row: int, field: str) -> list:
    if value is None:
        return [DataError(dataset, row, field, "missing (None)", "missing_field")]
    if not isinstance(value, str):
        return [DataError(dataset, row, field, f"expected a string, got {type(value).__name__}", "wrong_type")]
    if not value.strip():
        return [DataError(dataset, row, field, "empty string", "empty")]
    return []


def check_columns(column_names: Iterable[str], required: Sequence[str], *, dataset: str, what: str) -> None:
    """Fail fast (before touching rows) when whole columns are missing."""
    have = set(column_names)
    missing = [c for c in required if c not in have]
    if missing:
        raise DataValidationError(
            [DataError(dataset, -1, c, f"column missing for {what} (columns present: {sorted(have)})", "missing_column") for c in missing]
        )


# --- row access shared by sft.py / preference.py / binarize.py -------------------------------------

SOURCE_COL, SOURCE_ROW_COL = "_source", "_source_row"
# set by load_rows on a row whose line could not be read (bad encoding, invalid JSON); None elsewhere.
# The row stays in place (so positions and skip counts stay right) and fails validation here.
LOAD_ERROR_COL = "_load_error"


def encode_load_error(kind: str, line: int, message: str, field: str = "") -> str:
    """The ``LOAD_ERROR_COL`` value for a line that could not be read (see :func:`load_errors`)."""
    return f"{kind}\t{line}\t{field}\t{message}"


def load_errors(value: Optional[str], *, dataset: str, row: int, position: int = -1) -> list:
    """``[DataError]`` for a row that ``load_rows`` could not read, ``[]`` for a readable row."""
    if value is None:
        return []
    kind, line, field, message = value.split("\t", 3)
    return [DataError(dataset, row, field, message, kind, position=position, line=int(line))]


def column_names(rows) -> list:
    """Columns of a ``datasets.Dataset`` or of a list of dict rows (union of keys)."""
    names = getattr(rows, "column_names", None)
    if names is not None:
        return list(names)
    seen = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def iter_chunks(rows, names: Sequence[str], size: int, dataset_name: str):
    """Yield ``(start, {name: list}, origins)`` for consecutive slices of ``rows``.

    Slicing a ``datasets.Dataset`` converts only ``size`` rows from Arrow at a time, so a 200k-row
    dataset is never held as Python objects all at once.  ``origins[k]`` is ``(dataset, row)`` for
    error messages: the source file and row recorded by :func:`load_rows` (mixtures shuffle rows),
    else ``dataset_name`` and the position in ``rows``.
    """
    have = column_names(rows)
    tagged = SOURCE_COL in have and SOURCE_ROW_COL in have
    wanted = [n for n in names if n in have] + ([SOURCE_COL, SOURCE_ROW_COL] if tagged else [])
    is_ds = hasattr(rows, "column_names")
    view = rows.select_columns(wanted) if is_ds else rows
    for c0 in range(0, len(rows), size):
        part = view[c0 : c0 + size]
        if is_ds:
            m = len(part[wanted[0]]) if wanted else min(size, len(rows) - c0)
            cols = {n: part[n] if n in part else [None] * m for n in names}
        else:
            m = len(part)
            cols = {n: [r.get(n) for r in part] for n in names}
        if tagged:
            src, idx = ((part[SOURCE_COL], part[SOURCE_ROW_COL]) if is_ds else
                        ([r.get(SOURCE_COL) for r in part], [r.get(SOURCE_ROW_COL) for r in part]))
            origins = [(s if s is not None else dataset_name, i if i is not None else c0 + k)
                       for k, (s, i) in enumerate(zip(src, idx))]
        else:
            origins = [(dataset_name, c0 + k) for k in range(m)]
        yield c0, cols, origins


# --- reading JSON / JSON Lines: an unreadable line is a row error, never a traceback -------------


def file_error(path: str, message: str, kind: str, line: int = 0) -> DataValidationError:
    """A problem with a whole file (one line; skipping rows cannot help)."""
    return DataValidationError([DataError(path, -1, "", message, kind, line=line)])


def read_json_rows(path: str) -> list:
    """The rows of a JSON Lines file (or a ``.json`` list / dict of columns / lines) as dicts.

    A line that is not UTF-8, not JSON or not an object becomes a row holding only
    ``LOAD_ERROR_COL`` (validation reports it with file, line and row; ``skip_invalid_rows`` skips it).
    A file that is empty or has no readable line at all is one :class:`DataValidationError`.
    """
    if os.path.getsize(path) == 0:
        raise file_error(path, "the file is empty (0 bytes)", "empty_file")
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        data = data[3:]
    if not data.strip():
        raise file_error(path, "the file is empty (whitespace only)", "empty_file")
    rows, lines = _json_document(path, data), None
    if rows is None:
        rows, lines = _json_lines(data)
    if not rows:
        raise file_error(path, "the file is empty (a JSON document with no rows)", "empty_file")
    rows = _mark_schema_conflicts(rows, lines or [0] * len(rows))
    errors = {i: r[LOAD_ERROR_COL] for i, r in enumerate(rows) if LOAD_ERROR_COL in r}
    if len(errors) == len(rows):  # nothing readable: the whole file is the problem
        raise DataValidationError([e for i, v in errors.items() for e in load_errors(v, dataset=path, row=i)])
    return rows


def _json_document(path: str, data: bytes):
    """Rows of a whole-file JSON document (a list of objects, or a dict of equal-length columns);
    None when the file is JSON Lines."""
    head = data.lstrip()[:1]
    if head not in (b"[", b"{"):
        return None
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        if head == b"{":
            return None
        raise file_error(path, f"not valid UTF-8: {_bad_byte(data, exc.start)}", "encoding",
                          line=data.count(b"\n", 0, exc.start) + 1) from None
    except json.JSONDecodeError as exc:
        if head == b"{":
            return None  # JSON Lines (several objects), or a broken line that _json_lines names
        raise file_error(path, f"invalid JSON: {exc.msg} (column {exc.colno})", "invalid_json", line=exc.lineno) from None
    if isinstance(doc, list):
        return [r if isinstance(r, dict) else
                {LOAD_ERROR_COL: encode_load_error("invalid_json", 0, f"list item {i}: expected a JSON object, "
                                                   f"got {type(r).__name__}")} for i, r in enumerate(doc)]
    cols = list(doc.values())
    if cols and all(isinstance(c, list) for c in cols) and len({len(c) for c in cols}) == 1:
        return [dict(zip(doc, vals)) for vals in zip(*cols)]
    return [doc]


def _bad_byte(data: bytes, pos: int) -> str:
    line_start = data.rfind(b"\n", 0, pos) + 1
    return f"byte 0x{data[pos]:02x} at column {pos - line_start + 1}"


def _kind(value) -> Optional[str]:
    """A JSON value's type as one Arrow column must hold it (None: null, fits any column)."""
    if value is None:
        return None
    if isinstance(value, list):
        inner = next((_kind(v) for v in value if v is not None), None)
        return "a list" if inner is None else f"a list of {inner.split(' ', 1)[1]}s"
    name = {bool: "a boolean", str: "a string", dict: "an object"}.get(type(value))
    return name or ("a number" if isinstance(value, (int, float)) else type(value).__name__)


def _mark_schema_conflicts(rows: list, lines: list) -> list:
    """Rows whose field holds another type than most rows' (a string ``chosen`` among message lists):
    each becomes a ``LOAD_ERROR_COL`` row naming its line and field, so validation reports (or
    ``skip_invalid_rows`` skips) exactly those rows instead of the whole file failing to load."""
    kinds: dict = {}
    for i, r in enumerate(rows):
        for k, v in r.items():
            if k != LOAD_ERROR_COL and _kind(v) is not None:
                kinds.setdefault(k, {}).setdefault(_kind(v), []).append(i)
    bad: dict = {}
    for col, by_kind in kinds.items():
        if len(by_kind) < 2:
            continue
        # an empty list (elements unknown) fits any column of lists: the column's type is the most
        # common of the others (ties: the first row's), empty lists agreeing with any list type
        typed = [k for k in by_kind if k != "a list"] or list(by_kind)
        usual = max(typed, key=lambda k: (len(by_kind[k]), -by_kind[k][0]))
        odd = [k for k in by_kind if k != usual and not (k == "a list" and usual.startswith("a list"))]
        example = by_kind[usual][0]
        for k in odd:
            for i in by_kind[k]:
                at = f"line {lines[example]}" if lines[example] else f"row {example}"
                bad.setdefault(i, encode_load_error(
                    "schema", lines[i], f"{k}, where {len(by_kind[usual])} other rows (e.g. {at}) hold {usual}", col))
    return [r if i not in bad else {LOAD_ERROR_COL: bad[i]} for i, r in enumerate(rows)]


def _json_lines(data: bytes) -> tuple:
    """``(rows, 1-based line of each row)`` of a JSON Lines file."""
    rows, lines = [], []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            problem = None if isinstance(obj, dict) else ("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
        except UnicodeDecodeError as exc:
            problem = ("encoding", f"not valid UTF-8: {_bad_byte(raw, exc.start)}")
        except json.JSONDecodeError as exc:
            problem = ("invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})")
        rows.append(obj if problem is None else {LOAD_ERROR_COL: encode_load_error(problem[0], n, problem[1])})
        lines.append(n)
    return rows, lines
