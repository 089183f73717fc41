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

NaN in, NaN out: on both backends alike, a NaN in an input makes NaN every output (and gradient)
that depends on it, so a diverged run is never hidden. Two rules say what "depends" means, the
same on both backends: cross-entropy rows whose target is ignore_index are never read (their NaN
leaves the loss and their logits' gradient at exactly 0), and in causal_attention a NaN at a key
a query does not attend is not promised to reach it (see causal_attention).

The Triton modules are imported lazily, on the first call that needs them, so ``import kernels``
stays cheap and never imports triton itself. ``kernels.spec_type`` is the argparse ``type=`` of a
``--kernels SPEC`` flag: it rejects a bad spec with parse_spec's message.

Layout of a Triton op (every ``kernels/triton_<op>.py`` follows it, in this order):

1. Module docstring: the algorithm and its memory traffic.
2. Triton kernels ``_<op>_fwd_kernel`` and ``_<op>_bwd_kernel``; further kernels are named
   ``_<op>_<what>_kernel`` (``_causal_attention_dkdv_kernel``); ``@triton.jit`` helpers are
   ``_``-prefixed with descriptive names.
3. Launchers: public ``plan_forward(...)`` and ``plan_backward(...)`` that take the tensors
   (inputs and outputs, allocated) and a ``launching.Gpu`` and return the launch plan, a list of
   ``launching.Launch`` (grid, arguments, candidate configs), as a plain function of shapes,
   dtypes and the target; then public ``forward(...)`` and ``backward(...)`` that allocate, plan
   for the tensors' device and run the plan (tests and benchmarks call them directly;
   ``python -m bench.compiled`` compiles the plans ahead of time).
4. Torch custom ops ``tritongpt::<op>`` and ``tritongpt::<op>_backward``, defined with
   ``@torch.library.custom_op`` as python handles ``_<op>_op`` and ``_<op>_backward_op``, fakes
   by ``@handle.register_fake``, then ``_setup_context(ctx, inputs, output)``, ``_backward(ctx,
   ...)`` and ``_<op>_op.register_autograd(_backward, setup_context=_setup_context)``, always
   through the handle. (triton_rms_norm.py adds ``tritongpt::add_rms_norm``, registered alike.)
5. Last, the public entry ``<op>(...)`` with the reference's signature, which this module
   dispatches to for the triton backend.

triton_linear_cross_entropy.py has no kernels of its own: its launchers run the chunked matmuls
around the launchers of triton_cross_entropy.py.

Shared launcher helpers live in ``kernels/launching.py``: ``interpreting()`` (the one test for
the Triton interpreter), ``Gpu``/``gpu_of``, ``Launch``/``run``, ``as_rows``, ``reduce_losses``, ``default_chunk_rows``,
``compute_dtype``. ``kernels/reference.py`` holds only the torch references.
``kernels/quantization.py`` defines the weight formats of ``quantized_linear`` (int8 and fp4:
quantize, pack, dequantize), which both backends and model/io/quantized.py share.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import numbers
import os
from typing import Callable

import torch

from kernels import launching, quantization, reference

OPS: tuple[str, ...] = ("rms_norm", "swiglu", "causal_attention", "cross_entropy", "linear_cross_entropy",
                        "quantized_linear")
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
ENV_VAR = "TRITONGPT_KERNELS"

# The Triton version of op X lives in kernels/triton_X.py and defines a function named X with the
# same signature as the reference. (Not kernels/X.py: a submodule named like the public function
# would replace kernels.X with the module the moment anything imported it.)
_triton_impls: dict[str, Callable | None] = {}
_choice: dict[str, str] = {op: "auto" for op in OPS}

# Range-check target ids in the losses. The check costs a host sync per call; turn it off for
# speed (kernels.check_targets = False, or TRITONGPT_CHECK_TARGETS=0) once the data is trusted.
check_targets: bool = os.environ.get("TRITONGPT_CHECK_TARGETS", "1") != "0"


# ----------------------------------------------------------------------------- backend switch

def parse_spec(spec: str) -> dict[str, str]:
    """Turn a spec like ``"torch,rms_norm=triton"`` into {op: backend} for every op it names."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"kernel spec must be a non-empty string, got {spec!r}; use one of {BACKENDS} or 'op=backend,...' with ops {OPS}")
    choice: dict[str, str] = {}
    for entry in spec.split(","):
        entry = entry.strip()
        if "=" in entry:
            op, backend = (s.strip() for s in entry.split("=", 1))
            _check_op(op)
            _check_backend(backend, op)
            choice[op] = backend
        elif entry in BACKENDS:
            choice.update({op: entry for op in OPS})
        else:
            raise ValueError(f"unknown kernel spec entry {entry!r}: expected a backend ({', '.join(BACKENDS)}) "
                             f"or op=backend with op in ({', '.join(OPS)}), e.g. 'torch,rms_norm=triton'")
    return choice


def spec_type(text: str) -> str:
    """The argparse ``type=`` for a ``--kernels SPEC`` flag: text unchanged when parse_spec accepts
    it, else argparse.ArgumentTypeError with parse_spec's message (which lists the choices)."""
    try:
        parse_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; valid ops are {', '.join(OPS)}")


def _check_backend(backend: str, op: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r} for {op}; valid backends are {', '.join(BACKENDS)} "
            f"(spec example: 'auto' or 'torch,rms_norm=triton')")


def triton_available(op: str) -> bool:
    """True when op has a Triton version and triton can be imported."""
    return _load_triton(op) is not None


def _load_triton(op: str) -> Callable | None:
    if op not in _triton_impls:
        module_name = f"kernels.triton_{op}"
        if importlib.util.find_spec("triton") is None or importlib.util.find_spec(module_name) is None:
            _triton_impls[op] = None
        else:
            _triton_impls[op] = getattr(importlib.import_module(module_name), op)
    return _triton_impls[op]


class _Restore:
    """Returned by use(): ignore it to keep the setting, or use it in `with` to restore on exit."""

    def __init__(self, previous: dict[str, str]):
        self._previous = previous

    def __enter__(self) -> "_Restore":
        return self

    def __exit__(self, *exc) -> None:
        _choice.update(self._previous)


def use(spec: str | None = None, **per_op: str) -> _Restore:
    """Set the backend of every op (``spec``) and/or of single ops (keywords).

    ``kernels.use("triton")``, ``kernels.use(rms_norm="torch")``, or as a context manager:
    ``with kernels.use("torch"): ...`` restores the previous choice on exit. Forcing ``triton``
    for an op that has no Triton version, or where triton is not installed, raises ValueError.
    """
    choice = parse_spec(spec) if spec is not None else {}
    for op, backend in per_op.items():
        _check_op(op)
        _check_backend(backend, op)
        choice[op] = backend
    for op, backend in choice.items():
        if backend == "triton" and not triton_available(op):
            raise ValueError(
                f"cannot force triton for {op}: " + ("triton is not installed (pip install triton, Linux only)"
                if importlib.util.find_spec("triton") is None else "it has no Triton version yet")
                + f"; use {op}=torch or {op}=auto")
    previous = dict(_choice)
    _choice.update(choice)
    return _Restore(previous)


def _resolve(op: str, device: torch.device) -> str:
    backend = _choice[op]
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(op) else "torch"
    if (backend == "triton" and device.type != "cuda"
            and not (device.type == "cpu" and launching.interpreting())):
        raise ValueError(
            f"{op}: the triton backend needs CUDA tensors (got {device.type}); move the inputs to a GPU, "
            f"use {op}=torch or auto, or for tests set TRITON_INTERPRET=1 before triton is imported")
    return backend


def active(device: str | torch.device | None = None) -> dict[str, str]:
    """{op: backend a call on `device` uses now} (device defaults to cuda when present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {op: _resolve(op, device) for op in OPS}


def implementation(op: str, backend: str) -> Callable:
    """The raw function of one backend ("torch" or "triton"), bypassing checks; for benchmarks."""
    _check_op(op)
    if backend == "torch":
        return getattr(reference, op)
    if backend == "triton" and triton_available(op):
        return _load_triton(op)
    raise ValueError(f"no {backend!r} implementation of {op}; available: torch" + (", triton" if triton_available(op) else ""))


def _dispatch(op: str, device: torch.device) -> Callable:
    return _load_triton(op) if _resolve(op, device) == "triton" else getattr(reference, op)


if os.environ.get(ENV_VAR):
    use(os.environ[ENV_VAR])


# ----------------------------------------------------------------------------- input checks

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# The checks run on every call, and a decoding step on the CPU is all per-call overhead, so each
# tests the common case first with plain comparisons and builds its message only on failure.

def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of float32, float16, bfloat16")


def _check_same(what: str, **tensors: torch.Tensor) -> None:
    """All tensors share device (and dtype when what == 'dtype')."""
    first, *others = tensors.values()
    expected = getattr(first, what)
    for t in others:
        if getattr(t, what) != expected:
            listing = ", ".join(f"{name} {getattr(t, what)}" for name, t in tensors.items())
            raise ValueError(f"mismatched {what}s: {listing}; convert them to one {what}")


def _check_targets(targets: torch.Tensor, n_rows: int, name: str) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be an int64 tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.shape != (n_rows,):
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected ({n_rows},) to match {name}")


def _check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if check_targets and targets.numel() and not torch.compiler.is_compiling():  # data-dependent: breaks graphs
        bad = targets[(targets != ignore_index) & ((targets < 0) | (targets >= vocab))]
        if bad.numel():
            raise ValueError(f"target id {int(bad[0])} is outside [0, {vocab}) and is not ignore_index "
                             f"({ignore_index}); fix the data or the vocabulary size")


def _check_eps(eps) -> float:
    if type(eps) is float and 0.0 < eps < math.inf:
        return eps
    # bool is an int: eps=True is a mistake, not 1.0. NaN fails both comparisons.
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 < eps < math.inf):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}; pass a small positive value such as 1e-6 "
                         f"(the default), which keeps 1 / sqrt(mean(x^2) + eps) finite")
    return float(eps)


def _check_loss_args(reduction: str, label_smoothing: float, z_loss: float) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")


# ----------------------------------------------------------------------------- public ops

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim. x (..., D), weight (D,).

    eps must be a finite number > 0 (ValueError otherwise). With ``residual=r``: h = x + r,
    returns (rms_norm(h), h), fusing the residual add.
    """
    _check_float("x", x)
    _check_float("weight", weight)
    eps = _check_eps(eps)
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected ({x.shape[-1] if x.dim() else '?'},) "
                         f"to match the last dim of x {tuple(x.shape)}")
    if residual is None:
        _check_same("device", x=x, weight=weight)
    else:
        _check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; expected x's shape {tuple(x.shape)}")
        _check_same("dtype", x=x, residual=residual)
        _check_same("device", x=x, weight=weight, residual=residual)
    return _dispatch("rms_norm", x.device)(x, weight, eps, residual=residual)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up have the same shape and dtype."""
    _check_float("gate", gate)
    _check_float("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate has shape {tuple(gate.shape)} but up has {tuple(up.shape)}; they must match")
    _check_same("dtype", gate=gate, up=up)
    _check_same("device", gate=gate, up=up)
    return _dispatch("swiglu", gate.device)(gate, up)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Causal softmax attention. q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) -> (B, Hq, Tq, D).

    Hq % Hkv == 0 (grouped-query attention). Query i sits at absolute position Tk - Tq + i and
    attends keys 0 .. Tk - Tq + i, so Tq == Tk is plain causal attention and Tq == 1 is one
    decoding step against a KV cache. scale defaults to D ** -0.5.

    NaN: output row i is NaN whenever q row i, or k or v at a key it attends, holds a NaN, and the
    gradients then hold NaN too (dv not for a NaN in v, which dv does not depend on). A NaN at a
    key that query i does not attend is no part of its result but may still reach it, depending
    on the backend's tiling (a masked probability is exactly 0, and 0 * NaN in the P @ V product
    is NaN; SDPA's additive mask keeps a masked NaN score): neither backend promises either way.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dims (batch, heads, time, head_dim)")
    _check_same("dtype", q=q, k=k, v=v)
    _check_same("device", q=q, k=k, v=v)
    (B, Hq, Tq, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch size and head dim")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for grouped-query attention")
    if Tq > Tk:
        raise ValueError(f"more queries ({Tq}) than keys ({Tk}); queries must be the last Tq of the Tk positions")
    if Tq == 0:
        raise ValueError("q has no queries (Tq == 0)")
    return _dispatch("causal_attention", q.device)(q, k, v, scale)


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
    _check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; expected (N, V): flatten leading dims first")
    _check_targets(targets, logits.shape[0], "logits")
    _check_same("device", logits=logits, targets=targets)
    _check_target_range(targets, logits.shape[1], ignore_index)
    _check_loss_args(reduction, label_smoothing, z_loss)
    return _dispatch("cross_entropy", logits.device)(
        logits, targets, ignore_index, reduction, label_smoothing, z_loss)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets, ...) without ever holding the (N, V) logits.

    hidden (N, D), weight (V, D). Rows are processed in chunks of chunk_size (default: chosen from
    a memory budget); the result and gradients equal the unfused composition, NaN included: an
    ignored row's NaN hidden state gives it a zero grad_hidden row but, through the weight
    gradient's matmul (0 * NaN), NaN in grad_weight.
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be (N, D) and (V, D)")
    _check_targets(targets, hidden.shape[0], "hidden")
    _check_same("device", hidden=hidden, weight=weight, targets=targets)
    _check_target_range(targets, weight.shape[0], ignore_index)
    _check_loss_args(reduction, label_smoothing, z_loss)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return _dispatch("linear_cross_entropy", hidden.device)(
        hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss, chunk_size)


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """x (..., K) @ W.T -> (..., N) in x's dtype, where W (N, K) is stored quantized in fmt
    ("int8" or "fp4"; layouts and quantizer in kernels/quantization.py) and dequantized inside
    the GEMM. int8: qweight (N, K) int8, scales (N,); fp4: qweight (N, Kp / 2) uint8 (two E2M1
    codes a byte), scales (N, Kp / 32), Kp = K rounded up to a multiple of 32 (the zero padding
    quantize() adds). Scales are fp16 or fp32. The weights are frozen: x gets a gradient, they do not.
    """
    _check_float("x", x)
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
    _check_same("device", x=x, qweight=qweight, scales=scales)
    return _dispatch("quantized_linear", x.device)(x, qweight.contiguous(), scales.contiguous(), fmt)
