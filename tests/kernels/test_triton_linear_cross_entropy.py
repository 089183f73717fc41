"""The Triton fused linear cross-entropy (kernels/triton_linear_cross_entropy.py).

Loss, grad_hidden and grad_weight through kernels.linear_cross_entropy are checked with
tests.numerics.assert_matches against the float64 composition exact_cross_entropy(h @ w.T), with
the unfused composition in the same dtype (materialised logits + the torch cross-entropy) as the
yardstick, over hidden sizes, chunk sizes (one row, a partial last chunk, larger than N, the
default) and the loss options. CPU runs fp32 and fp16 in the interpreter; CUDA adds bf16.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tritongpt import kernels
from tritongpt.kernels import reference, triton_linear_cross_entropy as tlce
from numerics import ATOL, CUDA, DEVICE, assert_matches, exact_cross_entropy, make_targets, nan_filled, needs_cuda

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype):
    hidden = torch.randn(n, d, device=DEVICE).to(dtype)
    weight = (torch.randn(v, d, device=DEVICE) * 2 / d ** 0.5).to(dtype)
    return hidden, weight


def run(backend: str, hidden, weight, targets, upstream, chunk_size=None, **kwargs):
    """(loss, grad_hidden, grad_weight) of "triton", the unfused "torch" composition or "float64"."""
    leaves = [t.detach().requires_grad_() for t in (hidden, weight)]
    if backend == "triton":
        with kernels.use(linear_cross_entropy="triton"):
            loss = kernels.linear_cross_entropy(*leaves, targets, chunk_size=chunk_size, **kwargs)
    elif backend == "torch":
        loss = reference.cross_entropy(leaves[0] @ leaves[1].T, targets, **kwargs)
    else:
        leaves = [t.double().requires_grad_() for t in leaves]
        loss = exact_cross_entropy(leaves[0] @ leaves[1].T, targets, **kwargs)
    grad_out = upstream.to(loss) if isinstance(upstream, torch.Tensor) else torch.full_like(loss, upstream)
    grads = torch.autograd.grad(loss, leaves, grad_out)
    if backend == "triton":
        assert loss.dtype == torch.float32 and [g.dtype for g in grads] == [hidden.dtype, weight.dtype]
    return (loss.detach(), *grads)


def compare(hidden, weight, targets, upstream=1.0, chunk_size=None, **kwargs) -> None:
    got, ref, exact = (run(b, hidden, weight, targets, upstream, chunk_size, **kwargs)
                       for b in ("triton", "torch", "float64"))
    scale = exact[0].abs().max().item()
    if hidden.dtype == torch.float32:
        # a reduced loss carries the fp32 sum's rounding (see tests/kernels/test_triton_cross_entropy.py's compare)
        atol = ATOL[torch.float32] + (0.0 if exact[0].dim() else 8 * torch.finfo(torch.float32).eps * scale)
    else:
        # the loss is fp32 but only as exact as the logits, rounded to the half compute dtype
        atol = ATOL[hidden.dtype] * max(1.0, scale)
    assert_matches("loss", got[0], ref[0], exact[0], atol=atol)
    assert_matches("grad_hidden", got[1], ref[1], exact[1])
    assert_matches("grad_weight", got[2], ref[2], exact[2])


@pytest.mark.parametrize("chunk_size", [None, 1, 8, 64], ids=["default", "1", "8-partial", "64>N"])
@pytest.mark.parametrize("d", [16, 64, 300])
def test_hidden_sizes_and_chunks(d, chunk_size):
    hidden, weight = make_inputs(37, 1000, d, torch.float32)
    compare(hidden, weight, make_targets(37, 1000), chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, v, d", [(1, 50257, 16), (7, 32000, 64), (256, 1000, 64), (256, 17, 300)])
def test_shapes(n, v, d, dtype, nan_outputs):
    hidden, weight = make_inputs(n, v, d, dtype)
    compare(hidden, weight, make_targets(n, v), chunk_size=100)


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, z_loss=1e-4)], ids=["plain", "ls,z"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reductions_upstream_and_options(dtype, reduction, options, nan_outputs):
    hidden, weight = make_inputs(29, 513, 48, dtype)
    compare(hidden, weight, make_targets(29, 513), upstream=3.7, chunk_size=8, reduction=reduction, **options)


def test_per_row_upstream_gradient():
    """reduction="none" with a different upstream gradient per row (DPO's per-token log-probs)."""
    hidden, weight = make_inputs(41, 300, 32, torch.float32)
    compare(hidden, weight, make_targets(41, 300), upstream=torch.randn(41), chunk_size=16, reduction="none",
            z_loss=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(reduction, nan_outputs):
    hidden, weight = make_inputs(10, 200, 24, torch.float32)
    targets = torch.full((10,), -100, device=DEVICE)
    compare(hidden, weight, targets, chunk_size=4, reduction=reduction)
    loss, grad_hidden, grad_weight = run("triton", hidden, weight, targets, 1.0, 4, reduction=reduction)
    assert not loss.any() and not grad_hidden.any() and not grad_weight.any()


def test_custom_ignore_index():
    hidden, weight = make_inputs(30, 60, 20, torch.float32)
    compare(hidden, weight, make_targets(30, 60, ignore_index=0, ignored=0.3), chunk_size=7, ignore_index=0)


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["hidden-only", "weight-only"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_of_one_input_only(needs, reduction):
    hidden, weight = make_inputs(13, 90, 16, torch.float32)
    targets = make_targets(13, 90)
    leaves = [t.requires_grad_(need) for t, need in zip((hidden, weight), needs)]
    with kernels.use(linear_cross_entropy="triton"):
        loss = kernels.linear_cross_entropy(*leaves, targets, reduction=reduction, chunk_size=5)
    loss.sum().backward()
    expected = run("torch", hidden, weight, targets, 1.0, reduction=reduction)
    for leaf, need, grad in zip(leaves, needs, expected[1:]):
        assert (leaf.grad is not None) == need
        if need:
            torch.testing.assert_close(leaf.grad, grad)


def test_no_grad_forward_matches():
    hidden, weight = make_inputs(20, 150, 16, torch.float32)
    targets = make_targets(20, 150)
    with torch.no_grad(), kernels.use(linear_cross_entropy="triton"):
        loss = kernels.linear_cross_entropy(hidden.requires_grad_(), weight, targets, chunk_size=6)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference.cross_entropy(hidden @ weight.T, targets))


def test_chunk_loop_writes_every_row():
    """The forward launcher fills the NaN-filled per-row buffers and grad_hidden, ignored rows included."""
    n, v, d = 23, 130, 16
    hidden, weight = make_inputs(n, v, d, torch.float16)
    targets = make_targets(n, v, ignored=0.4)
    losses, lse, grad_target = (nan_filled(n, dtype=torch.float32, device=DEVICE) for _ in range(3))
    grad_hidden = nan_filled(n, d, dtype=hidden.dtype, device=DEVICE)
    grad_weight = torch.zeros(v, d, device=DEVICE)
    tlce.forward(hidden, weight, targets, -100, 0.1, 1e-4, 5, torch.float16, torch.ones(1, device=DEVICE),
                 losses, lse, grad_target, grad_hidden, grad_weight)
    for t in (losses, lse, grad_target, grad_hidden, grad_weight):
        assert t.isfinite().all()
    assert not grad_hidden[targets == -100].any()


def test_autocast_bf16_with_fp32_master_weights():
    """bf16 matmuls, fp32 gradients; close to the torch backend under the same autocast."""
    hidden, weight = make_inputs(24, 400, 32, torch.float32)
    targets = make_targets(24, 400)
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.detach().requires_grad_() for t in (hidden, weight)]
        with torch.autocast(DEVICE, dtype=torch.bfloat16), kernels.use(linear_cross_entropy=backend):
            loss = kernels.linear_cross_entropy(*leaves, targets, chunk_size=10)
        loss.backward()
        results.append((loss.detach(), *(leaf.grad for leaf in leaves)))
    assert results[0][0].dtype == torch.float32
    assert [g.dtype for g in results[0][1:]] == [torch.float32, torch.float32]
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("bad", [400, -7])
def test_out_of_range_target_names_the_value(bad):
    hidden, weight = make_inputs(5, 400, 16, torch.float32)
    targets = make_targets(5, 400)
    targets[2] = bad
    with kernels.use(linear_cross_entropy="triton"), pytest.raises(ValueError, match=f"target id {bad} is outside"):
        kernels.linear_cross_entropy(hidden, weight, targets)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_custom_op_compiles_without_graph_breaks(reduction):
    hidden, weight = (t.requires_grad_() for t in make_inputs(12, 70, 16, torch.float32))
    targets = make_targets(12, 70)

    def loss_fn(h, w, t):
        return kernels.linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=5).sum()

    with kernels.use(linear_cross_entropy="triton"):
        compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(hidden, weight, targets)
        eager = loss_fn(hidden, weight, targets)
    torch.testing.assert_close(compiled, eager)
    for got, expected in zip(torch.autograd.grad(compiled, (hidden, weight)),
                             torch.autograd.grad(eager, (hidden, weight))):
        torch.testing.assert_close(got, expected)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 40), v=st.integers(1, 700), d=st.integers(1, 80), chunk_size=st.one_of(st.none(),
       st.integers(1, 50)), half=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]),
       ignored=st.floats(0.0, 1.0))
def test_property_shapes(n, v, d, chunk_size, half, reduction, ignored):
    torch.manual_seed(n * 7919 + v * 31 + d)
    hidden, weight = make_inputs(n, v, d, torch.float16 if half else torch.float32)
    compare(hidden, weight, make_targets(n, v, ignored=ignored), chunk_size=chunk_size, reduction=reduction)


@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_peak_memory_at_most_a_fifth_of_unfused(reduction):
    """The (N, V) logits never exist: peak memory against materialised logits + cross-entropy."""
    hidden, weight = (t.requires_grad_() for t in make_inputs(8192, 32000, 1024, torch.bfloat16))
    targets = make_targets(8192, 32000)
    peaks = {}
    for backend in ("triton", "torch"):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if backend == "triton":
            with kernels.use(linear_cross_entropy="triton"):
                loss = kernels.linear_cross_entropy(hidden, weight, targets, reduction=reduction)
        else:
            loss = reference.cross_entropy(hidden @ weight.T, targets, reduction=reduction)
        loss.sum().backward()
        torch.cuda.synchronize()
        peaks[backend] = torch.cuda.max_memory_allocated()
    assert peaks["triton"] <= 0.2 * peaks["torch"], peaks
