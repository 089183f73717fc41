"""The run-directory lock: one job at a time, a dead owner taken over, no trace of a failed start."""
import os

import pytest

from train.runlock import RunLock


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
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    lock.release()
    assert not (tmp_path / "run").exists()
