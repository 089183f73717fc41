"""The Triton quantized linear (kernels/triton_quantized_linear.py) through kernels.quantized_linear.

Each path (skinny without and with split-K, tiled) in int8 and fp4 against float64 of the same
dequantized weights, with tests.numerics.assert_matches (twice the torch backend's error in the
same dtype, plus atol): awkward K and N, M = 1, non-contiguous and batched x, fp32 and fp16 in the
interpreter, bf16 on CUDA. Outputs and the split-K workspace start as NaN (nan_outputs), so an
unwritten element fails. Also the gradient of x, and each bad input's message.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tritongpt import kernels
from tritongpt.kernels import quantization as Q
from tritongpt.kernels.launching import gpu_of
from tritongpt.kernels.triton_quantized_linear import SKINNY_ROWS, geometry
from numerics import DEVICE, assert_matches, needs_cuda, randn


def weights(N: int, K: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return Q.quantize(randn(N, K, scale=0.05), fmt)


def compare(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fmt: str, grad: bool = False) -> None:
    """Triton output (and dx) against the torch backend and float64."""
    K = x.shape[-1]
    exact_w = Q.dequantize(qweight, scales, fmt, K, torch.float64)
    dout = randn(*x.shape[:-1], qweight.shape[0], dtype=x.dtype)
    results = {}
    for backend in ("triton", "torch"):
        leaf = x.detach().requires_grad_(grad)
        with kernels.use(quantized_linear=backend):
            out = kernels.quantized_linear(leaf, qweight, scales, fmt)
        if grad:
            out.backward(dout)
        results[backend] = (out.detach(), leaf.grad)
    exact = x.double() @ exact_w.T
    assert results["triton"][0].dtype == x.dtype
    assert_matches("out", results["triton"][0], results["torch"][0], exact)
    if grad:
        assert_matches("dx", results["triton"][1], results["torch"][1], dout.double() @ exact_w)


def splits(M: int, N: int, K: int, fmt: str, dtype: torch.dtype) -> int:
    return geometry(M, N, K, fmt, dtype, gpu_of(torch.device(DEVICE)))[2]


# (M, N, K) per path, in the interpreter's geometry (4 SMs, 32-wide N tiles, 64-deep K steps)
PATHS = {"skinny": (1, 48, 96), "skinny-split-k": (3, 17, 1000), "tiled": (37, 50, 70)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("path", PATHS)
def test_each_path_matches_float64(nan_outputs, path, fmt, dtype):
    M, N, K = PATHS[path]
    if not DEVICE == "cuda":
        assert (M <= SKINNY_ROWS) == path.startswith("skinny")
        assert (splits(M, N, K, fmt, dtype) > 1) == path.endswith("split-k")
    compare(randn(M, K, dtype=dtype), *weights(N, K, fmt), fmt)


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_non_contiguous_and_batched_x(nan_outputs, fmt):
    wide = randn(2, 40, 3, dtype=torch.float16)                 # x (3, 40) with stride (1, 3): transposed
    compare(wide[0].T, *weights(33, 40, fmt), fmt)
    compare(randn(2, 5, 150)[:, ::2], *weights(20, 150, fmt), fmt)   # (2, 3, 150) with a row stride of 2 rows


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_gradient_of_x(nan_outputs, fmt):
    compare(randn(5, 70), *weights(24, 70, fmt), fmt, grad=True)


@settings(max_examples=12, deadline=None)
@given(M=st.integers(1, 40), N=st.integers(1, 70), K=st.integers(1, 300), fmt=st.sampled_from(Q.FORMATS))
def test_shapes_property(M, N, K, fmt):
    compare(randn(M, K), *weights(N, K, fmt), fmt)


def test_empty_inputs():
    q, s = weights(8, 64, "int8")
    with kernels.use(quantized_linear="triton" if DEVICE == "cuda" or kernels.launching.interpreting() else "torch"):
        assert kernels.quantized_linear(randn(0, 64), q, s, "int8").shape == (0, 8)


@needs_cuda
@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("M", [1, 16, 300])
def test_bf16_and_large_shapes_on_cuda(nan_outputs, fmt, M):
    compare(randn(M, 4096, dtype=torch.bfloat16), *weights(4096, 4096, fmt), fmt)


@pytest.mark.parametrize("make, message", [
    (lambda q, s: kernels.quantized_linear(randn(3, 64, device="cpu"), q, s, "int4"),
     "unknown quantization format 'int4'; choose one of int8, fp4"),
    (lambda q, s: kernels.quantized_linear(randn(3, 64, device="cpu"), q.float(), s, "int8"),
     "int8 qweight must be a 2-D torch.int8 tensor, got torch.float32"),
    (lambda q, s: kernels.quantized_linear(randn(3, 60, device="cpu"), q, s, "int8"),
     r"int8 qweight has shape \(8, 64\) but x has K = 60 input features; expected \(8, 60\)"),
    (lambda q, s: kernels.quantized_linear(randn(3, 64, device="cpu"), q, s[:4], "int8"),
     r"int8 scales have shape \(4,\); expected \(8,\) for qweight \(8, 64\) \(one per output feature\)"),
    (lambda q, s: kernels.quantized_linear(randn(3, 64, device="cpu"), q, s.double(), "int8"),
     "scales must be a float16 or float32 tensor, got torch.float64"),
    (lambda q, s: kernels.quantized_linear(randn(3, 64, device="cpu").long(), q, s, "int8"),
     "x has dtype torch.int64"),
])
def test_bad_input_messages(make, message):
    q, s = Q.quantize(randn(8, 64, device="cpu"), "int8")
    with pytest.raises(ValueError, match=message):
        make(q, s)


def test_fp4_scale_shape_message():
    q, s = Q.quantize(randn(8, 70, device="cpu"), "fp4")
    assert q.shape == (8, 48) and s.shape == (8, 3)
    with pytest.raises(ValueError, match=r"fp4 scales have shape \(8, 2\); expected \(8, 3\) .*groups? of 32"):
        kernels.quantized_linear(randn(3, 70, device="cpu"), q, s[:, :2], "fp4")
