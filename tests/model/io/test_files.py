"""Atomic writes: the new text or the old one, never a partial file or a leftover temporary."""
import os
import stat

import pytest

from model.io import files
from model.io.files import atomic_write_text


def test_writes_text_and_creates_parent_dirs(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b.json", "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]


def test_file_mode_follows_the_umask_like_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "config.json", "{}")
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def fail(*_):
        raise OSError("disk full")
    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_dir_gives_the_modes_of_a_plain_open_and_mkdir(tmp_path):
    def fill(staging):
        os.close(os.open(staging / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))   # as safetensors does
        (staging / "checkpoints").mkdir(mode=0o700)
        os.close(os.open(staging / "checkpoints" / "latest", os.O_CREAT | os.O_WRONLY, 0o600))

    old = os.umask(0o022)
    try:
        out = files.atomic_write_dir(tmp_path / "out", fill)
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes == {".": 0o755, "model.safetensors": 0o644, "checkpoints": 0o755, "checkpoints/latest": 0o644}


def test_atomic_write_dir_appears_whole_or_not_at_all(tmp_path):
    def fill(staging):
        (staging / "a.txt").write_text("a")

    old = os.umask(0o022)
    try:
        out = files.atomic_write_dir(tmp_path / "out", fill)
    finally:
        os.umask(old)
    assert [p.name for p in out.iterdir()] == ["a.txt"] and stat.S_IMODE(out.stat().st_mode) == 0o755
    with pytest.raises(ValueError, match="already exists and is not an empty directory; choose a new OUT_DIR"):
        files.atomic_write_dir(out, fill, "OUT_DIR")

    def broken(staging):
        fill(staging)
        raise OSError("disk full")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_dir(tmp_path / "empty", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"] and not any((tmp_path / "empty").iterdir())
