"""The triton backend of kernels.causal_attention: kernels.attention's kernels (triton_attention.py)
with its causal defaults, and per-row key lengths (split-key decoding, triton_attention_decode.py)."""
from __future__ import annotations

import torch

from tritongpt.kernels import triton_attention


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    return triton_attention.attention(q, k, v, True, scale, (-1, 0), 0.0, key_lengths=key_lengths)
