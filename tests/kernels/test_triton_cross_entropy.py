"""The Triton cross-entropy (kernels/triton_cross_entropy.py) through kernels.cross_entropy.

The loss and the logits gradient are checked with tests.numerics.assert_matches against the op's
definition evaluated in float64 (exact_cross_entropy; the torch backend itself computes in fp32),
with the torch backend in the same dtype as the yardstick. Every triton run also checks that the
caller's logits are unchanged. In the CPU interpreter the kernels run in fp32 and fp16 (the
interpreter truncates on bf16 stores), on a few (N, V) pairs; CUDA adds bf16 and the full grid.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tritongpt import kernels
from tritongpt.kernels import triton_cross_entropy as tce
from numerics import ATOL, CUDA, DEVICE, assert_matches, exact_cross_entropy, make_targets, nan_filled, needs_cuda

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# (N, V): every N of {1, 7, 256} and every V of {17, 1000, 32000, 50257}, paired to fit the
# interpreter's time budget; CUDA runs the whole grid.
SHAPES = (list(itertools.product((1, 7, 256), (17, 1000, 32000, 50257))) if CUDA
          else [(1, 50257), (7, 32000), (256, 1000), (7, 17), (256, 17)])
OPTIONS = [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-4), dict(label_smoothing=0.1, z_loss=1e-4)]


def make_logits(n: int, v: int, dtype: torch.dtype, scale: float = 2.0) -> torch.Tensor:
    return (torch.randn(n, v, device=DEVICE) * scale).to(dtype)


def run(backend: str, logits: torch.Tensor, targets: torch.Tensor, upstream, **kwargs):
    """(loss, dlogits) of one backend; "float64" is exact_cross_entropy on a float64 copy."""
    if backend == "float64":
        leaf = logits.detach().double().requires_grad_()
        loss = exact_cross_entropy(leaf, targets, **kwargs)
    else:
        leaf = logits.detach().requires_grad_()                                  # keeps the strides
        before = leaf.detach().clone()
        with kernels.use(cross_entropy=backend):
            loss = kernels.cross_entropy(leaf, targets, **kwargs)
    grad_out = upstream.to(loss) if isinstance(upstream, torch.Tensor) else torch.full_like(loss, upstream)
    (grad,) = torch.autograd.grad(loss, leaf, grad_out)
    if backend == "triton":
        assert torch.equal(leaf.detach(), before), "the op wrote into the caller's logits"
        assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    return loss.detach(), grad


def compare(logits: torch.Tensor, targets: torch.Tensor, upstream=1.0, **kwargs):
    """Check the triton loss and gradient against float64; return (triton, torch, float64) results."""
    got, ref, exact = (run(b, logits, targets, upstream, **kwargs) for b in ("triton", "torch", "float64"))
    # A reduced loss is an fp32 sum of N per-row losses whose rounding (~eps * |sum|) is the same
    # torch sum on both backends: allow it on top of the usual atol rather than a 2x coin toss.
    atol = None if exact[0].dim() else ATOL[torch.float32] + 8 * torch.finfo(torch.float32).eps * exact[0].abs().item()
    assert_matches("loss", got[0], ref[0], exact[0], atol=atol)
    assert_matches("dlogits", got[1], ref[1], exact[1])
    return got, ref, exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, v", SHAPES)
def test_shapes(n, v, dtype, nan_outputs):
    compare(make_logits(n, v, dtype), make_targets(n, v))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reductions_and_options(dtype, reduction, options, nan_outputs):
    compare(make_logits(37, 3001, dtype), make_targets(37, 3001), reduction=reduction, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_upstream_gradient(dtype, reduction):
    compare(make_logits(19, 700, dtype), make_targets(19, 700), upstream=3.7, reduction=reduction)


def test_per_row_upstream_gradient():
    """reduction="none" with a different upstream gradient per row, as DPO's log-probs see it."""
    compare(make_logits(23, 900, torch.float32), make_targets(23, 900), upstream=torch.randn(23),
            reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(reduction, nan_outputs):
    targets = torch.full((9,), -100, device=DEVICE)
    got, _, _ = compare(make_logits(9, 300, torch.float32), targets, reduction=reduction, z_loss=1e-4)
    loss, grad = got
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


def test_custom_ignore_index():
    """ignore_index = 0, a real class id (a padding token): rows with target 0 are ignored."""
    targets = make_targets(40, 50, ignore_index=0, ignored=0.3)
    got, _, _ = compare(make_logits(40, 50, torch.float32), targets, ignore_index=0, reduction="none")
    ignored = targets == 0
    assert ignored.any() and not got[0][ignored].any() and not got[1][ignored].any()
    assert got[0][~ignored].gt(0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_confident_prediction(dtype):
    """Target logit = row max + 10: 1 - p_t is ~1e-3, and the true-class gradient entry keeps it."""
    n, v = 16, 1000
    logits = make_logits(n, v, torch.float32, scale=1.0)
    targets = torch.randint(0, v, (n,), device=DEVICE)
    logits[torch.arange(n), targets] = logits.max(dim=1).values + 10
    got, ref, exact = compare(logits.to(dtype), targets, reduction="sum")
    true_class = [g[torch.arange(n), targets].double() for g in (got[1], ref[1], exact[1])]
    err, ref_err = ((t - true_class[2]).abs().max().item() for t in true_class[:2])
    assert true_class[2].abs().max() < 1e-2
    assert err <= ref_err, f"true-class gradient error {err:.3e} > torch's {ref_err:.3e}"


def test_non_contiguous_inputs():
    wide = make_logits(12, 520, torch.float32)
    compare(wide[:, 7:507], make_targets(12, 500))                               # strided rows
    compare(make_logits(300, 12, torch.float16).T, make_targets(12, 300))       # column-major
    compare(make_logits(10, 400, torch.float32), make_targets(20, 400)[::2], reduction="none")


def test_kernels_write_every_element():
    """The launchers fill every output element, ignored rows included (NaN-filled buffers)."""
    n, v = 11, 333
    logits, targets = make_logits(n, v, torch.float16), make_targets(n, v, ignored=0.4)
    kept = targets != -100
    losses, lse, grad_target = (nan_filled(n, dtype=torch.float32, device=DEVICE) for _ in range(3))
    grad = nan_filled(n, v, dtype=logits.dtype, device=DEVICE)
    tce.forward(logits, targets, losses, lse, grad_target, -100, 0.1, 1e-4)
    scale = torch.randn(n, device=DEVICE)
    tce.backward(logits, targets, lse, grad_target, scale, grad, -100, 0.1, 1e-4)
    assert losses.isfinite().all() and lse.isfinite().all() and grad_target.isfinite().all()
    assert grad.isfinite().all() and not grad[~kept].any() and not losses[~kept].any()
    # in place over the logits, as the fused linear version runs it: the same gradient
    in_place = logits.clone()
    tce.forward(in_place, targets, losses, lse, grad_target, -100, 0.1, 1e-4, grad=in_place, scale=scale)
    torch.testing.assert_close(in_place, grad, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [1000, -3])
def test_out_of_range_target_names_the_value(bad):
    targets = make_targets(6, 1000)
    targets[4] = bad
    with kernels.use(cross_entropy="triton"), pytest.raises(ValueError, match=f"target id {bad} is outside"):
        kernels.cross_entropy(make_logits(6, 1000, torch.float32), targets)


def test_custom_op_compiles_without_graph_breaks_and_profiles_by_name():
    logits = make_logits(8, 100, torch.float32).requires_grad_()
    targets = make_targets(8, 100)

    def loss_fn(x, t):
        return kernels.cross_entropy(x, t, label_smoothing=0.1) * 2

    with kernels.use(cross_entropy="triton"):
        compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(logits, targets)
        with torch.profiler.profile() as prof:
            eager = loss_fn(logits, targets)
            eager.backward()
    torch.testing.assert_close(compiled, eager)
    (compiled_grad,) = torch.autograd.grad(compiled, logits)
    torch.testing.assert_close(compiled_grad, logits.grad)
    names = {event.name for event in prof.events()}
    assert {"tritongpt::cross_entropy", "tritongpt::cross_entropy_backward"} <= names


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 48), v=st.integers(1, 5000), half=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), label_smoothing=st.sampled_from([0.0, 0.1]),
       z_loss=st.sampled_from([0.0, 1e-4]), ignored=st.floats(0.0, 1.0))
def test_property_shapes(n, v, half, reduction, label_smoothing, z_loss, ignored):
    torch.manual_seed(n * 7919 + v)
    compare(make_logits(n, v, torch.float16 if half else torch.float32), make_targets(n, v, ignored=ignored),
            reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)


@needs_cuda
def test_peak_memory_at_most_half_of_torch_eager():
    """Forward + backward: the logits and their gradient, nothing (N, V)-sized in fp32."""
    logits = make_logits(4096, 32000, torch.bfloat16).requires_grad_()
    targets = make_targets(4096, 32000)
    peaks = {}
    for backend in ("triton", "torch"):
        logits.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with kernels.use(cross_entropy=backend):
            kernels.cross_entropy(logits, targets).backward()
        torch.cuda.synchronize()
        peaks[backend] = torch.cuda.max_memory_allocated()
    assert peaks["triton"] <= 0.5 * peaks["torch"], peaks
