"""NaN in, NaN out, on both real backends (triton runs in the interpreter on CPU): each test puts
one NaN into one input, runs forward and a backward pass with upstream gradient 1, and states where
NaN must appear in the outputs and gradients, and where it must not (the rules are in
kernels/__init__.py)."""
from __future__ import annotations

import pytest
import torch

from tritongpt import kernels
from numerics import DEVICE

NAN = float("nan")
both_backends = pytest.mark.parametrize("backend", ["torch", "triton"])
quiet_nan = pytest.mark.filterwarnings(  # the interpreter computes in numpy, which warns about NaN
    "ignore:invalid value encountered:RuntimeWarning", "ignore:All-NaN slice encountered:RuntimeWarning")


def poisoned(shapes: dict[str, tuple], name: str, index: tuple, dtype: torch.dtype = torch.float32) -> dict:
    """Seeded normal leaves that require grad, one per shape, with a NaN at leaves[name][index]."""
    generator = torch.Generator().manual_seed(0)
    leaves = {n: torch.randn(shape, generator=generator).to(dtype) for n, shape in shapes.items()}
    leaves[name][index] = NAN
    return {n: t.to(DEVICE).requires_grad_() for n, t in leaves.items()}


def run_nan(op: str, backend: str, args: list, kwargs: dict, leaves: dict) -> tuple[list[torch.Tensor], dict]:
    """isnan (on the CPU) of each output of op(*args, **kwargs) on backend, and of each leaf's gradient."""
    with kernels.use(**{op: backend}):
        outs = getattr(kernels, op)(*args, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return [o.detach().isnan().cpu() for o in outs], {n: t.grad.isnan().cpu() for n, t in leaves.items()}


def where(shape: tuple, *indices) -> torch.Tensor:
    """A bool mask of shape: True at each index (slices allowed, ... for everything), else False."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for index in indices:
        mask[index] = True
    return mask


def assert_nan_at(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(got, expected), f"{name}: NaN at {got.nonzero().tolist()}, expected at {expected.nonzero().tolist()}"


@quiet_nan
@both_backends
@pytest.mark.parametrize("source, residual", [("x", False), ("weight", False), ("x", True), ("weight", True),
                                              ("residual", True)])
def test_rms_norm_propagates_nan(source, residual, backend):
    M, D, r, c = 3, 37, 1, 5
    shapes = {"x": (M, D), "weight": (D,), **({"residual": (M, D)} if residual else {})}
    leaves = poisoned(shapes, source, (c,) if source == "weight" else (r, c))
    kwargs = {"residual": leaves["residual"]} if residual else {}
    outs, grads = run_nan("rms_norm", backend, [leaves["x"], leaves["weight"]], kwargs, leaves)
    if source == "weight":  # column c of y; all of dx (mean(g * xhat) mixes the columns); dw does not read w
        y, h, dx, dw = where((M, D), (slice(None), c)), where((M, D)), where((M, D), ...), where((D,))
    else:                   # row r of y (its rms is NaN) and one element of h; row r of dx (= dresidual), all of dw
        y, h, dx, dw = where((M, D), r), where((M, D), (r, c)), where((M, D), r), where((D,), ...)
    for name, got, expected in zip(("y", "h"), outs, (y, h)):
        assert_nan_at(name, got, expected)
    for name, expected in {"x": dx, "weight": dw, "residual": dx}.items():
        if name in grads:
            assert_nan_at(f"grad of {name}", grads[name], expected)


@quiet_nan
@both_backends
@pytest.mark.parametrize("source", ["gate", "up"])
def test_swiglu_propagates_nan(source, backend):
    shape, at = (3, 37), (1, 5)
    leaves = poisoned({"gate": shape, "up": shape}, source, at)
    (out,), grads = run_nan("swiglu", backend, list(leaves.values()), {}, leaves)
    assert_nan_at("out", out, where(shape, at))
    assert_nan_at("grad of gate", grads["gate"], where(shape, at))
    # dup = dout * silu(gate): NaN only where the gate is
    assert_nan_at("grad of up", grads["up"], where(shape, at) if source == "gate" else where(shape))


# (Tq, Tk). SDPA's CPU kernel lost NaN only for rows of keys shorter than a SIMD vector: most are short.
ATTENTION_MODES = {"causal": (7, 7), "decode": (1, 7), "chunked_prefill": (3, 7), "causal_two_key_tiles": (20, 20)}


@quiet_nan
@both_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ATTENTION_MODES)
@pytest.mark.parametrize("source, head, position", [
    ("q", 1, 0), ("q", 3, -1),          # query rows: the first and the last
    ("k", 0, 0),                        # key 0, which every query attends
    ("k", 1, -2), ("v", 1, -2),         # the last key but one: the last query (and, in decode, every query) attends it
])
def test_causal_attention_propagates_nan(source, head, position, mode, dtype, backend):
    """Output row i is NaN when q row i, or k or v at a key it attends, holds a NaN; whether a key
    it does not attend reaches it is not specified (see kernels.causal_attention), and the KV
    group of other heads never sees the NaN. Gradients hold NaN too, except dv for a NaN in v."""
    (Tq, Tk), B, Hq, Hkv, D = ATTENTION_MODES[mode], 1, 4, 2, 8
    group = Hq // Hkv
    leaves = poisoned({"q": (B, Hq, Tq, D), "k": (B, Hkv, Tk, D), "v": (B, Hkv, Tk, D)}, source,
                      (0, head, position, 3), dtype)
    (out,), grads = run_nan("causal_attention", backend, list(leaves.values()), {}, leaves)
    nan_rows = out.any(-1)[0]                                                   # (Hq, Tq)
    kv_head = head // group if source == "q" else head
    own = torch.arange(Hq) // group == kv_head                                 # query heads of that KV group
    if source == "q":
        assert_nan_at("out rows", nan_rows, where((Hq, Tq), (head, position)))
    else:
        attends = torch.arange(Tq) + (Tk - Tq) >= position % Tk                 # (Tq,) queries that see the key
        assert nan_rows[own][:, attends].all(), f"rows attending the NaN are not all NaN: {nan_rows.int().tolist()}"
        assert not nan_rows[~own].any(), f"NaN reached another KV group: {nan_rows.int().tolist()}"
    for name, grad in grads.items():
        heads = own if name == "q" else torch.arange(Hkv) == kv_head
        assert not grad[0, ~heads].any(), f"grad of {name}: NaN reached another KV group"
        depends = not (name == "v" and source == "v")                          # dv = P^T dO does not read v
        assert grad[0, heads].any() == depends, f"grad of {name}: NaN {'missing' if depends else 'unexpected'}"


CE_N, CE_V = 5, 37
CE_TARGETS = [0, 36, 3, -100, 9]                 # row 3 is ignored


@quiet_nan
@both_backends
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1, z_loss=1e-3)], ids=["plain", "smoothing_zloss"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("at", [(1, 5), (1, 36), (3, 5)], ids=["kept_row", "target_logit", "ignored_row"])
def test_cross_entropy_propagates_nan(at, reduction, options, backend):
    """A NaN logit in a kept row: that row's loss and gradient, and the sum and mean, are NaN. An
    ignored row is never read: its NaN changes nothing, its gradient stays exactly 0."""
    targets = torch.tensor(CE_TARGETS, device=DEVICE)
    leaves = poisoned({"logits": (CE_N, CE_V)}, "logits", at)
    args, kwargs = [leaves["logits"], targets], dict(reduction=reduction, **options)
    (loss,), grads = run_nan("cross_entropy", backend, args, kwargs, leaves)
    row, ignored = at[0], CE_TARGETS[at[0]] == -100
    expected = where(loss.shape) if ignored else where(loss.shape, row if reduction == "none" else ...)
    assert_nan_at("loss", loss, expected)
    assert_nan_at("grad of logits", grads["logits"], where((CE_N, CE_V), *([] if ignored else [row])))
    if ignored:  # exactly what the same rows give with a finite logit there
        assert not leaves["logits"].grad[row].any()
        clean = leaves["logits"].detach().clone()
        clean[at] = 0.0
        with kernels.use(cross_entropy=backend):
            torch.testing.assert_close(kernels.cross_entropy(leaves["logits"].detach(), targets, **kwargs),
                                       kernels.cross_entropy(clean, targets, **kwargs), rtol=0, atol=0)


@quiet_nan
@both_backends
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("source, at", [("hidden", (1, 5)), ("hidden", (3, 5)), ("weight", (9, 5))],
                         ids=["hidden_kept_row", "hidden_ignored_row", "weight"])
def test_linear_cross_entropy_propagates_nan(source, at, reduction, backend):
    """As cross_entropy on the logits hidden @ weight.T: a NaN hidden state of a kept row reaches
    its loss, its grad_hidden row and all of grad_weight; one of an ignored row only reaches the
    grad_weight column it multiplies (0 * NaN); a NaN weight reaches every kept row's loss and
    every grad_hidden row, an ignored row's in the weight's column only."""
    D = 16
    targets = torch.tensor(CE_TARGETS, device=DEVICE)
    leaves = poisoned({"hidden": (CE_N, D), "weight": (CE_V, D)}, source, at)
    args = [leaves["hidden"], leaves["weight"], targets]
    (loss,), grads = run_nan("linear_cross_entropy", backend, args, dict(reduction=reduction, chunk_size=2), leaves)
    kept = torch.tensor(CE_TARGETS) != -100
    column = (slice(None), at[1])
    if source == "weight":
        losses, grad_hidden, grad_weight = kept, where((CE_N, D), column) | kept[:, None], where((CE_V, D), ...)
    elif kept[at[0]]:
        losses, grad_hidden, grad_weight = where((CE_N,), at[0]), where((CE_N, D), at[0]), where((CE_V, D), ...)
    else:
        losses, grad_hidden, grad_weight = where((CE_N,)), where((CE_N, D)), where((CE_V, D), column)
    assert_nan_at("loss", loss, losses if reduction == "none" else losses.any())
    assert_nan_at("grad of hidden", grads["hidden"], grad_hidden)
    assert_nan_at("grad of weight", grads["weight"], grad_weight)
