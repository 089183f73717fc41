"""kernels.attention benchmark: sliding-window and softcapped causal attention, forward and
backward TFLOP/s (the options of kernels.attention beyond plain causal, which
bench/test_causal_attention.py times).

On a GPU: bf16, B * T = 16384 tokens at model width 2048 (H = 2048 / D), D in {64, 128}:
sliding windows of 512 and 4096 keys (window_size=(511, 0) and (4095, 0), causal) at T = 4096
and 16384, and softcap 50 (causal, no window) at T = 4096. TRITONGPT_BENCH_QUICK=1 keeps D = 128
and, of the windows, T = 16384 only. On CPU: B = 2, H = 4, T = 256, D = 64 in fp32, one window
of 64 keys and one softcap 50 shape.

Backends: triton (ours: kernels.implementation("attention", "triton")), torch (our reference:
one SDPA call with the mask it builds per call; with a softcap, the scores materialised in fp32),
sdpa_mask (one SDPA call with an explicit (T, T) boolean mask built once outside the timing;
skipped for the softcap, which SDPA cannot apply), flex (torch.compile'd FlexAttention: the
sliding-window causal mask_mod through a BlockMask built once outside the timing, and the
softcap as score_mod) and compile (torch.compile of the reference, for the softcap only: for a
window the reference is one masked SDPA call, which compiling leaves as it is and sdpa_mask
times alone). triton, compile and flex run on CUDA only; see FLEX_ON_CPU for FlexAttention here.

FLOPs count only the (query, key) pairs the mask keeps, exactly (visible_pairs): forward
4 * D * H * B * pairs (QK^T and PV, a multiply-add each), backward 2.5x that. A window of W keys
keeps T * W - W * (W - 1) / 2 pairs of the T * T, causal alone T * (T + 1) / 2. Every backend is
held to the same count, so TFLOP/s compare as speeds; one that computes the masked pairs anyway
(sdpa_mask, the reference) shows what that costs.

The helpers here (masks, pair counts, the FlexAttention and masked-SDPA callers) serve
bench/test_varlen_attention.py too.
"""
from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import DEVICE, DTYPE, ON_GPU, QUICK, implementation, measure, timed_pass
from tritongpt.kernels import checks

TOKENS, WIDTH = 16384, 2048
SOFTCAP = 50.0
FLOPS_PER_PASS = {"fwd": 1.0, "bwd": 2.5}
BACKENDS = ("triton", "torch", "compile", "sdpa_mask", "flex")
# (B, H, T, D, window, softcap): window = keys each query sees (itself included), 0 for unbounded.
if ON_GPU:
    HEAD_DIMS = (128,) if QUICK else (64, 128)
    CASES = [(TOKENS // T, WIDTH // D, T, D, W, 0.0)
             for D in HEAD_DIMS for T in ((16384,) if QUICK else (4096, 16384)) for W in (512, 4096)]
    CASES += [(TOKENS // 4096, WIDTH // D, 4096, D, 0, SOFTCAP) for D in HEAD_DIMS]
else:
    CASES = [(2, 4, 256, 64, 64, 0.0), (2, 4, 256, 64, 0, SOFTCAP)]
FLEX_ON_CPU = ("FlexAttention on CPU (torch 2.13): no backward (NotImplementedError), and its forward is fused "
               "only under torch.compile, ~20 s per mask on a 2-core CPU; eager flex materialises the scores")


# ----------------------------------------------------------------------------- masks and FLOPs

def visible_pairs(T: int, window: int = 0) -> int:
    """(query, key) pairs of causal attention over T positions where each query sees its last
    `window` keys (itself included; 0 or >= T: every earlier key)."""
    if window <= 0 or window >= T:
        return T * (T + 1) // 2
    return T * window - window * (window - 1) // 2


def causal_window_mask_mod(window: int) -> Callable:
    """FlexAttention mask_mod of kernels.attention(causal=True, window_size=(window - 1, 0))
    (window 0: plain causal). Also builds the explicit masks: see dense_mask."""
    def mask_mod(b, h, q_idx, kv_idx):
        seen = kv_idx <= q_idx
        return seen & (q_idx - kv_idx < window) if window > 0 else seen
    return mask_mod


def softcap_score_mod(cap: float) -> Callable:
    """FlexAttention score_mod of kernels.attention(softcap=cap): its score arrives scaled."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return score_mod


def dense_mask(mask_mod: Callable, Tq: int, Tk: int) -> torch.Tensor:
    """The (Tq, Tk) boolean mask a mask_mod describes (True: the query sees the key)."""
    q_idx = torch.arange(Tq, device=DEVICE)[:, None]
    kv_idx = torch.arange(Tk, device=DEVICE)[None, :]
    return mask_mod(0, 0, q_idx, kv_idx).expand(Tq, Tk).contiguous()


# ----------------------------------------------------------------------------- baselines

def sdpa_mask(mask_mod: Callable, Tq: int, Tk: int) -> Callable:
    """SDPA (its own choice of backend) with the explicit boolean mask, built once here, over
    (B, H, T, D) inputs; pytest.skip when the mask would take more than an eighth of the GPU."""
    if ON_GPU and Tq * Tk * 3 > torch.cuda.get_device_properties(0).total_memory / 8:  # bool + bf16 bias
        pytest.skip(f"the explicit ({Tq}, {Tk}) mask does not fit")
    mask = dense_mask(mask_mod, Tq, Tk)

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return attention


@functools.cache
def compiled_flex() -> Callable:
    # One compiled graph per mask, score_mod and shape (dynamic=False: static shapes, as a model
    # compiles them); fullgraph=True so that a graph break fails the row instead of timing the
    # unfused eager flex_attention; the recompile limit raised so that the suite's many
    # masks and shapes stay compiled (past the limit dynamo would run the frame eagerly).
    from torch.nn.attention.flex_attention import flex_attention
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"    # before torch 2.6
    setattr(config, limit, max(getattr(config, limit), 256))
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def flex(mask_mod: Callable, Tq: int, Tk: int, score_mod: Callable | None = None) -> Callable:
    """torch.compile'd FlexAttention with a BlockMask of mask_mod (built once here, shared by the
    batch and heads) over (B, H, T, D) inputs, or pytest.skip when it cannot run here."""
    if not ON_GPU:
        pytest.skip(FLEX_ON_CPU)
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.flex_attention")
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=Tq, KV_LEN=Tk, device=DEVICE)
    fn = compiled_flex()

    def attention(q, k, v):
        return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return attention


def runnable(fn: Callable, backend: str, *inputs: torch.Tensor) -> None:
    """Run fn once (forward, and backward when the inputs require grad) and pytest.skip with the
    reason when a baseline cannot run the shape: SDPA or FlexAttention rejecting it or failing to
    compile it, or a torch baseline out of memory. Our kernels' failures stay failures."""
    if backend == "triton":
        return
    catch = (Exception,) if backend in ("sdpa_mask", "flex") else (torch.OutOfMemoryError,)
    try:
        out = fn(*inputs)
        if out.requires_grad:
            out.sum().backward()
    except catch as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        pytest.skip(f"{backend} cannot run this shape: {type(e).__name__}: {lines[0][:300]}")
    finally:
        for t in inputs:
            t.grad = None
        if ON_GPU:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- benchmark

def attention_fn(backend: str, T: int, window: int, softcap: float) -> Callable:
    """The (q, k, v) -> out function of backend for this case, or pytest.skip."""
    mask_mod = causal_window_mask_mod(window)
    if backend == "sdpa_mask":
        if softcap:
            pytest.skip("SDPA has no softcap")
        return sdpa_mask(mask_mod, T, T)
    if backend == "flex":
        return flex(mask_mod, T, T, softcap_score_mod(softcap) if softcap else None)
    if backend == "compile" and not softcap:
        pytest.skip("for a window the reference is one masked SDPA call, which torch.compile leaves as it is "
                    "(sdpa_mask times that call)")
    fn = implementation("attention", backend)
    # The backends take the options as kernels.attention hands them on: normalised (causal: right = 0).
    options = checks.attention_options(True, None, (window - 1 if window else -1, 0), softcap)
    return lambda q, k, v: fn(q, k, v, *options)


def case_id(case: tuple) -> str:
    B, H, T, D, window, softcap = case
    return f"B{B}-H{H}-T{T}-D{D}-" + (f"window{window}" if window else f"softcap{softcap:g}")


@pytest.mark.parametrize("pass_", list(FLOPS_PER_PASS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention(benchmark, case, backend, pass_):
    B, H, T, D, window, softcap = case
    fn = attention_fn(backend, T, window, softcap)
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE, requires_grad=pass_ != "fwd") for _ in range(3))
    runnable(fn, backend, q, k, v)
    forward_flops = 4 * D * H * B * visible_pairs(T, window)
    shape = f"B={B} H={H} T={T} D={D} " + (f"window={window}" if window else f"causal softcap={softcap:g}")
    measure(benchmark, timed_pass(lambda: fn(q, k, v), (q, k, v), pass_), op="attention", pass_=pass_,
            backend=backend, shape=shape, flops=forward_flops * FLOPS_PER_PASS[pass_])
