"""Weight-only quantized inference (issue 17): the quantized linear op in GB/s, greedy decoding in tokens/s.

quantized_linear rows: out = x @ dequant(W).T for an (N, K) weight, forward only (quantized
weights are frozen), in int8 and fp4 (kernels/quantization.py), one report row per format and
shape. Backends: triton (our kernel, dequantizing in the GEMM; CUDA only), torch (the reference:
dequantize, then F.linear), dense (F.linear with the full-precision weight in x's dtype: what
quantization has to beat; the same measurement in both formats' rows), int8pack
(torch._weight_int8pack_mm, torch's own int8 weight-only GEMM, on our int8 weights; int8 only,
skipped where it does not run for the device and dtype) and torchao (torchao.quantization.quantize_
of an nn.Linear holding the same weight with Int8WeightOnlyConfig, or for fp4 with
NVFP4WeightOnlyConfig, torchao's nearest format: E2M1 with an E4M3 scale per 16 inputs and a
per-tensor scale; skipped when torchao does not import or the config does not run here).
GPU: decode M in {1, 4, 16} with K = N in {2048, 4096, 8192} (4096 only with
TRITONGPT_BENCH_QUICK=1) and prefill M = 16384 at K = N = 4096, bf16. CPU: M in {1, 16} with
K = N in {1024, 2048} and prefill M = 256 at K = N = 1024, fp32.
GB/s counts the weight as stored read once (qweight + scales; the dense weight for dense; the
inner tensors of torchao's tensor subclass), x read once and out written once. At decode shapes
the weight is nearly all of it. The torch reference moves more than that (it writes and reads the
dequantized weight at full width), so its GB/s is an effective rate, not its traffic: compare the
backends of a row by time; GB/s says how near each gets to the memory bandwidth that bounds a
decode step. extra_info also holds weight_bytes and threads (CPU figures depend on the thread
count: on a busy 2-core box, 2 threads can run 10-100x slower than 1; OMP_NUM_THREADS=1 sets 1).

generate rows: greedy generation with the KV cache (model.generate.generate, temperature 0) at
batch 1 from a 16-token prompt, one row per format: full precision ("full") and quantized by
model.quantize.quantize to int8 and fp4 (every attention and MLP projection; the embedding, the
norms and the tied LM head stay in full precision). GPU: the small preset (V = 8192) in bf16 on
the Triton kernels, 64 new tokens. CPU: the tiny preset (V = 8192) in fp32 on the torch kernels,
16 new tokens (the small preset's fp4 model takes tens of seconds a round there). tokens/s counts
new tokens; vs_full is the row's tokens/s over the full row's; GB/s is the weight bytes
(weight_MiB: the parameters, the tied head once, plus the quantized projections as stored) read
once per new token, the prefill counted as a step.
"""
from __future__ import annotations

import copy
import functools
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from tritongpt import kernels
from bench.conftest import DEVICE, DTYPE, ON_GPU, QUICK, implementation, measure, timed_pass
from tritongpt.kernels import quantization
from model import GPT, ModelConfig
from model.generate import generate
from model.quantized import QuantizedLinear, quantize

# (M, K = N): decode rows, then the prefill row
if ON_GPU:
    SHAPES = [(m, k) for k in ((4096,) if QUICK else (2048, 4096, 8192)) for m in (1, 4, 16)] + [(16384, 4096)]
else:
    SHAPES = [(m, k) for k in (1024, 2048) for m in (1, 16)] + [(256, 1024)]
OP_BACKENDS = ("triton", "torch", "dense", "int8pack", "torchao")
PRESET, VOCAB, PROMPT = ("small" if ON_GPU else "tiny"), 8192, 16
NEW_TOKENS = 64 if ON_GPU else 16


def stored_bytes(*tensors: torch.Tensor) -> int:
    """Bytes the tensors are stored in; a tensor subclass (torchao's) counts its inner tensors."""
    total = 0
    for t in tensors:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            total += stored_bytes(*(inner for inner in (getattr(t, name) for name in names) if inner is not None))
        else:
            total += t.numel() * t.element_size()
    return total


@functools.cache
def _weight(N: int, K: int) -> torch.Tensor:
    torch.manual_seed(0)
    return 0.02 * torch.randn(N, K, device=DEVICE)


@functools.cache
def _quantized(N: int, K: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return quantization.quantize(_weight(N, K), fmt)


def _int8pack(x: torch.Tensor, N: int, K: int, fmt: str) -> tuple[Callable[[], torch.Tensor], int]:
    """torch._weight_int8pack_mm on our int8 weight (its layout: int8 (N, K), one scale per output
    channel in x's dtype), or pytest.skip where it does not run."""
    if fmt != "int8":
        pytest.skip("torch._weight_int8pack_mm is int8 only")
    qweight, scales = _quantized(N, K, fmt)
    scales = scales.to(x.dtype)

    def forward():
        return torch._weight_int8pack_mm(x, qweight, scales)

    try:
        forward()
    except (AttributeError, NotImplementedError, RuntimeError) as e:
        pytest.skip(f"torch._weight_int8pack_mm does not run on {DEVICE} in {DTYPE}: {type(e).__name__}: {e}")
    return forward, stored_bytes(qweight, scales)


def _torchao(x: torch.Tensor, N: int, K: int, fmt: str) -> tuple[Callable[[], torch.Tensor], int]:
    """An nn.Linear holding the weight, quantized by torchao's weight-only config for fmt, or
    pytest.skip where torchao does not import or the config does not run here."""
    pytest.importorskip("torchao")
    linear = torch.nn.Linear(K, N, bias=False, device=DEVICE, dtype=DTYPE)
    try:
        from torchao.quantization import quantize_
        if fmt == "int8":
            from torchao.quantization import Int8WeightOnlyConfig as Config
        else:
            from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig as Config
        with torch.no_grad():
            linear.weight.copy_(_weight(N, K))
            quantize_(linear, Config())
            linear(x)
    except Exception as e:  # a torchao release without the config, or one that does not run on this device
        pytest.skip(f"torchao's {fmt} weight-only path does not run here: {type(e).__name__}: {e}")
    return lambda: linear(x), stored_bytes(linear.weight)


def _forward(backend: str, x: torch.Tensor, N: int, K: int, fmt: str) -> tuple[Callable[[], torch.Tensor], int]:
    """The forward of backend for the (N, K) weight in fmt, and the bytes its weight is stored in."""
    if backend == "dense":
        weight = _weight(N, K).to(DTYPE)
        return lambda: F.linear(x, weight), stored_bytes(weight)
    if backend == "int8pack":
        return _int8pack(x, N, K, fmt)
    if backend == "torchao":
        return _torchao(x, N, K, fmt)
    fn = implementation("quantized_linear", backend)
    qweight, scales = _quantized(N, K, fmt)
    return lambda: fn(x, qweight, scales, fmt), stored_bytes(qweight, scales)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("M,K", SHAPES, ids=[f"M={m}-K=N={k}" for m, k in SHAPES])
@pytest.mark.parametrize("fmt", quantization.FORMATS)
def test_quantized_linear(benchmark, fmt, M, K, backend):
    N = K
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
    forward, weight_bytes = _forward(backend, x, N, K, fmt)
    measure(benchmark, timed_pass(forward, [x], "fwd"), op="quantized_linear", pass_="fwd", backend=backend,
            shape=f"{fmt} M={M} K=N={K}", nbytes=weight_bytes + (M * K + M * N) * DTYPE.itemsize)
    benchmark.extra_info.update(weight_bytes=weight_bytes, threads=torch.get_num_threads())


@functools.cache
def _model(fmt: str) -> GPT:
    """The preset's GPT on DEVICE in DTYPE ("full"), or a quantized copy of it."""
    if fmt != "full":
        return quantize(copy.deepcopy(_model("full")), fmt)
    torch.manual_seed(0)
    return GPT(ModelConfig.preset(PRESET, vocab_size=VOCAB)).to(DEVICE, DTYPE).eval()


def _weight_bytes(model: GPT) -> int:
    quantized = [t for m in model.modules() if isinstance(m, QuantizedLinear) for t in (m.qweight, m.scales)]
    return stored_bytes(*model.parameters(), *quantized)


_GENERATE: dict[str, dict] = {}     # the generate rows' extra_info by format, for vs_full


@pytest.mark.parametrize("fmt", ("full", *quantization.FORMATS))
def test_generate(benchmark, fmt):
    model = _model(fmt)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    weight_bytes = _weight_bytes(model)
    backend = "triton" if ON_GPU else "torch"
    with kernels.use(backend):
        measure(benchmark, lambda: generate(model, prompt, NEW_TOKENS, temperature=0), op="generate",
                pass_="greedy", backend=backend, shape=f"{fmt} {PRESET} V={VOCAB} B=1 prompt={PROMPT} new={NEW_TOKENS}",
                nbytes=NEW_TOKENS * weight_bytes)
    info = benchmark.extra_info
    info.update({"tokens/s": NEW_TOKENS / benchmark.stats.stats.median, "weight_MiB": weight_bytes / 2**20,
                 "threads": torch.get_num_threads()})
    _GENERATE[fmt] = info
    if "full" in _GENERATE:
        for row in _GENERATE.values():
            row["vs_full"] = row["tokens/s"] / _GENERATE["full"]["tokens/s"]
