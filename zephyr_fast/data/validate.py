"""Row validation: every problem names the dataset, row and field; nothing is dropped silently.

Validation collects *all* problems of a dataset first, then either stops the run with one summary
(:class:`DataValidationError`, the default) or, with ``skip_invalid_rows=True``, drops exactly the
bad rows and reports how many were skipped and why.

Reading JSON / JSON Lines (:func:`read_json_rows`, used by binarize and for JSON documents;
:class:`JsonLinesReader`, the loader's streamed reading of JSON Lines, which gives the same rows)
follows the same rule: a line that is not UTF-8 or not JSON becomes a row error naming the file and
the line.
"""

from __future__ import annotations

import json
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

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
    dataset is never held as Python objects all at once; the pages of its memory-mapped Arrow files
    that a chunk touched leave this process's resident set after the chunk (:class:`MappedPages`), so a
    pass over the rows does not keep the whole file resident either. ``origins[k]`` is
    ``(dataset, row)`` for error messages: the source file and row recorded by :func:`load_rows`
    (mixtures shuffle rows), else ``dataset_name`` and the position in ``rows``.
    """
    have = column_names(rows)
    tagged = SOURCE_COL in have and SOURCE_ROW_COL in have
    wanted = [n for n in names if n in have] + ([SOURCE_COL, SOURCE_ROW_COL] if tagged else [])
    is_ds = hasattr(rows, "column_names")
    view = rows.select_columns(wanted) if is_ds else rows
    pages = MappedPages.of(rows) if is_ds else None
    for c0 in range(0, len(rows), size):
        part = view[c0 : c0 + size] if pages is None else pages.read(view, c0, min(c0 + size, len(rows)))
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


class MappedPages:
    """The read-only file mappings of a ``datasets.Dataset``'s memory-mapped Arrow tables, and
    :meth:`release`: ``madvise(MADV_DONTNEED)`` over them, so the pages a pass has read leave this
    process's resident set (they stay in the page cache; the next access maps them again, unchanged).

    Only a mapping of the table's own file (``/proc/self/maps``, its path), read-only, that holds one of
    the table's own buffers is taken -- it stays mapped while the dataset lives, so nothing else is
    ever advised. Linux only; elsewhere (or with nothing found) :meth:`of` returns None.
    """

    MADV_DONTNEED = 4
    # rows read between two releases: a page fault maps a whole page-cache folio (often 128 KB or more),
    # so one shuffled row can put a few hundred KB of the file into the resident set
    READ_ROWS = 32

    def __init__(self, ranges: list):
        import ctypes

        self.ranges = ranges
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    @classmethod
    def of(cls, rows) -> Optional["MappedPages"]:
        try:
            ranges = _mapped_ranges(rows)
            return cls(ranges) if ranges else None
        except (OSError, ImportError, AttributeError, ValueError):  # no /proc, no libc: nothing to release
            return None

    def release(self) -> None:
        for start, end in self.ranges:
            self._libc.madvise(start, end - start, self.MADV_DONTNEED)

    def read(self, view, start: int, stop: int) -> dict:
        """``view[start:stop]`` (columns of Python values), read :attr:`READ_ROWS` rows at a time with
        the pages released after each read."""
        out: dict = {}
        for a in range(start, stop, self.READ_ROWS):
            for name, values in view[a:min(a + self.READ_ROWS, stop)].items():
                out.setdefault(name, []).extend(values)
            self.release()
        return out


def _mapped_ranges(rows) -> list:
    """``[(start, end)]`` of the read-only mappings holding the memory-mapped tables under ``rows``."""
    from datasets.table import ConcatenationTable, MemoryMappedTable

    tables, stack = [], [getattr(rows, "data", None)]
    while stack:
        t = stack.pop()
        if isinstance(t, MemoryMappedTable):
            tables.append(t)
        elif isinstance(t, ConcatenationTable):
            stack += [b for row in t.blocks for b in row]
    if not tables or not os.path.exists("/proc/self/maps"):
        return []
    maps: dict = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and "w" not in parts[1]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.setdefault(parts[5].rstrip("\n"), []).append((lo, hi))
    out = set()
    for t in tables:
        address = next((b.address for col in t.table.columns for chunk in col.chunks for b in chunk.buffers()
                        if b is not None and b.size), None)
        for lo, hi in maps.get(os.path.realpath(t.path), []):
            if address is not None and lo <= address < hi:
                out.add((lo, hi))
    return sorted(out)


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


def _json_line(n: int, raw: bytes) -> dict:
    """Line ``n`` of a JSON Lines file as a row: its object, or a ``LOAD_ERROR_COL`` row naming the problem."""
    try:
        obj = json.loads(raw.decode("utf-8"))
        problem = None if isinstance(obj, dict) else ("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
    except UnicodeDecodeError as exc:
        problem = ("encoding", f"not valid UTF-8: {_bad_byte(raw, exc.start)}")
    except json.JSONDecodeError as exc:
        problem = ("invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})")
    return obj if problem is None else {LOAD_ERROR_COL: encode_load_error(problem[0], n, problem[1])}


def _json_lines(data: bytes) -> tuple:
    """``(rows, 1-based line of each row)`` of a JSON Lines file."""
    rows, lines = [], []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        rows.append(_json_line(n, raw))
        lines.append(n)
    return rows, lines


# --- JSON Lines, streamed: the rows of read_json_rows without holding the file or its rows ----------

_BOM = b"\xef\xbb\xbf"


def _file_lines(path: str) -> Iterator[tuple]:
    """``(line number, bytes)`` of every non-blank line, numbered as ``data.split(b"\\n")`` numbers them
    (a leading byte order mark dropped), read one line at a time."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if n == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            if raw.strip():
                yield n, raw


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw.decode("utf-8"))
        return True
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        return False


def _signature(row: dict) -> tuple:
    """A row's keys, in order, each with its :func:`_kind` (what schema-conflict marking looks at)."""
    return tuple((k, _kind(v)) for k, v in row.items())


class JsonLinesReader:
    """A JSON Lines file read in two streamed passes, giving exactly the rows :func:`read_json_rows`
    gives (row errors, schema-conflict marks, the whole-file errors) without holding the file's bytes
    or its rows: memory is a few bytes per row (its key/kind signature) plus one chunk of rows.

    Pass 1 (:meth:`open`) parses every line and keeps, per row, only the id of its signature (its keys
    and their kinds) and, per column and kind, a count and the first row: enough to mark the schema
    conflicts exactly as :func:`_mark_schema_conflicts` does and to know the column order. Pass 2
    (:meth:`chunks`) parses the lines again and yields the final rows, a chunk at a time.
    """

    def __init__(self, path: str):
        self.path = path
        self._sig_ids: dict = {}
        self._sigs: list = []  # signature tuples, in order of first row
        self._row_sig = array("l")  # signature id of every row
        self._kinds: dict = {}  # column -> {kind: [rows, first row, its line]}
        self._stat = self._file_state()

    @classmethod
    def open(cls, path: str) -> Optional["JsonLinesReader"]:
        """The scanned reader, or None when the file must be read whole: a JSON document (starts with
        ``[``, or an object that is not alone on its first line of several). Raises the whole-file
        errors :func:`read_json_rows` raises (empty, whitespace only, no readable line)."""
        if os.path.getsize(path) == 0:
            raise file_error(path, "the file is empty (0 bytes)", "empty_file")
        lines = _file_lines(path)
        first = next(lines, None)
        if first is None:
            raise file_error(path, "the file is empty (whitespace only)", "empty_file")
        head = first[1].lstrip()[:1]
        # an object first: JSON Lines (and the whole file no JSON document) when the first line is a
        # complete value of its own and another line follows; anything else is left to the whole read
        whole = head == b"[" or head == b"{" and (next(lines, None) is None or not _parses(first[1]))
        lines.close()
        if whole:
            return None
        reader = cls(path)
        reader._scan()
        return reader

    def _file_state(self) -> tuple:
        st = os.stat(self.path)
        return st.st_size, st.st_mtime_ns, st.st_ino

    def _scan(self) -> None:
        kinds, sig_ids, row_sig = self._kinds, self._sig_ids, self._row_sig
        for i, (n, raw) in enumerate(_file_lines(self.path)):
            row = _json_line(n, raw)
            sig = _signature(row)
            sid = sig_ids.get(sig)
            if sid is None:
                sid = sig_ids[sig] = len(self._sigs)
                self._sigs.append(sig)
            row_sig.append(sid)
            for k, kind in sig:
                if k != LOAD_ERROR_COL and kind is not None:
                    entry = kinds.setdefault(k, {}).setdefault(kind, [0, i, n])
                    entry[0] += 1
        self.num_rows = len(row_sig)
        self._sig_mark = self._conflicts()
        # the columns in order of first appearance over the final rows (a marked row holds LOAD_ERROR_COL
        # only): the signatures in order of their first row give the same order
        final_keys = [(LOAD_ERROR_COL,) if mark else tuple(k for k, _ in sig)
                      for sig, mark in zip(self._sigs, self._sig_mark)]
        self.names = list(dict.fromkeys(k for keys in final_keys for k in keys))
        rows_per_sig = Counter(row_sig)
        errors = sum(rows_per_sig[sid] for sid, keys in enumerate(final_keys) if LOAD_ERROR_COL in keys)
        if errors == self.num_rows:  # nothing readable: the whole file is the problem (as read_json_rows)
            rows = [r for chunk in self.chunks() for r in chunk]
            raise DataValidationError([e for i, r in enumerate(rows)
                                       for e in load_errors(r[LOAD_ERROR_COL], dataset=self.path, row=i)])

    def _conflicts(self) -> list:
        """Per signature: None, or ``(message, column)`` of the first column (in :func:`_mark_schema_conflicts`'
        order) whose kind is not the column's usual one."""
        odd: dict = {}
        for col, by_kind in self._kinds.items():
            if len(by_kind) < 2:
                continue
            typed = [k for k in by_kind if k != "a list"] or list(by_kind)
            usual = max(typed, key=lambda k: (by_kind[k][0], -by_kind[k][1]))
            count, first, line = by_kind[usual]
            at = f"line {line}" if line else f"row {first}"
            for k in by_kind:
                if k != usual and not (k == "a list" and usual.startswith("a list")):
                    odd[(col, k)] = (f"{k}, where {count} other rows (e.g. {at}) hold {usual}", col)
        marks = []
        order = list(self._kinds)
        for sig in self._sigs:
            kind_of = dict(sig)
            marks.append(next((odd[(c, kind_of[c])] for c in order if c in kind_of and (c, kind_of[c]) in odd), None))
        return marks

    def chunks(self, max_rows: int = 4096, max_bytes: int = 16 << 20) -> Iterator[list]:
        """The rows (as :func:`read_json_rows` returns them), in consecutive lists of at most ``max_rows``
        rows or about ``max_bytes`` of lines. Refuses a file that changed since :meth:`open` read it."""
        if self._file_state() != self._stat:
            raise file_error(self.path, "the file changed while it was being read", "changed")
        chunk, size, i = [], 0, -1
        for i, (n, raw) in enumerate(_file_lines(self.path)):
            if i >= self.num_rows:
                break
            mark = self._sig_mark[self._row_sig[i]]
            chunk.append(_json_line(n, raw) if mark is None else
                         {LOAD_ERROR_COL: encode_load_error("schema", n, mark[0], mark[1])})
            size += len(raw)
            if len(chunk) >= max_rows or size >= max_bytes:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk
        if i + 1 != self.num_rows or self._file_state() != self._stat:
            raise file_error(self.path, "the file changed while it was being read", "changed")
