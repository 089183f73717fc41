"""Fused RMSNorm (optionally with the residual add before it) in Triton, forward and backward.

Forward, each program normalises a tile of ROWS rows of x (M, D), one row unless rows are narrow:

    h    = x + r                       (residual variant; rounded to x's dtype like torch's add, stored)
    rstd = 1 / sqrt(mean(h^2) + eps)   (fp32, stored: M * 4 bytes for the backward)
    y    = h * rstd * w

When a row fits one block (D <= MAX_BLOCK) it stays in registers: x (and r) are read once, y
(and h) written once, so the kernel moves 2 * M * D elements (4 with the residual) plus w. Wider
rows loop over blocks twice: the first pass accumulates sum(h^2) (and writes h), the second reads
the row again (h with the residual, else x; usually still in L1/L2) to write y.

Backward, with xhat = h * rstd and g = dy * w:

    dh = rstd * (g - xhat * mean(g * xhat)) (+ the incoming gradient of h, residual variant)
    dw = sum over rows of dy * xhat

dx and dresidual are both dh. A fixed grid of programs (enough to fill every SM several times,
whatever M and D) each walks a contiguous group of rows, keeping its share of dw as an fp32
partial sum; the (programs, D) partials are then summed in a fixed order, so dw is deterministic
(no atomics). With one block per row a program reads dy and h and writes dx once per element and
holds w and its dw partial in registers; wider rows loop twice (mean first, then dx) and keep the
partial in the program's own row of the partial buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritongpt.kernels.launching import Gpu, Launch, as_rows, gpu_of, run

# Widest row kept in registers by one program; wider rows are processed in blocks of this size.
MAX_BLOCK = 8192
# Elements per program tile in the forward (and per loop step in the backward) for narrow rows.
TILE = 2048


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _residual_add(X, R, H, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """One tile of h (fp32); with the residual, h = x + r is rounded to x's dtype and stored."""
    h = tl.load(X + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + cols, h, mask=mask)
    return h.to(tl.float32)


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, H, W, Y, RSTD,            # R, H: residual and h = x + r; without a residual H is X
    stride_x, stride_r, stride_h, stride_y,
    M, D, eps,
    HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)             # (ROWS,)
    row_mask = rows[:, None] < M                                                  # (ROWS, 1)
    X += rows[:, None] * stride_x
    R += rows[:, None] * stride_r
    H += rows[:, None] * stride_h
    Y += rows[:, None] * stride_y
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK)[None, :]                                       # (1, BLOCK)
        mask = row_mask & (cols < D)                                              # (ROWS, BLOCK)
        h = _residual_add(X, R, H, cols, mask, HAS_RESIDUAL)                      # (ROWS, BLOCK)
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / D + eps)                          # (ROWS,)
        w = tl.load(W + cols, mask=cols < D).to(tl.float32)                       # (1, BLOCK)
        tl.store(Y + cols, (h * rstd[:, None] * w).to(Y.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)[None, :]
            h = _residual_add(X, R, H, cols, row_mask & (cols < D), HAS_RESIDUAL)
            sum_sq += h * h
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=1) / D + eps)                         # (ROWS,)
        tl.debug_barrier()  # the h stored above, by whichever threads, is visible to all below
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)[None, :]
            mask = row_mask & (cols < D)
            h = tl.load(H + cols, mask=mask).to(tl.float32)
            w = tl.load(W + cols, mask=cols < D).to(tl.float32)
            tl.store(Y + cols, (h * rstd[:, None] * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _load_fp32(P, cols, mask):
    return tl.load(P + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_dx(g, xhat, mean_g_xhat, rstd, DH, DX, cols, mask, HAS_DH: tl.constexpr):
    """dx = (g - xhat * mean(g * xhat)) * rstd, plus the incoming gradient of h if any."""
    dx = (g - xhat * mean_g_xhat) * rstd
    if HAS_DH:
        dx += _load_fp32(DH, cols, mask)
    tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, H, W, RSTD, DH, DX, DW_PARTIAL,      # DH: incoming gradient of h (residual variant only)
    stride_dy, stride_h, stride_dh, stride_dx,
    M, D, rows_per_program,
    HAS_DH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    first_row = pid * rows_per_program
    row_end = tl.minimum(first_row + rows_per_program, M)
    DW_PARTIAL += pid * D
    if SINGLE_BLOCK:
        # The row is one tile: w and this program's partial sum of dw stay in registers.
        cols = tl.arange(0, BLOCK)[None, :]                                       # (1, BLOCK)
        w = _load_fp32(W, cols, cols < D)                                         # (1, BLOCK)
        dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    # ROWS rows at a time; rows of a tile past row_end load zeros and add nothing to dw.
    for start_row in range(first_row, row_end, ROWS):
        rows = start_row + tl.arange(0, ROWS)                                    # (ROWS,)
        row_mask = rows[:, None] < row_end                                        # (ROWS, 1)
        rstd = tl.load(RSTD + rows, mask=rows < row_end, other=0.0)[:, None]      # (ROWS, 1)
        dy_rows, h_rows = DY + rows[:, None] * stride_dy, H + rows[:, None] * stride_h
        dh_rows, dx_rows = DH + rows[:, None] * stride_dh, DX + rows[:, None] * stride_dx
        if SINGLE_BLOCK:
            mask = row_mask & (cols < D)                                          # (ROWS, BLOCK)
            dy = _load_fp32(dy_rows, cols, mask)                                  # (ROWS, BLOCK)
            xhat = _load_fp32(h_rows, cols, mask) * rstd                          # (ROWS, BLOCK)
            g = dy * w
            mean_g_xhat = tl.sum(g * xhat, axis=1)[:, None] / D                   # (ROWS, 1)
            _store_dx(g, xhat, mean_g_xhat, rstd, dh_rows, dx_rows, cols, mask, HAS_DH)
            dw += dy * xhat
        else:
            dot = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
            for start in range(0, D, BLOCK):
                cols = start + tl.arange(0, BLOCK)[None, :]
                mask = row_mask & (cols < D)
                dot += _load_fp32(dy_rows, cols, mask) * _load_fp32(W, cols, cols < D) * _load_fp32(h_rows, cols, mask)
            mean_g_xhat = tl.sum(dot, axis=1)[:, None] * rstd / D                 # (ROWS, 1)
            for start in range(0, D, BLOCK):
                cols = start + tl.arange(0, BLOCK)[None, :]
                mask = row_mask & (cols < D)
                dy = _load_fp32(dy_rows, cols, mask)
                xhat = _load_fp32(h_rows, cols, mask) * rstd
                _store_dx(dy * _load_fp32(W, cols, cols < D), xhat, mean_g_xhat, rstd, dh_rows, dx_rows,
                          cols, mask, HAS_DH)
                # This program's own row of partial sums: no other program touches it.
                partial = tl.load(DW_PARTIAL + cols, mask=cols < D)
                tl.store(DW_PARTIAL + cols, partial + tl.sum(dy * xhat, axis=0, keep_dims=True), mask=cols < D)
            tl.debug_barrier()  # this tile's partial-sum stores are visible to the next tile's loads
    if SINGLE_BLOCK:
        tl.store(DW_PARTIAL + cols, tl.sum(dw, axis=0, keep_dims=True), mask=cols < D)


# ----------------------------------------------------------------------------- launchers

def _tile_config(D: int) -> tuple[int, int, int, bool]:
    """(ROWS, BLOCK, num_warps, single block) for rows of D elements.

    Narrow rows are batched ROWS to a tile of about TILE elements; a tile gets 8 elements (16 bytes
    of bf16) per thread, so an 8192-wide block takes 32 warps. (At 16 warps, 16 elements per thread,
    the backward needs about 116 registers: one program per SM where its grid plans two.)
    """
    block = min(max(triton.next_power_of_2(D), 16), MAX_BLOCK)
    rows = max(1, TILE // block)
    return rows, block, min(max(rows * block // 256, 1), 32), D <= block


def plan_forward(x2: torch.Tensor, weight: torch.Tensor, y2: torch.Tensor, rstd: torch.Tensor, eps: float,
                 r2: torch.Tensor | None, h2: torch.Tensor | None, gpu: Gpu) -> list[Launch]:
    """The launch writing y2 (M, D), rstd (M,) and, with the residual r2, h2 = x2 + r2 (all rows by
    stride, unit column stride; weight contiguous)."""
    M, D = x2.shape
    rows, block, num_warps, single = _tile_config(D)
    has_residual = r2 is not None
    r2, h2 = (r2, h2) if has_residual else (x2, x2)     # unused pointers without the residual
    args = dict(X=x2, R=r2, H=h2, W=weight, Y=y2, RSTD=rstd, stride_x=x2.stride(0), stride_r=r2.stride(0),
                stride_h=h2.stride(0), stride_y=y2.stride(0), M=M, D=D, eps=eps)
    return [Launch.fixed(_rms_norm_fwd_kernel, (triton.cdiv(M, rows),), args, num_warps,
                         HAS_RESIDUAL=has_residual, ROWS=rows, BLOCK=block, SINGLE_BLOCK=single)]


def forward(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
            eps: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """y, h (None without the residual) and rstd (fp32, x.shape[:-1])."""
    D = x.shape[-1]
    weight = weight.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, h, rstd.fill_(eps ** -0.5)
    run(plan_forward(as_rows(x), weight, y.view(-1, D), rstd, eps, None if residual is None else as_rows(residual),
                     None if h is None else h.view(-1, D), gpu_of(x.device)))
    return y, h, rstd


def backward_programs(M: int, D: int, gpu: Gpu) -> tuple[int, int]:
    """(programs, rows per program) of the backward's fixed grid."""
    rows, _, num_warps, _ = _tile_config(D)
    # Several programs per SM hide the latency of each tile's load -> reduce -> store chain.
    programs = min(triton.cdiv(M, rows), gpu.sms * max(1, 32 // num_warps))
    rows_per_program = triton.cdiv(triton.cdiv(M, programs), rows) * rows
    return triton.cdiv(M, rows_per_program), rows_per_program


def plan_backward(dy2: torch.Tensor, h2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                  dh2: torch.Tensor | None, dx2: torch.Tensor, partial: torch.Tensor, gpu: Gpu) -> list[Launch]:
    """The launch writing dx2 (M, D) and the dw partial sums (backward_programs(M, D)[0], D) fp32,
    which must be zero on entry unless D fits one block."""
    M, D = h2.shape
    rows, block, num_warps, single = _tile_config(D)
    programs, rows_per_program = backward_programs(M, D, gpu)
    dh = dy2 if dh2 is None else dh2
    args = dict(DY=dy2, H=h2, W=weight, RSTD=rstd, DH=dh, DX=dx2, DW_PARTIAL=partial, stride_dy=dy2.stride(0),
                stride_h=h2.stride(0), stride_dh=dh.stride(0), stride_dx=dx2.stride(0), M=M, D=D,
                rows_per_program=rows_per_program)
    return [Launch.fixed(_rms_norm_bwd_kernel, (programs,), args, num_warps,
                         HAS_DH=dh2 is not None, ROWS=rows, BLOCK=block, SINGLE_BLOCK=single)]


def backward(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
             dh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (h's shape and dtype) and dweight (weight's dtype), for y = rms_norm(h)."""
    D = h.shape[-1]
    weight = weight.contiguous()
    dx = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if h.numel() == 0:
        return dx, torch.zeros_like(weight)
    h2 = as_rows(h)                                                            # (M, D)
    gpu = gpu_of(h.device)
    programs, _ = backward_programs(h2.shape[0], D, gpu)
    # One block per row overwrites its whole partial row; the block loop accumulates into it.
    partial = (torch.empty if D <= MAX_BLOCK else torch.zeros)((programs, D), dtype=torch.float32, device=h.device)
    run(plan_backward(as_rows(dy), h2, weight, rstd, None if dh is None else as_rows(dh), dx.view(-1, D),
                      partial, gpu))
    return dx, partial.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------- torch custom ops

def _rstd_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tritongpt::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = forward(x, weight, None, eps)
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _rstd_like(x)


@torch.library.custom_op("tritongpt::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward(x, weight, residual, eps)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y), _rstd_like(x)


@torch.library.custom_op("tritongpt::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          dh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return backward(dy, h, weight, rstd, dh)


@_rms_norm_backward_op.register_fake
def _(dy, h, weight, rstd, dh):
    return torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _rms_norm_backward_op(dy, x, weight, rstd, None)
    return dx, dweight, None


def _add_rms_norm_setup_context(ctx, inputs, output):
    _, _, weight, _ = inputs
    _, h, rstd = output
    ctx.mark_non_differentiable(rstd)
    # An unused output (h after the last block) gets None, not a tensor of zeros to read.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, weight, rstd)


def _add_rms_norm_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    if dy is None:
        return dh, dh, None, None
    dx, dweight = _rms_norm_backward_op(dy, h, weight, rstd, dh)
    return dx, dx, dweight, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
_add_rms_norm_op.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup_context)


# ----------------------------------------------------------------------------- public entry

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = x * rsqrt(mean(x^2) + eps) * weight over the last dim, or (rms_norm(x + residual), x + residual)."""
    if residual is None:
        return _rms_norm_op(x, weight, eps)[0]
    y, h, _ = _add_rms_norm_op(x, residual, weight, eps)
    return y, h
