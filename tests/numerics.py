"""The numerical test method shared by every kernel test (the method of the FlashAttention tests).

A result passes when its max error against the float64 result is at most twice the error of the
torch reference run in the same dtype, plus atol; in float32 it must also be within ~1e-5
relative of the float64 result. NaN never passes.
"""
from __future__ import annotations

import functools

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"     # kernel tests run on the GPU when there is one, else in the interpreter
needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16 kernels and full-size shapes need a CUDA GPU")

# Slack added to 2 * err(reference) per dtype; it covers the last-bit rounding of the output.
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
FP32_RTOL = 1e-5


def max_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    return (out.double() - exact.double()).abs().max().item() if out.numel() else 0.0


def assert_matches(name: str, out: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor,
                   atol: float | None = None, factor: float = 2.0) -> None:
    """out: kernel result; ref: torch reference in the same dtype; exact: float64 result. factor
    (2 by the method) is larger only where a kernel computes a function torch rounds correctly to
    a few ulp, and its caller says why."""
    assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != expected {tuple(exact.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the result"
    atol = ATOL[out.dtype] if atol is None else atol
    err, ref_err = max_err(out, exact), max_err(ref, exact)
    assert err <= factor * ref_err + atol, \
        f"{name}: error {err:.3e} > {factor:g} * reference error {ref_err:.3e} + {atol:.0e}"
    if out.dtype == torch.float32 and exact.numel():
        scale = exact.double().abs().max().item()
        assert err <= FP32_RTOL * scale + atol, f"{name}: fp32 error {err:.3e} > {FP32_RTOL:.0e} * {scale:.3e}"


def nan_filled(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so an element a kernel forgets to write fails the test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, device=DEVICE) -> torch.Tensor:
    """Fresh normal inputs (never zeros), drawn in fp32 and then cast so every dtype sees the same values."""
    return (torch.randn(*shape, device=device) * scale).to(dtype)


cpu_randn = functools.partial(randn, device="cpu")   # for tests of the references and of input checks


def exact_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                        reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """kernels.cross_entropy's definition, evaluated in float64."""
    x = logits.double()                                                          # (N, V)
    kept = targets != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    nll = lse - x.gather(1, targets.masked_fill(~kept, 0)[:, None]).squeeze(1)
    losses = (1 - label_smoothing) * nll + label_smoothing * (lse - x.mean(dim=-1)) + z_loss * lse.square()
    losses = torch.where(kept, losses, 0.0)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / kept.sum().clamp(min=1)


def make_targets(n: int, v: int, ignore_index: int = -100, ignored: float = 0.25) -> torch.Tensor:
    targets = torch.randint(0, v, (n,), device=DEVICE)
    return targets.masked_fill(torch.rand(n, device=DEVICE) < ignored, ignore_index)
