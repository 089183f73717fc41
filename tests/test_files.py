"""Atomic writes: the new text or the old one, never a partial file or a leftover temporary."""
import pytest

from train import files
from train.files import atomic_write_text


def test_writes_text_and_creates_parent_dirs(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b.json", "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.json"]


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
