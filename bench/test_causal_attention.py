"""Causal attention benchmark (DESIGN.md section 5): forward and backward TFLOP/s.

On a GPU: bf16, B * T = 16384 tokens at model width 2048 (so H = 2048 / D), T from 512 to 16k,
D in {64, 128}, for triton, torch (the reference: SDPA with its default backend), compile
(torch.compile of the reference) and naive (softmax(QK^T)V with the (T, T) scores materialised,
where they fit in half the GPU memory). On CPU: one small fp32 shape, torch and naive rows only.
FLOPs: forward 4 * B * H * T * T * D / 2 (causal: half the score matrix), backward 2.5x that.
"""
from __future__ import annotations

import pytest
import torch

from bench.conftest import BACKENDS, DEVICE, DTYPE, ON_GPU, implementation, measure, timed_pass

TOKENS, WIDTH = 16384, 2048
SHAPES = ([(TOKENS // T, WIDTH // D, T, D) for T in (512, 1024, 2048, 4096, 8192, 16384) for D in (64, 128)]
          if ON_GPU else [(1, 4, 256, 64)])                                      # (B, H, T, D)
FLOPS_PER_PASS = {"fwd": 1.0, "bwd": 2.5}
NAIVE_BYTES_PER_SCORE = 16   # bf16 scores and probabilities, fp32 softmax, kept for the backward


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention (Tq == Tk, Hq == Hkv) through the full (B, H, T, T) score matrix."""
    T = q.shape[2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5                     # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)          # (T, T)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")).float(), dim=-1).to(q.dtype)
    return probs @ v                                                              # (B, H, T, D)


def attention_fn(backend: str, B: int, H: int, T: int):
    if backend != "naive":
        return implementation("causal_attention", backend)
    if ON_GPU and B * H * T * T * NAIVE_BYTES_PER_SCORE > torch.cuda.get_device_properties(0).total_memory / 2:
        pytest.skip("the naive (T, T) scores do not fit in memory")
    return naive_attention


@pytest.mark.parametrize("pass_", list(FLOPS_PER_PASS))
@pytest.mark.parametrize("backend", [*BACKENDS, "naive"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-T{}-D{}".format(*s))
def test_causal_attention(benchmark, shape, backend, pass_):
    B, H, T, D = shape
    fn = attention_fn(backend, B, H, T)
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE, requires_grad=pass_ != "fwd") for _ in range(3))
    forward_flops = 4 * B * H * T * T * D / 2
    measure(benchmark, timed_pass(lambda: fn(q, k, v), (q, k, v), pass_), op="causal_attention", pass_=pass_,
            backend=backend, shape=f"B={B} H={H} T={T} D={D}", flops=forward_flops * FLOPS_PER_PASS[pass_])
