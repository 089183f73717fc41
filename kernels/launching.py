"""Helpers the launchers share: interpreter detection, SM count, row views, loss plumbing.

Nothing here imports triton, so kernels/__init__.py and kernels/reference.py can use it while
``import kernels`` stays cheap.
"""
from __future__ import annotations

import functools
import os

import torch

# Stands in for the SM count when the interpreter runs the kernels on the CPU.
INTERPRETER_SMS = 4
# Bytes of fp32 logits (plus their gradient) one linear_cross_entropy chunk may hold at once. On a
# GPU 256 MiB keeps every chunk a large GEMM (>= 256 rows even at a 128k vocabulary) while the
# default CUDA shape's full logits take 2 GiB (32k rows x 16k vocab). On the CPU 32 MiB is below
# the full logits of the default run (4096 rows x 4096 vocab: 64 MiB of fp32) and fits the chunk's
# (C, V) block nearer the caches; CPU GEMMs are as fast at a few hundred rows as at thousands.
LCE_CHUNK_BUDGET_BYTES = {"cuda": 256 * 2**20, "cpu": 32 * 2**20}


def interpreting() -> bool:
    """True when the Triton interpreter runs the kernels (TRITON_INTERPRET=1, for tests).

    The one place that reads the variable. It reads the environment on every call, because the
    backend switch must see what a test sets at run time. Triton itself decides when a module's
    ``@triton.jit`` functions are created, at import, which is why tests/conftest.py sets it before
    triton is imported; a launcher that fixes something per kernel at import (the autotuned
    attention launchers) calls this at import too, so both agree.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; INTERPRETER_SMS in the interpreter or off CUDA."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sm_count(device)


@functools.cache
def _cuda_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D) with unit column stride, as the row kernels index it: rows by stride,
    columns by 1. Rows may keep any stride (no copy then); otherwise the result is a copy."""
    t2 = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def reduce_losses(losses: torch.Tensor, kept: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row losses (N,) reduced as every cross-entropy backend does: "none", "sum", or "mean"
    over the kept (non-ignored) rows, which is 0 when no row is kept."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / kept.sum().clamp(min=1)  # count stays on the device: no host sync


def default_chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per linear_cross_entropy chunk so fp32 logits and their gradient fit the device's budget."""
    budget = LCE_CHUNK_BUDGET_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, min(n_rows, budget // (8 * vocab)))


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick, or the promoted dtype of the inputs without it."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)
