"""kernels/triton_attention_decode.py: split-key decoding, and per-row key lengths against a
float64 implementation written from the definition (row b's query i attends keys 0 .. L_b - Tq
+ i of its first L_b keys). The decode path without lengths is also checked, with gradients,
by test_triton_attention.py's DECODE_CASES.
"""
from __future__ import annotations

import pytest
import torch

from tritongpt import kernels
from tritongpt.kernels import reference, triton_attention_decode as decode
from tritongpt.kernels.launching import Gpu
from numerics import DEVICE, assert_matches, nan_filled


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor) -> torch.Tensor:
    """float64 softmax attention, one row at a time, reading only each row's first L_b keys."""
    B, Hq, Tq, D = q.shape
    group = Hq // k.shape[1]
    out = torch.empty(B, Hq, Tq, D, dtype=torch.float64)
    for b, length in enumerate(key_lengths.tolist()):
        keys = k[b, :, :length].double().cpu().repeat_interleave(group, 0)              # (Hq, L, D)
        values = v[b, :, :length].double().cpu().repeat_interleave(group, 0)
        scores = q[b].double().cpu() @ keys.transpose(1, 2) * D ** -0.5                 # (Hq, Tq, L)
        visible = torch.arange(length)[None, :] <= (length - Tq + torch.arange(Tq))[:, None]   # (Tq, L)
        out[b] = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values
    return out


def lengths_inputs(B, Hq, Hkv, Tq, Tk, D, lengths, dtype):
    """q, and k, v caches of capacity Tk whose keys past each row's length hold NaN."""
    torch.manual_seed(0)
    q = torch.randn(B, Hq, Tq, D, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(B, Hkv, Tk, D, dtype=dtype, device=DEVICE) for _ in range(2))
    key_lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    for b, length in enumerate(lengths):
        k[b, :, length:], v[b, :, length:] = float("nan"), float("nan")
    return q, k, v, key_lengths


# (B, Hq, Hkv, Tq, Tk, D, lengths): rows of different lengths, a length equal to Tq, a full row,
# GQA, MQA and MHA, several queries (speculative verification), lengths inside one split.
LENGTH_CASES = [
    (3, 8, 2, 1, 97, 64, [1, 40, 97]),
    (2, 4, 1, 3, 50, 32, [3, 33]),
    (2, 3, 3, 16, 70, 16, [16, 70]),
    (4, 2, 2, 2, 129, 80, [2, 17, 64, 100]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", LENGTH_CASES, ids=lambda c: "B{}-H{}:{}-T{}:{}-D{}".format(*c[:6]))
def test_key_lengths_match_float64(case, dtype):
    *shape, lengths = case
    q, k, v, key_lengths = lengths_inputs(*shape, lengths, dtype)
    B, Hq, Tq, D = q.shape
    o = nan_filled(B, Tq, Hq, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    lse = nan_filled(B, Hq, Tq, dtype=torch.float32, device=DEVICE)
    decode.forward(q, k, v, D ** -0.5, o, lse, key_lengths)
    exact = exact_attention(q, k, v, key_lengths)
    assert not o.isnan().any()
    assert_matches("out", o, reference.causal_attention(q, k, v, key_lengths=key_lengths), exact)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_op_with_key_lengths(backend):
    """kernels.causal_attention with key_lengths: the decode kernels for a step, the reference for
    more queries than DECODE_MAX_TQ and for gradients; both never read past a row's length."""
    for Tq in (2, decode.DECODE_MAX_TQ + 3):
        q, k, v, key_lengths = lengths_inputs(2, 4, 2, Tq, 64, 16, [Tq, 50], torch.float32)
        with kernels.use(causal_attention=backend):
            out = kernels.causal_attention(q, k, v, key_lengths=key_lengths)
        exact = exact_attention(q, k, v, key_lengths)
        assert_matches("out", out, reference.causal_attention(q, k, v, key_lengths=key_lengths), exact)
    q, k, v, key_lengths = lengths_inputs(2, 4, 2, 2, 64, 16, [2, 50], torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with kernels.use(causal_attention=backend):
        kernels.causal_attention(q, k, v, key_lengths=key_lengths).sum().backward()
    assert not q.grad.isnan().any()
    assert k.grad[1, :, 50:].eq(0).all() and not k.grad[1, :, :50].isnan().any()


def test_decode_splits_the_keys():
    """A decode step with few heads spreads one KV head over many programs, each a whole number
    of key tiles, and the splits cover the keys exactly once."""
    h200 = Gpu(sms=132, smem_per_block=227 * 1024, capability=90)
    block_n, splits, split_keys = decode.decode_split(1, 8, 4096, h200)
    assert 8 * splits >= 2 * 132 and split_keys % block_n == 0
    assert (splits - 1) * split_keys < 4096 <= splits * split_keys
    assert decode.decode_split(1, 8, 1, h200)[1:] == (1, block_n)


def test_opcheck_custom_op():
    q, k, v, key_lengths = lengths_inputs(2, 2, 1, 1, 9, 16, [1, 9], torch.float32)
    torch.library.opcheck(decode._attention_decode_op, (q, k.nan_to_num(), v.nan_to_num(), 0.25, key_lengths))
