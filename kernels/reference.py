"""The `torch` backend: readable, efficient PyTorch versions of every op.

These are the references the Triton kernels are tested against, and the backend used on CPU.
Inputs arrive already validated by kernels/__init__.py. Each function has the signature of the
public op in kernels/__init__.py; see there for the semantics, NaN propagation included (a NaN
input gives the same NaN outputs as on the triton backend).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tritongpt.kernels import launching, quantization


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    if x.device.type == "cpu" and _needs_grad(x, weight, residual):
        return _RMSNorm.apply(x, weight, eps, residual)
    h = x if residual is None else x + residual
    # F.rms_norm computes the statistics in fp32 for half inputs; casting the weight keeps the
    # fused path (mixed dtypes fall back to a slow composite) and the output in x's dtype.
    y = F.rms_norm(h, (h.shape[-1],), weight.to(h.dtype), eps)
    return y if residual is None else (y, h)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or as it is when it is float64 (the tests' exact reference)."""
    return t if t.dtype == torch.float64 else t.float()


class _RMSNorm(torch.autograd.Function):
    """RMSNorm (with the residual add) that saves only h and the fp32 1/rms per row.

    On the CPU F.rms_norm is a composite of six ops, and autograd through it also keeps the
    normalized h: one more activation of x's size per norm, two per block. This computes the same
    thing and derives the gradients from h and 1/rms in the backward:
    with n = h / rms and g = dy * w, dh = (g - n * mean(g * n)) / rms and dw = sum(dy * n).
    (On CUDA F.rms_norm has fused kernels that save only 1/rms; it stays in use there.)
    """

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        h = x if residual is None else x + residual
        h32 = _wide(h)
        rstd = torch.rsqrt(h32.square().mean(-1, keepdim=True) + eps)          # (..., 1) fp32
        y = (h32 * rstd).to(h.dtype) * weight.to(h.dtype)
        ctx.save_for_backward(h, rstd, weight)
        ctx.has_residual = residual is not None
        return y if residual is None else (y, h)

    @staticmethod
    def backward(ctx, grad_y, grad_h=None):
        h, rstd, weight = ctx.saved_tensors
        n = _wide(h) * rstd                                                     # (..., D) fp32
        grad_weight = (_wide(grad_y) * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        g = _wide(grad_y) * _wide(weight)
        dh = (g - n * (g * n).mean(-1, keepdim=True)).mul_(rstd)
        if grad_h is not None:
            dh += grad_h
        dh = dh.to(h.dtype)
        return dh, grad_weight, None, dh if ctx.has_residual else None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if _needs_grad(gate, up):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up saving only gate and up: autograd through F.silu(gate) * up also keeps
    silu(gate), a third activation of the MLP's width. The backward recomputes it:
    d up = dy * silu(gate), d gate = silu'(gate) * dy * up, the latter by aten's fused
    silu_backward, written over its dy * up input: four elementwise passes and two MLP-wide
    allocations, where the composite with sigmoid took nine passes and three."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        g, dy = _wide(gate), _wide(grad_out)
        grad_up = F.silu(g).mul_(dy)                                          # dy * silu(gate)
        dy_up = dy * _wide(up)
        grad_gate = torch.ops.aten.silu_backward.grad_input(dy_up, g, grad_input=dy_up)
        return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):     # _needs_grad, inlined
        return _rotate(q, cos, sin), _rotate(k, cos, sin)
    # Without autograd (a decoding step, all per-op overhead) each op rotates q and k in one
    # dispatch (_foreach_* broadcast each pair like the plain ops): four dispatches instead of six.
    xs = [q, k] if q.dtype == torch.float32 or q.dtype == torch.float64 else [q.float(), k.float()]
    half = q.shape[-1] // 2
    out = torch._foreach_mul(xs, [cos, cos])
    torch._foreach_addcmul_(out, [xs[0].roll(half, dims=-1), xs[1].roll(half, dims=-1)], [sin, sin])
    if out[0].dtype != q.dtype:
        out = [t.to(q.dtype) for t in out]
    return out[0].contiguous(), out[1].contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + roll(x, D/2) * sin in fp32 (float64 stays), back in x's dtype: three ops, which a
    decoding step, all per-op overhead, notices (the add in place: one allocation less; mul's
    backward needs only its inputs); autograd's backward is dy * cos + roll(dy * sin). The tables
    broadcast: (T, 1, D) over batch and heads, (B, T, 1, D) over heads."""
    x32 = _wide(x)
    return (x32 * cos).addcmul_(x32.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype).contiguous()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                     key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_lengths is not None:
        # Row b's query i attends keys j <= key_lengths[b] - Tq + i; the keys past the row's length
        # are zeroed first, since a masked probability is exactly 0 and 0 * NaN would still be NaN.
        keys = torch.arange(Tk, device=q.device)                                        # (Tk,)
        in_row = keys < key_lengths[:, None]                                            # (B, Tk)
        k, v = (t.masked_fill(~in_row[:, None, :, None], 0) for t in (k, v))            # (B, Hkv, Tk, D)
        last = key_lengths[:, None] - Tq + torch.arange(Tq, device=q.device)            # (B, Tq)
        mask = keys <= last[:, :, None]                                                 # (B, Tq, Tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, *,
              key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    if causal and window_size[0] < 0 and not softcap and q.shape[2] <= k.shape[2]:   # (with causal, right is 0)
        return causal_attention(q, k, v, scale, key_lengths=key_lengths)
    B, Tq = q.shape[0], q.shape[2]
    k_lengths = key_lengths if key_lengths is not None else torch.full((B,), k.shape[2], device=q.device)
    return _masked_attention(q, k, v, torch.full((B,), Tq, device=q.device), k_lengths, causal, scale,
                             window_size, softcap)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                     scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                     softcap: float = 0.0) -> torch.Tensor:
    """Unpack the sequences into a zero-padded batch, attend once with each row's lengths, pack back.

    The packed model's case (one cu_seqlens for queries and keys, plain causal) runs SDPA's
    is_causal without a mask: a query never sees a key past its own position, so none of its row's
    padding, and the padded rows' outputs are never packed back."""
    q_rows, q_slots = _unpack(q, cu_seqlens_q, max_seqlen_q)                            # (n, Hq, Tq_max, D)
    k_rows, _ = _unpack(k, cu_seqlens_k, max_seqlen_k)                                  # (n, Hkv, Tk_max, D)
    v_rows, _ = _unpack(v, cu_seqlens_k, max_seqlen_k)
    if causal and window_size[0] < 0 and not softcap and cu_seqlens_q is cu_seqlens_k:
        out = F.scaled_dot_product_attention(q_rows, k_rows, v_rows, is_causal=True, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
    else:
        out = _masked_attention(q_rows, k_rows, v_rows, cu_seqlens_q.diff(), cu_seqlens_k.diff(), causal, scale,
                                window_size, softcap)
    n, H, T, D = out.shape
    return out.transpose(1, 2).reshape(n * T, H, D).index_select(0, q_slots)            # (total_q, Hq, D)


def _unpack(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed x (total, H, D) -> (n, H, max_seqlen, D), zero past each sequence's end, and each
    token's slot in the (n * max_seqlen) positions of that batch. Copied into the slots (whose
    backward is a gather) rather than gathered (whose backward is a slow scatter-add)."""
    starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()                 # (n,)
    n, total = lengths.numel(), x.shape[0]
    sequence = torch.repeat_interleave(torch.arange(n, device=x.device), lengths, output_size=total)   # (total,)
    slots = sequence * max_seqlen + torch.arange(total, device=x.device) - starts[sequence]             # (total,)
    rows = x.new_zeros(n * max_seqlen, *x.shape[1:]).index_copy(0, slots, x)            # (n * max_seqlen, H, D)
    return rows.view(n, max_seqlen, *x.shape[1:]).transpose(1, 2), slots


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lengths: torch.Tensor,
                      k_lengths: torch.Tensor, causal: bool, scale: float | None, window_size: tuple[int, int],
                      softcap: float) -> torch.Tensor:
    """Attention of q (B, Hq, Tq, D) to k, v (B, Hkv, Tk, D) where row b holds q_lengths[b] queries
    and k_lengths[b] keys, its query i at position k_lengths[b] - q_lengths[b] + i; a query that
    sees no key gets 0. With softcap the scores are computed explicitly (SDPA cannot cap them)."""
    (B, Hq, Tq, D), (Hkv, Tk) = q.shape, k.shape[1:3]
    scale = D ** -0.5 if scale is None else scale
    keys = torch.arange(Tk, device=q.device)                                            # (Tk,)
    pos = (k_lengths - q_lengths)[:, None] + torch.arange(Tq, device=q.device)          # (B, Tq)
    visible = (keys < k_lengths[:, None, None]).expand(B, Tq, Tk).clone()               # (B, Tq, Tk)
    left, right = window_size
    if causal:
        right = 0
    if left >= 0:
        visible &= keys >= pos[:, :, None] - left
    if right >= 0:
        visible &= keys <= pos[:, :, None] + right
    # Keys past a row's length are zeroed (0 * NaN would still be NaN), and a row that sees no key
    # attends to all of them and is zeroed after, so that neither pass meets a softmax over nothing.
    in_row = (keys < k_lengths[:, None])[:, None, :, None]                              # (B, 1, Tk, 1)
    k, v = k.masked_fill(~in_row, 0), v.masked_fill(~in_row, 0)
    empty = ~visible.any(-1)                                                            # (B, Tq)
    mask = (visible | empty[:, :, None])[:, None]                                       # (B, 1, Tq, Tk)
    if softcap:
        k, v = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))                   # (B, Hq, Tk, D)
        s = torch.tanh((_wide(q) @ _wide(k).transpose(-1, -2)) * (scale / softcap)) * softcap
        p = s.masked_fill(~mask, float("-inf")).softmax(-1)                              # (B, Hq, Tq, Tk)
        out = p.to(v.dtype) @ v      # probabilities in v's dtype, as SDPA and the Triton kernels use them
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    return out.masked_fill(empty[:, None, :, None], 0)                                   # (B, Hq, Tq, D)


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


def _ce_losses(x: torch.Tensor, targets: torch.Tensor, ignore_index: int, label_smoothing: float,
               z_loss: float) -> tuple[torch.Tensor, ...]:
    """Per-row losses of fp32 logits x (N, V), 0 at ignored rows; -> (losses, lse, safe targets, kept)."""
    lse = torch.logsumexp(x, dim=-1)                       # (N,)
    kept = targets != ignore_index                         # (N,)
    safe_targets = targets.masked_fill(~kept, 0)
    losses = lse - x.gather(1, safe_targets[:, None]).squeeze(1)   # (N,) negative log-likelihood
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss:
        losses = losses + z_loss * lse.square()
    return losses.masked_fill(~kept, 0.0), lse, safe_targets, kept


def _ce_grad_(x: torch.Tensor, lse: torch.Tensor, safe_targets: torch.Tensor, kept: torch.Tensor,
              row: torch.Tensor, label_smoothing: float, z_loss: float) -> torch.Tensor:
    """Overwrite fp32 logits x (N, V) with row * dloss/dx (row: (N,) upstream gradients), in place:
    dloss/dx_j = p_j * (1 + 2 z lse) - ls / V - (1 - ls) [j == t], p = softmax(x); 0 at ignored rows."""
    grad = x.sub_(lse[:, None]).exp_()                     # softmax
    grad.mul_((row * (1.0 + 2.0 * z_loss * lse))[:, None])
    if label_smoothing:
        grad.sub_((row * (label_smoothing / x.shape[1]))[:, None])
    grad.scatter_add_(1, safe_targets[:, None], (-(1.0 - label_smoothing) * row)[:, None])
    return grad.masked_fill_(~kept[:, None], 0.0)          # ignored rows: zero gradient, whatever they held


class _CrossEntropy(torch.autograd.Function):
    """Per-row losses (N,) in float32, with the gradient written out (as the Triton kernel has it).

    Ignored rows get loss 0 and a gradient of exactly 0, whatever their logits hold: autograd
    through logsumexp would give them 0 * softmax(x), which is NaN for a NaN logit. The backward
    also makes fewer (N, V) passes than autograd's, and saves the logits rather than an fp32 copy.
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing, z_loss):
        losses, lse, safe_targets, kept = _ce_losses(logits.float(), targets, ignore_index, label_smoothing, z_loss)
        ctx.save_for_backward(logits, safe_targets, kept, lse)
        ctx.options = (label_smoothing, z_loss)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        logits, safe_targets, kept, lse = ctx.saved_tensors
        x = logits.float() if logits.dtype != torch.float32 else logits.clone()   # (N, V), overwritten
        grad = _ce_grad_(x, lse, safe_targets, kept, grad_losses.float(), *ctx.options)
        return grad.to(logits.dtype), None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    losses = _CrossEntropy.apply(logits, targets, ignore_index, label_smoothing, z_loss)   # (N,)
    return launching.reduce_losses(losses, targets != ignore_index, reduction)


def _lce_chunks(hidden: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                label_smoothing: float, z_loss: float, chunk: int, losses: torch.Tensor | None,
                row_grad: torch.Tensor | None, grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None) -> None:
    """One sweep over row chunks of logits = hidden @ w.T: writes the losses (when given) and, with
    row_grad (N,), the chunk's logit gradient times row_grad, turned at once into its grad_hidden
    rows (grad @ w) and its part of grad_weight (grad.T @ h). One (chunk, V) fp32 block is live."""
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        h = hidden[rows].to(w.dtype)                                          # (C, D)
        x = (h @ w.T).float()                                                 # (C, V) fp32 logits
        chunk_losses, lse, safe_targets, kept = _ce_losses(x, targets[rows], ignore_index, label_smoothing, z_loss)
        if losses is not None:
            losses[rows] = chunk_losses
        if row_grad is None:
            continue
        grad = _ce_grad_(x, lse, safe_targets, kept, row_grad[rows], label_smoothing, z_loss).to(w.dtype)
        # Written in place (for fp32 weights): a fresh (V, D) product per chunk would cost an
        # allocation of the whole head's size and an add pass over it.
        if grad_hidden is not None:
            torch.mm(grad, w, out=grad_hidden[rows])
        if grad_weight is None:
            continue
        if grad.dtype == grad_weight.dtype:
            grad_weight.addmm_(grad.T, h)
        else:
            grad_weight += (grad.T @ h).float()


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked lm-head + cross-entropy that never holds more than one (chunk, V) block of logits.

    For "mean" and "sum" the upstream gradient is a scalar, so the forward computes each chunk's
    gradient right away (scaled by 1, or 1 / kept rows) and the backward only multiplies by it: one
    pass over the logits, no recompute (the way the Triton version works). For "none" the per-row
    upstream gradients are unknown until backward, which recomputes the chunks' logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss, chunk_size):
        dtype = launching.compute_dtype(hidden, weight)
        n_rows = hidden.shape[0]
        chunk = chunk_size or launching.default_chunk_rows(n_rows, weight.shape[0], hidden.device, 8)
        kept = targets != ignore_index
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        early = reduction != "none" and (need_hidden or need_weight)
        losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if early and need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if early and need_weight else None
        row_grad = None
        if early:   # d(sum)/d(loss_i) = 1; d(mean)/d(loss_i) = 1 / kept rows
            scale = 1.0 / kept.sum().clamp(min=1) if reduction == "mean" else torch.ones((), device=hidden.device)
            row_grad = scale.float().expand(n_rows)
        with torch.autocast(hidden.device.type, enabled=False):
            _lce_chunks(hidden, weight.to(dtype), targets, ignore_index, label_smoothing, z_loss, chunk, losses,
                        row_grad, grad_hidden, grad_weight)
        if early:
            ctx.save_for_backward(grad_hidden, grad_weight)
        else:
            ctx.save_for_backward(hidden, weight, targets)
        ctx.args = (early, ignore_index, label_smoothing, z_loss, chunk, dtype, hidden.dtype, weight.dtype)
        return launching.reduce_losses(losses, kept, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        early, ignore_index, label_smoothing, z_loss, chunk, dtype, hidden_dtype, weight_dtype = ctx.args
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if early:
            grad_hidden, grad_weight = ctx.saved_tensors
            grad_hidden = None if grad_hidden is None else (grad_hidden * grad_loss).to(hidden_dtype)
            grad_weight = None if grad_weight is None else (grad_weight * grad_loss).to(weight_dtype)
        else:
            hidden, weight, targets = ctx.saved_tensors
            grad_hidden = torch.empty_like(hidden, dtype=dtype) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            with torch.autocast(hidden.device.type, enabled=False):
                _lce_chunks(hidden, weight.to(dtype), targets, ignore_index, label_smoothing, z_loss, chunk, None,
                            grad_loss.float(), grad_hidden, grad_weight)
            grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden_dtype)
            grad_weight = None if grad_weight is None else grad_weight.to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


class _IgnoredRows(torch.autograd.Function):
    """0, with the gradients that the rows hidden (n, D) of an ignored target get through the lm
    head's zero logit gradient: 0 * weight summed over the vocabulary, and 0 * hidden summed over
    the rows for the weight; NaN wherever a NaN or inf meets the zero, else 0."""

    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        return hidden.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        grad_hidden, grad_weight = (0 * weight).sum(0), (0 * hidden).sum(0)              # (D,), (D,)
        return grad_hidden.to(hidden.dtype).expand_as(hidden), grad_weight.to(weight.dtype).expand_as(weight)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                         chunk_size: int | None = None) -> torch.Tensor:
    if hidden.device.type == "cpu":
        # Rows whose target is ignored (an SFT prompt, padding) cost the lm head as much as the
        # others but add nothing: on the CPU, where finding them costs no device sync, they skip the
        # head (mean and sum are over the kept rows anyway; "none" gives them 0), and _IgnoredRows
        # gives them and the weight the gradients the full product would (0, or NaN from a NaN).
        ignored = targets == ignore_index
        kept, skipped = (~ignored).nonzero().squeeze(1), ignored.nonzero().squeeze(1)      # (n_kept,), (n_ignored,)
        if kept.numel() and skipped.numel():
            losses = _LinearCrossEntropy.apply(hidden.index_select(0, kept), weight, targets[kept], ignore_index,
                                               reduction, label_smoothing, z_loss, chunk_size)
            if reduction == "none":
                losses = losses.new_zeros(targets.shape).index_copy(0, kept, losses)       # (n_rows,)
            return losses + _IgnoredRows.apply(hidden.index_select(0, skipped), weight)
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss,
                                     chunk_size)


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    # Dequantize, then one matmul in x's dtype: the weight is materialized at full width, so this
    # reads more bytes than the full-precision layer; the Triton kernel dequantizes tile by tile.
    # (torch._weight_int8pack_mm, the CPU's int8 weight-only GEMM, is not used: on the 2-core dev
    # machine it was no faster than this at M=1 and 47x slower at M=256, K=N=1024;
    # bench/results/cpu-2cores-2026-12-07-quantized.json.)
    return F.linear(x, quantization.dequantize(qweight, scales, fmt, x.shape[-1], x.dtype))
