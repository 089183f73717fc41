"""bench/data_prep.py on a tiny corpus: every figure comes from a real run, copies of the corpus are
kept as new documents, and the memory of a process tree is read from /proc."""
import json
import os
import signal
import subprocess
import sys

import pytest

from bench import data_prep
from corpus_fixtures import write_corpus
from train.data.sources import iter_documents

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")


def test_the_bench_runs_on_a_tiny_corpus(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_files=12)
    results = data_prep.main(["--source", str(corpus), "--workers", "2", "--repeats", "1", "--scales", "1,2",
                              "--vocab-size", "300", "--work-dir", str(tmp_path / "work"),
                              "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == results
    (run,) = results["throughput"]
    assert run["workers"] == 2 and run["tokens"] > 0 and run["wall_s"] > 0
    assert run["bytes_in"] == sum(len(t.encode()) for _, t in iter_documents(str(corpus)))
    one, two = results["memory"]
    assert two["docs_in"] == 2 * one["docs_in"] and two["docs_kept"] >= 2 * one["docs_kept"]   # no copy is a duplicate
    assert all(r["peak_rss_mb"] >= r["peak_rss_main_mb"] > 10 and r["peak_pss_mb"] > 10 for r in (one, two))
    assert list(one["peak_rss_mb_by_phase"]) == ["filter", "tokenizer", "encode"]
    assert max(one["peak_rss_mb_by_phase"].values()) <= one["peak_rss_mb"]
    assert list(one["cpu_s_by_phase"]) == ["filter", "tokenizer", "encode"] and min(one["cpu_s_by_phase"].values()) >= 0
    assert all(run[k] is None or run[k] > 0 for k in ("filter_mb_per_cpu_s", "encode_mb_per_cpu_s"))
    assert sorted(os.listdir(tmp_path / "work")) == []                                       # datasets and corpora removed


def test_copies_are_halves_of_two_documents():
    assert data_prep.halves("a\nb\nc\nd\n") == ("a\nb\n", "c\nd\n") and data_prep.halves("abcd") == ("ab", "cd")


def test_the_process_tree_includes_grandchildren():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
                              "print(p.pid, flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        assert data_prep.process_tree(child.pid) == [child.pid, grandchild]
        assert data_prep._cpu_seconds(os.getpid()) > 0 and data_prep._cpu_seconds(child.pid) >= 0
    finally:
        for pid in data_prep.process_tree(child.pid)[::-1]:
            os.kill(pid, signal.SIGKILL)
        child.wait()
