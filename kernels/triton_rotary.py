"""Rotary position embedding (RoPE) of q and k in Triton: one launch each way, forward and backward.

Convention (kernels.rotary, model/gpt.py's rope_tables): q (B, T, Hq, D), k (B, T, Hkv, D), any
strides; cos, sin full-width tables (fp32 in the model; any float dtype is read as fp32) of shape
(T, 1, D), or (B, T, 1, D) per row, where cos holds cos(angle) over both halves of a head vector
and sin holds -sin(angle), +sin(angle). The op is

    y = x * cos + roll(x, D/2) * sin

which with those tables rotates each head vector's halves (x1, x2) to
(x1 cos - x2 sin, x2 cos + x1 sin). With h = D/2, per half (c1, c2, s1, s2 the tables' halves):

    forward:   y1  = x1 * c1 + x2 * s1,      y2  = x2 * c2 + x1 * s2
    backward:  dx1 = dy1 * c1 + dy2 * s2,    dx2 = dy2 * c2 + dy1 * s1

The backward is the transpose of the forward's linear map, dx = dy * cos + roll(dy * sin, D/2):
the forward kernel with the sin halves swapped (TRANSPOSE), which for rope_tables' signed sin
(s1 = -s2) is the inverse rotation, dx = dy * cos + roll(dy, D/2) * (-sin). Both are exact for
any tables, so the gradients are those of the torch reference's three ops. Everything is
computed in fp32 and rounded once to the input dtype; the outputs are new contiguous tensors.

Grid: one program per token (B * T rows). A program loads its row of each table once (the
halves c1, c2, s1, s2, fp32, kept in registers), then sweeps q's Hq heads and k's Hkv heads in
tiles of BLOCK_H heads x D/2 columns, reading each element of q and k once (strided, the first
and second halves as two loads) and writing each output element once (contiguous). Memory
traffic each way: 2 * B * T * (Hq + Hkv) * D elements of the input dtype, plus one table row of
each table per token (2 * D fp32; a (T, 1, D) table is shared by the batch rows and stays in L2).
The op is purely bandwidth-bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritongpt.kernels.launching import Gpu, Launch, gpu_of, run

# Elements of one half-head tile (BLOCK_H heads x BLOCK_D columns); with NUM_WARPS warps each
# thread holds 16 of each half: 16-byte vector accesses of bf16 at D/2 >= 8.
TILE = 2048
NUM_WARPS = 4


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _rotary_rotate_heads(X, OUT, n_heads, stride_h, stride_d, half, c1, c2, s1, s2,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """out1 = x1 * c1 + x2 * s1, out2 = x2 * c2 + x1 * s2 for the n_heads heads of one token.
    X: the token's first head (heads by stride_h, columns by stride_d); OUT: contiguous heads."""
    cols = tl.arange(0, BLOCK_D)[None, :]                                        # (1, BLOCK_D)
    col_mask = cols < half
    for start in range(0, n_heads, BLOCK_H):
        heads = start + tl.arange(0, BLOCK_H)[:, None]                           # (BLOCK_H, 1)
        mask = (heads < n_heads) & col_mask                                      # (BLOCK_H, BLOCK_D)
        x = X + heads * stride_h + cols * stride_d
        x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x + half * stride_d, mask=mask, other=0.0).to(tl.float32)
        out = OUT + heads * (2 * half) + cols
        tl.store(out, (x1 * c1 + x2 * s1).to(OUT.dtype.element_ty), mask=mask)
        tl.store(out + half, (x2 * c2 + x1 * s2).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_table_halves(COS, SIN, b, t, stride_cb, stride_ct, stride_cd, stride_sb, stride_st, stride_sd,
                         half, BLOCK_D: tl.constexpr):
    """(c1, c2, s1, s2), each (1, BLOCK_D) fp32: the halves of row (b, t) of both tables."""
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = cols < half
    cos = COS + b * stride_cb + t * stride_ct + cols * stride_cd
    sin = SIN + b * stride_sb + t * stride_st + cols * stride_sd
    c1 = tl.load(cos, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos + half * stride_cd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin + half * stride_sd, mask=mask, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rotary_fwd_kernel(
    Q, K, COS, SIN, QO, KO,
    stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
    stride_cb, stride_ct, stride_cd, stride_sb, stride_st, stride_sd,
    stride_out_q, stride_out_k,         # row strides of the contiguous outputs: Hq * D, Hkv * D
    T, n_q_heads, n_k_heads, half,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr,
):
    # TRANSPOSE (the backward: Q, K are the outputs' gradients, QO, KO the inputs'): the same
    # rotation with the halves of sin swapped.
    row = tl.program_id(0).to(tl.int64)                                          # b * T + t
    b, t = row // T, row % T
    c1, c2, s1, s2 = _rotary_table_halves(COS, SIN, b, t, stride_cb, stride_ct, stride_cd,
                                          stride_sb, stride_st, stride_sd, half, BLOCK_D)
    if TRANSPOSE:
        s1, s2 = s2, s1
    _rotary_rotate_heads(Q + b * stride_qb + t * stride_qt, QO + row * stride_out_q, n_q_heads, stride_qh, stride_qd,
                         half, c1, c2, s1, s2, BLOCK_HQ, BLOCK_D)
    _rotary_rotate_heads(K + b * stride_kb + t * stride_kt, KO + row * stride_out_k, n_k_heads, stride_kh, stride_kd,
                         half, c1, c2, s1, s2, BLOCK_HK, BLOCK_D)


# ----------------------------------------------------------------------------- launchers

def _table_strides(table: torch.Tensor) -> tuple[int, int, int]:
    """(batch, time, column) strides of a (T, 1, D) table (batch stride 0) or a (B, T, 1, D) one."""
    if table.dim() == 3:
        return 0, table.stride(0), table.stride(2)
    return table.stride(0), table.stride(1), table.stride(3)


def _shape_args(xq: torch.Tensor, xk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[dict, dict]:
    """The run-time arguments both kernels share (strides and sizes) and their constexprs, for
    rows of xq (B, T, Hq, D) and xk (B, T, Hkv, D) and the contiguous outputs of their shapes."""
    _, T, Hq, D = xq.shape
    Hkv = xk.shape[2]
    half = D // 2
    block_d = triton.next_power_of_2(half)
    # Heads per tile: as many as fill TILE elements, at most all of them (rounded to a power of 2).
    cap = max(1, TILE // block_d)
    block_hq, block_hk = (min(triton.next_power_of_2(max(h, 1)), cap) for h in (Hq, Hkv))
    (cb, ct, cd), (sb, st, sd) = _table_strides(cos), _table_strides(sin)
    args = dict(stride_qb=xq.stride(0), stride_qt=xq.stride(1), stride_qh=xq.stride(2), stride_qd=xq.stride(3),
                stride_kb=xk.stride(0), stride_kt=xk.stride(1), stride_kh=xk.stride(2), stride_kd=xk.stride(3),
                stride_cb=cb, stride_ct=ct, stride_cd=cd, stride_sb=sb, stride_st=st, stride_sd=sd,
                stride_out_q=Hq * D, stride_out_k=Hkv * D, T=T, n_q_heads=Hq, n_k_heads=Hkv, half=half)
    return args, dict(BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d)


def _plan(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_out: torch.Tensor,
          y_out: torch.Tensor, gpu: Gpu, transpose: bool) -> list[Launch]:
    args, constexprs = _shape_args(x, y, cos, sin)
    return [Launch.fixed(_rotary_fwd_kernel, (x.shape[0] * x.shape[1],),
                         dict(Q=x, K=y, COS=cos, SIN=sin, QO=x_out, KO=y_out, **args), NUM_WARPS, **constexprs,
                         TRANSPOSE=transpose)]


def _run(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y_out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if x.shape[0] * x.shape[1]:
        run(_plan(x, y, cos, sin, x_out, y_out, gpu_of(x.device), transpose))
    return x_out, y_out


def plan_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
                 k_out: torch.Tensor, gpu: Gpu) -> list[Launch]:
    """The launch writing q_out, k_out (contiguous, q's and k's shapes) from q (B, T, Hq, D) and
    k (B, T, Hkv, D), any strides, and the tables cos, sin ((T, 1, D) or (B, T, 1, D), any
    strides); B * T > 0. One config whatever the target: the kernel is a bandwidth-bound sweep."""
    return _plan(q, k, cos, sin, q_out, k_out, gpu, False)


def forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot, k_rot), new contiguous tensors in q's and k's dtype."""
    return _run(q, k, cos, sin, False)


def plan_backward(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  dq: torch.Tensor, dk: torch.Tensor, gpu: Gpu) -> list[Launch]:
    """The launch writing dq, dk (contiguous) from the outputs' gradients dq_out, dk_out (any
    strides) and the forward's tables: the forward's launch with TRANSPOSE."""
    return _plan(dq_out, dk_out, cos, sin, dq, dk, gpu, True)


def backward(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk), contiguous, in the gradients' dtypes."""
    return _run(dq_out, dk_out, cos, sin, True)


# ----------------------------------------------------------------------------- torch custom ops

@torch.library.custom_op("tritongpt::rotary", mutates_args=())
def _rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(q, k, cos, sin)


@_rotary_op.register_fake
def _(q, k, cos, sin):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


@torch.library.custom_op("tritongpt::rotary_backward", mutates_args=())
def _rotary_backward_op(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return backward(dq_out, dk_out, cos, sin)


@_rotary_backward_op.register_fake
def _(dq_out, dk_out, cos, sin):
    return (torch.empty_like(dq_out, memory_format=torch.contiguous_format),
            torch.empty_like(dk_out, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = _rotary_backward_op(dq_out, dk_out, cos, sin)
    return dq, dk, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry

def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + roll(q, D/2) * sin, k * cos + roll(k, D/2) * sin), new contiguous tensors."""
    return _rotary_op(q, k, cos, sin)
