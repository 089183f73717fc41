"""Inspection on worker processes: the verdicts of any number of workers are those of one, in
corpus order; the pool is gone after an early stop, and a dead worker is one line."""
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from corpus_fixtures import write_corpus
from train.data import workers as workers_mod
from train.data.filters import FilterConfig
from train.data.sources import iter_documents
from train.data.workers import available_cores, check_workers, inspect_corpus


@pytest.fixture
def documents(tmp_path, monkeypatch):
    monkeypatch.setattr(workers_mod, "BATCH_BYTES", 1_500)        # a document or two a batch: many in flight
    return list(iter_documents(str(write_corpus(tmp_path / "corpus", n_files=30))))


def test_any_number_of_workers_gives_the_verdicts_of_one_in_order(documents):
    one = list(inspect_corpus(documents, FilterConfig(), 3, workers=1))
    three = list(inspect_corpus(iter(documents), FilterConfig(), 3, workers=3))
    assert [doc_id for doc_id, _ in three] == [doc_id for doc_id, _ in documents]
    assert sum(v.reason is None for _, v in one) > 30 and any(v.reason == "too_short" for _, v in one)
    for (_, a), (_, b) in zip(one, three, strict=True):
        assert a[:5] == b[:5] and (a.signature is None) == (b.signature is None)
        assert a.signature is None or np.array_equal(a.signature, b.signature)
    assert multiprocessing.active_children() == []


def test_stopping_early_ends_the_workers(documents):
    verdicts = inspect_corpus(iter(documents), FilterConfig(), 0, workers=2)
    next(verdicts)
    assert len(multiprocessing.active_children()) == 2
    verdicts.close()
    assert multiprocessing.active_children() == []


def test_a_dead_worker_is_one_line(documents):
    verdicts = inspect_corpus(iter(documents), FilterConfig(), 0, workers=2)
    next(verdicts)
    os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
    with pytest.raises(ChildProcessError, match=r"worker process died: killed \(out of memory\? .*fewer --workers") as e:
        list(verdicts)
    assert "\n" not in str(e.value) and multiprocessing.active_children() == []


def test_one_batch_runs_without_a_pool(documents, monkeypatch):
    monkeypatch.setattr(workers_mod, "BATCH_BYTES", 10**9)
    monkeypatch.setattr(workers_mod, "ProcessPoolExecutor", lambda *a, **k: pytest.fail("started a pool"))
    assert len(list(inspect_corpus(iter(documents), FilterConfig(), 0, workers=4))) == len(documents)


def test_workers_check():
    assert available_cores() >= 1
    check_workers(1)
    with pytest.raises(ValueError, match=rf"must be at least 1 \(worker processes; default: every core, "
                                         rf"{available_cores()} here\), got 0"):
        check_workers(0)


def test_workers_end_with_a_killed_parent(tmp_path):
    """Killed (the OOM killer, kill -9), the parent cannot shut its pool down: each worker notices alone."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, time\n"
        "from train.data import workers\n"
        "from train.data.filters import FilterConfig\n"
        "if __name__ == '__main__':\n"
        "    workers.BATCH_BYTES = 2_000\n"
        "    docs = iter([(str(i), f'word{i} ' * 2_000) for i in range(400)])\n"
        "    verdicts = workers.inspect_corpus(docs, FilterConfig(), 0, workers=2)\n"
        "    next(verdicts)\n"
        "    print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n"
        "    time.sleep(60)\n")
    root = Path(__file__).resolve().parents[3]
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)})
    try:
        pids = [int(pid) for pid in parent.stdout.readline().split()]
    finally:
        parent.kill()
        parent.wait()
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
