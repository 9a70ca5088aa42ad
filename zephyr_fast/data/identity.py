"""Content identity of data: file and folder digests, the ``datasets`` cache keyed by content, and
:func:`rows_digest`, the identity of the rows a run actually uses (after mixture, split and shuffle).

Identity is content, never paths or mtimes: touching a file or rewriting it with the same bytes
changes nothing; an edit that keeps the mtime changes the digest. The reference-log-prob cache key
and a checkpoint's data identity are both :func:`rows_digest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from typing import Optional

from .validate import SOURCE_COL, SOURCE_ROW_COL, column_names, iter_chunks


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_digest(path: str) -> str:
    """sha256 over a file's bytes, or over every file under a folder (relative names and bytes)."""
    if os.path.isfile(path):
        return file_digest(path)
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(d, name)
            h.update(os.path.relpath(full, path).encode() + b"\0" + file_digest(full).encode())
    return h.hexdigest()


def content_cache_dir(path: str, cache_dir: Optional[str]) -> str:
    """A ``datasets`` cache folder keyed by the content of ``path`` (a file or a folder): an edit, even
    one that keeps the mtime, gets a fresh Arrow copy; a touch or a same-bytes rewrite reuses it."""
    import datasets

    return os.path.join(cache_dir or str(datasets.config.HF_DATASETS_CACHE), "by_content", tree_digest(path))


def rows_digest(rows) -> str:
    """sha256 (hex) of the rows actually used, in order: every column's values except the
    ``_source`` / ``_source_row`` bookkeeping, so it depends on content, not on paths or mtimes.

    ``rows``: a ``datasets.Dataset`` (e.g. ``load_rows(cfg)["train"]``, after mixture, split and
    shuffle) or a list of dict rows; both give the same digest for the same rows. A Dataset is
    immutable, so its digest is computed once per process (the reference cache key and the
    checkpoint's data identity share it; about 30 s per 200k UltraChat rows on one core).
    """
    try:
        return _DIGESTS[rows]
    except (KeyError, TypeError):  # not digested yet, or a list (not weak-referenceable)
        pass
    digest = _rows_digest(rows)
    try:
        _DIGESTS[rows] = digest
    except TypeError:
        pass
    return digest


_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _rows_digest(rows) -> str:
    names = sorted(c for c in column_names(rows) if c not in (SOURCE_COL, SOURCE_ROW_COL))
    h = hashlib.sha256(json.dumps(names).encode())
    for _, cols, origins in iter_chunks(rows, names, 1024, "rows"):
        for j in range(len(origins)):
            row = [cols[n][j] for n in names]
            h.update(json.dumps(row, ensure_ascii=False, sort_keys=True, default=repr).encode() + b"\n")
    return h.hexdigest()
