"""kernels/triton_attention.py (causal, padded batches) against float64, within the error the reference itself makes
in the same dtype (numerics.assert_matches).

Runs in the Triton interpreter on CPU (fp32, fp16) and on CUDA when present (bf16 too). The
kernels write into NaN-filled buffers so a skipped element fails; the public op is checked
through kernels.causal_attention with autograd, torch.library.opcheck and torch.compile.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tritongpt import kernels
from tritongpt.kernels import reference
from tritongpt.kernels import triton_attention as tca
from tritongpt.kernels.launching import Gpu
from numerics import CUDA, DEVICE, assert_matches, nan_filled, needs_cuda

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)]
LAYOUTS = ("contiguous", "projection", "cache")


def make_inputs(B: int, Hq: int, Hkv: int, Tq: int, Tk: int, D: int, layout: str, dtype: torch.dtype):
    """q (B, Hq, Tq, D), k, v (B, Hkv, Tk, D) laid out as the model produces them.

    contiguous: fresh tensors. projection: heads split from one fused (B, T, (Hq + 2 Hkv) * D)
    projection and transposed, as model/gpt.py does. cache: q from a projection, k and v the first
    Tk positions of a longer preallocated KV-cache buffer.
    """
    torch.manual_seed(0)
    if layout == "contiguous":
        return (torch.randn(B, Hq, Tq, D, dtype=dtype, device=DEVICE),
                torch.randn(B, Hkv, Tk, D, dtype=dtype, device=DEVICE),
                torch.randn(B, Hkv, Tk, D, dtype=dtype, device=DEVICE))
    if layout == "projection":
        assert Tq == Tk, "a fused projection gives as many queries as keys"
        fused = torch.randn(B, Tq, Hq + 2 * Hkv, D, dtype=dtype, device=DEVICE)   # (B, T, H_all, D)
        return fused.transpose(1, 2).split([Hq, Hkv, Hkv], dim=1)
    q = torch.randn(B, Tq, Hq, D, dtype=dtype, device=DEVICE).transpose(1, 2)      # (B, Hq, Tq, D) view
    k_buf, v_buf = torch.randn(2, B, Hkv, Tk + 13, D, dtype=dtype, device=DEVICE)  # cache with spare room
    return q, k_buf[:, :, :Tk], v_buf[:, :, :Tk]


def reference_grads(q, k, v, do, scale, dtype):
    """Output and (dq, dk, dv) of the torch reference computed in dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = reference.causal_attention(*leaves, scale)
    return out, torch.autograd.grad(out, leaves, do.to(dtype))


def check_kernels(B, Hq, Hkv, Tq, Tk, D, layout, dtype, scale=None) -> None:
    q, k, v = make_inputs(B, Hq, Hkv, Tq, Tk, D, layout, dtype)
    do = torch.randn(B, Hq, Tq, D, dtype=dtype, device=DEVICE)
    sm_scale = D ** -0.5 if scale is None else scale
    o = nan_filled(B, Tq, Hq, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    lse = nan_filled(B, Hq, Tq, dtype=torch.float32, device=DEVICE)
    tca.forward(q, k, v, sm_scale, o, lse)
    dq = nan_filled(B, Hq, Tq, D, dtype=dtype, device=DEVICE)
    dk, dv = (nan_filled(B, Hkv, Tk, D, dtype=dtype, device=DEVICE) for _ in range(2))
    tca.backward(do, q, k, v, o, lse, sm_scale, dq, dk, dv)

    exact_out, exact_grads = reference_grads(q, k, v, do, scale, torch.float64)
    ref_out, ref_grads = reference_grads(q, k, v, do, scale, dtype)
    assert_matches("out", o, ref_out, exact_out)
    for name, got, ref, exact in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, exact_grads):
        assert_matches(name, got, ref, exact)


# (B, Hq, Hkv, Tq, Tk, D, layout): a covering subset of T in {1, 16, 17, 64, 100, 129},
# D in {16, 32, 64, 80}, Hq/Hkv in {1, 2, 4}, decode and chunked prefill, every layout.
CASES = [
    (1, 1, 1, 1, 1, 16, "contiguous"),        # a single token
    (2, 2, 1, 16, 16, 32, "projection"),      # MQA, exactly one tile
    (1, 4, 2, 17, 17, 80, "projection"),      # GQA, one row past a tile, padded head dim
    (1, 4, 1, 64, 64, 64, "contiguous"),      # MQA with four query heads per KV head
    (1, 2, 2, 100, 100, 16, "projection"),
    (1, 2, 1, 129, 129, 32, "contiguous"),
    (2, 4, 2, 1, 17, 64, "cache"),            # decode steps
    (1, 2, 1, 1, 100, 80, "cache"),
    (1, 4, 2, 16, 64, 32, "cache"),           # chunked prefill against a cache
    (1, 2, 1, 17, 129, 16, "cache"),
    (1, 1, 1, 100, 129, 64, "cache"),
    (1, 2, 1, 64, 100, 80, "contiguous"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}:{}-T{}:{}-D{}-{}".format(*c))
def test_matches_float64(case, dtype):
    check_kernels(*case, dtype=dtype)


# Split-key decoding (Tq <= DECODE_MAX_TQ): GQA and MHA, odd key counts, cache offsets, a split
# holding one key, and rows that see no key of the last split (Tq > the last split's keys).
DECODE_CASES = [
    (1, 8, 2, 1, 97, 64, "cache"),            # GQA decode step, odd Tk
    (2, 3, 3, 3, 50, 32, "cache"),            # MHA, three queries (speculative verification)
    (1, 4, 1, 16, 129, 16, "cache"),          # MQA, 16 queries: a 64-row packed tile
    (1, 2, 2, 16, 33, 80, "contiguous"),      # last split holds one key; padded head dim
    (1, 4, 2, 7, 7, 64, "projection"),        # a short prompt's prefill takes the decode path too
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "B{}-H{}:{}-T{}:{}-D{}-{}".format(*c))
def test_decode_matches_float64(case, dtype):
    check_kernels(*case, dtype=dtype)


@pytest.mark.parametrize("D", [96, 128, 256])
def test_wide_head_dims(D):
    check_kernels(1, 2, 1, 33, 40, D, "contiguous", torch.float32)


@pytest.mark.skipif(CUDA, reason="on a GPU the autotuner picks the tiles")
@pytest.mark.parametrize("tiles", [(16, 64), (64, 16), (16, 16)], ids=lambda t: f"M{t[0]}-N{t[1]}")
@pytest.mark.parametrize("case", [(1, 2, 1, 77, 77, 32, "projection"), (1, 2, 2, 1, 50, 16, "cache"),
                                  (1, 4, 2, 30, 95, 64, "cache")],
                         ids=lambda c: "B{}-H{}:{}-T{}:{}-D{}-{}".format(*c))
def test_other_tilings(case, tiles, monkeypatch):
    """The GPU tiles have other BLOCK_M / BLOCK_N ratios than the default interpreter ones."""
    for name, tile in tca.INTERPRETER_TILES.items():
        monkeypatch.setitem(tca.INTERPRETER_TILES, name, dataclasses.replace(tile, block_m=tiles[0], block_n=tiles[1]))
    check_kernels(*case, dtype=torch.float32)


@pytest.mark.skipif(CUDA, reason="on a GPU the autotuner picks the tiles")
@pytest.mark.parametrize("case", [(1, 2, 1, 77, 77, 32, "projection"), (1, 4, 2, 30, 95, 80, "cache"),
                                  (2, 2, 2, 40, 40, 16, "contiguous"),
                                  (1, 2, 1, 33, 33, 20, "projection")],   # fp16 rows of 40 B: no TMA
                         ids=lambda c: "B{}-H{}:{}-T{}:{}-D{}-{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_tma_tiles(case, dtype, monkeypatch):
    """The TMA path (tensor descriptors of the strided views; rows past T and columns past D come
    back as zeros) gives the pointer path's results, and tensors TMA cannot address fall back."""
    for name, tile in tca.INTERPRETER_TILES.items():
        monkeypatch.setitem(tca.INTERPRETER_TILES, name, dataclasses.replace(tile, tma=True))
    check_kernels(*case, dtype=dtype)


def test_tma_only_where_the_strides_allow():
    q, k, v = make_inputs(1, 2, 1, 33, 33, 20, "projection", torch.float16)
    assert tca._descriptor(k, 32) is None                      # rows of 5 * 20 halves: 200 B
    q, k, v = make_inputs(1, 2, 1, 33, 33, 32, "projection", torch.float16)
    assert tca._descriptor(k, 32).block_shape == [1, 1, 16, 32]


def test_candidates_follow_the_target():
    """Hopper gets the TMA and Hopper-only tiles, when the tensors allow TMA; Ampere never; a few
    queries get small query tiles; every candidate fits the GPU's shared memory."""
    q = torch.empty(1, 16, 4096, 128, dtype=torch.bfloat16, device="meta")
    h100, a100 = Gpu(132, 227 * 1024, 90), Gpu(108, 163 * 1024, 80)
    for name in ("fwd", "dkdv", "dq"):
        hopper, ampere = (tca.candidates(name, q, 128, 4096, True, gpu) for gpu in (h100, a100))
        assert any(t.tma for t in hopper) and not any(t.tma for t in ampere)
        assert set(ampere) < set(hopper)
        assert not any(t.tma for t in tca.candidates(name, q, 128, 4096, False, h100))
        for t in hopper:
            assert 2 * 128 * tca.SMEM_ROWS[name](t) <= h100.smem_per_block
    assert {t.block_m for t in tca.candidates("fwd", q, 128, 16, True, h100)} == {16}


@pytest.mark.parametrize("head_dim", [64, 128])
def test_datacenter_blackwell_leaves_out_the_tiles_that_spill_there(head_dim):
    """sm_100 (B200) gets no spills_sm100 tile and a 32-row delta program at head dim 128, where
    ptxas spilled them (kernels/launching.py's Gpu.datacenter_blackwell); Hopper keeps every tile."""
    q = torch.empty(1, 16, 4096, head_dim, dtype=torch.float32, device="meta")
    b200, h100 = Gpu(148, 227 * 1024, 100), Gpu(132, 227 * 1024, 90)
    for name in ("fwd", "dkdv", "dq"):
        blackwell = tca.candidates(name, q, head_dim, 4096, True, b200)
        assert blackwell and not any(t.spills_sm100 for t in blackwell)
        assert set(blackwell) <= set(tca.candidates(name, q, head_dim, 4096, True, h100))
    assert any(t.spills_sm100 for name in ("fwd", "dkdv", "dq")
               for t in tca.candidates(name, q, head_dim, 4096, True, h100))
    assert tca._delta_rows(head_dim, b200) == (32 if head_dim > 64 else tca.DELTA_BLOCK_M)
    assert tca._delta_rows(head_dim, h100) == tca.DELTA_BLOCK_M


def test_plan_lists_the_candidates_by_name():
    """A GPU plan's configs are the candidates of its launch, its arguments passed by name."""
    q, k = (torch.empty(1, 16, 4096, 128, dtype=torch.bfloat16, device="meta") for _ in range(2))
    h100 = Gpu(132, 227 * 1024, 90)
    (launch,) = tca.plan_forward(q, k, k, 0.1, q, torch.empty(1, 16, 4096, device="meta"), h100)
    assert launch.configs == [t.config() for t in tca.candidates("fwd", q, 128, 4096, True, h100)]
    assert launch.args["stride_kt"] == 128 and launch.args["Q_BUCKET"] == 4096


def test_custom_scale():
    check_kernels(1, 2, 1, 20, 37, 32, "cache", torch.float32, scale=0.37)


@st.composite
def shapes(draw):
    Tk = draw(st.integers(1, 70))
    Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    layout = draw(st.sampled_from(LAYOUTS))
    Tq = Tk if layout == "projection" else draw(st.integers(1, Tk))
    D = draw(st.sampled_from([16, 24, 40, 64, 80, 96, 128]))
    return draw(st.integers(1, 2)), Hkv * group, Hkv, Tq, Tk, D, layout


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_property_shapes(shape, dtype):
    check_kernels(*shape, dtype=dtype)


def test_public_op_autograd_and_layout():
    q, k, v = (t.requires_grad_() for t in make_inputs(2, 4, 2, 24, 24, 32, "contiguous", torch.float32))
    do = torch.randn(2, 4, 24, 32, device=DEVICE)
    with kernels.use(causal_attention="triton"):
        assert kernels.active(DEVICE)["causal_attention"] == "triton"
        out = kernels.causal_attention(q, k, v)
    out.backward(do)
    # Stored as (B, T, H, D), so the model's transpose back to (B, T, H * D) is free.
    assert out.transpose(1, 2).is_contiguous()
    exact_out, exact_grads = reference_grads(q, k, v, do, None, torch.float64)
    ref_out, ref_grads = reference_grads(q, k, v, do, None, torch.float32)
    assert_matches("out", out.detach(), ref_out, exact_out)
    for name, t, ref, exact in zip(("dq", "dk", "dv"), (q, k, v), ref_grads, exact_grads):
        assert_matches(name, t.grad, ref, exact)


def test_opcheck_custom_ops():
    q, k, v = make_inputs(1, 2, 1, 5, 9, 16, "cache", torch.float32)
    for mask in (tca.CAUSAL, tca.Mask(3, 1, 2.5)):
        options = (0.25, mask.left, mask.right, mask.softcap)
        torch.library.opcheck(tca._attention_op, (q, k, v, *options))
        o, lse = tca._attention_op(q, k, v, *options)
        torch.library.opcheck(tca._attention_backward_op, (torch.randn_like(o), q, k, v, o, lse, *options))


def test_compiles_without_graph_break():
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 2, 1, 8, 8, 16, "contiguous", torch.float32))
    compiled = torch.compile(tca.attention, fullgraph=True, backend="aot_eager")
    compiled(q, k, v).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    tca.attention(q, k, v).sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, device=device).to(dtype)


BAD_INPUTS = [
    ((_t(1, 3, 4, 16), _t(1, 2, 4, 16), _t(1, 2, 4, 16)), "multiple of key/value heads"),
    ((_t(1, 2, 5, 16), _t(1, 2, 4, 16), _t(1, 2, 4, 16)), "more queries"),
    ((_t(1, 2, 4, 16), _t(1, 2, 4, 32), _t(1, 2, 4, 32)), "must share the head dim"),
    ((_t(2, 2, 4, 16), _t(1, 2, 4, 16), _t(1, 2, 4, 16)), "must share the batch size"),
    ((_t(1, 2, 4, 16), _t(1, 2, 4, 16), _t(1, 2, 5, 16)), "they must match"),
    ((_t(1, 2, 4, 16), _t(1, 2, 4, 16, dtype=torch.float16), _t(1, 2, 4, 16)), "mismatched dtypes"),
    ((_t(1, 2, 4, 16), _t(1, 2, 4, 16, device="meta"), _t(1, 2, 4, 16)), "mismatched devices"),
    ((_t(2, 4, 16), _t(2, 4, 16), _t(2, 4, 16)), "expected 4 dims"),
    ((_t(1, 2, 4, 16).long(), _t(1, 2, 4, 16).long(), _t(1, 2, 4, 16).long()), "expected one of float32"),
    ((_t(1, 2, 0, 16), _t(1, 2, 4, 16), _t(1, 2, 4, 16)), "no queries"),
]


@pytest.mark.parametrize("inputs, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs(inputs, message):
    with kernels.use(causal_attention="triton"), pytest.raises(ValueError, match=message):
        kernels.causal_attention(*inputs)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(2, 16, 4, 1024, 1024, 128, "projection"), (1, 8, 8, 777, 777, 64, "contiguous"),
                                  (4, 8, 2, 1, 2048, 128, "cache"), (1, 8, 2, 256, 3000, 96, "cache")],
                         ids=lambda c: "B{}-H{}:{}-T{}:{}-D{}-{}".format(*c))
def test_large_shapes_on_gpu(case, dtype):
    check_kernels(*case, dtype=dtype)
