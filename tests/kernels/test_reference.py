"""The torch backend (kernels/reference.py) against float64 computations written out here.

Every op runs in float32, bfloat16 and float16 and is compared, forward and every gradient, with a
plain float64 implementation of its definition (the docstrings of kernels/__init__.py) applied to the same inputs
(already rounded to the test dtype). Here the reference IS the op under test, so assert_matches
gets the op's own result as `ref`: that keeps its shape, NaN and fp32 ~1e-5 relative checks, and
`check` adds a bound relative to the largest exact value for the dtype the op computed in.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tritongpt.kernels import reference
from numerics import ATOL, assert_matches, max_err
from numerics import cpu_randn as randn   # the references are checked on the CPU

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Max error allowed relative to the largest |exact| element, by the dtype the op computes in: a
# few units in the last place, since each op rounds its inputs and output and accumulates in fp32.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def within(name: str, out: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> None:
    """max |out - target| <= REL_TOL[dtype] * max |target| + ATOL[dtype]."""
    scale = target.double().abs().max().item() if target.numel() else 0.0
    err = max_err(out, target)
    assert err <= REL_TOL[dtype] * scale + ATOL[dtype], (
        f"{name}: error {err:.3e} > {REL_TOL[dtype]:.0e} * {scale:.3e} + {ATOL[dtype]:.0e} ({dtype})")


def check(name: str, out: torch.Tensor, exact: torch.Tensor, compute_dtype: torch.dtype | None = None) -> None:
    """The op's result `out` against the float64 `exact`, for an op that computed in compute_dtype
    (default out.dtype; it differs under autocast or when a float32 loss comes from half logits)."""
    compute_dtype = compute_dtype or out.dtype
    assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != expected {tuple(exact.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the result"
    if compute_dtype == out.dtype:
        assert_matches(name, out, out, exact)
    within(name, out, exact, compute_dtype)


def compare(name: str, op: Callable, exact_fn: Callable, inputs: Sequence[torch.Tensor],
            compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Run op on `inputs` and exact_fn on their float64 copies; check every output and, after a
    backward pass with the same random output gradients, the gradient of every input.
    Returns the op's outputs followed by the input gradients, for further comparisons."""
    leaves = [t.detach().requires_grad_() for t in inputs]            # detach keeps the strides
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    outs, exacts = op(*leaves), exact_fn(*leaves64)
    outs = outs if isinstance(outs, tuple) else (outs,)
    exacts = exacts if isinstance(exacts, tuple) else (exacts,)
    # Output gradients from a fixed generator: two compare() calls on equal outputs use equal ones.
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=generator).to(o.dtype) for o in outs]
    for i, (out, exact) in enumerate(zip(outs, exacts)):
        check(f"{name} output {i}", out, exact, compute_dtype)
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(exacts, [g.double() for g in grads])
    for i, (leaf, leaf64) in enumerate(zip(leaves, leaves64)):
        assert leaf.grad.dtype == leaf.dtype
        check(f"{name} grad of input {i}", leaf.grad, leaf64.grad, compute_dtype)
    return (*(o.detach() for o in outs), *(leaf.grad for leaf in leaves))


# ----------------------------------------------------------------------------- float64 definitions

def rms_norm64(x, weight, eps=1e-6, residual=None):
    h = x if residual is None else x + residual
    y = h / torch.sqrt((h * h).mean(dim=-1, keepdim=True) + eps) * weight
    return y if residual is None else (y, h)


def swiglu64(gate, up):
    return gate / (1 + torch.exp(-gate)) * up


def attention64(q, k, v, scale=None):
    """Materialised attention; query head h reads key/value head h // (Hq // Hkv)."""
    _, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    kv_head = torch.arange(Hq) // (Hq // Hkv)
    k, v = k[:, kv_head], v[:, kv_head]
    # Query i sits at absolute position Tk - Tq + i and may attend keys 0 .. Tk - Tq + i.
    allowed = torch.tensor([[j <= Tk - Tq + i for j in range(Tk)] for i in range(Tq)])
    scores = q @ k.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    scores = scores.masked_fill(~allowed, -math.inf)
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return (p / p.sum(dim=-1, keepdim=True)) @ v


def cross_entropy64(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    x = logits.double()
    m = x.amax(dim=-1, keepdim=True)
    lse = (m + torch.log(torch.exp(x - m).sum(dim=-1, keepdim=True))).squeeze(-1)
    log_probs = x - lse[:, None]
    losses = []
    for n, t in enumerate(targets.tolist()):
        if t == ignore_index:
            losses.append(x.new_zeros(()))
            continue
        nll, smooth = -log_probs[n, t], -log_probs[n].mean()
        losses.append((1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse[n] ** 2)
    losses = torch.stack(losses)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / max(int((targets != ignore_index).sum()), 1)


# ----------------------------------------------------------------------------- rms_norm, swiglu

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 37), (1, 1)])
def test_rms_norm(shape, dtype):
    x, w = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype) + 1
    compare("rms_norm", reference.rms_norm, rms_norm64, [x, w])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_residual(dtype):
    x, r, w = randn(3, 4, 33, dtype=dtype), randn(3, 4, 33, dtype=dtype), randn(33, dtype=dtype)
    compare("rms_norm residual", lambda x, r, w: reference.rms_norm(x, w, 1e-5, residual=r),
            lambda x, r, w: rms_norm64(x, w, 1e-5, residual=r), [x, r, w])


def test_rms_norm_eps_and_noncontiguous():
    x = randn(40, 6, scale=1e-2).t()  # tiny values so eps matters; strided rows
    assert not x.is_contiguous()
    compare("rms_norm eps", lambda x, w: reference.rms_norm(x, w, eps=1e-3),
            lambda x, w: rms_norm64(x, w, eps=1e-3), [x, randn(40)])


def test_rms_norm_fp32_weight_half_input():
    """A float32 weight with bfloat16 activations: output in bfloat16, weight gradient in float32."""
    x, w = randn(5, 24, dtype=torch.bfloat16), randn(24)
    y, gx, gw = compare("rms_norm mixed", reference.rms_norm, rms_norm64, [x, w], compute_dtype=torch.bfloat16)
    assert (y.dtype, gx.dtype, gw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    gate, up = randn(2, 3, 17, dtype=dtype, scale=3), randn(2, 3, 17, dtype=dtype)
    compare("swiglu", reference.swiglu, swiglu64, [gate, up])
    compare("swiglu strided", reference.swiglu, swiglu64, [gate.transpose(0, 2), up.transpose(0, 2)])


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 5), dim=st.integers(1, 70))
def test_rms_norm_swiglu_shapes(rows, dim):
    x, w = randn(rows, dim), randn(dim)
    compare("rms_norm", reference.rms_norm, rms_norm64, [x, w])
    compare("swiglu", reference.swiglu, swiglu64, [x, w.expand(rows, dim)])


# ----------------------------------------------------------------------------- causal_attention

ATTENTION_CASES = {  # (B, Hq, Hkv, Tq, Tk, D)
    "causal": (2, 3, 3, 13, 13, 16),
    "gqa": (1, 6, 2, 9, 9, 8),
    "mqa": (2, 4, 1, 7, 7, 8),
    "decode": (2, 4, 2, 1, 17, 16),
    "chunked_prefill": (1, 4, 2, 5, 12, 8),
    "single_token": (1, 2, 2, 1, 1, 8),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_causal_attention(case, dtype):
    B, Hq, Hkv, Tq, Tk, D = ATTENTION_CASES[case]
    q, k, v = randn(B, Hq, Tq, D, dtype=dtype), randn(B, Hkv, Tk, D, dtype=dtype), randn(B, Hkv, Tk, D, dtype=dtype)
    compare(f"attention {case}", reference.causal_attention, attention64, [q, k, v])


@pytest.mark.parametrize("Tq", [1, 4, 10])
def test_causal_attention_custom_scale_noncontiguous(Tq):
    # (B, T, H, D) storage viewed as (B, H, T, D), as a model produces it from one projection.
    q = randn(2, Tq, 4, 8).transpose(1, 2)
    k, v = randn(2, 10, 2, 8).transpose(1, 2), randn(2, 10, 2, 8).transpose(1, 2)
    compare("attention scale", lambda q, k, v: reference.causal_attention(q, k, v, scale=0.7),
            lambda q, k, v: attention64(q, k, v, scale=0.7), [q, k, v])


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3), tq=st.integers(1, 9),
       extra=st.integers(0, 9), d=st.sampled_from([1, 4, 7, 16]))
def test_causal_attention_shapes(b, hkv, group, tq, extra, d):
    q, k, v = randn(b, hkv * group, tq, d), randn(b, hkv, tq + extra, d), randn(b, hkv, tq + extra, d)
    compare("attention", reference.causal_attention, attention64, [q, k, v])


# ----------------------------------------------------------------------------- cross_entropy

def ragged_targets(n: int, vocab: int, ignore_index: int = -100, ignored: int = 3) -> torch.Tensor:
    """Random targets with `ignored` randomly placed rows set to ignore_index."""
    targets = torch.randint(0, vocab, (n,))
    targets[torch.randperm(n)[:ignored]] = ignore_index
    return targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.3, 1e-3)])
def test_cross_entropy(reduction, label_smoothing, z_loss, dtype):
    targets = ragged_targets(11, 37)
    options = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    compare("cross_entropy", lambda x: reference.cross_entropy(x, targets, **options),
            lambda x: cross_entropy64(x, targets, **options), [randn(11, 37, dtype=dtype, scale=2)])


def test_cross_entropy_custom_ignore_index():
    targets = ragged_targets(9, 20, ignore_index=5)  # ignore_index inside the vocabulary
    (loss, grad) = compare("cross_entropy ignore 5", lambda x: reference.cross_entropy(x, targets, ignore_index=5),
                           lambda x: cross_entropy64(x, targets, ignore_index=5), [randn(9, 20)])
    assert not grad[targets == 5].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_large_logits(dtype):
    """Logits far beyond exp's range must not overflow: the loss works from the row maximum."""
    targets = torch.randint(0, 30, (6,))
    loss, grad = compare("cross_entropy large", lambda x: reference.cross_entropy(x, targets, reduction="none"),
                         lambda x: cross_entropy64(x, targets, reduction="none"), [randn(6, 30, dtype=dtype, scale=1e3)])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored(reduction):
    logits = randn(4, 9).requires_grad_()
    loss = reference.cross_entropy(logits, torch.full((4,), -100), reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    assert not torch.isnan(loss).any()
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ----------------------------------------------------------------------------- linear_cross_entropy

N, D, V = 10, 16, 37


def lce_inputs(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [randn(N, D, dtype=dtype), randn(V, D, dtype=dtype, scale=0.3)]


def unfused(hidden, weight, targets, **options):
    return reference.cross_entropy(hidden @ weight.T, targets, **options)


@pytest.mark.parametrize("chunk_size", [None, 1, 4, N, N + 5])  # 4: chunks of 4, 4 and 2 rows
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_chunks(chunk_size, reduction):
    targets = ragged_targets(N, V)
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    inputs = lce_inputs()
    fused = compare("lce", lambda h, w: reference.linear_cross_entropy(h, w, targets, chunk_size=chunk_size, **options),
                    lambda h, w: cross_entropy64(h @ w.T, targets, **options), inputs)
    plain = compare("unfused", lambda h, w: unfused(h, w, targets, **options),
                    lambda h, w: cross_entropy64(h @ w.T, targets, **options), inputs)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), fused, plain):
        within(f"lce vs unfused {name}", a, b, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing, z_loss, ignore_index", [(0.0, 0.0, -100), (0.2, 1e-2, -1)])
def test_linear_cross_entropy_dtypes(dtype, label_smoothing, z_loss, ignore_index):
    targets = ragged_targets(N, V, ignore_index)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)
    loss, grad_hidden, grad_weight = compare(
        "lce", lambda h, w: reference.linear_cross_entropy(h, w, targets, chunk_size=3, **options),
        lambda h, w: cross_entropy64(h @ w.T, targets, **options), lce_inputs(dtype), compute_dtype=dtype)
    assert loss.dtype == torch.float32
    assert not grad_hidden[targets == ignore_index].any()


def test_linear_cross_entropy_all_ignored():
    hidden, weight = (t.requires_grad_() for t in lce_inputs())
    loss = reference.linear_cross_entropy(hidden, weight, torch.full((N,), -100), chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()


def test_linear_cross_entropy_frozen_weight():
    """Only the hidden states need a gradient (a frozen head): no weight gradient is made."""
    targets = torch.randint(0, V, (N,))
    hidden, weight = lce_inputs()
    hidden.requires_grad_()
    reference.linear_cross_entropy(hidden, weight, targets, chunk_size=4).backward()
    h64 = hidden.detach().double().requires_grad_()
    cross_entropy64(h64 @ weight.double().T, targets).backward()
    assert weight.grad is None
    check("lce frozen grad hidden", hidden.grad, h64.grad)


def test_linear_cross_entropy_autocast():
    """bf16 autocast with fp32 parameters, as in training on CPU: the matmuls run in bf16 like the
    unfused composition under autocast, while the loss and the gradients stay float32."""
    targets = ragged_targets(N, V)

    def under_autocast(fn):
        def run(h, w):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(h, w)
        return run

    inputs = lce_inputs()
    exact = lambda h, w: cross_entropy64(h @ w.T, targets)  # noqa: E731
    fused = compare("lce autocast", under_autocast(lambda h, w: reference.linear_cross_entropy(h, w, targets, chunk_size=4)),
                    exact, inputs, compute_dtype=torch.bfloat16)
    plain = compare("unfused autocast", under_autocast(lambda h, w: unfused(h, w, targets)),
                    exact, inputs, compute_dtype=torch.bfloat16)
    assert [t.dtype for t in fused] == [torch.float32] * 3
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), fused, plain):
        within(f"lce vs unfused autocast {name}", a, b, torch.bfloat16)


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_linear_cross_entropy_never_holds_full_logits():
    """Forward saves no (N, V) tensor for backward, and neither pass creates one: the largest
    intermediate is one (chunk, V) block. The unfused composition shows the probes see logits."""
    n, chunk, d = 64, 16, 4  # d small so the (n, d) hidden states are smaller than a logits block
    hidden, weight = randn(n, d).requires_grad_(), randn(V, d).requires_grad_()
    targets = torch.randint(0, V, (n,))

    def run(fn):
        saved, forward_ops, backward_ops = [], LargestOutput(), LargestOutput()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            with forward_ops:
                loss = fn()
        with backward_ops:
            loss.backward()
        return max(saved), forward_ops.largest, backward_ops.largest

    saved, fwd, bwd = run(lambda: reference.linear_cross_entropy(hidden, weight, targets, chunk_size=chunk))
    assert saved < n * V and max(fwd, bwd) <= chunk * V, (saved, fwd, bwd)
    assert min(run(lambda: unfused(hidden, weight, targets))) >= n * V


def test_linear_cross_entropy_default_chunks_stay_under_the_budget():
    """At the default CPU run's shape (4096 rows, vocab 4096) the full fp32 logits (64 MiB) exceed the
    CPU budget, so the default chunking never holds them whole; every device's chunk fits its budget."""
    from tritongpt.kernels import launching
    rows = launching.default_chunk_rows(4096, 4096, torch.device("cpu"), 8)
    assert 8 * rows * 4096 <= launching.LCE_CHUNK_BUDGET_BYTES["cpu"] < 4 * 4096 * 4096 and rows < 4096
    for vocab in (16384, 131072):
        cuda_rows = launching.default_chunk_rows(32768, vocab, torch.device("cuda"), 2)
        assert 2 * cuda_rows * vocab <= launching.LCE_CHUNK_BUDGET_BYTES["cuda"] and cuda_rows >= 1024
    n, d = 4096, 8
    hidden, weight = randn(n, d).requires_grad_(), randn(4096, d).requires_grad_()
    probe = LargestOutput()
    with probe:
        reference.linear_cross_entropy(hidden, weight, torch.randint(0, 4096, (n,))).backward()
    assert probe.largest == rows * 4096
