"""kernels.varlen_attention benchmark: causal attention within packed documents, forward and
backward TFLOP/s.

On a GPU: bf16, 16384 tokens packed as documents whose lengths are drawn log-uniformly from
64..4096 (a long tail: most documents short, most tokens in the long ones) with a fixed seed,
the last one or two adjusted so that they sum to exactly 16384 (document_lengths: 18 documents
of 68 to 4022 tokens; the shape label names their number and the longest), Hq = 2048 / D query heads, D in {64, 128},
and for D = 128 also grouped-query attention with Hkv = Hq / 4 (TRITONGPT_BENCH_QUICK=1 keeps
D = 128 without GQA). On CPU: 1024 fp32 tokens in documents of 16..256 tokens, H = 4, D = 64.

The inputs are packed as a model holds them: q (16384, Hq, D), k and v (16384, Hkv, D) and the
int32 offsets cu_seqlens. Backends: triton (ours: kernels.implementation("varlen_attention",
"triton")), torch (our reference: the documents unpacked into a zero-padded (n, H, longest, D)
batch, one masked SDPA call, packed back), sdpa_mask (one SDPA call over the packed tokens viewed
as (1, H, 16384, D), with an explicit block-diagonal causal (16384, 16384) boolean mask built
once outside the timing; skipped where the mask does not fit) and flex (torch.compile'd
FlexAttention over the same view, the document-causal mask_mod through a BlockMask built once
outside the timing). No compile row: the reference is index shuffling around one masked SDPA
call, which torch.compile leaves as it is. triton and flex run on CUDA only
(bench/test_attention.py's FLEX_ON_CPU says why flex does not run on CPU).

FLOPs count only the (query, key) pairs the mask keeps: the sum over documents of
L * (L + 1) / 2, times 4 * D * Hq for the forward, 2.5x that for the backward. Every backend is
held to that count, so TFLOP/s compare as speeds; sdpa_mask computes all 16384^2 pairs, and the
reference n * longest^2, which shows as a low rate.
"""
from __future__ import annotations

import math
import random
from typing import Callable

import pytest
import torch

from bench.conftest import DEVICE, DTYPE, ON_GPU, QUICK, implementation, measure, timed_pass
from bench.test_attention import FLOPS_PER_PASS, WIDTH, flex, runnable, sdpa_mask
from tritongpt.kernels import checks

TOKENS, SHORTEST, LONGEST = (16384, 64, 4096) if ON_GPU else (1024, 16, 256)
SEED = 3    # the first seed whose documents reach both ends (under 100 and over 4000 tokens): 68..4022
BACKENDS = ("triton", "torch", "sdpa_mask", "flex")
if ON_GPU:
    HEADS = [(WIDTH // D, WIDTH // D, D) for D in ((128,) if QUICK else (64, 128))]    # (Hq, Hkv, D)
    HEADS += [] if QUICK else [(WIDTH // 128, WIDTH // 128 // 4, 128)]
else:
    HEADS = [(4, 4, 64)]


def document_lengths(total: int, shortest: int, longest: int, seed: int = SEED) -> list[int]:
    """Document lengths drawn log-uniformly from [shortest, longest] by a fixed-seed generator,
    in order until they hold `total` tokens: a draw that would leave less than `shortest` tokens
    is cut (or the rest taken whole) so that they sum to exactly total, all within the range."""
    if not (0 < 2 * shortest <= longest and total >= shortest):
        raise ValueError(f"cannot pack {total} tokens in documents of {shortest}..{longest}")
    rng = random.Random(seed)
    lengths, left = [], total
    while left:
        n = min(round(math.exp(rng.uniform(math.log(shortest), math.log(longest)))), left)
        if left - n < shortest:     # the rest would be too short for a document of its own
            n = left if left <= longest else left - shortest
        lengths.append(n)
        left -= n
    return lengths


def document_causal_mask_mod(lengths: list[int]) -> Callable:
    """FlexAttention mask_mod of causal attention within each document of the packed tokens."""
    document = torch.repeat_interleave(torch.arange(len(lengths), device=DEVICE),
                                       torch.tensor(lengths, device=DEVICE))      # (total,) document of each token

    def mask_mod(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (kv_idx <= q_idx)
    return mask_mod


def visible_pairs(lengths: list[int]) -> int:
    """(query, key) pairs of causal attention within each document."""
    return sum(L * (L + 1) // 2 for L in lengths)


def varlen_fn(backend: str, lengths: list[int]) -> Callable:
    """The packed (q, k, v) -> out function of backend, or pytest.skip."""
    total = sum(lengths)
    if backend in ("sdpa_mask", "flex"):
        mask_mod = document_causal_mask_mod(lengths)
        over_batch = sdpa_mask(mask_mod, total, total) if backend == "sdpa_mask" else flex(mask_mod, total, total)

        def packed(q, k, v):        # (total, H, D) viewed as one (1, H, total, D) row, and back
            return over_batch(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)))[0].transpose(0, 1)
        return packed
    fn = implementation("varlen_attention", backend)
    cu_seqlens = torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)    # (n + 1,)
    L = max(lengths)
    options = checks.attention_options(True, None, (-1, -1), 0.0)     # as kernels.varlen_attention passes them on
    return lambda q, k, v: fn(q, k, v, cu_seqlens, cu_seqlens, L, L, *options)


LENGTHS = document_lengths(TOKENS, SHORTEST, LONGEST)


@pytest.mark.parametrize("pass_", list(FLOPS_PER_PASS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda s: "Hq{}-Hkv{}-D{}".format(*s))
def test_varlen_attention(benchmark, heads, backend, pass_):
    Hq, Hkv, D = heads
    fn = varlen_fn(backend, LENGTHS)
    grad = pass_ != "fwd"
    q = torch.randn(TOKENS, Hq, D, device=DEVICE, dtype=DTYPE, requires_grad=grad)
    k, v = (torch.randn(TOKENS, Hkv, D, device=DEVICE, dtype=DTYPE, requires_grad=grad) for _ in range(2))
    runnable(fn, backend, q, k, v)
    forward_flops = 4 * D * Hq * visible_pairs(LENGTHS)
    shape = (f"tokens={TOKENS} docs={len(LENGTHS)} ({SHORTEST}..{LONGEST}, longest {max(LENGTHS)}) "
             f"Hq={Hq} Hkv={Hkv} D={D}")
    measure(benchmark, timed_pass(lambda: fn(q, k, v), (q, k, v), pass_), op="varlen_attention", pass_=pass_,
            backend=backend, shape=shape, flops=forward_flops * FLOPS_PER_PASS[pass_])
