"""zephyr_fast.fileio: the one atomic write (whole file or the old one, fsynced, umask permissions)."""

import os

import pytest

from zephyr_fast import fileio
from zephyr_fast.fileio import atomic_open, atomic_write, first_line


def test_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("old")
    atomic_write(str(p), "new ü")
    assert p.read_text(encoding="utf-8") == "new ü"
    atomic_write(str(p), b"\x00bytes")
    assert p.read_bytes() == b"\x00bytes"
    assert os.listdir(tmp_path) == ["x.json"]


def test_failure_inside_the_block_keeps_the_old_file(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(str(p)) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_permissions_follow_the_umask_like_open(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a"), "x")
        with open(tmp_path / "b", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == (tmp_path / "b").stat().st_mode & 0o777 == 0o644


def test_fsyncs_file_then_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(fileio.os, "fsync", spy)
    atomic_write(str(tmp_path / "a"), "x")
    assert synced == [False, True]  # the data, then the folder holding the rename


def test_rename_failure_removes_the_temp(tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write(str(tmp_path / "a"), "x")
    assert os.listdir(tmp_path) == []


def test_bad_mode_refused(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_open(str(tmp_path / "a"), "a"):
            pass


@pytest.mark.parametrize("exc, line", [(ValueError("a\nb"), "a"), (KeyError(), "KeyError"),
                                        (OSError("  x  "), "x")])
def test_first_line(exc, line):
    assert first_line(exc) == line
