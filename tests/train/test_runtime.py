"""Where a job runs: on a CPU that other processes keep busy, a single process trains on the cores
they leave free (the measurement, the choice, the line it prints, and what leaves it alone)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import runtime


@pytest.mark.parametrize("threads, busy, free", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.9, 1), (2, 5.0, 1),
                                                 (8, 3.2, 5), (1, 0.0, 1)])
def test_free_threads(threads, busy, free):
    assert runtime.free_threads(threads, busy) == free


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="busy_cores reads Linux's /proc/stat")
def test_busy_cores_sees_a_spinning_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        runtime.busy_cores(0.3)                               # let it start
        assert 0.5 < runtime.busy_cores(0.5) <= os.cpu_count()
    finally:
        spinner.kill()
        spinner.wait()


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_busy_cpu_gets_fewer_threads_and_a_line(threads, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "busy_cores", lambda: 5.0)
    torch.set_num_threads(2)
    assert runtime.use_free_cores(runtime.Runtime(torch.device("cpu"), None)) == 1
    assert torch.get_num_threads() == 1
    assert "training on 1 of 2 threads" in capsys.readouterr().out
    torch.set_num_threads(2)
    monkeypatch.setattr(runtime, "busy_cores", lambda: 0.1)
    assert runtime.use_free_cores(runtime.Runtime(torch.device("cpu"), None)) == 2
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("case", ["omp_num_threads", "distributed", "cuda"])
def test_what_leaves_the_threads_alone(case, threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "busy_cores", lambda: 5.0)
    torch.set_num_threads(2)
    device = torch.device("cuda" if case == "cuda" else "cpu")
    rt = runtime.Runtime(device, None, world_size=2 if case == "distributed" else 1)
    if case == "omp_num_threads":
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.use_free_cores(rt) == 2 and torch.get_num_threads() == 2
