"""The Triton RoPE (kernels/triton_rotary.py) through kernels.rotary, against float64.

Both outputs and both gradients are checked with tests.numerics.assert_matches (twice the torch
backend's error in the same dtype, plus atol). fp32 and fp16 run in the CPU interpreter; bf16
runs on CUDA only (the interpreter rounds bf16 by truncation), and so do the LLM-sized shapes.
Inputs are, as in the model, strided views of a fused qkv projection, with the model's own
tables (rope_tables) sliced to T or indexed per row; also: the rotation convention itself, odd
shapes (D/2 not a power of 2, more heads than one tile), T = 1, NaN propagation, the custom ops
under torch.compile, the input checks, and the model training alike on both backends.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tritongpt import kernels
from tritongpt.kernels import reference
from model import GPT, ModelConfig
from model.gpt import rope_tables
from numerics import DEVICE, assert_matches, cpu_randn, needs_cuda, randn

# (B, T, Hq, Hkv, D)
SHAPES = [(1, 1, 1, 1, 2), (2, 5, 4, 2, 16), (3, 7, 6, 3, 80), (2, 9, 8, 8, 64), (1, 3, 40, 8, 128)]
CUDA_SHAPES = [(4, 4096, 32, 8, 128), (2, 2048, 32, 32, 128), (64, 1, 32, 8, 128), (3, 333, 12, 4, 96)]


def tables(D: int, T: int, positions: torch.Tensor | None = None, theta: float = 10000.0,
           block_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's tables (rope_tables) on DEVICE: rows 0..T-1 (T, 1, D), or the rows at
    positions (B, T) -> (B, T, 1, D)."""
    cfg = ModelConfig(vocab_size=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=D, block_size=block_size,
                      rope_theta=theta)
    cos, sin = (t.to(DEVICE) for t in rope_tables(cfg))
    where = slice(0, T) if positions is None else positions
    return cos[where], sin[where]


def fused_qk(B: int, T: int, Hq: int, Hkv: int, D: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k as the model has them: views of a fused (B, T, Hq + 2 Hkv, D) projection."""
    qkv = randn(B, T, Hq + 2 * Hkv, D, dtype=dtype)
    q, k, _ = qkv.split([Hq, Hkv, Hkv], dim=2)
    return q, k


def run(backend: str, q, k, cos, sin, grads) -> list[torch.Tensor]:
    """[q_rot, k_rot, dq, dk] of one backend; "float64" is the reference on float64 copies."""
    if backend == "float64":
        leaves = [t.detach().double().requires_grad_() for t in (q, k)]
        fn = reference.rotary
    else:
        leaves = [t.detach().requires_grad_() for t in (q, k)]        # detach keeps the strides
        fn = kernels.rotary
    with kernels.use(rotary="torch" if backend == "float64" else backend):
        outs = fn(*leaves, cos, sin)
        torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])
    return [outs[0].detach(), outs[1].detach(), leaves[0].grad, leaves[1].grad]


def compare(q, k, cos, sin, grads=None) -> list[torch.Tensor]:
    """Check the triton outputs and gradients against float64; return them."""
    grads = [randn(*q.shape), randn(*k.shape)] if grads is None else grads
    got, ref, exact = (run(backend, q, k, cos, sin, grads) for backend in ("triton", "torch", "float64"))
    for name, out, r, e, x in zip(("q_rot", "k_rot", "dq", "dk"), got, ref, exact, (q, k, q, k)):
        assert out.dtype == x.dtype
        assert_matches(name, out, r, e)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    return got


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(nan_outputs, shape):
    B, T, Hq, Hkv, D = shape
    compare(*fused_qk(*shape), *tables(D, T))


def test_contiguous_and_transposed_inputs_and_grads(nan_outputs):
    B, T, Hq, Hkv, D = 2, 6, 4, 2, 32
    q = randn(B, Hq, T, D).transpose(1, 2)                       # (B, T, Hq, D) in (B, H, T, D) memory
    k = randn(B, T, Hkv, D)
    grads = [randn(B, T, D, Hq).transpose(2, 3), randn(T, B, Hkv, D).transpose(0, 1)]
    compare(q, k, *tables(D, T), grads)


def test_strided_head_columns(nan_outputs):
    """Every other column of a wider tensor: the column stride is not 1."""
    B, T, Hq, Hkv, D = 2, 3, 3, 1, 12
    compare(randn(B, T, Hq, 2 * D)[..., ::2], randn(B, T, Hkv, 2 * D)[..., 1::2], *tables(D, T))


def test_per_row_tables(nan_outputs):
    """(B, T, 1, D) tables: each sequence at its own positions (a cache of rows at different lengths)."""
    B, T, Hq, Hkv, D = 3, 4, 4, 2, 32
    positions = torch.tensor([[0, 1, 2, 3], [7, 8, 9, 10], [100, 101, 102, 103]], device=DEVICE)
    cos, sin = tables(D, T, positions)
    assert cos.shape == (B, T, 1, D)
    got = compare(*fused_qk(B, T, Hq, Hkv, D), cos, sin)
    # Row 0 at positions 0..3 is rotated like the shared (T, 1, D) table does.
    q, k = fused_qk(B, T, Hq, Hkv, D)
    with kernels.use(rotary="triton"):
        shared, per_row = kernels.rotary(q, k, *tables(D, T)), kernels.rotary(q, k, cos, sin)
    torch.testing.assert_close(per_row[0][0], shared[0][0], rtol=0, atol=0)
    assert not torch.equal(per_row[0][1], shared[0][1])
    assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_single_position_decode_step(nan_outputs, per_row):
    B, Hq, Hkv, D = 4, 8, 2, 64
    positions = torch.tensor([[5], [0], [300], [77]], device=DEVICE) if per_row else None
    cos, sin = tables(D, 1, positions)
    compare(*fused_qk(B, 1, Hq, Hkv, D), cos, sin)


@pytest.mark.parametrize("Hq, Hkv", [(8, 8), (8, 1), (12, 4)])
def test_grouped_query_heads(nan_outputs, Hq, Hkv):
    compare(*fused_qk(2, 5, Hq, Hkv, 16), *tables(16, 5))


def test_any_tables_give_the_three_op_formula(nan_outputs):
    """The kernels compute x * cos + roll(x, D/2) * sin for any tables, not only rope_tables'."""
    B, T, Hq, Hkv, D = 2, 5, 3, 1, 10
    compare(*fused_qk(B, T, Hq, Hkv, D), randn(T, 1, D), randn(T, 1, D))
    compare(*fused_qk(B, T, Hq, Hkv, D), randn(B, T, 1, D), randn(B, T, 1, D))


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)], ids=str)
def test_half_precision(nan_outputs, dtype):
    B, T, Hq, Hkv, D = 2, 7, 6, 2, 48
    compare(*fused_qk(B, T, Hq, Hkv, D, dtype=dtype), *tables(D, T, theta=500000.0))


def test_half_precision_tables_are_read_in_fp32(nan_outputs):
    """A model cast to fp16 casts its tables too: both backends use the rounded table values alike."""
    q, k = fused_qk(2, 4, 4, 2, 16)
    cos, sin = (t.half() for t in tables(16, 4))
    with kernels.use(rotary="triton"):
        got = kernels.rotary(q, k, cos, sin)
    with kernels.use(rotary="torch"):
        ref = kernels.rotary(q, k, cos, sin)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_torch_backend_without_autograd(dtype, per_row):
    """The torch backend's no-grad path (both tensors through each _foreach op, for decoding)
    gives what its autograd path gives: values, dtype, contiguity, NaN."""
    B, T, Hq, Hkv, D = 2, 3, 4, 2, 16
    positions = torch.tensor([[3, 4, 5], [0, 1, 2]], device=DEVICE) if per_row else None
    cos, sin = tables(D, T, positions)
    q = randn(B, Hq, T, D).to(dtype).transpose(1, 2)            # not in (B, T, H, D) memory order
    k = fused_qk(B, T, Hkv, Hkv, D)[1].to(dtype)
    q[1, 2, 3, 5] = float("nan")
    with torch.no_grad():
        plain = reference.rotary(q, k, cos, sin)
    with torch.enable_grad():
        grad = reference.rotary(q.requires_grad_(), k, cos, sin)
    for p, g in zip(plain, grad):
        assert p.dtype == dtype and p.is_contiguous() and p.shape == g.shape
        torch.testing.assert_close(p, g.detach(), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(plain[0]).sum() == 2 and not torch.isnan(plain[1]).any()


def test_rotation_convention(nan_outputs):
    """With rope_tables, head vector halves (x1, x2) at position p become (x1 cos - x2 sin,
    x2 cos + x1 sin) with angle p * theta^(-2i/D): complex multiplication by e^(i angle) of
    x1 + i x2; the backward of a rotation is its inverse, so it maps the output back to the input."""
    B, T, Hq, Hkv, D = 2, 6, 2, 1, 16
    q, k = fused_qk(B, T, Hq, Hkv, D)
    cos, sin = tables(D, T)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)   # (T, D/2)
    with kernels.use(rotary="triton"):
        q_rot, k_rot = kernels.rotary(q, k, cos, sin)
        for x, x_rot in ((q, q_rot), (k, k_rot)):
            x64 = x.double().cpu()
            expected = torch.view_as_real(torch.complex(x64[..., :D // 2], x64[..., D // 2:])
                                          * torch.polar(torch.ones_like(angles), angles)[:, None])
            torch.testing.assert_close(x_rot.double().cpu(), torch.cat((expected[..., 0], expected[..., 1]), -1),
                                       rtol=1e-5, atol=1e-5)
        leaves = [t.detach().requires_grad_() for t in (q, k)]
        outs = kernels.rotary(*leaves, cos, sin)
        torch.autograd.backward(outs, [q_rot, k_rot])
    torch.testing.assert_close(leaves[0].grad, q.contiguous(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaves[1].grad, k.contiguous(), rtol=1e-5, atol=1e-5)


def test_empty(nan_outputs):
    cos, sin = tables(8, 0)
    for B, T in ((0, 3), (2, 0)):
        cos, sin = tables(8, T)
        q = torch.ones(B, T, 2, 8, device=DEVICE, requires_grad=True)
        k = torch.ones(B, T, 1, 8, device=DEVICE, requires_grad=True)
        with kernels.use(rotary="triton"):
            q_rot, k_rot = kernels.rotary(q, k, cos, sin)
            (q_rot.sum() + k_rot.sum()).backward()
        assert q_rot.shape == q.shape and k_rot.shape == k.shape and q.grad.shape == q.shape


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 9), Hq=st.integers(1, 9), groups=st.integers(1, 3),
       half=st.integers(1, 40), per_row=st.booleans())
def test_property_shapes(B, T, Hq, groups, half, per_row):
    torch.manual_seed(0)            # inputs depend only on the example, so a failure replays
    Hkv = max(1, Hq // groups)
    positions = torch.randint(0, 512, (B, T), device=DEVICE) if per_row else None
    compare(*fused_qk(B, T, Hq, Hkv, 2 * half), *tables(2 * half, T, positions))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + CUDA_SHAPES, ids=str)
def test_all_shapes_and_dtypes_on_cuda(shape, dtype):
    B, T, Hq, Hkv, D = shape
    positions = torch.randint(0, 8192, (B, T), device=DEVICE)
    compare(*fused_qk(*shape, dtype=dtype), *tables(D, T, block_size=8192))
    compare(*fused_qk(*shape, dtype=dtype), *tables(D, T, positions, block_size=8192))


# ----------------------------------------------------------------------------- NaN

def expected_nan(shape: tuple, where: tuple) -> torch.Tensor:
    """The (B, T, H, D) NaN mask of a rotation whose input has a NaN at where = (b, t, h, j):
    output columns j and (j + D/2) % D of that head."""
    mask = torch.zeros(shape, dtype=torch.bool)
    b, t, h, j = where
    D = shape[-1]
    mask[b, t, h, j] = mask[b, t, h, (j + D // 2) % D] = True
    return mask


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("source", ["q", "k", "cos", "sin", "dq_rot"])
def test_nan_propagates_alike(backend, source):
    """A NaN in q (or the gradient of q_rot) at column j of a head reaches columns j and j +- D/2
    of that head's output (gradient); one in a table's row t those columns of every head of
    token t, in both outputs and in both gradients (sin: the gradient's partner column)."""
    B, T, Hq, Hkv, D, t, j = 2, 4, 3, 2, 8, 2, 1
    q, k = fused_qk(B, T, Hq, Hkv, D)
    cos, sin = (x.clone() for x in tables(D, T))
    grads = [randn(B, T, Hq, D), randn(B, T, Hkv, D)]
    poisoned = {"q": q, "k": k, "cos": cos, "sin": sin, "dq_rot": grads[0]}[source]
    if source in ("cos", "sin"):
        poisoned[t, 0, j] = float("nan")
    else:
        poisoned[1, t, 1, j] = float("nan")
    leaves = [x.detach().requires_grad_() for x in (q, k)]
    with kernels.use(rotary=backend):
        outs = kernels.rotary(*leaves, cos, sin)
        torch.autograd.backward(outs, grads)
    got = [torch.isnan(x).cpu() for x in (*outs, leaves[0].grad, leaves[1].grad)]
    none_q, none_k = torch.zeros(B, T, Hq, D, dtype=torch.bool), torch.zeros(B, T, Hkv, D, dtype=torch.bool)
    if source == "q":
        expected = [expected_nan(q.shape, (1, t, 1, j)), none_k, none_q, none_k]
    elif source == "k":
        expected = [none_q, expected_nan(k.shape, (1, t, 1, j)), none_q, none_k]
    elif source == "dq_rot":
        expected = [none_q, none_k, expected_nan(q.shape, (1, t, 1, j)), none_k]
    else:
        column = j if source == "cos" else (j + D // 2) % D       # dx = dy * cos + roll(dy * sin)
        expected = []
        for grad, shape in ((False, q.shape), (False, k.shape), (True, q.shape), (True, k.shape)):
            mask = torch.zeros(shape, dtype=torch.bool)
            mask[:, t, :, column if grad else j] = True
            expected.append(mask)
    for name, g, e in zip(("q_rot", "k_rot", "dq", "dk"), got, expected):
        assert torch.equal(g, e), f"{name}: NaN at {g.nonzero().tolist()}, expected at {e.nonzero().tolist()}"


# ----------------------------------------------------------------------------- custom ops

def test_registered_custom_ops():
    q, k = (t.detach().requires_grad_() for t in fused_qk(2, 3, 4, 2, 16))
    cos, sin = tables(16, 3)
    torch.library.opcheck(torch.ops.tritongpt.rotary.default, (q, k, cos, sin))
    torch.library.opcheck(torch.ops.tritongpt.rotary_backward.default, (randn(2, 3, 4, 16), randn(2, 3, 2, 16),
                                                                          cos, sin))
    with kernels.use(rotary="triton"):
        q_rot, k_rot = torch.compile(kernels.rotary, backend="aot_eager", fullgraph=True)(q, k, cos, sin)
    (q_rot.sum() + k_rot.sum()).backward()
    assert q.grad is not None and k.grad is not None


# ----------------------------------------------------------------------------- input checks

cq, ck = cpu_randn(2, 5, 4, 8), cpu_randn(2, 5, 2, 8)
ccos, csin = cpu_randn(5, 1, 8), cpu_randn(5, 1, 8)


@pytest.mark.parametrize("make_args, message", [
    (lambda: (cq[0], ck, ccos, csin), r"q has shape \(5, 4, 8\); expected 4 dims \(batch, time, heads, head_dim\): "
                                      r"rotate the \(B, T, H, D\) views of the projection, before any transpose"),
    (lambda: (cq, ck[None], ccos, csin), r"k has shape \(1, 2, 5, 2, 8\); expected 4 dims"),
    (lambda: (cq, cpu_randn(3, 5, 2, 8), ccos, csin),
     r"q \(2, 5, 4, 8\) and k \(3, 5, 2, 8\) must share batch, time and head_dim \(only the head counts may differ\)"),
    (lambda: (cq, cpu_randn(2, 6, 2, 8), ccos, csin), r"q \(2, 5, 4, 8\) and k \(2, 6, 2, 8\) must share batch, time"),
    (lambda: (cq, cpu_randn(2, 5, 2, 6), ccos, csin), r"must share batch, time and head_dim"),
    (lambda: (cpu_randn(2, 5, 4, 7), cpu_randn(2, 5, 2, 7), cpu_randn(5, 1, 7), cpu_randn(5, 1, 7)),
     r"head_dim is 7; rotary rotates the two halves of each head vector, so it must be even and > 0"),
    (lambda: (cq.long(), ck, ccos, csin), r"q has dtype torch.int64; expected one of float32, float16, bfloat16"),
    (lambda: (cq, ck.half(), ccos, csin), r"mismatched dtypes: q torch.float32, k torch.float16; convert them"),
    (lambda: (cq, ck, ccos.double(), csin), r"cos has dtype torch.float64"),
    (lambda: (cq, ck, ccos, csin.half()), r"mismatched dtypes: cos torch.float32, sin torch.float16"),
    (lambda: (cq, ck, cpu_randn(6, 1, 8), csin),
     r"cos has shape \(6, 1, 8\); expected \(5, 1, 8\) or, per row, \(2, 5, 1, 8\) for q \(2, 5, 4, 8\): "
     r"the table's rows at the T positions \(table\[:T\], or table\[positions\] for \(B, T\) positions\)"),
    (lambda: (cq, ck, ccos, cpu_randn(5, 8)), r"sin has shape \(5, 8\); expected \(5, 1, 8\) or, per row"),
    (lambda: (cq, ck, ccos, cpu_randn(3, 5, 1, 8)), r"sin has shape \(3, 5, 1, 8\); expected"),
    (lambda: (cq, ck, ccos, cpu_randn(2, 5, 1, 8)),
     r"cos has shape \(5, 1, 8\) but sin has \(2, 5, 1, 8\); index both tables at the same positions"),
    (lambda: (cq, ck, cpu_randn(5, 1, 8).requires_grad_(), csin),
     r"cos requires grad; rotary's tables are constants that get no gradient: pass cos.detach\(\)"),
    (lambda: (cq, ck, ccos, cpu_randn(5, 1, 8, device="meta")),
     r"mismatched devices: q cpu, k cpu, cos cpu, sin meta; convert them to one device"),
    (lambda: (cq, cpu_randn(2, 5, 2, 8, device="meta"), ccos, csin), r"mismatched devices: q cpu, k meta"),
], ids=["q 3d", "k 5d", "batch", "time", "head_dim", "odd D", "int q", "q k dtypes", "float64 table",
        "table dtypes", "table T", "table 2d", "table batch", "cos sin shapes", "table grad", "table device",
        "k device"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_name_the_problem(make_args, message, backend):
    args = make_args()
    with kernels.use(rotary=backend), pytest.raises(ValueError, match=message):
        kernels.rotary(*args)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        kernels.rotary([1.0], ck, ccos, csin)


# ----------------------------------------------------------------------------- the model

def test_model_trains_like_the_torch_backend():
    """A few AdamW steps of a small GQA model: the Triton RoPE gives the torch losses and logits."""
    cfg = ModelConfig.preset("tiny", vocab_size=64, n_layer=2, n_embd=64, block_size=32)
    idx = torch.randint(0, 64, (2, 16), device=DEVICE)
    targets = torch.roll(idx, -1, dims=1)
    losses, logits = {}, {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = GPT(cfg).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[backend] = []
        with kernels.use(rotary=backend):
            for _ in range(4):
                loss = model(idx, targets=targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[backend].append(loss.item())
            with torch.no_grad():
                logits[backend] = model(idx)
    assert losses["triton"][-1] < losses["triton"][0]
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)
    assert math.isfinite(losses["triton"][-1])
