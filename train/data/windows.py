"""Windows of a token stream for next-token prediction: random training windows that are a pure
function of (seed, step, rank), and the fixed consecutive windows of a validation split. Pretraining
trains and validates on them; post-training mixes them in to keep what pretraining learned."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def sample_batch(tokens: np.ndarray, batch_size: int, block_size: int, seed: int, step: int,
                 rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of batch_size windows at uniform random starts, y = x shifted by one; a pure function of
    (seed, step, rank), so resuming at a step replays the same batches. (B, T) int64 CPU tensors."""
    if len(tokens) < block_size + 1:
        raise ValueError(f"{len(tokens):,} tokens are fewer than block_size + 1 = {block_size + 1}")
    rng = np.random.default_rng([seed, step, rank])
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    return _split_xy(tokens[starts[:, None] + np.arange(block_size + 1)])


def eval_batches(tokens: np.ndarray, batch_size: int, block_size: int,
                 max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows from the start, batch_size at a time, until about max_tokens
    targets (at least one window) or the end of the tokens; the same batches on every call."""
    windows = (len(tokens) - 1) // block_size
    if windows == 0:
        raise ValueError(f"{len(tokens):,} tokens are fewer than block_size + 1 = {block_size + 1}; "
                         f"evaluate with a smaller block_size or a larger val split")
    if max_tokens is not None:
        windows = min(windows, max(1, max_tokens // block_size))
    for first in range(0, windows, batch_size):
        rows = np.arange(first, min(first + batch_size, windows))
        yield _split_xy(tokens[rows[:, None] * block_size + np.arange(block_size + 1)])


def _split_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of (B, T + 1) windows as contiguous int64 tensors (copied in numpy, which is
    far faster than torch's .contiguous() on CPU here)."""
    windows = windows.astype(np.int64)
    return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())
