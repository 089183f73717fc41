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
