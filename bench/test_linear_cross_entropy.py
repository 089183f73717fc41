"""Linear cross-entropy (lm head + mean loss): forward, backward and both, in TFLOP/s, with peak memory.

GPU: N = 16384 rows in bf16 at (V, D) = (32000, 2048) and (128256, 4096) (only the latter with
TRITONGPT_BENCH_QUICK=1). Rows: triton (the fused kernel), torch (the chunked reference), compile
(torch.compile of it), liger (Liger-Kernel's fused linear cross-entropy, where it imports) and
unfused (the (N, V) logits materialised, upcast to fp32 and fed to F.cross_entropy: the path the
fused op replaces).
CPU: torch and unfused on one small shape, plus each one's peak RSS above its inputs, measured
in a fresh subprocess at a larger shape (peak_rss_MiB in extra_info) to show the chunking saving.
FLOPs count the nominal matmuls: forward 2 N V D, backward 4 N V D (whatever a backend recomputes).
The triton op computes the gradients inside a forward that requires grad, so its bwd row is only
their rescale and its fwd row (run without grad) only the loss; Liger's computes them in every
forward: compare backends on fwdbwd.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import BACKENDS, DEVICE, DTYPE, ON_GPU, PASSES, QUICK, implementation, measure, timed_pass

N = 16384 if ON_GPU else 256
SHAPES = ((((128256, 4096),) if QUICK else ((32000, 2048), (128256, 4096))) if ON_GPU
          else ((4096, 64),))                                                   # (V, D)
MATMULS = {"fwd": 1, "bwd": 2, "fwdbwd": 3}
RSS_SHAPE = dict(n=2048, vocab=16384, dim=64, chunk=256)   # fp32 logits 128 MiB; chunks of 16 MiB

_RSS_SCRIPT = """
import re, sys
import torch
import torch.nn.functional as F
from tritongpt.kernels import reference

def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

def step(backend, n, vocab, dim, chunk):
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    if backend == "torch":
        loss = reference.linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    else:
        loss = F.cross_entropy((hidden @ weight.T).float(), targets)
    loss.backward()

n, vocab, dim, chunk = map(int, sys.argv[1:])
inputs = 4 * (n + vocab) * dim / 1024
for backend in ("torch", "unfused"):
    step(backend, 16, 64, dim, 4)       # first use pages in library code and thread pools: not the op's memory
    base = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")      # restart the peak-RSS count from here
    step(backend, n, vocab, dim, chunk)
    print(backend, (kib("VmHWM") - base - inputs) / 1024)
"""


def unfused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), targets)                 # (N, V) logits twice


@functools.cache
def peak_rss_mib() -> dict[str, float]:
    """{backend: peak RSS growth (MiB) of one forward + backward beyond its inputs}, from a fresh
    interpreter, with glibc returning every large block on free so that RSS follows live memory."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    args = [str(RSS_SHAPE[k]) for k in ("n", "vocab", "dim", "chunk")]
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, *args], env=env, cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return {backend: float(mib) for backend, mib in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"V={s[0]},D={s[1]}")
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("backend", [*BACKENDS, "liger", "unfused"])
def test_linear_cross_entropy(benchmark, backend, pass_, shape):
    vocab, dim = shape
    fn = unfused if backend == "unfused" else implementation("linear_cross_entropy", backend)
    hidden = torch.randn(N, dim, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(vocab, dim, device=DEVICE) * dim ** -0.5).to(DTYPE).requires_grad_()
    targets = torch.randint(0, vocab, (N,), device=DEVICE)
    run = timed_pass(lambda: fn(hidden, weight, targets), [hidden, weight], pass_)
    measure(benchmark, run, op="linear_cross_entropy", pass_=pass_, backend=backend,
            shape=f"N={N} V={vocab} D={dim}", flops=MATMULS[pass_] * 2 * N * vocab * dim, memory=True)
    if not ON_GPU and pass_ == "fwdbwd":
        benchmark.extra_info["peak_rss_MiB"] = peak_rss_mib()[backend]
        benchmark.extra_info["rss_shape"] = "N={n} V={vocab} D={dim} chunk={chunk} fp32".format(**RSS_SHAPE)
