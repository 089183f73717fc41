"""The weight formats of kernels/quantization.py: round trips, rounding, saturation, packing."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tritongpt.kernels import quantization as Q

FP4_GRID = torch.tensor(Q.FP4_MAGNITUDES)


def test_int8_round_trip_is_within_half_a_step():
    w = torch.randn(37, 53) * 0.05
    q, s = Q.quantize(w, "int8")
    assert q.dtype == torch.int8 and q.shape == (37, 53) and s.shape == (37,) and s.dtype == torch.float32
    err = (Q.dequantize(q, s, "int8", 53) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-6)).all()
    # symmetric: each row's largest magnitude lands on +-127, -128 is never used
    assert (q.abs().amax(dim=1) == 127).all() and (q != -128).all()


def test_fp4_values_are_exactly_representable_and_the_nearest():
    w = torch.randn(9, 96)
    q, s = Q.quantize(w, "fp4")
    assert q.dtype == torch.uint8 and q.shape == (9, 48) and s.shape == (9, 3) and s.dtype == torch.float16
    values = Q.fp4_values(Q.unpack_fp4(q))                                   # (9, 96)
    assert torch.isin(values.abs(), FP4_GRID).all()
    scaled = (w.view(9, 3, 32) / s.float()[:, :, None]).view(9, 96)
    nearest = (scaled.abs()[..., None] - FP4_GRID).abs().min(dim=-1).values
    assert torch.allclose((values.abs() - scaled.abs()).abs(), nearest)   # no closer grid value exists
    assert ((values.abs() == 6) | (values.abs() < 6)).all()
    assert (values.abs().view(9, 3, 32).amax(dim=2) == 6).all()           # each group's absmax maps onto 6


def test_fp4_ties_round_to_even_and_saturate():
    scaled = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -5.0, 100.0, -0.1]])
    codes = Q._fp4_codes(scaled)
    assert Q.fp4_values(codes).tolist() == [[0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.0, -4.0, 6.0, 0.0]]
    assert (codes != 8).all()                                               # no negative zero


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda c: len(c) % 2 == 0))
def test_pack_and_unpack_are_inverse(codes):
    c = torch.tensor(codes, dtype=torch.uint8).view(1, -1)
    packed = Q.pack_fp4(c)
    assert packed.shape == (1, len(codes) // 2)
    assert torch.equal(Q.unpack_fp4(packed), c)
    assert torch.equal(Q.pack_fp4(Q.unpack_fp4(packed)), packed)
    assert (packed & 0xF).tolist()[0] == codes[0::2]                         # element 2j in the low nibble


def test_fp4_pads_k_to_the_group_with_zeros():
    w = torch.randn(5, 45)
    q, s = Q.quantize(w, "fp4")
    assert q.shape == (5, 32) and s.shape == (5, 2)
    assert (Q.fp4_values(Q.unpack_fp4(q))[:, 45:] == 0).all()
    assert Q.dequantize(q, s, "fp4", 45).shape == (5, 45)
    assert Q.shapes("fp4", 5, 45) == ((5, 32), (5, 2))


def test_dequantize_of_quantize_is_close_and_idempotent():
    w = torch.randn(16, 64) * 0.02
    for fmt, tol in (("int8", 0.01), ("fp4", 0.15)):
        q, s = Q.quantize(w, fmt)
        back = Q.dequantize(q, s, fmt, 64)
        assert (back - w).norm() / w.norm() < tol
        q2, s2 = Q.quantize(back, fmt)                    # a quantized weight quantizes to itself
        assert torch.equal(Q.dequantize(q2, s2, fmt, 64), back)


def test_zero_rows_and_groups_survive():
    w = torch.zeros(3, 64)
    w[1, :32] = torch.randn(32)
    for fmt in Q.FORMATS:
        q, s = Q.quantize(w, fmt)
        back = Q.dequantize(q, s, fmt, 64)
        assert torch.isfinite(back).all() and (back[0] == 0).all() and (back[1, 32:] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(4, 32)
    w[2, 3] = bad
    for fmt in Q.FORMATS:
        with pytest.raises(ValueError, match="NaN or infinite"):
            Q.quantize(w, fmt)


def test_bad_format_and_shapes_are_refused():
    with pytest.raises(ValueError, match="unknown quantization format 'int4'; choose one of int8, fp4"):
        Q.quantize(torch.randn(4, 32), "int4")
    with pytest.raises(ValueError, match="2-D float weight"):
        Q.quantize(torch.randn(4, 32, 2), "int8")
    with pytest.raises(ValueError, match="use --format int8"):
        Q.quantize(torch.full((1, 32), 1e6), "fp4")
