"""Weight-only quantized linear layer in Triton: out = x @ dequant(W).T, dequantized in the GEMM.

x (M, K) in fp32/fp16/bf16; W (N, K) stored as int8 with a scale per output channel, or as fp4
(E2M1, two per byte) with an fp16 scale per 32 input channels (formats: kernels/quantization.py).

One kernel, two launch shapes chosen by M. Each program owns a (BLOCK_N, BLOCK_M) tile of out.T
and walks its slice of K in BLOCK_K steps: it loads the packed weight tile (BLOCK_N, BLOCK_K)
(int8: BLOCK_K bytes a row; fp4: BLOCK_K / 2 bytes, unpacked to codes with two shifts and
interleaved back to K order), turns the codes into values in registers (fp4: the E2M1 code's
bits become an fp16's bits, times the group's scale), rounds them to x's dtype, and multiplies
with tl.dot(w, x.T) into an fp32 accumulator. The weights are the dot's first operand, so on
Hopper the dequantized tile can feed the warpgroup MMA straight from registers, and the
(BLOCK_N >= 64)-row tile is the MMA's M side even when the batch is one row ("swap AB"). int8's
per-channel scale multiplies the accumulator once at the end, so its values enter the MMA
exactly (every int8 is exact in fp16 and bf16).

- Skinny path (M <= 16, decoding): BLOCK_M = 16 covers every row, so each weight byte is read
  from memory exactly once and the rows ride along for free: traffic = the weights as stored
  (N * K * bits / 8, plus the scales) + M * K activations + M * N outputs, which at M = 1 is the
  weights alone. When the
  N / BLOCK_N tiles are too few to fill the GPU (and K is long enough), K is split across SPLIT_K
  programs per tile, each writing fp32 partial sums into a (SPLIT_K, M, N) workspace that one
  small sum reduces (deterministic, no atomics): SPLIT_K * M * N * 8 more bytes, tiny next to
  the weights at decode shapes.
- Tiled path (M > 16, prefill): 128 x 128 tiles (64 rows when M <= 64), the usual tensor-core
  GEMM whose weight reads are amortized over BLOCK_M rows: N * K * bits / 8 * cdiv(M, BLOCK_M)
  weight bytes (mostly from L2) against 2 * M * N * K FLOPs.

fp32 activations run the MMA in IEEE fp32 (input_precision="ieee", not tf32) so the result
keeps fp32 precision. The op has no weight gradient (quantized weights are frozen); the gradient
of x, dout @ dequant(W), runs in torch.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tritongpt.kernels import quantization
from tritongpt.kernels.launching import Gpu, Launch, gpu_of, run

SKINNY_ROWS = 16          # M at or below this takes the skinny path


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _e2m1_values(codes):
    """E2M1 codes (0..15, any int type) -> their fp32 values, by building an fp16's bits: exponent
    field e + 14 and the mantissa bit on top for e > 0, the subnormal 0.5 (fp16 exponent 14) or
    zero for e == 0; the sign bit (8) negates."""
    c = codes.to(tl.int32)
    e = (c >> 1) & 3
    m = c & 1
    bits = tl.where(e == 0, m * (14 << 10), ((e + 14) << 10) | (m << 9))
    magnitude = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return tl.where((c & 8) != 0, -magnitude, magnitude)


@triton.jit
def _quantized_linear_fwd_kernel(X, W, S, OUT, M, N, K, K_STORED, K_PER_SPLIT,
                                 stride_xm, stride_xk, stride_wn, stride_sn, stride_split, stride_om,
                                 FP4: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr,
                                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                           # (BLOCK_N,)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                           # (BLOCK_M,)
    n_mask, m_mask = offs_n < N, offs_m < M
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn                      # (BLOCK_N, 1)
    x_cols = X + offs_m.to(tl.int64)[None, :] * stride_xm                      # (1, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K_STORED)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)                                    # (BLOCK_K,)
        # x beyond K reads as 0, so fp4's zero padding (K < K_STORED) adds nothing
        x = tl.load(x_cols + offs_k[:, None] * stride_xk,
                    mask=(offs_k[:, None] < K) & m_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_M)
        if FP4:
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)                      # bytes of the tile
            packed = tl.load(w_rows + offs_b[None, :], mask=n_mask[:, None] & (offs_b[None, :] < K_STORED // 2),
                             other=0)                                          # (BLOCK_N, BLOCK_K / 2) uint8
            codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
            offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
            scale = tl.load(S + offs_n[:, None] * stride_sn + offs_g[None, :],
                            mask=n_mask[:, None] & (offs_g[None, :] < K_STORED // GROUP),
                            other=0.0).to(tl.float32)                          # (BLOCK_N, BLOCK_K / GROUP)
            w = tl.reshape(_e2m1_values(codes), (BLOCK_N, BLOCK_K // GROUP, GROUP)) * scale[:, :, None]
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & (offs_k[None, :] < K_STORED),
                        other=0)                                               # (BLOCK_N, BLOCK_K) int8
        acc = tl.dot(w.to(X.dtype.element_ty), x, acc, input_precision=PRECISION)   # (BLOCK_N, BLOCK_M)
    if not FP4:
        acc = acc * tl.load(S + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    out = OUT + pid_k * stride_split + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT:
        tl.store(out, acc, mask=mask)                                          # fp32 partial sums
    else:
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def tile_config(M: int, dtype: torch.dtype, gpu: Gpu) -> dict:
    """BLOCK_M/N/K, warps and stages for M rows of x in dtype on gpu."""
    if gpu.capability == 0:                         # the interpreter: few, small programs
        return dict(BLOCK_M=16 if M <= SKINNY_ROWS else 32, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1)
    wide = dtype == torch.float32                   # fp32 tiles take twice the registers and smem
    if M <= SKINNY_ROWS:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64 if wide else 128, num_warps=4, num_stages=4)
    if wide:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64 if M <= 64 else 128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=1024)      # forward and plan_forward both ask, on every call
def geometry(M: int, N: int, K: int, fmt: str, dtype: torch.dtype, gpu: Gpu) -> tuple[dict, int, int]:
    """(tile config, K per split, SPLIT_K) for x (M, K) in dtype times an (N, K) weight in fmt.

    The skinny path splits K until there are about four programs per SM (a decode step is
    memory-bound, and more programs keep more loads in flight), as long as each split keeps at
    least two BLOCK_K steps; the tiled path never splits."""
    k_stored = quantization.padded_in_features(fmt, K)
    config = tile_config(M, dtype, gpu)
    splits = 1
    if M <= SKINNY_ROWS:
        tiles = triton.cdiv(N, config["BLOCK_N"]) * triton.cdiv(M, config["BLOCK_M"])
        splits = max(1, min(triton.cdiv(4 * gpu.sms, tiles), k_stored // (2 * config["BLOCK_K"])))
    per_split = triton.cdiv(triton.cdiv(k_stored, splits), config["BLOCK_K"]) * config["BLOCK_K"]
    return config, per_split, max(1, triton.cdiv(k_stored, per_split))


def plan_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fmt: str, out: torch.Tensor,
                 gpu: Gpu) -> list[Launch]:
    """The launch writing out (M, N) = x (M, K) @ dequant(qweight, scales).T, or with SPLIT_K > 1
    (geometry) the (SPLIT_K, M, N) fp32 workspace of partial sums that forward() adds up."""
    (M, K), N = x.shape, qweight.shape[0]
    config, per_split, splits = geometry(M, N, K, fmt, x.dtype, gpu)
    grid = (triton.cdiv(N, config["BLOCK_N"]), triton.cdiv(M, config["BLOCK_M"]), splits)
    config = dict(config)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    args = dict(X=x, W=qweight, S=scales, OUT=out, M=M, N=N, K=K, K_STORED=quantization.padded_in_features(fmt, K),
                K_PER_SPLIT=per_split, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=qweight.stride(0),
                stride_sn=scales.stride(0), stride_split=out.stride(0) if splits > 1 else 0,
                stride_om=out.stride(-2))
    return [Launch.fixed(_quantized_linear_fwd_kernel, grid, args, warps, stages, FP4=fmt == "fp4",
                         GROUP=quantization.GROUP, SPLIT=splits > 1,
                         PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **config)]


def forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype."""
    M, N = x.shape[0], qweight.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    if x.shape[1] == 0:
        return out.zero_()
    gpu = gpu_of(x.device)
    _, _, splits = geometry(M, N, x.shape[1], fmt, x.dtype, gpu)
    if splits == 1:
        run(plan_forward(x, qweight, scales, fmt, out, gpu))
        return out
    partial = torch.empty(splits, M, N, device=x.device, dtype=torch.float32)
    run(plan_forward(x, qweight, scales, fmt, partial, gpu))
    return torch.sum(partial, dim=0, out=out) if x.dtype == torch.float32 else partial.sum(0).to(x.dtype)


# ----------------------------------------------------------------------------- torch custom ops

@torch.library.custom_op("tritongpt::quantized_linear", mutates_args=())
def _quantized_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    return forward(x, qweight, scales, fmt)


@_quantized_linear_op.register_fake
def _(x, qweight, scales, fmt):
    return x.new_empty(x.shape[0], qweight.shape[0])


def _setup_context(ctx, inputs, output):
    x, qweight, scales, fmt = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.fmt, ctx.in_features, ctx.dtype = fmt, x.shape[1], x.dtype


def _backward(ctx, dout):
    qweight, scales = ctx.saved_tensors
    weight = quantization.dequantize(qweight, scales, ctx.fmt, ctx.in_features, ctx.dtype)   # (N, K)
    return dout.to(ctx.dtype) @ weight, None, None, None


_quantized_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry

def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """x (..., K) @ dequant(qweight, scales).T -> (..., N) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])                                            # (M, K), any strides
    return _quantized_linear_op(x2, qweight, scales, fmt).view(*x.shape[:-1], qweight.shape[0])
