"""Input checks of the public ops in kernels/__init__.py, shared by both backends.

Each raises a one-line error that names the problem and its fix. The checks run on every call,
and a decoding step on the CPU is all per-call overhead, so each tests the common case first with
plain comparisons and builds its message only on failure. The range checks (target ids, key
lengths) read tensor values, a host sync per call: the ops call them only when their switch in
kernels/__init__.py is on, and they skip themselves while torch.compile traces (a data-dependent
branch breaks the graph).
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def float_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of float32, float16, bfloat16")


def same(what: str, **tensors: torch.Tensor) -> None:
    """All tensors share device (and dtype when what == 'dtype')."""
    first, *others = tensors.values()
    expected = getattr(first, what)
    for t in others:
        if getattr(t, what) != expected:
            listing = ", ".join(f"{name} {getattr(t, what)}" for name, t in tensors.items())
            raise ValueError(f"mismatched {what}s: {listing}; convert them to one {what}")


def targets(targets: torch.Tensor, n_rows: int, name: str) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be an int64 tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.shape != (n_rows,):
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected ({n_rows},) to match {name}")


def target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if targets.numel() and not torch.compiler.is_compiling():
        bad = targets[(targets != ignore_index) & ((targets < 0) | (targets >= vocab))]
        if bad.numel():
            raise ValueError(f"target id {int(bad[0])} is outside [0, {vocab}) and is not ignore_index "
                             f"({ignore_index}); fix the data or the vocabulary size")


def key_lengths(lengths: torch.Tensor, q: torch.Tensor) -> None:
    """lengths (B,) int32 or int64 on q's device, for q (B, Hq, Tq, D)."""
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"key_lengths must be an int32 or int64 tensor, got "
                         f"{getattr(lengths, 'dtype', type(lengths))}; pass each row's number of keys as a tensor")
    if lengths.shape != (q.shape[0],):
        raise ValueError(f"key_lengths has shape {tuple(lengths.shape)}; expected ({q.shape[0]},), one length "
                         f"per row of q {tuple(q.shape)}")
    if lengths.device != q.device:
        raise ValueError(f"key_lengths is on {lengths.device} but q on {q.device}; move key_lengths to q's device")


# The lengths that last passed key_length_range, with the Tq and Tk they passed for. A model passes
# the same lengths tensor to the attention of every layer of a forward: checking it once saves a host
# sync per layer. A strong reference, so that no other tensor can take its id while it is kept.
_checked_lengths: tuple[torch.Tensor, int, int] | None = None


def key_length_range(lengths: torch.Tensor, Tq: int, Tk: int) -> None:
    """Each of lengths in [Tq, Tk]; a host sync, done once per lengths tensor and (Tq, Tk)."""
    global _checked_lengths
    if _checked_lengths is not None and _checked_lengths[0] is lengths and _checked_lengths[1:] == (Tq, Tk):
        return
    if lengths.numel() and not torch.compiler.is_compiling():
        bad = lengths[(lengths < Tq) | (lengths > Tk)]
        if bad.numel():
            raise ValueError(f"key length {int(bad[0])} is outside [{Tq}, {Tk}]: a row needs at least its Tq "
                             f"queries' keys and at most the cache's Tk; fix the lengths or the cache size")
        _checked_lengths = (lengths, Tq, Tk)


def eps(eps) -> float:
    if type(eps) is float and 0.0 < eps < math.inf:
        return eps
    # bool is an int: eps=True is a mistake, not 1.0. NaN fails both comparisons.
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 < eps < math.inf):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}; pass a small positive value such as 1e-6 "
                         f"(the default), which keeps 1 / sqrt(mean(x^2) + eps) finite")
    return float(eps)


def loss_args(reduction: str, label_smoothing: float, z_loss: float) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")


def attention_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: int, layout: str) -> None:
    """q, k, v float tensors of `dims` dims (layout names them), one dtype and device, k and v of one
    shape, q and k of one head dim, query heads a multiple of key/value heads."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        float_tensor(name, t)
        if t.dim() != dims:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {dims} dims {layout}")
    same("dtype", q=q, k=k, v=v)
    same("device", q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    Hq, Hkv = q.shape[1], k.shape[1]
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share the head dim")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for grouped-query attention")


def attention_options(causal, scale, window_size, softcap) -> tuple[bool, float | None, tuple[int, int], float]:
    """The mask and score options of kernels.attention, normalised: window_size a pair of ints >= -1
    (with causal, its right side is 0), softcap a finite number >= 0, scale None or finite > 0."""
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not 0.0 < scale < math.inf):
        raise ValueError(f"scale must be None (head_dim ** -0.5) or a finite number > 0, got {scale!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), got "
                         f"{window_size!r}; (-1, -1) is no window")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not 0.0 <= softcap < math.inf:
        raise ValueError(f"softcap must be a finite number >= 0 (0 turns it off), got {softcap!r}")
    left, right = window_size
    return causal, None if scale is None else float(scale), (left, 0 if causal else right), float(softcap)


# The cu_seqlens pair that last passed cu_seqlens_range, with the totals and maxima it passed for
# (a model passes the same tensors to every layer of a forward: one host sync per forward).
_checked_seqlens: tuple | None = None


def cu_seqlens(name: str, cu: torch.Tensor, q: torch.Tensor) -> None:
    """cu (n + 1,) int32 on q's device."""
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor of n_seq + 1 offsets starting at 0, got "
                         f"{getattr(cu, 'dtype', type(cu))} {tuple(getattr(cu, 'shape', ()))}; build it with "
                         f"torch.tensor([0, len0, len0 + len1, ...], dtype=torch.int32)")
    if cu.device != q.device:
        raise ValueError(f"{name} is on {cu.device} but q on {q.device}; move it to q's device")


def cu_seqlens_range(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int,
                     max_q: int, max_k: int) -> None:
    """Each offsets tensor starts at 0, never decreases, ends at its total, and no sequence is longer
    than its max_seqlen; a host sync, done once per pair of tensors and arguments."""
    global _checked_seqlens
    key = (cu_q, cu_k, total_q, total_k, max_q, max_k)
    last = _checked_seqlens
    if last is not None and last[0] is cu_q and last[1] is cu_k and last[2:] == key[2:]:
        return
    if torch.compiler.is_compiling():
        return
    for name, cu, total, longest, max_name in (("cu_seqlens_q", cu_q, total_q, max_q, "max_seqlen_q"),
                                               ("cu_seqlens_k", cu_k, total_k, max_k, "max_seqlen_k")):
        values = cu.tolist()
        lengths = [b - a for a, b in zip(values, values[1:])]
        if values[0] != 0 or values[-1] != total:
            raise ValueError(f"{name} runs from {values[0]} to {values[-1]} but must run from 0 to the "
                             f"{total} packed tokens of its tensor; fix the offsets or the packed tensor")
        if min(lengths) < 0:
            raise ValueError(f"{name} decreases at sequence {lengths.index(min(lengths))}; the offsets must be "
                             f"sorted (cumulative sequence lengths)")
        if max(lengths) > longest:
            raise ValueError(f"sequence {lengths.index(max(lengths))} has {max(lengths)} tokens, more than "
                             f"{max_name}={longest}; pass the longest sequence's length")
    _checked_seqlens = key


def max_seqlen(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int (the longest sequence's length), got {value!r}")
    return value
