"""SwiGLU: forward, backward and both, in GB/s.

GPU: M = 16384 rows at the MLP widths of LLaMA-7B (11008) and Mistral/LLaMA-3-8B (14336; only
this one with TRITONGPT_BENCH_QUICK=1), bf16, plus Liger-Kernel's SiLU-mul where it imports.
CPU: the torch reference on one small shape. GB/s counts each input read once and each output
written once: forward gate, up; out (3 tensors), backward dout, gate, up; dgate, dup (5).
"""
import pytest
import torch

from bench.conftest import BACKENDS, DEVICE, DTYPE, ON_GPU, PASSES, QUICK, implementation, measure, timed_pass

M = 16384 if ON_GPU else 512
WIDTHS = ((14336,) if QUICK else (11008, 14336)) if ON_GPU else (2048,)
TENSORS = {"fwd": 3, "bwd": 5, "fwdbwd": 8}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("backend", [*BACKENDS, "liger"])
def test_swiglu(benchmark, backend, pass_, width):
    fn = implementation("swiglu", backend)
    gate = torch.randn(M, width, device=DEVICE, dtype=DTYPE, requires_grad=True)
    up = torch.randn(M, width, device=DEVICE, dtype=DTYPE, requires_grad=True)
    run = timed_pass(lambda: fn(gate, up), [gate, up], pass_)
    measure(benchmark, run, op="swiglu", pass_=pass_, backend=backend, shape=f"M={M} N={width}",
            nbytes=TENSORS[pass_] * M * width * DTYPE.itemsize)
