"""Shared benchmark machinery: realistic shapes (rows of 16k tokens, hidden 2048-8192, vocabularies
of 32k and 128k, attention over 16k tokens with T from 512 to 16k, head dim 64 and 128, bf16 on a GPU;
small shapes in fp32 on the CPU), the median of warmed-up runs, and derived figures in extra_info.

Every benchmark is parametrised by backend: "triton" (our kernels; CUDA only, interpreter
timings mean nothing), "torch" (the eager reference) and "compile" (torch.compile of the
reference; CUDA only, as compiling on a 2-core CPU costs minutes and measures the C++ compiler),
and where Liger-Kernel has the op, "liger" (CUDA only, skipped when `import liger_kernel` fails).
`measure` synchronises inside the timed function, warms up, and stores the op, pass, shape,
dtype, backend and the derived GB/s or TFLOP/s in benchmark.extra_info for bench/report.py.
TRITONGPT_BENCH_QUICK=1 trims the GPU shapes to those the goals of issue 13 name, so that
bench/gpu.sh fits its time budget; CPU shapes are small either way.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Sequence

import pytest
import torch

from tritongpt import kernels

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BACKENDS = ("triton", "torch", "compile")
PASSES = ("fwd", "bwd", "fwdbwd")
QUICK = os.environ.get("TRITONGPT_BENCH_QUICK") == "1"
# Liger-Kernel's functional entry points. These, not the autograd Functions of liger_kernel.ops,
# because the Functions' positional arguments changed between releases (LigerCrossEntropyFunction
# gained a required `weight` after `target`), while the functional names, plain aliases of
# Function.apply in early releases and wrappers later, take the same leading arguments in both:
# (x, w, eps), (a, b), (logits, target), (x, w, target).
LIGER = {"rms_norm": "liger_rms_norm", "swiglu": "liger_swiglu", "cross_entropy": "liger_cross_entropy",
         "linear_cross_entropy": "liger_fused_linear_cross_entropy"}


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


@functools.cache
def implementation(op: str, backend: str) -> Callable:
    """The function to time for op on backend, or pytest.skip when it cannot run here."""
    if backend == "liger":
        return liger(op)
    if backend in ("triton", "compile") and not ON_GPU:
        pytest.skip(f"{backend} timings need a CUDA GPU")
    if backend == "triton" and not kernels.triton_available(op):
        pytest.skip(f"{op} has no Triton version")
    fn = kernels.implementation(op, "torch" if backend == "compile" else backend)
    return torch.compile(fn) if backend == "compile" else fn


def liger(op: str) -> Callable:
    """Liger-Kernel's version of op, called like ours (the plain RMSNorm only; the first element of
    a loss that comes back as a tuple), or pytest.skip when Liger cannot run here."""
    if not ON_GPU:
        pytest.skip("liger timings need a CUDA GPU")
    if op not in LIGER:
        pytest.skip(f"Liger-Kernel has no {op}")
    try:
        functional = importlib.import_module("liger_kernel.transformers.functional")
    except Exception as e:  # not installed, or a build that does not import against this torch/triton
        pytest.skip(f"Liger-Kernel is not importable: {type(e).__name__}: {e}")
    fn = getattr(functional, LIGER[op])
    if op == "rms_norm":
        def rms_norm(x, weight, eps, residual=None):
            assert residual is None, "Liger's RMSNorm has no fused residual add"
            return fn(x, weight, eps)
        return rms_norm

    def call(*args):
        out = fn(*args)
        return out[0] if isinstance(out, tuple) else out
    return call


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
