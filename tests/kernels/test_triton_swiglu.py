"""The Triton SwiGLU (kernels/triton_swiglu.py) through kernels.swiglu, against float64.

The output and both gradients are checked with tests.numerics.assert_matches (twice the torch
backend's error in the same dtype, plus atol). fp32 and fp16 run in the CPU interpreter; bf16 runs
on CUDA only (the interpreter rounds bf16 by truncation), and so does the wide shape (4, 33, 32768):
over the flattened tensor it would only add programs to what the smaller shapes cover. Also: the
model trains with the Triton RMSNorm and SwiGLU exactly as with the torch backend.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tritongpt import kernels
from tritongpt.kernels import reference
from model import GPT, ModelConfig
from numerics import DEVICE, assert_matches, needs_cuda, randn
# The NaN-output fixture and helpers of the RMSNorm tests (tests/conftest.py has no such fixture).

SHAPES = [(1, 1), (5, 123, 123), (2, 128, 512), (3, 7, 4096)]
WIDE = (4, 33, 32768)       # rows far wider than one program's BLOCK of elements


def run(backend: str, gate, up, grad) -> list[torch.Tensor]:
    """[out, dgate, dup] of one backend; "float64" is the reference on float64 copies."""
    if backend == "float64":
        leaves = [t.detach().double().requires_grad_() for t in (gate, up)]
        fn = reference.swiglu
    else:
        leaves = [t.detach().requires_grad_() for t in (gate, up)]   # detach keeps the strides
        fn = kernels.swiglu
    with kernels.use(swiglu="torch" if backend == "float64" else backend):
        out = fn(*leaves)
        out.backward(grad.to(out.dtype))
    return [out.detach(), leaves[0].grad, leaves[1].grad]


def compare(gate, up, grad=None) -> list[torch.Tensor]:
    """Check the triton output and gradients against float64; return them."""
    grad = randn(*gate.shape) if grad is None else grad
    got, ref, exact = (run(backend, gate, up, grad) for backend in ("triton", "torch", "float64"))
    for name, out, r, e in zip(("out", "dgate", "dup"), got, ref, exact):
        assert out.dtype == gate.dtype
        assert_matches(name, out, r, e)
    return got


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(nan_outputs, shape):
    compare(randn(*shape), randn(*shape))


def test_non_contiguous_inputs_and_grad(nan_outputs):
    fused = randn(6, 11, 2 * 77)                     # a fused gate/up projection, split in halves
    gate, up = fused[..., :77], fused[..., 77:]
    compare(gate, up, randn(11, 6, 77).transpose(0, 1))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # numpy, in the interpreter
def test_large_magnitudes_are_finite(nan_outputs):
    got = compare(randn(3, 7, 300, scale=1e4), randn(3, 7, 300, scale=1e4))
    assert all(torch.isfinite(t).all() for t in got)


def test_empty(nan_outputs):
    gate = torch.ones(0, 5, device=DEVICE, requires_grad=True)
    with kernels.use(swiglu="triton"):
        out = kernels.swiglu(gate, torch.ones(0, 5, device=DEVICE))
        out.sum().backward()
    assert out.shape == (0, 5) and gate.grad.shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)], ids=str)
def test_half_precision(nan_outputs, dtype):
    compare(randn(5, 13, 123, dtype=dtype), randn(5, 13, 123, dtype=dtype))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [WIDE, (16384, 11008)], ids=str)
def test_all_shapes_and_dtypes_on_cuda(shape, dtype):
    compare(randn(*shape, dtype=dtype), randn(*shape, dtype=dtype))


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3))
def test_property_shapes(shape):
    torch.manual_seed(0)            # inputs depend only on the example, so a failure replays
    compare(randn(*shape), randn(*shape))


def test_registered_custom_ops():
    gate, up = randn(3, 5, 40).requires_grad_(), randn(3, 5, 40)
    torch.library.opcheck(torch.ops.tritongpt.swiglu.default, (gate, up))
    with kernels.use(swiglu="triton"):
        out = torch.compile(kernels.swiglu, backend="aot_eager", fullgraph=True)(gate, up)
    out.sum().backward()
    assert gate.grad is not None


@pytest.mark.parametrize("make_inputs, message", [
    (lambda: (randn(2, 8), randn(2, 9)), r"gate has shape \(2, 8\) but up has \(2, 9\)"),
    (lambda: (torch.ones(2, 8, dtype=torch.int64), randn(2, 8)), "gate has dtype torch.int64"),
    (lambda: (randn(2, 8), randn(2, 8, dtype=torch.float16)), "mismatched dtypes: gate torch.float32, up torch.float16"),
    (lambda: (randn(2, 8), torch.ones(2, 8, device="meta")), "mismatched devices"),
], ids=["shapes", "int", "dtypes", "devices"])
def test_bad_inputs_name_the_problem(make_inputs, message):
    gate, up = make_inputs()
    with kernels.use(swiglu="triton"), pytest.raises(ValueError, match=message):
        kernels.swiglu(gate, up)


def test_model_trains_like_the_torch_backend():
    """A few AdamW steps of a small model: Triton RMSNorm and SwiGLU give the torch losses."""
    cfg = ModelConfig.preset("tiny", vocab_size=64, n_layer=2, n_embd=64, block_size=32)
    idx = torch.randint(0, 64, (2, 16), device=DEVICE)
    targets = torch.roll(idx, -1, dims=1)
    losses = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = GPT(cfg).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[backend] = []
        with kernels.use(rms_norm=backend, swiglu=backend):
            for _ in range(4):
                loss = model(idx, targets=targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[backend].append(loss.item())
    assert losses["triton"][-1] < losses["triton"][0]
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-4, atol=1e-5)
