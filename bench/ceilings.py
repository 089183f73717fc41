"""Environment report and measured ceilings of the GPU (issue 13 item 6; bench/gpu.sh runs it first).

    python -m bench.ceilings [OUT.json]

Prints one `key: value` line per fact and writes them all to OUT.json: GPU name, SM count,
memory, compute capability, driver (from nvidia-smi when it is on PATH), CUDA runtime, cuDNN,
torch, triton and Python versions, and two ceilings measured here, which bench/report.py and the
train-step MFU are read against:

- copy bandwidth: `dst.copy_(src)` of a 1 GiB buffer, counted as one read plus one write (2 GiB
  per copy), median of 20 copies after 5 warm-ups, each timed by CUDA events;
- bf16 matmul: `torch.matmul` of two 8192 x 8192 bf16 matrices, 2 * 8192^3 FLOPs, median of 20
  after 10 warm-ups (enough for the clocks to settle), timed alike.

Without a CUDA GPU it prints the one line "no CUDA GPU present: ..." and exits with status 2,
which bench/gpu.sh takes as its dry run.
"""
from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from bench.report import COPY_KEY, MATMUL_KEY

NO_GPU_STATUS = 2
COPY_BYTES = 2**30
MATMUL_N = 8192


def no_gpu_reason() -> str | None:
    """Why there is no CUDA GPU to measure, or None when there is one."""
    if torch.cuda.is_available():
        return None
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"torch.cuda.is_available() is False (torch {torch.__version__}, {build}); nothing to measure"


def cuda_median_s(fn: Callable[[], object], warmup: int, rounds: int) -> float:
    """Median seconds of fn() over `rounds` runs after `warmup` more, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_gbps(nbytes: int = COPY_BYTES) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_median_s(lambda: dst.copy_(src), warmup=5, rounds=20) / 1e9


def matmul_tflops(n: int = MATMUL_N) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    return 2 * n**3 / cuda_median_s(lambda: torch.matmul(a, b, out=out), warmup=10, rounds=20) / 1e12


def cpu_model() -> str:
    """The CPU's model name, which CPU results are reported with."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment() -> dict:
    """The facts and the two measured ceilings of GPU 0."""
    props = torch.cuda.get_device_properties(0)
    facts = {
        "gpu": props.name, "sm_count": props.multi_processor_count,
        "memory_GiB": round(props.total_memory / 2**30, 1), "compute_capability": f"{props.major}.{props.minor}",
        "driver": _driver(), "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    facts[COPY_KEY] = round(copy_gbps(), 1)
    facts[MATMUL_KEY] = round(matmul_tflops(), 1)
    facts["method"] = (f"copy: dst.copy_(src) of {COPY_BYTES >> 20} MiB, read + write counted, median of 20; "
                       f"matmul: torch.matmul {MATMUL_N}^3 bf16, 2*n^3 FLOPs, median of 20; CUDA events")
    return facts


def mfu_peak(device_name: str, ceilings: str | Path | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s for MFU, "measured" or "nominal"): the bf16 matmul ceiling in the JSON file
    `ceilings` (this module's output) when it holds one, else train.loop's nominal dense bf16 peak
    for the named GPU (989 TFLOP/s for H100 and H200), else (None, "unknown")."""
    if ceilings:
        try:
            measured = json.loads(Path(ceilings).read_text()).get(MATMUL_KEY)
        except (OSError, ValueError, AttributeError):
            measured = None     # a ceilings step that failed: fall back to the nominal figure
        if isinstance(measured, (int, float)) and measured > 0:
            return measured * 1e12, "measured"
    from train.loop import PEAK_FLOPS
    nominal = next((flops for key, flops in PEAK_FLOPS.items() if key in device_name), None)
    return (nominal, "nominal") if nominal else (None, "unknown")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    reason = no_gpu_reason()
    if reason:
        print(f"no CUDA GPU present: {reason}", file=sys.stderr)
        return NO_GPU_STATUS
    facts = environment()
    for key, value in facts.items():
        print(f"{key}: {value}")
    if args:
        from model.io.files import atomic_write_text
        atomic_write_text(args[0], json.dumps(facts, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
