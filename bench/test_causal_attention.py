"""Causal attention benchmark (DESIGN.md section 5): forward and backward TFLOP/s, decode GB/s.

On a GPU: bf16, B * T = 16384 tokens at model width 2048 (so H = 2048 / D), T from 512 to 16k
(1k, 4k and 16k with TRITONGPT_BENCH_QUICK=1), D in {64, 128}, for triton, torch (the reference:
SDPA with its default backend), compile (torch.compile of the reference), sdpa_flash and
sdpa_cudnn (SDPA pinned to its FlashAttention or its cuDNN backend by sdpa_kernel; skipped where
that backend cannot run the shape) and naive (softmax(QK^T)V with the (T, T) scores
materialised, where they fit in half the GPU memory). On CPU: one small fp32 shape, torch and
naive rows only. FLOPs: forward 4 * B * H * T * T * D / 2 (causal: half the score matrix),
backward 2.5x that.

Decode: one query per head against a KV cache (Tq = 1, B = 1, Hq = 32, Hkv = 8, D = 128, Tk in
{4096, 16384} on a GPU; Tk = 512 with Hq = 8, Hkv = 2, D = 64 on CPU), forward only, in GB/s:
K and V read once (2 * B * Hkv * Tk * D elements) plus q read and o written once, the traffic a
kernel that reads each KV head once for its whole query group moves.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import BACKENDS, DEVICE, DTYPE, ON_GPU, QUICK, implementation, measure, timed_pass

TOKENS, WIDTH = 16384, 2048
LENGTHS = (1024, 4096, 16384) if QUICK else (512, 1024, 2048, 4096, 8192, 16384)
SHAPES = ([(TOKENS // T, WIDTH // D, T, D) for T in LENGTHS for D in (64, 128)]
          if ON_GPU else [(1, 4, 256, 64)])                                      # (B, H, T, D)
DECODE_SHAPES = ([(1, 32, 8, Tk, 128) for Tk in (4096, 16384)] if ON_GPU
                 else [(1, 8, 2, 512, 64)])                                      # (B, Hq, Hkv, Tk, D)
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}
FLOPS_PER_PASS = {"fwd": 1.0, "bwd": 2.5}
NAIVE_BYTES_PER_SCORE = 16   # bf16 scores and probabilities, fp32 softmax, kept for the backward


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention (Tq == Tk, Hq == Hkv) through the full (B, H, T, T) score matrix."""
    T = q.shape[2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5                     # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)          # (T, T)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")).float(), dim=-1).to(q.dtype)
    return probs @ v                                                              # (B, H, T, D)


def sdpa(backend: str) -> Callable:
    """SDPA held to one backend (GPU only), with our semantics: causal when Tq == Tk, and a single
    query (decode) sees every key. The backward runs the kernel its forward recorded."""
    if not ON_GPU:
        pytest.skip(f"{backend} timings need a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    chosen = getattr(SDPBackend, SDPA_BACKENDS[backend], None)
    if chosen is None:
        pytest.skip(f"this torch has no SDPBackend.{SDPA_BACKENDS[backend]}")

    def attention(q, k, v):
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2],
                                                  enable_gqa=q.shape[1] != k.shape[1])
    return attention


def runnable(fn: Callable, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """pytest.skip, with SDPA's reason, when a pinned SDPA backend rejects these inputs (forward,
    and backward too when they require grad)."""
    if backend in SDPA_BACKENDS:
        try:
            out = fn(q, k, v)
            if out.requires_grad:
                out.sum().backward()
        except RuntimeError as e:
            pytest.skip(f"{backend} cannot run this shape: {str(e).strip().splitlines()[0]}")
        finally:
            q.grad = k.grad = v.grad = None


def attention_fn(backend: str, B: int, H: int, T: int):
    if backend in SDPA_BACKENDS:
        return sdpa(backend)
    if backend != "naive":
        return implementation("causal_attention", backend)
    if ON_GPU and B * H * T * T * NAIVE_BYTES_PER_SCORE > torch.cuda.get_device_properties(0).total_memory / 2:
        pytest.skip("the naive (T, T) scores do not fit in memory")
    return naive_attention


@pytest.mark.parametrize("pass_", list(FLOPS_PER_PASS))
@pytest.mark.parametrize("backend", [*BACKENDS, *SDPA_BACKENDS, "naive"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-T{}-D{}".format(*s))
def test_causal_attention(benchmark, shape, backend, pass_):
    B, H, T, D = shape
    fn = attention_fn(backend, B, H, T)
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE, requires_grad=pass_ != "fwd") for _ in range(3))
    runnable(fn, backend, q, k, v)
    forward_flops = 4 * B * H * T * T * D / 2
    measure(benchmark, timed_pass(lambda: fn(q, k, v), (q, k, v), pass_), op="causal_attention", pass_=pass_,
            backend=backend, shape=f"B={B} H={H} T={T} D={D}", flops=forward_flops * FLOPS_PER_PASS[pass_])


def decode_bytes(B: int, Hq: int, Hkv: int, Tk: int, D: int) -> float:
    """K and V read once, q read and o written once."""
    return (2 * B * Hkv * Tk * D + 2 * B * Hq * D) * DTYPE.itemsize


@pytest.mark.parametrize("backend", ["triton", "torch", *SDPA_BACKENDS])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-Tk{}-D{}".format(*s))
def test_decode_attention(benchmark, shape, backend):
    B, Hq, Hkv, Tk, D = shape
    fn = attention_fn(backend, B, Hq, 1)
    q = torch.randn(B, Hq, 1, D, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(B, Hkv, Tk, D, device=DEVICE, dtype=DTYPE) for _ in range(2))
    runnable(fn, backend, q, k, v)
    measure(benchmark, timed_pass(lambda: fn(q, k, v), (q, k, v), "fwd"), op="decode_attention", pass_="fwd",
            backend=backend, shape=f"B={B} Hq={Hq} Hkv={Hkv} Tk={Tk} D={D}", nbytes=decode_bytes(B, Hq, Hkv, Tk, D))
