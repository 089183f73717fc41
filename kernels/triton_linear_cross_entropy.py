"""Fused linear cross-entropy: cross_entropy(hidden @ weight.T, targets) without the (N, V) logits.

The rows are processed in chunks of C rows (default: kernels.launching.default_chunk_rows, from a
memory budget on the one (C, V) buffer; chunk_size overrides). Per chunk, with D the hidden size:

    logits = hidden[chunk] @ weight.T              (C, V) in the compute dtype, one private buffer
    forward kernel of kernels/triton_cross_entropy.py: per-row losses, and with WRITE_GRAD the
        logits buffer overwritten in place by its gradient g, already scaled for the reduction
    grad_hidden[chunk] = g @ weight                (C, D)
    grad_weight       += g.T @ hidden[chunk]        (V, D), accumulated in fp32

so at most one (C, V) buffer of logits exists, in forward and backward alike. The gradients are
computed during the forward (only when an input requires grad), for the cost of the unfused
path's three matmuls; the backward multiplies them by the upstream gradient (a scalar for "mean"
and "sum"; exact for upstream 1, one extra rounding otherwise).

reduction="none" is different: its upstream gradient is a vector known only in backward, and
sum_r s_r g_r^T h_r cannot be formed from the unscaled g^T h, so the forward keeps the per-row
lse and true-class gradient entries, and the backward recomputes each chunk's logits and runs
the single-sweep backward kernel in place with s as the per-row scale: an exact gradient for
per-token consumers such as DPO, for one more matmul.

Memory traffic per chunk of the kernel part: the chunk logits are written by the matmul, then
read twice and written once by the kernel (3 C V b bytes, b per logit) before two matmuls read
them; the fp32 grad_weight accumulator is read and written once per chunk (8 V D bytes), which is
why chunks should not be smaller than a few hundred rows.

Matmuls run in kernels.launching.compute_dtype: the autocast dtype when autocast is on (fp32
master weights are cast once per call), else the promoted input dtype. Gradients come back in
the dtypes of hidden and weight.
"""
from __future__ import annotations

import torch

from tritongpt.kernels import triton_cross_entropy as ce
from tritongpt.kernels.launching import compute_dtype, default_chunk_rows, reduce_losses


# ----------------------------------------------------------------------------- launchers

def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. cuBLAS writes half-precision products straight into fp32; other
    devices round each chunk's product to the compute dtype once before the fp32 add."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


def _chunk_loop(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                label_smoothing: float, z_loss: float, chunk: int, dtype: torch.dtype, scale: torch.Tensor,
                losses: torch.Tensor | None, lse: torch.Tensor, grad_target: torch.Tensor,
                grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None) -> None:
    """Run the chunk loop, writing into the given buffers.

    losses given: forward (write losses, lse, true-class entries; gradients only when a gradient
    buffer is given). losses None: backward of "none", reading lse and true-class entries.
    scale: the gradient's scale, one entry or (N,) per row. grad_weight: fp32 accumulator (V, D),
    zero on entry.
    """
    n_rows = hidden.shape[0]
    w = weight.to(dtype)                                                         # (V, D)
    with_grad = grad_hidden is not None or grad_weight is not None
    buffer = torch.empty(min(chunk, n_rows), weight.shape[0], dtype=dtype, device=hidden.device)
    for start in range(0, n_rows, chunk):
        rows = slice(start, start + chunk)
        h = hidden[rows].to(dtype)                                               # (C, D)
        logits = buffer[: h.shape[0]]                                            # (C, V)
        torch.mm(h, w.T, out=logits)
        row_scale = scale[rows] if scale.numel() > 1 else scale
        if losses is None:
            ce.backward(logits, targets[rows], lse[rows], grad_target[rows], row_scale, logits, ignore_index,
                        label_smoothing, z_loss)
        else:
            ce.forward(logits, targets[rows], losses[rows], lse[rows], grad_target[rows], ignore_index,
                       label_smoothing, z_loss, grad=logits if with_grad else None, scale=row_scale)
        if grad_hidden is not None:
            if grad_hidden.dtype == dtype:
                torch.mm(logits, w, out=grad_hidden[rows])
            else:
                grad_hidden[rows] = logits @ w
        if grad_weight is not None:
            _accumulate(grad_weight, logits.T, h)


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
            label_smoothing: float, z_loss: float, chunk: int, dtype: torch.dtype, scale: torch.Tensor,
            losses: torch.Tensor, lse: torch.Tensor, grad_target: torch.Tensor,
            grad_hidden: torch.Tensor | None = None, grad_weight: torch.Tensor | None = None) -> None:
    """Write per-row losses, lse and true-class gradient entries (each (N,) fp32), chunk by chunk.

    With grad_hidden (N, D) and/or grad_weight ((V, D) fp32, zero on entry), also write the
    gradients of the losses scaled by scale (one entry or (N,) per row).
    """
    _chunk_loop(hidden, weight, targets, ignore_index, label_smoothing, z_loss, chunk, dtype, scale,
                losses, lse, grad_target, grad_hidden, grad_weight)


def backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
             label_smoothing: float, z_loss: float, chunk: int, dtype: torch.dtype, scale: torch.Tensor,
             lse: torch.Tensor, grad_target: torch.Tensor, grad_hidden: torch.Tensor | None,
             grad_weight: torch.Tensor | None) -> None:
    """Write the gradients of scale (N,) times the per-row losses into grad_hidden and/or
    grad_weight (as in forward), recomputing each chunk's logits, from forward's lse and
    true-class entries."""
    _chunk_loop(hidden, weight, targets, ignore_index, label_smoothing, z_loss, chunk, dtype, scale,
                None, lse, grad_target, grad_hidden, grad_weight)


def _gradient_buffers(hidden: torch.Tensor, weight: torch.Tensor, need_hidden: bool, need_weight: bool):
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
    grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                   if need_weight else None)                                     # (V, D) fp32
    return grad_hidden, grad_weight


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


# ----------------------------------------------------------------------------- torch custom ops

@torch.library.custom_op("tritongpt::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
        hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
        label_smoothing: float, z_loss: float, chunk: int, dtype: torch.dtype, need_hidden: bool,
        need_weight: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, true-class entries, grad_hidden, grad_weight); unneeded gradients are empty."""
    n_rows = hidden.shape[0]
    losses, lse, grad_target = (torch.empty(n_rows, dtype=torch.float32, device=hidden.device) for _ in range(3))
    kept = targets != ignore_index                                               # (N,)
    eager_grads = reduction != "none"
    grad_hidden, grad_weight = _gradient_buffers(hidden, weight, need_hidden and eager_grads,
                                                 need_weight and eager_grads)
    scale = (1.0 / kept.sum().clamp(min=1) if reduction == "mean" else torch.ones((), device=hidden.device))
    forward(hidden, weight, targets.contiguous(), ignore_index, label_smoothing, z_loss, chunk, dtype,
            scale.float().reshape(1), losses, lse, grad_target, grad_hidden, grad_weight)
    return (reduce_losses(losses, kept, reduction), lse, grad_target,
            _placeholder(hidden) if grad_hidden is None else grad_hidden,
            _placeholder(weight) if grad_weight is None else grad_weight.to(weight.dtype))


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss, chunk, dtype, need_hidden,
      need_weight):
    n_rows = hidden.shape[0]
    eager_grads = reduction != "none"
    loss = hidden.new_empty((n_rows,) if reduction == "none" else (), dtype=torch.float32)
    stats = [hidden.new_empty(n_rows, dtype=torch.float32) for _ in range(2)]
    grad_hidden = hidden.new_empty(hidden.shape) if need_hidden and eager_grads else _placeholder(hidden)
    grad_weight = weight.new_empty(weight.shape) if need_weight and eager_grads else _placeholder(weight)
    return loss, *stats, grad_hidden, grad_weight


@torch.library.custom_op("tritongpt::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
        hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
        grad_target: torch.Tensor, grad_losses: torch.Tensor, ignore_index: int, label_smoothing: float,
        z_loss: float, chunk: int, dtype: torch.dtype, need_hidden: bool,
        need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of reduction="none" for per-row upstream gradients grad_losses (N,)."""
    grad_hidden, grad_weight = _gradient_buffers(hidden, weight, need_hidden, need_weight)
    backward(hidden, weight, targets.contiguous(), ignore_index, label_smoothing, z_loss, chunk, dtype,
             grad_losses.float(), lse, grad_target, grad_hidden, grad_weight)
    return (_placeholder(hidden) if grad_hidden is None else grad_hidden,
            _placeholder(weight) if grad_weight is None else grad_weight.to(weight.dtype))


@_linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, targets, lse, grad_target, grad_losses, ignore_index, label_smoothing, z_loss, chunk,
      dtype, need_hidden, need_weight):
    return (hidden.new_empty(hidden.shape) if need_hidden else _placeholder(hidden),
            weight.new_empty(weight.shape) if need_weight else _placeholder(weight))


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss, chunk, dtype, *needs = inputs
    _, lse, grad_target, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(lse, grad_target, grad_hidden, grad_weight)
    ctx.reduction = reduction
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets, lse, grad_target)
        ctx.args = (ignore_index, label_smoothing, z_loss, chunk, dtype, *needs)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight)


def _backward(ctx, grad_loss, *_unused):
    need_hidden, need_weight = ctx.needs_input_grad[:2]
    if ctx.reduction == "none":
        grad_hidden, grad_weight = _linear_cross_entropy_backward_op(*ctx.saved_tensors, grad_loss, *ctx.args)
    else:
        grad_hidden, grad_weight = (g * grad_loss for g in ctx.saved_tensors)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            None, None, None, None, None, None, None, None, None)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry

def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                         chunk_size: int | None = None) -> torch.Tensor:
    grad_on = torch.is_grad_enabled()
    dtype = compute_dtype(hidden, weight)
    chunk = chunk_size or default_chunk_rows(hidden.shape[0], weight.shape[0], hidden.device, dtype.itemsize)
    loss, *_ = _linear_cross_entropy_op(
        hidden, weight, targets, ignore_index, reduction, float(label_smoothing), float(z_loss), chunk, dtype,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return loss
