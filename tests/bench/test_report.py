"""bench/report.py on a small synthetic pytest-benchmark file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

REPO = Path(__file__).resolve().parents[2]


def bench(op: str, pass_: str, backend: str, median_ms: float, shape: str = "16384x4096", **figures) -> dict:
    """One benchmark entry as pytest-benchmark writes it, labelled as bench/conftest.measure does."""
    info = dict(op=op, pass_=pass_, backend=backend, shape=shape, dtype="bfloat16",
                device="NVIDIA H100 80GB HBM3", median_ms=median_ms, **figures)
    return {"name": f"test_{op}[{pass_}-{backend}]", "fullname": f"bench/test_{op}.py::test_{op}[{pass_}-{backend}]",
            "params": {"pass_": pass_, "backend": backend}, "extra_info": info,
            "stats": {"min": median_ms / 1e3 * 0.9, "median": median_ms / 1e3, "mean": median_ms / 1e3, "rounds": 30}}


BENCHMARKS = [
    bench("rms_norm", "fwd", "triton", 0.5, **{"GB/s": 800.0}),
    bench("rms_norm", "fwd", "torch", 1.5, **{"GB/s": 266.7}),
    bench("rms_norm", "fwd", "compile", 1.0, **{"GB/s": 400.0}),
    bench("causal_attention", "fwdbwd", "triton", 2.0, shape="B=8 T=2048 H=16 D=128", **{"TFLOP/s": 312.5}),
    bench("causal_attention", "fwdbwd", "torch", 5.0, shape="B=8 T=2048 H=16 D=128", **{"TFLOP/s": 125.0}),
    bench("linear_cross_entropy", "fwdbwd", "torch", 12.0, **{"GB/s": 90.0, "peak_MiB": 1536.0}),
    bench("train_step", "fwdbwd", "torch", 250.0, shape="small B=8 T=1024", **{"tokens/s": 32768.0, "MFU": 0.4123}),
    {"name": "test_other", "fullname": "bench/test_other.py::test_other", "extra_info": {}, "stats": {"median": 0.01}},
]


@pytest.fixture
def results_file(tmp_path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {"id": "0123456789abcdef", "dirty": True},
                                "benchmarks": BENCHMARKS, "datetime": "2026-01-02T03:04:05", "version": "5.2.3"}))
    return path


def table(markdown: str) -> dict[tuple[str, str], dict[str, str]]:
    """The report's table as {(op, pass): {column: cell}}."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    return {(r[0], r[1]): dict(zip(header, r)) for r in body}


def test_report_table(results_file, tmp_path, capsys):
    out = tmp_path / "report.md"
    report.main([str(results_file), "--output", str(out)])
    markdown = capsys.readouterr().out
    assert out.read_text() == markdown
    assert "Device: NVIDIA H100 80GB HBM3" in markdown
    assert "commit 0123456789 (dirty)" in markdown and "pytest-benchmark 5.2.3" in markdown

    rows = table(markdown)
    assert list(rows) == [("rms_norm", "fwd"), ("causal_attention", "fwdbwd"),
                          ("linear_cross_entropy", "fwdbwd"), ("train_step", "fwdbwd")]
    assert list(rows["rms_norm", "fwd"]) == [  # peak MiB only for the backend that measured it
        "op", "pass", "shape", "dtype", "triton ms", "triton rate", "torch ms", "torch rate", "torch peak MiB",
        "compile ms", "compile rate", "triton vs torch eager", "triton vs torch.compile"]
    norm = rows["rms_norm", "fwd"]
    assert (norm["shape"], norm["dtype"]) == ("16384x4096", "bfloat16")
    assert (norm["triton ms"], norm["torch ms"], norm["compile ms"]) == ("0.500", "1.50", "1.00")
    assert (norm["triton rate"], norm["torch rate"]) == ("800 GB/s", "267 GB/s")
    assert (norm["triton vs torch eager"], norm["triton vs torch.compile"]) == ("3.00x", "2.00x")

    attention = rows["causal_attention", "fwdbwd"]
    assert attention["triton rate"] == "312 TFLOP/s"
    assert (attention["triton vs torch eager"], attention["triton vs torch.compile"]) == ("2.50x", "")
    assert (attention["triton ms"], attention["compile ms"]) == ("2.00", "")

    loss = rows["linear_cross_entropy", "fwdbwd"]
    assert (loss["torch peak MiB"], loss["triton ms"], loss["triton vs torch eager"]) == ("1,536", "", "")
    assert rows["train_step", "fwdbwd"]["torch rate"] == "32,768 tokens/s, 41.2% MFU"
    assert "Skipped 1 benchmark(s) without bench/conftest.measure labels: bench/test_other.py::test_other" in markdown


def test_repeated_measurement_is_noted(tmp_path, capsys):
    path = tmp_path / "twice.json"
    path.write_text(json.dumps({"benchmarks": [bench("swiglu", "fwd", "torch", 2.0), bench("swiglu", "fwd", "torch", 3.0)]}))
    report.main([str(path)])
    markdown = capsys.readouterr().out
    assert table(markdown)["swiglu", "fwd"]["torch ms"] == "3.00"
    assert "1 measurement(s) repeated a group and backend; the last one is shown" in markdown


@pytest.mark.parametrize("content, reason", [
    ("not json", "not JSON"),
    ("[1, 2]", "no 'benchmarks' list at the top level"),
    ('{"machine_info": {}}', "no 'benchmarks' list at the top level"),
    ('{"benchmarks": [{"name": "x", "extra_info": {}}]}', "benchmark 0 has no stats.median"),
])
def test_not_a_benchmark_file(tmp_path, capsys, content, reason):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"{path} is not a pytest-benchmark JSON file ({reason}" in error
    assert "--benchmark-json" in error


def test_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "absent.json")])
    assert "cannot read" in capsys.readouterr().err


def test_command_line(results_file):
    """`python -m bench.report` works from the repo root (and needs no torch: standard library only)."""
    code = ("import runpy, sys; sys.argv = ['report', sys.argv[1]]; runpy.run_module('bench.report', run_name='__main__'); "
            "assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code, str(results_file)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Benchmark report (results.json)")


def write(path: Path, benchmarks: list[dict], **meta) -> Path:
    path.write_text(json.dumps({"benchmarks": benchmarks, **meta}))
    return path


def test_sdpa_and_liger_backends(tmp_path, capsys):
    """Pinned SDPA backends and Liger get their own columns, and triton a speed-up over each kind:
    over the faster of sdpa_flash and sdpa_cudnn, and over Liger."""
    shape = "B=1 H=16 T=16384 D=128"
    path = write(tmp_path / "gpu.json", [
        bench("causal_attention", "fwd", "triton", 2.0, shape=shape, **{"TFLOP/s": 500.0}),
        bench("causal_attention", "fwd", "sdpa_cudnn", 2.4, shape=shape, **{"TFLOP/s": 416.7}),
        bench("causal_attention", "fwd", "sdpa_flash", 3.0, shape=shape, **{"TFLOP/s": 333.3}),
        bench("causal_attention", "fwd", "naive", 9.0, shape=shape),
        bench("rms_norm", "fwd", "triton", 0.5, **{"GB/s": 800.0}),
        bench("rms_norm", "fwd", "liger", 0.6, **{"GB/s": 666.7}),
        bench("rms_norm", "fwd", "torch", 1.5, **{"GB/s": 266.7}),
    ])
    report.main([str(path)])
    rows = table(capsys.readouterr().out)
    attention, norm = rows["causal_attention", "fwd"], rows["rms_norm", "fwd"]
    assert [c for c in attention if c.endswith(" ms")] == [  # known backends in order, then the rest
        "triton ms", "torch ms", "sdpa_flash ms", "sdpa_cudnn ms", "liger ms", "naive ms"]
    assert list(attention)[-4:] == ["triton vs torch eager", "triton vs torch.compile", "triton vs best SDPA", "triton vs Liger"]
    assert (attention["sdpa_flash ms"], attention["sdpa_cudnn rate"]) == ("3.00", "417 TFLOP/s")
    assert attention["triton vs best SDPA"] == "1.20x"          # against cudnn, the faster one
    assert (attention["triton vs Liger"], attention["triton vs torch eager"]) == ("", "")
    assert (norm["triton vs Liger"], norm["triton vs torch eager"], norm["triton vs best SDPA"]) == ("1.20x", "3.00x", "")


def test_ceilings_and_mfu_peak(tmp_path, capsys):
    """--ceilings shows each rate as a fraction of the measured ceiling; MFU names its peak."""
    path = write(tmp_path / "gpu.json", [
        bench("rms_norm", "fwd", "triton", 0.5, **{"GB/s": 800.0}),
        bench("causal_attention", "fwd", "triton", 2.0, shape="T=4096", **{"TFLOP/s": 450.0}),
        bench("train_step", "fwdbwd", "triton", 200.0, shape="small", **{"tokens/s": 40960.0, "MFU": 0.3, "MFU_peak": "nominal"}),
    ])
    ceilings = tmp_path / "env.json"
    ceilings.write_text(json.dumps({"gpu": "NVIDIA H200", report.COPY_KEY: 4000.0, report.MATMUL_KEY: 750.0}))
    report.main([str(path), "--ceilings", str(ceilings)])
    markdown = capsys.readouterr().out
    assert "Measured ceilings (NVIDIA H200): copy 4,000 GB/s, bf16 matmul 750 TFLOP/s" in markdown
    rows = table(markdown)
    assert rows["rms_norm", "fwd"]["triton rate"] == "800 GB/s (20% of copy)"
    assert rows["causal_attention", "fwd"]["triton rate"] == "450 TFLOP/s (60% of matmul)"
    assert rows["train_step", "fwdbwd"]["triton rate"] == "40,960 tokens/s, 30.0% MFU (nominal peak)"


def test_ceilings_file_without_ceilings(tmp_path, capsys):
    path = write(tmp_path / "gpu.json", [bench("swiglu", "fwd", "torch", 2.0)])
    ceilings = tmp_path / "env.json"
    ceilings.write_text(json.dumps({"gpu": "NVIDIA H200"}))
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(path), "--ceilings", str(ceilings)])
    assert exit_info.value.code == 2
    assert f"{ceilings} holds no {report.COPY_KEY}" in capsys.readouterr().err


def test_several_files_merged(tmp_path, capsys):
    """Files are read as one report, and --json writes them as one pytest-benchmark file."""
    first = write(tmp_path / "rms_norm.json", [bench("rms_norm", "fwd", "triton", 0.5)], datetime="2026-01-02", version="5.2.3")
    second = write(tmp_path / "swiglu.json", [bench("swiglu", "fwd", "torch", 2.0)], datetime="2026-01-03")
    merged = tmp_path / "bench.json"
    report.main([str(first), str(second), "--json", str(merged)])
    markdown = capsys.readouterr().out
    assert markdown.startswith("# Benchmark report (rms_norm.json, swiglu.json)")
    assert "run 2026-01-02" in markdown and "2026-01-03" not in markdown     # the first file's metadata
    assert list(table(markdown)) == [("rms_norm", "fwd"), ("swiglu", "fwd")]
    doc = json.loads(merged.read_text())
    assert [b["extra_info"]["op"] for b in doc["benchmarks"]] == ["rms_norm", "swiglu"]
    assert report.load(merged).measurements[1].median_ms == 2.0


def test_merge_names_the_bad_file(tmp_path, capsys):
    good = write(tmp_path / "good.json", [bench("swiglu", "fwd", "torch", 2.0)])
    bad = tmp_path / "bad.json"
    bad.write_text('{"benchmarks": [{"name": "x"}]}')
    with pytest.raises(SystemExit):
        report.main([str(good), str(bad)])
    assert f"{bad} is not a pytest-benchmark JSON file (benchmark 0 has no stats.median" in capsys.readouterr().err


def test_masked_sdpa_and_flex_backends(tmp_path, capsys):
    """The rows of bench/test_attention.py and bench/test_varlen_attention.py: sdpa_mask counts as
    an SDPA row and flex gets its own speed-up column, both after the pinned SDPA backends."""
    shape = "tokens=16384 docs=18 (64..4096, longest 4022) Hq=16 Hkv=16 D=128"
    path = write(tmp_path / "gpu.json", [
        bench("varlen_attention", "fwd", "triton", 1.0, shape=shape, **{"TFLOP/s": 400.0}),
        bench("varlen_attention", "fwd", "torch", 6.0, shape=shape, **{"TFLOP/s": 66.7}),
        bench("varlen_attention", "fwd", "sdpa_mask", 8.0, shape=shape, **{"TFLOP/s": 50.0}),
        bench("varlen_attention", "fwd", "flex", 1.5, shape=shape, **{"TFLOP/s": 266.7}),
        bench("attention", "bwd", "triton", 4.0, shape="B=1 H=16 T=16384 D=128 window=512"),
        bench("attention", "bwd", "flex", 5.0, shape="B=1 H=16 T=16384 D=128 window=512"),
        bench("causal_attention", "fwd", "sdpa_flash", 3.0, shape="T=4096"),
    ])
    report.main([str(path)])
    rows = table(capsys.readouterr().out)
    varlen, window = rows["varlen_attention", "fwd"], rows["attention", "bwd"]
    assert [c for c in varlen if c.endswith(" ms")] == ["triton ms", "torch ms", "sdpa_flash ms", "sdpa_mask ms", "flex ms"]
    assert list(varlen)[-4:] == ["triton vs torch eager", "triton vs torch.compile", "triton vs best SDPA",
                                 "triton vs FlexAttention"]
    assert (varlen["triton vs torch eager"], varlen["triton vs best SDPA"], varlen["triton vs FlexAttention"]) == (
        "6.00x", "8.00x", "1.50x")
    assert varlen["flex rate"] == "267 TFLOP/s"
    assert (window["triton vs FlexAttention"], window["triton vs best SDPA"], window["sdpa_mask ms"]) == ("1.25x", "", "")
