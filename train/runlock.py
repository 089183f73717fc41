"""One job per run directory: an exclusive lock held for the life of the run.

The lock is an flock on run_dir/.lock, so the kernel releases it when its process dies, however it
dies; the file also names the owner's pid, so a second job can say who holds it, and a run that
finds a dead owner's pid there says it takes over.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path


class RunLock:
    """Held from acquire() until release() (or the process's end)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None
        self.created: list[Path] = []      # directories acquire() made, innermost first
        self.found: set[str] = set()       # what the run directory held before acquire()

    def acquire(self) -> str:
        """Take the lock; -> "" or a note about the dead owner it took over. Raises SystemExit when
        a live job holds it."""
        missing = [d for d in [self.path.parent, *self.path.parent.parents] if not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = missing
        self.found = {entry.name for entry in self.path.parent.iterdir()}
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            owner = file.read().strip() or "another process"
            file.close()
            raise SystemExit(f"{self.path.parent} is in use by a running job ({owner}); wait for it to finish "
                             f"or choose another --out") from None
        file.seek(0)
        previous = file.read().strip()
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self.file = file
        return f"took over the lock of {previous}, which is no longer running" if previous else ""

    def discard_written(self) -> None:
        """Remove what this job added to the run directory since it took the lock (the lock aside), for
        a run that ended before anything worth keeping; what was there before stays, whoever wrote it."""
        for entry in self.path.parent.iterdir():
            if entry.name in self.found or entry == self.path:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def release(self) -> None:
        """Unlock; when the run directory holds nothing of this job but the lock (it failed before
        writing, or took back what it wrote), the lock goes too, and so do the directories acquire()
        made, so a failed start leaves no trace."""
        if self.file is None:
            return
        self.file.seek(0)
        self.file.truncate()      # an empty lock file: the last owner exited cleanly
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None
        if {entry.name for entry in self.path.parent.iterdir()} <= self.found | {self.path.name}:
            if self.path.name not in self.found:
                self.path.unlink()
            for directory in self.created:          # runs/ too, when this job made it
                if any(directory.iterdir()):
                    break
                directory.rmdir()
