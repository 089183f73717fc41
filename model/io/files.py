"""Atomic writes: a reader (or a crash) sees the old file or the new one, never half of one, and a
directory appears whole or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8) to path through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())     # mkstemp makes 0600; a plain open() would not
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def check_new_dir(path: str | Path, what: str = "directory") -> None:
    """Refuse a path that exists and is not an empty directory (what names the flag in the message)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} already exists and is not an empty directory; choose a new {what} "
                         f"or remove it first")


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None], what: str = "directory") -> Path:
    """Create the directory path, which must not exist or be empty, with the files fill(tmp) writes
    into a temporary sibling that is then renamed into place: a failure leaves nothing behind. Its
    files and folders get the modes a plain open() and mkdir() give."""
    check_new_dir(path, what)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(staging)
        give_plain_modes(staging)
        if path.exists():
            path.rmdir()
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def give_plain_modes(directory: Path) -> None:
    """Give directory and everything under it the modes a plain mkdir() and open() would: mkdtemp
    makes 0700 folders, and safetensors (so transformers' save_pretrained) 0600 files."""
    mask = current_umask()
    for p in [directory, *directory.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
