"""bench/gpu.sh and bench/ceilings.py on a machine without a GPU (the dry run), and the pure
pieces they rely on: the MFU peak and the Liger call adapter of bench/conftest.py."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from bench import ceilings
from bench import conftest as bench_conftest
from bench import report
from bench.report import MATMUL_KEY

REPO = Path(__file__).resolve().parents[2]
LIGER_MODULE = "liger_kernel.transformers.functional"
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these commands measure for real")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)


def assert_one_no_gpu_line(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert output.count("\n") == 1 and output.startswith("no CUDA GPU present: "), output


@cpu_only
def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "out"
    assert_one_no_gpu_line(run("bash", "bench/gpu.sh", str(out)))
    assert not out.exists()          # the dry run writes nothing


@cpu_only
def test_gpu_script_from_another_directory(tmp_path):
    """The script finds the repo from its own path, whatever the caller's directory."""
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "out"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert_one_no_gpu_line(result)


@cpu_only
def test_ceilings_without_gpu(tmp_path):
    assert_one_no_gpu_line(run(sys.executable, "-m", "bench.ceilings", str(tmp_path / "env.json")))
    assert not (tmp_path / "env.json").exists()


def test_gpu_script_usage():
    result = run("bash", "bench/gpu.sh")
    assert result.returncode == 2 and result.stderr == "usage: bash bench/gpu.sh OUT_DIR\n"


def test_gpu_script_parses():
    result = run("bash", "-n", "bench/gpu.sh")
    assert result.returncode == 0, result.stderr


def test_mfu_peak_measured_then_nominal(tmp_path):
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", MATMUL_KEY: 720.5}))
    assert ceilings.mfu_peak("NVIDIA H100 80GB HBM3", env) == (720.5e12, "measured")
    # No file, a file without the ceiling, or an unreadable one: the nominal dense bf16 peak.
    env_without = tmp_path / "partial.json"
    env_without.write_text(json.dumps({"gpu": "NVIDIA H200"}))
    for path in (None, env_without, tmp_path / "absent.json"):
        assert ceilings.mfu_peak("NVIDIA H200", path) == (989e12, "nominal")
    assert ceilings.mfu_peak("Tesla T4", None) == (None, "unknown")


def test_liger_skips_without_gpu(monkeypatch):
    monkeypatch.setattr(bench_conftest, "ON_GPU", False)
    with pytest.raises(pytest.skip.Exception, match="need a CUDA GPU"):
        bench_conftest.liger("rms_norm")


def test_liger_calls_like_ours(monkeypatch):
    """Liger's functional entry points get our call signatures: RMSNorm drops residual=None, and
    a loss that comes back as a tuple gives its first element."""
    calls = []
    fake = types.SimpleNamespace(
        liger_rms_norm=lambda x, w, eps: calls.append(("rms_norm", x, w, eps)) or "normed",
        liger_cross_entropy=lambda logits, target: ("loss", "z_loss"),
        liger_swiglu=lambda a, b: a * b)
    monkeypatch.setattr(bench_conftest, "ON_GPU", True)
    monkeypatch.setitem(sys.modules, LIGER_MODULE, fake)
    assert bench_conftest.liger("rms_norm")("x", "w", 1e-6, residual=None) == "normed"
    assert calls == [("rms_norm", "x", "w", 1e-6)]
    assert bench_conftest.liger("cross_entropy")("logits", "target") == "loss"
    assert bench_conftest.liger("swiglu")(3, 4) == 12
    with pytest.raises(pytest.skip.Exception, match="no causal_attention"):
        bench_conftest.liger("causal_attention")


def test_liger_not_importable(monkeypatch):
    monkeypatch.setattr(bench_conftest, "ON_GPU", True)
    monkeypatch.setitem(sys.modules, LIGER_MODULE, None)     # what a failed import leaves: import raises
    with pytest.raises(pytest.skip.Exception, match="Liger-Kernel is not importable: ModuleNotFoundError"):
        bench_conftest.liger("swiglu")


def test_ceilings_output_feeds_report_and_mfu(tmp_path, monkeypatch, capsys):
    """What bench.ceilings writes on a GPU (measurements stubbed) is what bench.report --ceilings
    and the train-step MFU read."""
    props = types.SimpleNamespace(name="NVIDIA H200", multi_processor_count=132, total_memory=141 * 2**30,
                                  major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(ceilings, "copy_gbps", lambda: 4012.34)
    monkeypatch.setattr(ceilings, "matmul_tflops", lambda: 761.26)
    env = tmp_path / "env.json"
    assert ceilings.main([str(env)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "gpu: NVIDIA H200" in printed and "sm_count: 132" in printed and f"{MATMUL_KEY}: 761.3" in printed
    assert report.load_ceilings(env)[report.COPY_KEY] == 4012.3
    assert ceilings.mfu_peak("NVIDIA H200", env) == (761.3e12, "measured")


def test_gpu_script_suites_exist():
    """Every suite of the script's benchmark loop is a bench/test_<name>.py, and the attention
    suites are all among them."""
    loop = re.search(r"^for suite in (.*?); do$", (REPO / "bench" / "gpu.sh").read_text(), re.M | re.S)
    suites = [entry.split(":")[0] for entry in loop.group(1).replace("\\\n", " ").split()]
    assert [s for s in suites if not (REPO / "bench" / f"test_{s}.py").exists()] == []
    assert {"causal_attention", "attention", "varlen_attention"} <= set(suites)
