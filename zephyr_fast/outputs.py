"""One writer per output, and never a file the run did not create.

Every command that writes (``train``, ``generate``, ``judge``, ``aif``, ``mt-bench``) claims its output
first (:func:`claim_folder`, or :func:`claim_file` for the judge's output file and cache):

* **inputs are not outputs**: an output equal to one of the run's inputs (the model folder, a data
  or prompts file) is refused, as is an output folder that is an existing file;
* **foreign folders are left alone**: a non-empty folder without zephyr_fast's lock file (so written
  by something else) is refused unless ``--overwrite_output_dir`` (TRL's key) says to write into it;
* **one writer**: the lock file (:data:`LOCK_NAME` in a folder, ``FILE.lock`` beside a file) is held
  with ``flock`` for the whole run and names its holder (command, pid, host, start time).  A second
  writer is refused in one line naming the holder.  The kernel releases a ``flock`` when its process
  dies, however it dies, so the lock of a dead process (``kill -9``, a lost node's file left behind)
  is simply taken over -- atomically: of two processes taking it over at once, one gets it.

The lock file stays after the run: it marks the folder as zephyr_fast's, so a rerun (a resume) is
allowed in without ``--overwrite_output_dir``.  Errors are :class:`OutputError` (a ``ConfigError``:
one line, exit status 2).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

from zephyr_fast.config import ConfigError

LOCK_NAME = ".zephyr_fast.lock"
OVERWRITE = "--overwrite_output_dir"


class OutputError(ConfigError):
    """An output that must not be written (an input, a foreign folder, another run's): one line."""


class OutputLock:
    """An ``flock`` held on ``path`` until :meth:`release` (or the process's death)."""

    def __init__(self, path: str, command: str):
        self.path, self.command, self._fd = path, command, None

    def acquire(self, what: str) -> "OutputLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputError(f"{what}: another writer holds it ({holder}); wait for it to finish or use another "
                              f"output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"command": self.command, "pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    return (f"zephyr-fast {info.get('command', '?')}, pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"since {info.get('started', '?')}")


def _same(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def check_not_input(output: str, inputs: dict, what: str) -> None:
    """Refuse an ``output`` that is one of ``inputs`` (``{name: path or None}``)."""
    for name, path in inputs.items():
        if isinstance(path, str) and path and os.path.exists(os.path.expanduser(path)) and _same(output, path):
            raise OutputError(f"{what}: is also the run's input ({name}); writing there would overwrite it: "
                              "choose another output")


def claim_folder(folder: str, command: str, *, inputs: Optional[dict] = None, overwrite: bool = False,
                 what: Optional[str] = None) -> OutputLock:
    """Check ``folder`` may be written by ``command`` (see the module docstring), create it, lock it."""
    what = what or f"output folder {folder}"
    if os.path.isfile(folder):
        raise OutputError(f"{what}: is an existing file, not a folder; choose another output")
    check_not_input(folder, inputs or {}, what)
    if os.path.isdir(folder) and not overwrite and not os.path.exists(os.path.join(folder, LOCK_NAME)):
        entries = sorted(os.listdir(folder))
        if entries:
            raise OutputError(f"{what}: not empty ({len(entries)} entries, e.g. {entries[0]!r}) and not written by "
                              f"zephyr_fast; pass {OVERWRITE}=true to write into it, or choose another folder")
    os.makedirs(folder, exist_ok=True)
    return OutputLock(os.path.join(folder, LOCK_NAME), command).acquire(what)


def claim_file(path: str, command: str, *, inputs: Optional[dict] = None, overwrite: bool = False) -> OutputLock:
    """The same for one output file: its lock is ``path + ".lock"``; an existing ``path`` without one
    was not written by zephyr_fast and is refused unless ``overwrite``."""
    what = f"output file {path}"
    if os.path.isdir(path):
        raise OutputError(f"{what}: is a folder, not a file; choose another output")
    check_not_input(path, inputs or {}, what)
    if os.path.exists(path) and not overwrite and not os.path.exists(path + ".lock"):
        raise OutputError(f"{what}: exists and was not written by zephyr_fast; pass {OVERWRITE} to replace it, "
                          "or choose another file")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return OutputLock(path + ".lock", command).acquire(what)

