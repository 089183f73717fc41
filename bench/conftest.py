"""Shared benchmark machinery (DESIGN.md section 5).

Every benchmark is parametrised by backend: "triton" (our kernels; CUDA only, interpreter
timings mean nothing), "torch" (the eager reference) and "compile" (torch.compile of the
reference; CUDA only, as compiling on a 2-core CPU costs minutes and measures the C++ compiler).
`measure` synchronises inside the timed function, warms up, and stores the op, pass, shape,
dtype, backend and the derived GB/s or TFLOP/s in benchmark.extra_info for bench/report.py.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import pytest
import torch

import kernels

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BACKENDS = ("triton", "torch", "compile")
PASSES = ("fwd", "bwd", "fwdbwd")


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


@functools.cache
def implementation(op: str, backend: str) -> Callable:
    """The function to time for op on backend, or pytest.skip when it cannot run here."""
    if backend in ("triton", "compile") and not ON_GPU:
        pytest.skip(f"{backend} timings need a CUDA GPU")
    if backend == "triton" and not kernels.triton_available(op):
        pytest.skip(f"{op} has no Triton version")
    fn = kernels.implementation(op, "torch" if backend == "compile" else backend)
    return torch.compile(fn) if backend == "compile" else fn


def timed_pass(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], pass_: str) -> Callable[[], None]:
    """A callable running one pass: the forward, the backward alone (graph built once and kept), or both."""
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                forward()
        return run
    grad_inputs = [t for t in inputs if t.requires_grad]

    def backward_of(out):
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        torch.autograd.grad(outs, grad_inputs, [torch.ones_like(o) for o in outs], retain_graph=True)

    if pass_ == "bwd":
        out = forward()
        return lambda: backward_of(out)
    return lambda: backward_of(forward())


def measure(benchmark, run: Callable[[], None], *, op: str, pass_: str, backend: str, shape: str,
            nbytes: float | None = None, flops: float | None = None, memory: bool = False) -> None:
    """Time run() (median of synchronised rounds after warm-up) and record the derived figures."""
    def timed():
        run()
        sync()

    for _ in range(3):
        timed()
    peak = None
    if memory and ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        timed()
        peak = torch.cuda.max_memory_allocated()
    benchmark.pedantic(timed, rounds=30 if ON_GPU else 5, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    info = benchmark.extra_info
    info.update(op=op, pass_=pass_, backend=backend, shape=shape, dtype=str(DTYPE).removeprefix("torch."),
                device=torch.cuda.get_device_name() if ON_GPU else "cpu", median_ms=median * 1e3)
    if nbytes is not None:
        info["GB/s"] = nbytes / median / 1e9
    if flops is not None:
        info["TFLOP/s"] = flops / median / 1e12
    if peak is not None:
        info["peak_MiB"] = peak / 2**20
