"""The one way zephyr_fast replaces a file, and the one way it shortens an error to a line.

:func:`atomic_write` / :func:`atomic_open` give every writer the same guarantee: a reader sees the old
file or the whole new one, never a part, and once the call returns the new file survives a power cut.
The data goes to a hidden temp file in the same folder (same filesystem, so the rename is atomic), is
flushed and fsynced, renamed over the target with ``os.replace``, and then the folder itself is
fsynced so the rename is on disk too.  On any failure the temp file is removed and the target is left
as it was.  This module is the only place outside the checkpoint publish that calls ``os.replace``
(a test checks it).

Torch-free and dependency-free: the config package, the CLI and the AIF tools import it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Iterator, Union


def first_line(exc: BaseException) -> str:
    """The first line of ``str(exc)`` (an error message fit for one line), else the exception's type name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fsync_dir(path: str) -> None:
    """fsync the folder ``path`` so that renames and creations inside it are durable."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str = "utf-8") -> Iterator:
    """``with atomic_open(path) as f: f.write(...)``: ``path`` is replaced by what was written, whole, on exit.

    ``mode`` is ``"w"`` (text, ``encoding``) or ``"wb"``.  An exception inside the block leaves ``path``
    untouched and removes the temp file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', not {mode!r}")
    folder = os.path.dirname(path) or "."
    # O_EXCL on a random name (not mkstemp): the file gets the umask's permissions, like a plain open()
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write(path: str, data: Union[bytes, str]) -> None:
    """Replace ``path`` with ``data`` (bytes, or text written as UTF-8) atomically and durably."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
