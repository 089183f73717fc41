"""The hot ops of tritongpt, each with a `torch` backend and (where written) a `triton` backend.

Callers use only the functions of this module (``kernels.rms_norm(...)`` and friends). Each call
validates its inputs once, here, so both backends raise the same errors, then routes to the
backend chosen for that op:

- ``torch``: the readable PyTorch reference in ``kernels/reference.py``; runs on any device.
- ``triton``: our Triton kernels in ``kernels/triton_<op>.py``; runs on CUDA tensors, or on CPU
  tensors when ``TRITON_INTERPRET=1`` was set before triton was imported (that is for tests).
- ``auto`` (the default): triton for CUDA tensors when the op has a Triton version, else torch.

Choose backends with ``kernels.use(...)`` (a setter that also works as a context manager), with
the ``TRITONGPT_KERNELS`` environment variable, or with ``--kernels`` on every training entry
point. All three take the same spec: ``"auto"``, ``"triton"``, ``"torch"`` or a comma-separated
list such as ``"torch,rms_norm=triton"`` (an entry without ``=`` sets every op).
``kernels.spec_type`` is the argparse ``type=`` of a ``--kernels SPEC`` flag: it rejects a bad
spec with parse_spec's message. The switch lives in ``kernels/backends.py``, the input checks in
``kernels/checks.py``.

Range checks read tensor values, a host sync per call: ``kernels.check_targets = False`` (or
TRITONGPT_CHECK_TARGETS=0 at import) skips the target-id range check of the losses, and
``kernels.check_key_lengths = False`` (or TRITONGPT_CHECK_KEY_LENGTHS=0) the key-length range
check of the attention ops and the cu_seqlens check of varlen_attention, once the data is trusted. Both skip themselves under torch.compile.

NaN in, NaN out: on both backends alike, a NaN in an input makes NaN every output (and gradient)
that depends on it, so a diverged run is never hidden. Two rules say what "depends" means, the
same on both backends: cross-entropy rows whose target is ignore_index are never read (their NaN
leaves the loss and their logits' gradient at exactly 0), and in the attention ops a NaN at a
key a query does not attend is not promised to reach it, except past a row's key_lengths or its
sequence's end, which are never read (see causal_attention).

Adding an op touches exactly four places:

1. ``kernels/triton_<op>.py``: its Triton version, a function ``<op>`` with the reference's
   signature (leave it out and the op runs on torch everywhere);
2. ``kernels/reference.py``: the torch reference, a function ``<op>``;
3. this module: the public function ``<op>``, decorated with ``@backends.op``, which is its one
   registry entry (OPS and the spec grammar follow from it): signature, docstring, its input
   checks (helpers in kernels/checks.py) and ``return backends.dispatch("<op>", device)(...)``;
4. the op table in README.md.

Layout of a Triton op (every ``kernels/triton_<op>.py`` follows it, in this order):

1. Module docstring: the algorithm and its memory traffic.
2. Triton kernels ``_<op>_fwd_kernel`` and ``_<op>_bwd_kernel``; further kernels are named
   ``_<op>_<what>_kernel`` (``_causal_attention_dkdv_kernel``); ``@triton.jit`` helpers are
   ``_``-prefixed with descriptive names.
3. Launchers: public ``plan_forward(...)`` and ``plan_backward(...)`` that take the tensors
   (inputs and outputs, allocated) and a ``launching.Gpu`` and return the launch plan, a list of
   ``launching.Launch`` (grid, arguments by name, candidate configs), as a plain function of
   shapes, dtypes and the target; then public ``forward(...)`` and ``backward(...)`` that
   allocate, plan for the tensors' device and run the plan (tests and benchmarks call them
   directly; ``python -m bench.compiled`` compiles the plans ahead of time).
4. Torch custom ops ``tritongpt::<op>`` and ``tritongpt::<op>_backward``, defined with
   ``@torch.library.custom_op`` as python handles ``_<op>_op`` and ``_<op>_backward_op``, fakes
   by ``@handle.register_fake``, then ``_setup_context(ctx, inputs, output)``, ``_backward(ctx,
   ...)`` and ``_<op>_op.register_autograd(_backward, setup_context=_setup_context)``, always
   through the handle. (triton_rms_norm.py adds ``tritongpt::add_rms_norm``, registered alike.)
5. Last, the public entry ``<op>(...)`` with the reference's signature, which this module
   dispatches to for the triton backend.

triton_linear_cross_entropy.py has no kernels of its own: its launchers run the chunked matmuls
around the launchers of triton_cross_entropy.py. Attention spans five modules:
triton_attention.py (kernels.attention: the training forward and backward, with every mask,
softcap and packed sequences), triton_varlen_attention.py (kernels.varlen_attention: its custom
op over those kernels), triton_causal_attention.py (kernels.causal_attention: the causal
defaults), triton_attention_decode.py (split-key decoding and per-row key lengths, which plain
causal calls with few queries go to) and triton_attention_tiles.py (the @triton.jit helpers all
share). The model calls kernels.attention (kernels.varlen_attention for packed documents), so
``--kernels attention=torch`` is the switch that changes its attention.

Shared launcher helpers live in ``kernels/launching.py``: ``interpreting()`` (the one test for
the Triton interpreter), ``Gpu``/``gpu_of``, ``Launch``/``run``, ``Tile``/``Autotune`` (named
autotune configs), ``as_rows``, ``reduce_losses``, ``default_chunk_rows``, ``compute_dtype``.
``kernels/quantization.py`` defines the weight formats of ``quantized_linear`` (int8 and fp4:
quantize, pack, dequantize), which both backends and model/quantized.py share.
"""
from __future__ import annotations

import os
import sys

if __name__ == "kernels":   # the bare name is Hugging Face's package: load as tritongpt.kernels (tritongpt/__init__.py)
    import tritongpt
    tritongpt.claim_bare_name(sys.modules[__name__])

import torch

from tritongpt.kernels import backends, checks, quantization
from tritongpt.kernels.backends import OPS, active, implementation, parse_spec, spec_type, triton_available, use

__all__ = ["OPS", "active", "attention", "causal_attention", "check_key_lengths", "check_targets", "cross_entropy",
           "implementation", "linear_cross_entropy", "parse_spec", "quantized_linear", "rms_norm", "rotary",
           "spec_type", "swiglu", "triton_available", "use", "varlen_attention"]

# Switches of the range checks (see above); the ops read them on every call.
check_targets: bool = os.environ.get("TRITONGPT_CHECK_TARGETS", "1") != "0"
check_key_lengths: bool = os.environ.get("TRITONGPT_CHECK_KEY_LENGTHS", "1") != "0"


@backends.op
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim. x (..., D), weight (D,).

    eps must be a finite number > 0 (ValueError otherwise). With ``residual=r``: h = x + r,
    returns (rms_norm(h), h), fusing the residual add.
    """
    checks.float_tensor("x", x)
    checks.float_tensor("weight", weight)
    eps = checks.eps(eps)
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected ({x.shape[-1] if x.dim() else '?'},) "
                         f"to match the last dim of x {tuple(x.shape)}")
    if residual is None:
        checks.same("device", x=x, weight=weight)
    else:
        checks.float_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; expected x's shape {tuple(x.shape)}")
        checks.same("dtype", x=x, residual=residual)
        checks.same("device", x=x, weight=weight, residual=residual)
    return backends.dispatch("rms_norm", x.device)(x, weight, eps, residual=residual)


@backends.op
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up have the same shape and dtype."""
    checks.float_tensor("gate", gate)
    checks.float_tensor("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate has shape {tuple(gate.shape)} but up has {tuple(up.shape)}; they must match")
    checks.same("dtype", gate=gate, up=up)
    checks.same("device", gate=gate, up=up)
    return backends.dispatch("swiglu", gate.device)(gate, up)


@backends.op
def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding (RoPE, GPT-NeoX / LLaMA half rotation) of q and k in one call:
    returns (q * cos + roll(q, D/2) * sin, k * cos + roll(k, D/2) * sin), computed in fp32, as new
    contiguous tensors in q's dtype.

    q (B, T, Hq, D) and k (B, T, Hkv, D), any strides (e.g. views of a fused qkv projection), one
    dtype, D even. cos and sin are full-width tables of one float dtype (fp32 keeps the angles
    exact), each of shape (T, 1, D), shared by the batch rows, or (B, T, 1, D), a row of positions
    per sequence: model/gpt.py's rope_tables sliced (table[:T]) or indexed by (B, T) positions. Its
    convention: cos holds cos(angle) over both halves of a head vector and sin holds -sin(angle)
    over the first half and +sin(angle) over the second, so that each head vector's halves
    (x1, x2) become (x1 cos - x2 sin, x2 cos + x1 sin). The tables are constants: they must not
    require grad (no backend gives them a gradient). The gradient of an input is the transposed
    map dy * cos + roll(dy * sin, D/2) (for such tables the inverse rotation).
    NaN: a NaN at column j of a head vector reaches output columns j and (j + D/2) % D of that
    head; one in a table's row t reaches those columns of every head of token t.
    """
    # The common case costs plain comparisons only: a decoding step calls this once per layer.
    checks.float_tensor("q", q)
    checks.float_tensor("k", k)
    if q.dim() != 4 or k.dim() != 4:
        name, t = ("q", q) if q.dim() != 4 else ("k", k)
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dims (batch, time, heads, head_dim): "
                         f"rotate the (B, T, H, D) views of the projection, before any transpose")
    (B, T, _, D), (Bk, Tk, _, Dk) = q.shape, k.shape
    if Bk != B or Tk != T or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, time and head_dim "
                         f"(only the head counts may differ)")
    if D % 2 or D == 0:
        raise ValueError(f"head_dim is {D}; rotary rotates the two halves of each head vector, so it must be "
                         f"even and > 0")
    if k.dtype != q.dtype:
        checks.same("dtype", q=q, k=k)
    checks.float_tensor("cos", cos)
    checks.float_tensor("sin", sin)
    if cos.shape != sin.shape or (cos.shape != (T, 1, D) and cos.shape != (B, T, 1, D)):
        for name, table in (("cos", cos), ("sin", sin)):
            if table.shape != (T, 1, D) and table.shape != (B, T, 1, D):
                raise ValueError(f"{name} has shape {tuple(table.shape)}; expected ({T}, 1, {D}) or, per row, "
                                 f"({B}, {T}, 1, {D}) for q {tuple(q.shape)}: the table's rows at the T "
                                 f"positions (table[:T], or table[positions] for (B, T) positions)")
        raise ValueError(f"cos has shape {tuple(cos.shape)} but sin has {tuple(sin.shape)}; index both tables "
                         f"at the same positions")
    if cos.requires_grad or sin.requires_grad:
        name = "cos" if cos.requires_grad else "sin"
        raise ValueError(f"{name} requires grad; rotary's tables are constants that get no gradient: "
                         f"pass {name}.detach()")
    if sin.dtype != cos.dtype:
        checks.same("dtype", cos=cos, sin=sin)
    if not q.device == k.device == cos.device == sin.device:
        checks.same("device", q=q, k=k, cos=cos, sin=sin)
    return backends.dispatch("rotary", q.device)(q, k, cos, sin)


@backends.op
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                     key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention, attention(q, k, v, scale=scale) with Tq <= Tk (see there) and
    per-row key lengths. q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) -> (B, Hq, Tq, D).

    Query i sits at absolute position Tk - Tq + i and attends keys 0 .. Tk - Tq + i, so Tq == Tk
    is plain causal attention and Tq == 1 is one decoding step against a KV cache.

    key_lengths (FlashAttention's cache_seqlens), an int32 or int64 tensor (B,) on q's device:
    row b uses only its first key_lengths[b] keys of k, v, so Tk is the cache's capacity, and its
    query i sits at position key_lengths[b] - Tq + i and attends keys 0 .. key_lengths[b] - Tq + i.
    Each length must be in [Tq, Tk] (checked at a host sync while check_key_lengths is on, once
    per lengths tensor: pass one tensor to every layer of a forward, and do not change it in place
    after a call). Keys past a row's length are never read, whatever they hold, NaN included.

    NaN: output row i is NaN whenever q row i, or k or v at a key it attends, holds a NaN, and the
    gradients then hold NaN too (dv not for a NaN in v, which dv does not depend on). A NaN at a
    key that query i does not attend is no part of its result but may still reach it, depending
    on the backend's tiling (a masked probability is exactly 0, and 0 * NaN in the P @ V product
    is NaN; SDPA's additive mask keeps a masked NaN score): neither backend promises either way.
    """
    checks.attention_tensors(q, k, v, 4, "(batch, heads, time, head_dim)")
    _batch_attention_shapes(q, k)
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]}); queries must be the last Tq of "
                         f"the Tk positions (kernels.attention takes Tq > Tk: the first queries then see no key)")
    scale = checks.attention_options(True, scale, (-1, -1), 0.0)[1]
    if key_lengths is None:
        return backends.dispatch("causal_attention", q.device)(q, k, v, scale)
    _check_key_lengths(key_lengths, q, k)
    return backends.dispatch("causal_attention", q.device)(q, k, v, scale, key_lengths=key_lengths)


@backends.op
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None,
              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
              key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention with FlashAttention's options. q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D)
    -> (B, Hq, Tq, D); Hq % Hkv == 0 (grouped-query attention); scale defaults to D ** -0.5.

    Query i sits at key position p = Tk - Tq + i (the causal mask aligned bottom-right, also when
    Tq > Tk). It sees key j when: j <= p if causal; p - left <= j (left = window_size[0] >= 0) and
    j <= p + right (right = window_size[1] >= 0; -1 leaves a side unbounded; with causal, right is
    0). softcap > 0 replaces each scaled score s by softcap * tanh(s / softcap) before the softmax
    (Gemma 2). A query that sees no key returns 0 (and passes no gradient).

    key_lengths: as in causal_attention (row b has key_lengths[b] keys and its queries are their
    last Tq positions). NaN: as in causal_attention, for the keys each query sees.
    """
    checks.attention_tensors(q, k, v, 4, "(batch, heads, time, head_dim)")
    _batch_attention_shapes(q, k)
    causal, scale, window_size, softcap = checks.attention_options(causal, scale, window_size, softcap)
    if key_lengths is not None:
        _check_key_lengths(key_lengths, q, k)
    return backends.dispatch("attention", q.device)(q, k, v, causal, scale, window_size, softcap,
                                                    key_lengths=key_lengths)


@backends.op
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = True,
                     scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                     softcap: float = 0.0) -> torch.Tensor:
    """attention() over packed sequences (FlashAttention's flash_attn_varlen_func).

    q (total_q, Hq, D); k, v (total_k, Hkv, D) -> (total_q, Hq, D). cu_seqlens_q and cu_seqlens_k,
    int32 (n_seq + 1,) on q's device, are the cumulative offsets of each sequence in the packed
    token axis (0, len_0, len_0 + len_1, ..., total); sequence s attends only within itself, with
    attention()'s rules (its query i at key position Tk_s - Tq_s + i). max_seqlen_q and
    max_seqlen_k bound the sequences' lengths (they size the launch). The offsets are checked at a
    host sync once per pair of tensors while check_key_lengths is on.
    """
    checks.attention_tensors(q, k, v, 3, "(total_tokens, heads, head_dim)")
    checks.cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    checks.cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences but cu_seqlens_k "
                         f"{cu_seqlens_k.numel() - 1}; pass the offsets of the same sequences")
    max_seqlen_q = checks.max_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = checks.max_seqlen("max_seqlen_k", max_seqlen_k)
    if check_key_lengths:
        checks.cu_seqlens_range(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    causal, scale, window_size, softcap = checks.attention_options(causal, scale, window_size, softcap)
    return backends.dispatch("varlen_attention", q.device)(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                           max_seqlen_k, causal, scale, window_size, softcap)


def _batch_attention_shapes(q: torch.Tensor, k: torch.Tensor) -> None:
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share the batch size")
    if q.shape[2] == 0:
        raise ValueError("q has no queries (Tq == 0)")
    if k.shape[2] == 0:
        raise ValueError("k has no keys (Tk == 0)")


def _check_key_lengths(key_lengths: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    checks.key_lengths(key_lengths, q)
    if check_key_lengths:
        checks.key_length_range(key_lengths, q.shape[2], k.shape[2])


@backends.op
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """Softmax cross-entropy of logits (N, V) against targets (N,), computed in float32.

    Per row: (1 - ls) * (lse - x[t]) + ls * (lse - mean(x)) + z_loss * lse^2, where lse is the
    logsumexp of the row. Rows whose target is ignore_index contribute 0 loss and 0 gradient.
    reduction "mean" averages over the non-ignored rows (0.0 when there are none), "sum" adds
    them, "none" returns the (N,) per-row losses. The loss is float32 whatever the logits dtype.
    A NaN logit in a kept row makes that row's loss and gradient NaN, and so the "sum" and "mean"
    losses; an ignored row is never read, so its NaN changes nothing (loss 0, gradient exactly 0).
    """
    checks.float_tensor("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; expected (N, V): flatten leading dims first")
    checks.targets(targets, logits.shape[0], "logits")
    checks.same("device", logits=logits, targets=targets)
    if check_targets:
        checks.target_range(targets, logits.shape[1], ignore_index)
    checks.loss_args(reduction, label_smoothing, z_loss)
    return backends.dispatch("cross_entropy", logits.device)(
        logits, targets, ignore_index, reduction, label_smoothing, z_loss)


@backends.op
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets, ...) without ever holding the (N, V) logits.

    hidden (N, D), weight (V, D). Rows are processed in chunks of chunk_size (default: chosen from
    a memory budget); the result and gradients equal the unfused composition, NaN included: an
    ignored row's NaN hidden state gives it a zero grad_hidden row but, through the weight
    gradient's matmul (0 * NaN), NaN in grad_weight.
    """
    checks.float_tensor("hidden", hidden)
    checks.float_tensor("weight", weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be (N, D) and (V, D)")
    checks.targets(targets, hidden.shape[0], "hidden")
    checks.same("device", hidden=hidden, weight=weight, targets=targets)
    if check_targets:
        checks.target_range(targets, weight.shape[0], ignore_index)
    checks.loss_args(reduction, label_smoothing, z_loss)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return backends.dispatch("linear_cross_entropy", hidden.device)(
        hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss, chunk_size)


@backends.op
def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """x (..., K) @ W.T -> (..., N) in x's dtype, where W (N, K) is stored quantized in fmt
    ("int8" or "fp4"; layouts and quantizer in kernels/quantization.py) and dequantized inside
    the GEMM. int8: qweight (N, K) int8, scales (N,); fp4: qweight (N, Kp / 2) uint8 (two E2M1
    codes a byte), scales (N, Kp / 32), Kp = K rounded up to a multiple of 32 (the zero padding
    quantize() adds). Scales are fp16 or fp32. The weights are frozen: x gets a gradient, they do not.
    """
    checks.float_tensor("x", x)
    quantization.check_format(fmt)
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (..., K)")
    K = x.shape[-1]
    qweight_dtype = quantization.storage_dtypes(fmt)[0]
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != qweight_dtype or qweight.dim() != 2:
        raise ValueError(f"{fmt} qweight must be a 2-D {qweight_dtype} tensor, got "
                         f"{getattr(qweight, 'dtype', type(qweight))} {tuple(getattr(qweight, 'shape', ()))}; "
                         f"make it with kernels.quantization.quantize(weight, {fmt!r})")
    expected_q, expected_s = quantization.shapes(fmt, qweight.shape[0], K)
    if qweight.shape != expected_q:
        raise ValueError(f"{fmt} qweight has shape {tuple(qweight.shape)} but x has K = {K} input features; "
                         f"expected {expected_q}")
    if not isinstance(scales, torch.Tensor) or scales.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"scales must be a float16 or float32 tensor, got {getattr(scales, 'dtype', type(scales))}")
    if scales.shape != expected_s:
        raise ValueError(f"{fmt} scales have shape {tuple(scales.shape)}; expected {expected_s} for qweight "
                         f"{tuple(qweight.shape)}" + (" (one per group of 32 input features)" if fmt == "fp4"
                                                      else " (one per output feature)"))
    checks.same("device", x=x, qweight=qweight, scales=scales)
    return backends.dispatch("quantized_linear", x.device)(x, qweight.contiguous(), scales.contiguous(), fmt)


backends.use_environment()
