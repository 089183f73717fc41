"""Key/value caches for decoding: the Cache protocol that GPT.forward is typed against, and its two
implementations.

KVCache holds B sequences that advance together (model/generate.py). SlotCache holds one sequence
per row, each at its own position, and runs each forward on the rows it was told to (the serving
engine's continuous batching, model/serve/engine.py). Only a cache writes its own state: callers
move it through its methods (reset, select, advance, move).
"""
from __future__ import annotations

from typing import Protocol

import torch

import kernels
from model.config import ModelConfig


class Cache(Protocol):
    """What GPT.forward asks of a cache, in the order it asks: `length`, to check that the new
    positions fit in block_size; positions(T), once, to index the RoPE tables; attend(...), once per
    layer; advance(T), once all layers ran."""

    @property
    def length(self) -> int:
        """Positions already filled (where rows differ, the longest row's)."""

    def positions(self, T: int) -> slice | torch.Tensor:
        """What indexes the (block_size, 1, D) RoPE tables for the T new positions: a slice when
        every row is at the same position, a (B, T) int64 tensor when each row has its own."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (B, Hkv, T, D) of the T new positions after the filled ones and attend
        q (B, Hq, T, D) causally to every key filled so far -> (B, Hq, T, D)."""

    def advance(self, T: int) -> None:
        """Count the T new positions as filled."""


class KVCache:
    """Keys and values of every layer for B sequences at the same position, preallocated to block_size."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype):
        shape = (batch_size, cfg.n_kv_head, cfg.block_size, cfg.head_dim)
        self._k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self._v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def reset(self) -> None:
        """Forget every position, to fill the cache again from position 0."""
        self._length = 0

    def positions(self, T: int) -> slice:
        return slice(self._length, self._length + T)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        end = self._length + k.shape[2]
        K, V = self._k[layer], self._v[layer]                                 # (B, Hkv, block_size, D)
        K[:, :, self._length:end], V[:, :, self._length:end] = k, v
        return kernels.causal_attention(q, K[:, :, :end], V[:, :, :end])      # (B, Hq, T, D)

    def advance(self, T: int) -> None:
        self._length += T


class SlotCache:
    """Keys and values for `slots` sequences, one per row of (slots, Hkv, block_size, D) per layer,
    each row filled to its own length. select(rows) picks the rows of the next forward: one row
    from its length on (a prefill, any T), or rows 0..n-1 one position each (a decoding step).
    Each row writes its new keys at its own length and attends to its own keys only."""

    def __init__(self, cfg: ModelConfig, slots: int, device: torch.device | str, dtype: torch.dtype):
        shape = (slots, cfg.n_kv_head, cfg.block_size, cfg.head_dim)
        # Empty, not zeros: causal_attention never reads a key past its row's key_lengths.
        self._k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self._v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self._lengths = [0] * slots                # positions filled, per row
        self._rows = slice(0, 0)                   # the rows of the next forward
        self._starts = torch.zeros(0, dtype=torch.int64, device=device)   # (B,) their lengths, on the device
        self._length = 0                           # the longest of them
        self._key_lengths = self._starts           # (B,) their lengths with this forward's positions

    @property
    def length(self) -> int:
        return self._length

    def row_length(self, row: int) -> int:
        """Positions filled in row."""
        return self._lengths[row]

    def reset(self, row: int) -> None:
        """Empty row, for a new sequence."""
        self._lengths[row] = 0

    def select(self, rows: slice) -> None:
        """Make the next forward run on these rows, each continuing from its own length."""
        self._rows = rows
        self._starts = torch.tensor(self._lengths[rows], dtype=torch.int64, device=self._starts.device)   # (B,)
        self._length = max(self._lengths[rows])

    def positions(self, T: int) -> torch.Tensor:
        return self._starts[:, None] + torch.arange(T, device=self._starts.device)   # (B, T)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        K, V = self._k[layer][self._rows], self._v[layer][self._rows]        # (B, Hkv, block_size, D) views
        B, _, T, _ = k.shape
        rows = torch.arange(B, device=k.device)[:, None]                     # (B, 1)
        new = self.positions(T)                                              # (B, T)
        K[rows, :, new], V[rows, :, new] = k.transpose(1, 2), v.transpose(1, 2)   # (B, T, Hkv, D) each
        end = self._length + T                                               # the longest row's keys
        if B == 1:          # one row (a prefill): its keys are the first `end`, the plain causal case
            return kernels.causal_attention(q, K[:, :, :end], V[:, :, :end])
        if layer == 0:                     # one lengths tensor for every layer: kernels checks it once
            self._key_lengths = self._starts + T                             # (B,)
        return kernels.causal_attention(q, K[:, :, :end], V[:, :, :end], key_lengths=self._key_lengths)

    def advance(self, T: int) -> None:
        for r in range(self._rows.start, self._rows.stop):
            self._lengths[r] += T
        self._starts = self._starts + T
        self._length += T

    def move(self, src: int, dst: int) -> None:
        """Row src's keys and values into row dst (what retiring dst does with the last row)."""
        n = self._lengths[src]
        for K, V in zip(self._k, self._v):
            K[dst, :, :n], V[dst, :, :n] = K[src, :, :n], V[src, :, :n]
        self._lengths[dst] = n
