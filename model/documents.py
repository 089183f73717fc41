"""Documents packed into the rows of a batch, for attention that never crosses from one to the next.

A (B, T) batch may hold several documents per row: pretraining rows cut from one token stream
(documents end at <|endoftext|>), or SFT examples packed into rows. Documents says where each one
starts, in the form kernels.varlen_attention takes: the (n + 1,) int32 offsets of the n documents
in the B * T flattened tokens, the longest document's length, and each token's position within
its document (which indexes the RoPE tables, so every document starts at position 0, exactly as
if it were alone in its row). A row always starts a document, so none spans two rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Documents:
    cu_seqlens: torch.Tensor      # (n + 1,) int32: document d is flattened tokens cu[d] .. cu[d + 1] - 1
    max_seqlen: int               # the longest document's length
    positions: torch.Tensor       # (B, T) int64: each token's position within its document

    @classmethod
    def from_starts(cls, starts: torch.Tensor) -> "Documents":
        """starts (B, T) bool: True where a document begins (column 0 is forced True)."""
        starts = starts.clone()
        starts[:, 0] = True
        B, T = starts.shape
        flat = starts.reshape(B * T)                                                   # (B * T,)
        first = flat.nonzero().squeeze(1)                                              # (n,) start offsets
        ends = torch.cat((first, first.new_tensor([B * T])))                           # (n + 1,)
        document = flat.cumsum(0) - 1                                                  # (B * T,) index of each token's
        positions = torch.arange(B * T, device=starts.device) - first[document]        # position in it
        return cls(ends.to(torch.int32), int(ends.diff().max()), positions.view(B, T))

    @classmethod
    def starting_at(cls, idx: torch.Tensor, boundary: int) -> "Documents":
        """The documents of idx (B, T) that each start at a `boundary` token (<|endoftext|>, which
        prepared data puts before every document, as the chat template and generation put it
        before a prompt), and at each row's start."""
        return cls.from_starts(idx == boundary)

    @classmethod
    def from_lengths(cls, lengths: list[list[int]], T: int, device: torch.device | str = "cpu") -> "Documents":
        """Row b holds documents of lengths[b] back to back from its start; what is left of the row
        after them (padding) is one more document, which no real token sees."""
        starts = torch.zeros(len(lengths), T, dtype=torch.bool)
        for b, row in enumerate(lengths):
            offsets = torch.tensor(row, dtype=torch.int64).cumsum(0)
            if len(row) and int(offsets[-1]) > T:
                raise ValueError(f"row {b} packs {int(offsets[-1])} tokens into {T} positions; pack fewer documents")
            starts[b, offsets[offsets < T]] = True
        return cls.from_starts(starts.to(device))
