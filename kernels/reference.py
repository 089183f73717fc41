"""The `torch` backend: readable, efficient PyTorch versions of every op.

These are the references the Triton kernels are tested against, and the backend used on CPU.
Inputs arrive already validated by kernels/__init__.py. Each function has the signature of the
public op in kernels/__init__.py; see there for the semantics, NaN propagation included (a NaN
input gives the same NaN outputs as on the triton backend).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import launching


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    h = x if residual is None else x + residual
    # F.rms_norm computes the statistics in fp32 for half inputs; casting the weight keeps the
    # fused path (mixed dtypes fall back to a slow composite) and the output in x's dtype.
    y = F.rms_norm(h, (h.shape[-1],), weight.to(h.dtype), eps)
    return y if residual is None else (y, h)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if Tq == Tk:  # plain causal: SDPA's flash/efficient kernels handle it without a mask
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return out + _nan_taint(q, k).to(out.dtype)
    if Tq == 1:  # one decoding step sees every cached key; a zero mask keeps NaN (see _nan_taint)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=q.new_zeros(1, 1), scale=scale, enable_gqa=gqa)
    # SDPA's is_causal aligns the diagonal top-left; ours is bottom-right (query i is at Tk - Tq + i).
    offset = Tk - Tq
    rows = torch.arange(Tq, device=q.device)[:, None]
    cols = torch.arange(Tk, device=q.device)[None, :]
    mask = cols <= rows + offset  # (Tq, Tk), True = may attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _nan_taint(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, Hq, Tq, 1): 0, or NaN for the query rows where q's row or k's row 0 holds a NaN.

    Without a mask, SDPA's CPU kernel may take a row's max over a block of keys with a NaN-dropping
    max (its scalar loop does: rows shorter than a SIMD vector) and returns 0 for a row whose max
    stays -inf, as for a fully masked row: a row of all-NaN scores (a NaN in q row i, or in k row 0
    for query 0, which sees only key 0) came out 0 instead of NaN. With a mask its max keeps NaN,
    which is why a decoding step passes a zero mask. Key 0 is in the first block and every query
    sees it: when score(i, 0) is finite the max is finite and every NaN score flows on through
    exp(NaN - max). So only q row i or k row 0 can be lost, and adding 0 * their sums restores
    exactly those NaNs, for O(Tq * D) work and no pass over K or V. Detached: it is 0 wherever a
    gradient could be finite.
    """
    B, Hq, Tq, _ = q.shape
    Hkv = k.shape[1]
    rows = q.detach().sum(-1, dtype=torch.float32).view(B, Hkv, -1)                     # (B, Hkv, G * Tq)
    key0 = k.detach()[:, :, 0].sum(-1, keepdim=True, dtype=torch.float32)               # (B, Hkv, 1)
    return (rows + key0).mul_(0.0).view(B, Hq, Tq, 1)


class _CrossEntropy(torch.autograd.Function):
    """Per-row losses (N,) in float32, with the gradient written out (as the Triton kernel has it):
    dloss/dx_j = p_j * (1 + 2 z lse) - ls / V - (1 - ls) [j == t], p = softmax(x).

    Ignored rows get loss 0 and a gradient of exactly 0, whatever their logits hold: autograd
    through logsumexp would give them 0 * softmax(x), which is NaN for a NaN logit. The backward
    also makes fewer (N, V) passes than autograd's, and saves the logits rather than an fp32 copy.
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing, z_loss):
        x = logits.float()                                     # (N, V)
        lse = torch.logsumexp(x, dim=-1)                       # (N,)
        kept = targets != ignore_index                         # (N,)
        safe_targets = targets.masked_fill(~kept, 0)
        losses = lse - x.gather(1, safe_targets[:, None]).squeeze(1)   # (N,) negative log-likelihood
        if label_smoothing:
            losses = (1.0 - label_smoothing) * losses + label_smoothing * (lse - x.mean(dim=-1))
        if z_loss:
            losses = losses + z_loss * lse.square()
        ctx.save_for_backward(logits, safe_targets, kept, lse)
        ctx.options = (label_smoothing, z_loss)
        return losses.masked_fill(~kept, 0.0)                 # ignored rows: zero loss

    @staticmethod
    def backward(ctx, grad_losses):
        logits, safe_targets, kept, lse = ctx.saved_tensors
        label_smoothing, z_loss = ctx.options
        row = grad_losses.float()                              # (N,)
        grad = torch.sub(logits, lse[:, None]).exp_()          # softmax, float32 (N, V)
        grad.mul_((row * (1.0 + 2.0 * z_loss * lse))[:, None])
        if label_smoothing:
            grad.sub_((row * (label_smoothing / logits.shape[1]))[:, None])
        grad.scatter_add_(1, safe_targets[:, None], (-(1.0 - label_smoothing) * row)[:, None])
        grad.masked_fill_(~kept[:, None], 0.0)                 # ignored rows: zero gradient
        return grad.to(logits.dtype), None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    losses = _CrossEntropy.apply(logits, targets, ignore_index, label_smoothing, z_loss)   # (N,)
    return launching.reduce_losses(losses, targets != ignore_index, reduction)


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked lm-head + cross-entropy. Forward keeps only the (N,) losses; backward recomputes
    each chunk's logits, so neither pass ever holds more than one (chunk, V) block of logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss, chunk_size):
        dtype = launching.compute_dtype(hidden, weight)
        n_rows = hidden.shape[0]
        chunk = chunk_size or launching.default_chunk_rows(n_rows, weight.shape[0])
        w = weight.to(dtype)                                                  # (V, D)
        losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_rows, chunk):
                rows = slice(start, start + chunk)
                logits = hidden[rows].to(dtype) @ w.T                         # (chunk, V)
                losses[rows] = cross_entropy(logits, targets[rows], ignore_index, "none", label_smoothing, z_loss)
        kept = targets != ignore_index
        ctx.save_for_backward(hidden, weight, targets, kept)
        ctx.args = (ignore_index, reduction, label_smoothing, z_loss, chunk, dtype)
        return launching.reduce_losses(losses, kept, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, kept = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, z_loss, chunk, dtype = ctx.args
        n_rows = hidden.shape[0]
        if reduction == "none":
            row_grad = grad_loss                                              # (N,)
        else:
            scale = grad_loss if reduction == "sum" else grad_loss / kept.sum().clamp(min=1)
            row_grad = scale.expand(n_rows)
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_rows, chunk):
                rows = slice(start, start + chunk)
                h = hidden[rows].to(dtype)                                    # (chunk, D)
                logits = (h @ w.T).requires_grad_()                           # (chunk, V)
                with torch.enable_grad():
                    losses = cross_entropy(logits, targets[rows], ignore_index, "none", label_smoothing, z_loss)
                (grad_logits,) = torch.autograd.grad(losses, logits, row_grad[rows])
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits @ w
                if grad_weight is not None:
                    grad_weight += (grad_logits.T @ h).float()
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                         chunk_size: int | None = None) -> torch.Tensor:
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss,
                                     chunk_size)
