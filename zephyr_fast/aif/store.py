"""Append-only JSONL files that survive ``kill -9``, and the judge's on-disk cache.

Every record is one line written with a single ``write`` and flushed at once, so a process killed
at any point loses at most the line it was writing.  A torn last line (no ``\\n``) is closed with
a newline before the next append and skipped — and counted — when the file is read back; nothing
else is ever skipped.

Cache records (``JudgeCache``): ``{"key": sha256, ...}`` where the key hashes
``(prompt, completion, judge model, template version)`` (plus the aspect / grading-prompt name), so
an item is never sent to the judge twice, across runs and across kill -9.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Iterable, Iterator, Optional


class JsonlError(ValueError):
    """A line of an input JSONL file that is not valid JSON (names file and line)."""


def cache_key(*parts) -> str:
    """sha256 of the JSON list of ``parts`` (strings / numbers / None)."""
    return hashlib.sha256(json.dumps(list(parts), ensure_ascii=False).encode("utf-8")).hexdigest()


def iter_jsonl(path: str, *, tolerate_torn: bool = True, counter: Optional[dict] = None) -> Iterator[dict]:
    """Records of a JSONL file.

    Args:
        tolerate_torn: skip lines that are not valid JSON (left by a killed writer) and count them in
            ``counter["torn"]``; ``False`` raises :class:`JsonlError` naming file and line instead.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                if not tolerate_torn:
                    raise JsonlError(f"{path}: line {n}: invalid JSON ({exc.msg})") from None
                if counter is not None:
                    counter["torn"] = counter.get("torn", 0) + 1
                continue
            yield rec


def read_input_jsonl(path: str) -> list:
    """Rows of a user-supplied JSONL file; a bad line raises :class:`JsonlError` (file, line)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    return list(iter_jsonl(path, tolerate_torn=False))


class AppendLog:
    """Thread-safe append-only JSONL writer (one flushed ``write`` per record)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.Lock()
        self._f = open(path, "a", encoding="utf-8")
        if self._f.tell() > 0 and not _ends_with_newline(path):
            self._f.write("\n")  # close a line torn by a killed writer
            self._f.flush()

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()

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
    """Write ``rows`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class JudgeCache:
    """On-disk judge cache: ``key -> record`` loaded from, and appended to, one JSONL file.

    Only final outcomes are stored (a parsed rating, or an answer that stayed unparseable after
    every re-ask); transport failures are not, so a rerun asks for exactly what is missing.
    """

    def __init__(self, path: str):
        self.path = path
        self.stats = {"torn": 0}
        self._data = {r["key"]: r for r in iter_jsonl(path, counter=self.stats) if "key" in r}
        self._log = AppendLog(path)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> Optional[dict]:
        return self._data.get(key)

    def put(self, key: str, record: dict) -> dict:
        rec = {"key": key, **record}
        self._log.append(rec)
        self._data[key] = rec
        return rec

    def close(self) -> None:
        self._log.close()
