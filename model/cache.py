"""Key/value caches for decoding: the Cache protocol that GPT.forward is typed against, and its two
implementations.

KVCache holds B sequences that advance together (model/generate.py). SlotCache holds one sequence
per row, each at its own position, and runs each forward on the rows it was told to (the serving
engine's continuous batching, model/serve/engine.py), or prefills several prompts packed into one
row, each into its own cache row (select_packed). Only a cache writes its own state: callers
move it through its methods (reset, select, select_packed, advance, move).
"""
from __future__ import annotations

from typing import Protocol

import torch

from tritongpt import kernels
from model.config import ModelConfig
from model.documents import Documents


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

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict) -> torch.Tensor:
        """Store k, v (B, Hkv, T, D) of the T new positions after the filled ones and attend
        q (B, Hq, T, D) causally to every key filled so far, with kernels.attention's options
        (window_size, softcap) -> (B, Hq, T, D)."""

    def advance(self, T: int) -> None:
        """Count the T new positions as filled."""

    @property
    def packed(self) -> Documents | None:
        """The documents of the next forward when it is a packed prefill (SlotCache.select_packed),
        else None: GPT.forward takes documents with a cache only when they are these."""


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

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict) -> torch.Tensor:
        end = self._length + k.shape[2]
        K, V = self._k[layer], self._v[layer]                                 # (B, Hkv, block_size, D)
        K[:, :, self._length:end], V[:, :, self._length:end] = k, v
        return kernels.attention(q, K[:, :, :end], V[:, :, :end], **options)  # (B, Hq, T, D)

    def advance(self, T: int) -> None:
        self._length += T

    @property
    def packed(self) -> None:
        return None


class SlotCache:
    """Keys and values for `slots` sequences, one per row of (slots, Hkv, block_size, D) per layer,
    each row filled to its own length. select(rows) picks the rows of the next forward: one row
    from its length on (a prefill, any T), or rows 0..n-1 one position each (a decoding step).
    Each row writes its new keys at its own length and attends to its own keys only.
    select_packed(rows, lengths) makes the next forward a packed prefill instead: one (1, sum of
    lengths) row of prompts back to back, each filling its own cache row from position 0."""

    def __init__(self, cfg: ModelConfig, slots: int, device: torch.device | str, dtype: torch.dtype):
        shape = (slots, cfg.n_kv_head, cfg.block_size, cfg.head_dim)
        # Empty, not zeros: attention never reads a key past its row's key_lengths.
        self._k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self._v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self._lengths = [0] * slots                # positions filled, per row
        self._rows = slice(0, 0)                   # the rows of the next forward
        self._starts = torch.zeros(0, dtype=torch.int64, device=device)   # (B,) their lengths, on the device
        self._length = 0                           # the longest of them
        self._key_lengths = self._starts           # (B,) their lengths with this forward's positions
        self._packed: Documents | None = None      # a packed prefill's prompts (select_packed), else None
        self._packed_lengths: list[int] = []       # their lengths
        self._packed_rows = self._starts           # (total,) each packed token's row, counted from rows.start

    @property
    def length(self) -> int:
        return self._length

    @property
    def packed(self) -> Documents | None:
        return self._packed

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
        self._packed = None

    def select_packed(self, rows: slice, lengths: list[int]) -> Documents:
        """Make the next forward a packed prefill of len(lengths) prompts into these rows, which are
        emptied first: its input is one row (1, sum(lengths)) holding the prompts back to back,
        prompt i (lengths[i] tokens) for row rows.start + i. Returns the Documents of that row, to
        pass to GPT.forward with this cache (which then gives each prompt's last logits). Each prompt
        writes its keys and values into its own row at positions 0..lengths[i] - 1 and attends to
        them only, through kernels.varlen_attention: its row being empty, its keys are exactly its
        new ones. After the forward the rows are selected as by select(rows), each at its prompt's
        length. Only fresh rows: a row that already holds a sequence is prefilled through select."""
        lengths = list(lengths)
        if rows.step not in (None, 1) or len(lengths) != len(range(rows.start, rows.stop)) or not lengths:
            raise ValueError(f"rows {rows} and {len(lengths)} prompt lengths: give one length per row, "
                             f"of consecutive rows")
        if min(lengths) < 1:
            raise ValueError(f"prompt lengths {lengths}: every prompt needs at least one token")
        device = self._starts.device
        for r in range(rows.start, rows.stop):
            self._lengths[r] = 0
        self._rows = rows
        self._starts = torch.zeros(len(lengths), dtype=torch.int64, device=device)                # (n,)
        self._length = 0
        self._packed = Documents.from_lengths([lengths], sum(lengths), device)
        self._packed_lengths = lengths
        self._packed_rows = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                                    torch.tensor(lengths, device=device))           # (total,)
        return self._packed

    def positions(self, T: int) -> torch.Tensor:
        if self._packed is not None:
            if T != self._packed_rows.numel():
                raise ValueError(f"the packed prefill holds {self._packed_rows.numel()} tokens but the forward "
                                 f"has {T}: pass the prompts given to select_packed, back to back in one row")
            return self._packed.positions                                    # (1, T), each prompt from 0
        return self._starts[:, None] + torch.arange(T, device=self._starts.device)   # (B, T)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict) -> torch.Tensor:
        K, V = self._k[layer][self._rows], self._v[layer][self._rows]        # (B, Hkv, block_size, D) views
        if self._packed is not None:
            return self._attend_packed(K, V, q, k, v, options)
        B, _, T, _ = k.shape
        rows = torch.arange(B, device=k.device)[:, None]                     # (B, 1)
        new = self.positions(T)                                              # (B, T)
        K[rows, :, new], V[rows, :, new] = k.transpose(1, 2), v.transpose(1, 2)   # (B, T, Hkv, D) each
        end = self._length + T                                               # the longest row's keys
        if B == 1:          # one row (a prefill): its keys are the first `end`, the plain causal case
            return kernels.attention(q, K[:, :, :end], V[:, :, :end], **options)
        if layer == 0:                     # one lengths tensor for every layer: kernels checks it once
            self._key_lengths = self._starts + T                             # (B,)
        return kernels.attention(q, K[:, :, :end], V[:, :, :end], key_lengths=self._key_lengths, **options)

    def _attend_packed(self, K: torch.Tensor, V: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       options: dict) -> torch.Tensor:
        """The packed prefill's attend: q (1, Hq, total, D), k, v (1, Hkv, total, D) of the prompts
        back to back; K, V (n, Hkv, block_size, D) the views of their rows."""
        docs = self._packed
        q, k, v = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)   # (total, H*, D)
        new = docs.positions[0]                                              # (total,) each within its prompt
        K[self._packed_rows, :, new], V[self._packed_rows, :, new] = k, v    # (total, Hkv, D) each
        y = kernels.varlen_attention(q, k, v, docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen,
                                     **options)                              # (total, Hq, D)
        return y.transpose(0, 1)[None]                                       # (1, Hq, total, D)

    def advance(self, T: int) -> None:
        if self._packed is not None:        # each row filled to its prompt's length; now selected as by select
            for r, n in zip(range(self._rows.start, self._rows.stop), self._packed_lengths):
                self._lengths[r] = n
            self.select(self._rows)
            return
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
