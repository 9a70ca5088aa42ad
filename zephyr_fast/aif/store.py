"""Append-only JSONL files that survive ``kill -9``, sealed record by record, and the judge's cache.

Every record is one line written with a single ``write`` and flushed at once, so a process killed
at any point loses at most the line it was writing.  A torn last line (no ``\\n``) is closed with
a newline before the next append.

Caches and resume files (the judge cache, ``generate``'s parts, MT-Bench answers) are *sealed*: each
record carries ``digest``, the sha256 of its own canonical JSON (:func:`seal`).  Reading one back
(:func:`iter_sealed`) keeps only records whose digest verifies; a torn line, invalid JSON, a
non-UTF-8 byte or an edited record is *damaged*: skipped, counted (``counter["damaged"]``) and, being
missing, recomputed by the caller -- never trusted, and never a reason to refuse the rerun.

Cache records (``JudgeCache``): ``{"key": sha256, ..., "digest"}`` where the key hashes the judge's
endpoint, model, template version and the exact request (see ``judge.py`` / ``eval/grading.py``), so
an item is never sent to the same judge twice, across runs and across kill -9.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Callable, Iterable, Iterator, Optional

from zephyr_fast.fileio import atomic_open

DIGEST = "digest"


class JsonlError(ValueError):
    """A line of an input JSONL file that is not valid JSON or UTF-8 (names file and line)."""


def cache_key(*parts) -> str:
    """sha256 of the JSON list of ``parts`` (strings / numbers / None / lists / dicts, keys sorted)."""
    return hashlib.sha256(json.dumps(list(parts), ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def _record_digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def seal(record: dict) -> dict:
    """``record`` with its own digest (what :func:`iter_sealed` verifies)."""
    return {**{k: v for k, v in record.items() if k != DIGEST}, DIGEST: _record_digest(record)}


def is_sealed(record) -> bool:
    return isinstance(record, dict) and record.get(DIGEST) == _record_digest(record)


def _decode(raw: bytes, path: str, n: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonlError(f"{path}: line {n}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") \
            from None


def iter_jsonl(path: str, *, tolerate_torn: bool = True, counter: Optional[dict] = None) -> Iterator[dict]:
    """Records of a JSONL file, read line by line (memory: one line).

    Args:
        tolerate_torn: skip lines that are not valid UTF-8 JSON (left by a killed writer, damaged) and
            count them in ``counter["damaged"]``; ``False`` raises :class:`JsonlError` naming file and
            line instead.
    """
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = _decode(raw, path, n)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise JsonlError(f"{path}: line {n}: invalid JSON ({exc.msg})") from None
            except JsonlError:
                if not tolerate_torn:
                    raise
                _count(counter)
                continue
            yield rec


def _count(counter: Optional[dict]) -> None:
    if counter is not None:
        counter["damaged"] = counter.get("damaged", 0) + 1


def iter_sealed(path: str, counter: Optional[dict] = None,
                valid: Optional[Callable[[dict], bool]] = None) -> Iterator[dict]:
    """The records of a sealed file whose digest verifies (and that ``valid`` accepts); every other
    line is damaged: skipped and counted in ``counter["damaged"]``."""
    for rec in iter_jsonl(path, counter=counter):
        if is_sealed(rec) and (valid is None or valid(rec)):
            yield rec
        else:
            _count(counter)


def read_input_jsonl(path: str) -> list:
    """Rows of a user-supplied JSONL file; a bad line raises :class:`JsonlError` (file, line)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise JsonlError(f"{path}: is a directory, not a JSONL file")
    return list(iter_jsonl(path, tolerate_torn=False))


class AppendLog:
    """Thread-safe append-only JSONL writer (one flushed ``write`` per record; sealed with ``sealed``)."""

    def __init__(self, path: str, *, sealed: bool = False):
        self.path, self.sealed = path, sealed
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.Lock()
        self._f = open(path, "a", encoding="utf-8")
        if self._f.tell() > 0 and not _ends_with_newline(path):
            self._f.write("\n")  # close a line torn by a killed writer
            self._f.flush()

    def append(self, record: dict) -> dict:
        record = seal(record) if self.sealed else record
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
        return record

    def extend(self, records: Iterable[dict]) -> None:
        for r in records:
            self.append(r)

    def close(self) -> None:
        with self._lock:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def write_jsonl_atomic(path: str, rows: Iterable[dict]) -> None:
    """Replace ``path`` with ``rows`` (one JSON object per line) atomically (:func:`~zephyr_fast.fileio.atomic_open`)."""
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


class JudgeCache:
    """On-disk judge cache: ``key -> record`` loaded from, and appended to, one sealed JSONL file.

    Only answers are stored: a parsed rating, or an answer that stayed unparseable after every
    re-ask (re-asked again with ``retry_failed``); transport and protocol failures never are, so a
    rerun asks for exactly what is missing.  ``valid(record)`` re-checks what a verified record
    claims (its rating re-parsed from its raw answer); a record it rejects counts as damaged.
    """

    def __init__(self, path: str, *, valid: Optional[Callable[[dict], bool]] = None, retry_failed: bool = False):
        self.path, self.retry_failed = path, retry_failed
        self.stats = {"damaged": 0}
        self._data = {r["key"]: r for r in iter_sealed(path, self.stats, lambda r: "key" in r and
                                                          (valid is None or valid(r)))}
        self._log = AppendLog(path, sealed=True)
        self._fresh: set = set()  # keys answered by this run

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> Optional[dict]:
        rec = self._data.get(key)
        if rec is not None and self.retry_failed and rec.get("status") != "ok" and key not in self._fresh:
            return None  # --retry-failed: an answer that never parsed is asked again
        return rec

    def put(self, key: str, record: dict) -> dict:
        rec = self._log.append({"key": key, **record})
        self._data[key] = rec
        self._fresh.add(key)
        return rec

    def close(self) -> None:
        self._log.close()
