"""Fused softmax cross-entropy in Triton: loss and logits gradient, one program per row.

Per row x (V logits) with target t, label smoothing ls and z-loss weight z:

    loss = (1 - ls) * (lse - x[t]) + ls * (lse - mean(x)) + z * lse^2
    dloss/dx_j = p_j * (1 + 2 z lse) - ls / V - (1 - ls) [j == t],   p = softmax(x)

Forward kernel: one sweep over the row in blocks of BLOCK_V with an online softmax (running max
m, running sum d of exp(x - m), rescaled whenever m grows), so V up to 256k needs no more than
one block in registers. Alongside d it keeps e, the same sum without the target entry, so that
for a confident prediction (p_t > 1/2) 1 - p_t = e / d comes out in fp32 with full relative
precision, where the true-class gradient -(1 - p_t) would otherwise be the difference of two
nearly equal numbers. The kernel stores per row the loss, lse and that true-class gradient
entry (fp32). With WRITE_GRAD it then sweeps the row a second time and writes the gradient, scaled, over a
buffer that may be the logits themselves (the fused linear cross-entropy uses that on its private
chunk of logits). Ignored rows (target == ignore_index) read nothing: loss 0, gradient 0.

Backward kernel: one sweep: g_j = scale_row * (exp(x_j - lse) * (1 + 2 z lse) - ls / V), with the
stored true-class entry at j == t.

The public op does not compute the gradient in the forward: that would need a second read of the
logits plus a gradient buffer held from forward to backward, and the backward would still have
to rescale the whole (N, V) gradient by the upstream gradient (another read and write), since
that is only known then. Recomputing instead makes the forward read the logits once and the
backward read them once and write the gradient once, which also serves reduction="none" with
per-row upstream gradients exactly. Traffic, with b bytes per logit:

    forward   N * V * b           (+ 12 N bytes of per-row results)
    backward  2 * N * V * b       (read logits, write the gradient into a fresh buffer)

so forward + backward moves 3 N V b bytes (a forward that also writes the gradient, in two sweeps,
plus a backward rescale would move 5 N V b), and the caller's logits are never written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritongpt.kernels.launching import Gpu, Launch, as_rows, gpu_of, reduce_losses, run

MAX_BLOCK_V = 8192


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _zero_row(g_row, V, BLOCK_V: tl.constexpr):
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=g_row.dtype.element_ty), mask=cols < V)


@triton.jit
def _grad_row(x_row, g_row, target, lse, grad_target, scale, V, label_smoothing, z_loss, BLOCK_V: tl.constexpr):
    coef = 1.0 + 2.0 * z_loss * lse
    floor = label_smoothing / V
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)                                   # (BLOCK_V,)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(cols == target, grad_target, tl.exp(x - lse) * coef - floor) * scale
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_fwd_kernel(X, stride_x, T, LOSS, LSE, GRAD_T, G, stride_g, SCALE, stride_scale, V, ignore_index,
                              label_smoothing, z_loss, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)     # int64: row * stride passes 2^31 at LLM sizes
    x_row = X + row * stride_x
    target = tl.load(T + row)
    loss = 0.0
    lse = 0.0
    grad_target = 0.0
    if target == ignore_index:
        if WRITE_GRAD:
            _zero_row(G + row * stride_g, V, BLOCK_V)
    else:
        m = -float("inf")       # running max
        d = 0.0                 # sum of exp(x - m)
        e = 0.0                 # the same without the target entry
        sum_x = 0.0             # for the label-smoothing mean
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)                               # (BLOCK_V,)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(x - m_new)                                              # (BLOCK_V,)
            d = d * alpha + tl.sum(p, axis=0)
            e = e * alpha + tl.sum(tl.where(cols == target, 0.0, p), axis=0)
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
            m = m_new
        x_t = tl.load(x_row + target).to(tl.float32)
        log_d = tl.log(d)
        lse = m + log_d
        p_t = tl.exp(x_t - m) / d
        # 1 - p_t rounds to within half an ulp when p_t < 1/2; above, e / d keeps its relative precision
        one_minus_p_t = tl.where(p_t < 0.5, 1.0 - p_t, e / d)
        loss = (1.0 - label_smoothing) * ((m - x_t) + log_d) + z_loss * lse * lse
        # where, not a product: mean(x) may be -inf (masked vocabulary) while label_smoothing is 0
        loss += tl.where(label_smoothing > 0.0, label_smoothing * (lse - sum_x / V), 0.0)
        grad_target = (-(1.0 - label_smoothing) * one_minus_p_t + label_smoothing * (p_t - 1.0 / V)
                       + 2.0 * z_loss * lse * p_t)
        if WRITE_GRAD:
            scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
            _grad_row(x_row, G + row * stride_g, target, lse, grad_target, scale, V, label_smoothing, z_loss,
                      BLOCK_V)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)
    tl.store(GRAD_T + row, grad_target)


@triton.jit
def _cross_entropy_bwd_kernel(X, stride_x, T, LSE, GRAD_T, G, stride_g, SCALE, stride_scale, V, ignore_index,
                              label_smoothing, z_loss, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(T + row)
    g_row = G + row * stride_g
    if target == ignore_index:
        _zero_row(g_row, V, BLOCK_V)
    else:
        scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
        _grad_row(X + row * stride_x, g_row, target, tl.load(LSE + row), tl.load(GRAD_T + row), scale, V,
                  label_smoothing, z_loss, BLOCK_V)


# ----------------------------------------------------------------------------- launchers

def _launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): blocks of up to 8k logits, 8 per thread (16 bytes of bf16), so an 8k
    block takes 32 warps. (At 16 warps the gradient-writing forward needs about 69 registers: one
    program per SM.)"""
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    return block, max(1, min(32, block // 256))


def _scale_stride(scale: torch.Tensor) -> int:
    return scale.stride(0) if scale.numel() > 1 else 0      # one entry serves every row


def plan_forward(logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, lse: torch.Tensor,
                 grad_target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                 grad: torch.Tensor | None, scale: torch.Tensor | None, gpu: Gpu) -> list[Launch]:
    """The launch of forward (below) on non-empty logits with unit column stride and contiguous targets."""
    n_rows, vocab = logits.shape
    block, warps = _launch_config(vocab)
    write_grad = grad is not None
    g = grad if write_grad else logits          # the pointer is unused without WRITE_GRAD
    s = scale if write_grad else losses
    args = dict(X=logits, stride_x=logits.stride(0), T=targets, LOSS=losses, LSE=lse, GRAD_T=grad_target, G=g,
                stride_g=g.stride(0), SCALE=s, stride_scale=_scale_stride(s), V=vocab, ignore_index=ignore_index,
                label_smoothing=label_smoothing, z_loss=z_loss)
    return [Launch.fixed(_cross_entropy_fwd_kernel, (n_rows,), args, warps, BLOCK_V=block, WRITE_GRAD=write_grad)]


def forward(logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, lse: torch.Tensor,
            grad_target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
            grad: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
    """Write per-row losses, lse and true-class gradient entries (each (N,) fp32, contiguous).

    With grad (N, V), also write scale * dloss/dlogits into it; grad may be logits itself. scale is
    a float tensor of N entries or one entry (any stride), read on the device.
    """
    if logits.shape[0]:
        run(plan_forward(as_rows(logits), targets.contiguous(), losses, lse, grad_target, ignore_index,
                         label_smoothing, z_loss, grad, scale, gpu_of(logits.device)))


def plan_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_target: torch.Tensor,
                  scale: torch.Tensor, grad: torch.Tensor, ignore_index: int, label_smoothing: float,
                  z_loss: float, gpu: Gpu) -> list[Launch]:
    """The launch of backward (below) on non-empty logits with unit column stride and contiguous targets."""
    n_rows, vocab = logits.shape
    block, warps = _launch_config(vocab)
    args = dict(X=logits, stride_x=logits.stride(0), T=targets, LSE=lse, GRAD_T=grad_target, G=grad,
                stride_g=grad.stride(0), SCALE=scale, stride_scale=_scale_stride(scale), V=vocab,
                ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)
    return [Launch.fixed(_cross_entropy_bwd_kernel, (n_rows,), args, warps, BLOCK_V=block)]


def backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_target: torch.Tensor,
             scale: torch.Tensor, grad: torch.Tensor, ignore_index: int, label_smoothing: float,
             z_loss: float) -> None:
    """Write scale * dloss/dlogits into grad (N, V), from forward's lse and true-class entries.

    grad may be logits itself; scale as in forward.
    """
    if logits.shape[0]:
        run(plan_backward(as_rows(logits), targets.contiguous(), lse, grad_target, scale, grad, ignore_index,
                          label_smoothing, z_loss, gpu_of(logits.device)))


# ----------------------------------------------------------------------------- torch custom ops

@torch.library.custom_op("tritongpt::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float,
                      z_loss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, lse, true-class gradient entries), each (N,) fp32."""
    losses, lse, grad_target = (torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
                                for _ in range(3))
    forward(logits, targets, losses, lse, grad_target, ignore_index, label_smoothing, z_loss)
    return losses, lse, grad_target


@_cross_entropy_op.register_fake
def _(logits, targets, ignore_index, label_smoothing, z_loss):
    return tuple(logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("tritongpt::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                               grad_target: torch.Tensor, grad_losses: torch.Tensor, ignore_index: int,
                               label_smoothing: float, z_loss: float) -> torch.Tensor:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)    # (N, V)
    backward(logits, targets, lse, grad_target, grad_losses, grad, ignore_index, label_smoothing, z_loss)
    return grad


@_cross_entropy_backward_op.register_fake
def _(logits, targets, lse, grad_target, grad_losses, ignore_index, label_smoothing, z_loss):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, ignore_index, label_smoothing, z_loss = inputs
    _, lse, grad_target = output
    ctx.mark_non_differentiable(lse, grad_target)
    ctx.save_for_backward(logits, targets, lse, grad_target)
    ctx.args = (ignore_index, label_smoothing, z_loss)


def _backward(ctx, grad_losses, _grad_lse, _grad_grad_target):
    logits, targets, lse, grad_target = ctx.saved_tensors
    grad = _cross_entropy_backward_op(logits, targets, lse, grad_target, grad_losses, *ctx.args)
    return grad, None, None, None, None


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry

def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    losses, _, _ = _cross_entropy_op(logits, targets, ignore_index, float(label_smoothing), float(z_loss))  # (N,)
    return reduce_losses(losses, targets != ignore_index, reduction)
