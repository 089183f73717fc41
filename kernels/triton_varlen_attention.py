"""Attention over packed sequences in Triton (FlashAttention's varlen): the kernels of
triton_attention.py, each program placed in its sequence.

q (total_q, Hq, D) and k, v (total_k, Hkv, D) hold n sequences back to back, sequence s in rows
cu_seqlens_q[s] .. cu_seqlens_q[s + 1] - 1 (of k, v: cu_seqlens_k). The grids are those of a
padded batch of n rows of max_seqlen_q queries (max_seqlen_k keys for dK, dV); each program reads
its sequence's first row and length from the offsets, addresses its tiles from that row (the
kernels' batch stride is 0), and a program whose tile lies past its sequence's end returns at
once. Within a sequence everything is as in triton_attention.py: the causal mask aligned
bottom-right, windows and softcap, masked tiles only where a tile crosses a boundary, so packing
costs no work beyond the padded tiles' idle programs. No sequence reads another's keys: a
sequence's key loads stop at its own length. The logsumexp and delta scratch are (Hq, total_q).

Memory traffic: as triton_attention.py per sequence, summed over the sequences (nothing is
padded in memory); tensor descriptors (TMA) address (B, H, T, D) tensors, so packed tiles use
pointer loads.
"""
from __future__ import annotations

import torch

from tritongpt.kernels.triton_attention import Mask, Packed, backward, forward


def _new_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o like q (total_q, Hq, D), contiguous, and the fp32 lse (Hq, total_q)."""
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[1], q.shape[0],
                                                                                   dtype=torch.float32)


def _new_grads(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape)


# ----------------------------------------------------------------------------- torch custom ops

@torch.library.custom_op("tritongpt::varlen_attention", mutates_args=())
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                         left: int, right: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _new_outputs(q)
    forward(q, k, v, scale, o, lse, Mask(left, right, softcap),
            Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return o, lse


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, softcap):
    return _new_outputs(q)


@torch.library.custom_op("tritongpt::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  o: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                  cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                                  left: int, right: int,
                                  softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _new_grads(q, k)
    backward(do.contiguous(), q, k, v, o, lse, scale, dq, dk, dv, Mask(left, right, softcap),
             Packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return dq, dk, dv


@_varlen_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, softcap):
    return _new_grads(q, k)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens_q, cu_seqlens_k, *ctx.options = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_backward_op(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry

def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                     scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                     softcap: float = 0.0) -> torch.Tensor:
    """The triton backend of kernels.varlen_attention (inputs validated there); see the module doc."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask = Mask.of(causal, window_size, softcap)
    return _varlen_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                mask.left, mask.right, mask.softcap)[0]
