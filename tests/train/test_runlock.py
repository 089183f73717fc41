"""The run-directory lock: one job at a time, a dead owner taken over, no trace of a failed start."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from train.runlock import RunLock

ROOT = Path(__file__).resolve().parents[2]


def test_a_second_job_is_refused_while_the_first_holds_the_lock(tmp_path):
    first = RunLock(tmp_path / "run")
    assert first.acquire() == ""
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match=f"is in use by a running job \\(pid {os.getpid()} on .*\\); wait"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    second = RunLock(tmp_path / "run")
    assert second.acquire() == ""          # a clean exit leaves no owner behind
    second.release()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"


def test_a_dead_owner_is_taken_over_with_a_note(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("pid 999999 on elsewhere\n")    # left by a killed job
    lock = RunLock(tmp_path / "run")
    assert lock.acquire() == "took over the lock of pid 999999 on elsewhere, which is no longer running"
    assert (tmp_path / "run" / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()


def test_a_failed_start_leaves_no_directory(tmp_path):
    lock = RunLock(tmp_path / "runs" / "run")
    lock.acquire()
    lock.release()
    assert not (tmp_path / "runs").exists()


def test_another_process_holding_the_lock_is_named(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from train.runlock import RunLock; "
                               f"held = RunLock({str(tmp_path / 'run')!r}); held.acquire(); print('locked', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"in use by a running job \\(pid {holder.pid} on "):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path / "run")       # the kernel released the dead holder's lock
    assert lock.acquire() == f"took over the lock of pid {holder.pid} on {socket.gethostname()}, which is no longer running"
    lock.release()


def test_discard_written_takes_back_only_what_the_job_added(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("the user's")
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "checkpoints" / "tmp").mkdir(parents=True)
    lock.discard_written()
    lock.release()
    assert os.listdir(tmp_path / "run") == ["notes.txt"]            # the lock went too: no trace of the job
    assert (tmp_path / "run" / "notes.txt").read_text() == "the user's"
