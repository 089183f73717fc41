"""The weight formats of kernels.quantized_linear: quantize, pack, unpack, dequantize.

A weight W (N, K) (N output channels, K input channels) is stored as (qweight, scales):

- ``int8``: qweight (N, K) int8 = round(W / s) clamped to [-127, 127] (symmetric: -128 is
  never written, so +-127 steps map to +-absmax), one fp32 scale per output channel,
  s = absmax(W[n]) / 127. 8.0 bits per weight plus 4 bytes per row: 0.5x of bf16.
- ``fp4``: E2M1 values (sign, 2 exponent bits, 1 mantissa bit: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6})
  packed two per byte along K (element 2j in the low nibble, 2j + 1 in the high one), qweight
  (N, Kp / 2) uint8, with one scale per group of GROUP = 32 input channels, scales (N, Kp / 32),
  s = absmax(group) / 6. Kp is K rounded up to a multiple of 32: a K that is not a multiple is
  padded with zero weights, which the kernels multiply by zero activations (x is masked beyond K).
  This is the MXFP4/NVFP4 layout family (E2M1 elements, a scale per small block) with the scale
  in **fp16**: MXFP4's E8M0 scale is a power of two, which maps a group's absmax anywhere in
  (3, 6] and so wastes up to one of the format's binades, and NVFP4's E4M3 scale underflows for
  weights of ~1e-2 without a second per-tensor scale; an fp16 scale maps every group's absmax
  exactly onto 6 with neither. Cost: 4 + 16 / 32 = 4.5 bits per weight, 0.28x of bf16 (E8M0 or
  E4M3 scales would give 0.27x).

Rounding is to nearest (ties to even: the code whose last bit is 0), saturating at the format's
largest value; NaN or infinite weights are refused. dequantize() is the exact inverse of the
encoding: dequantize(quantize(W)) is what the kernels multiply by.
"""
from __future__ import annotations

import functools

import torch

FORMATS: tuple[str, ...] = ("int8", "fp4")
GROUP = 32                          # fp4: input channels per scale
INT8_MAX = 127
FP4_MAX = 6.0
# The magnitude of E2M1 code c (0..7); code c + 8 is its negative.
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes: the rounding boundaries.
_FP4_BOUNDARIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# fp16's smallest subnormal: a group's scale never rounds to 0 (an all-zero group keeps it).
_MIN_SCALE = 2.0 ** -24


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose one of {', '.join(FORMATS)}")


def padded_in_features(fmt: str, in_features: int) -> int:
    """K as stored: rounded up to a multiple of GROUP for fp4, unchanged for int8."""
    return -(-in_features // GROUP) * GROUP if fmt == "fp4" else in_features


def shapes(fmt: str, out_features: int, in_features: int) -> tuple[tuple[int, int], tuple[int, ...]]:
    """(qweight shape, scales shape) of an (out_features, in_features) weight in fmt."""
    check_format(fmt)
    if fmt == "int8":
        return (out_features, in_features), (out_features,)
    padded = padded_in_features(fmt, in_features)
    return (out_features, padded // 2), (out_features, padded // GROUP)


def storage_dtypes(fmt: str) -> tuple[torch.dtype, torch.dtype]:
    """(qweight dtype, scales dtype) that quantize() writes."""
    check_format(fmt)
    return (torch.int8, torch.float32) if fmt == "int8" else (torch.uint8, torch.float16)


def quantize(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (qweight, scales) in fmt, on weight's device."""
    check_format(fmt)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"can only quantize a 2-D float weight (out_features, in_features), got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"cannot quantize a weight {tuple(weight.shape)} holding NaN or infinite values; "
                         f"the model is broken: quantize a checkpoint from before it diverged")
    w = weight.detach().float().contiguous()      # (a decoding model's weights may be transposed in memory)
    if fmt == "int8":
        scales = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)   # (N,)
        qweight = (w / scales[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return qweight, scales
    N, K = w.shape
    padded = padded_in_features(fmt, K)
    groups = torch.nn.functional.pad(w, (0, padded - K)).view(N, padded // GROUP, GROUP)
    absmax = groups.abs().amax(dim=2)                                               # (N, G)
    if float(absmax.max()) / FP4_MAX > torch.finfo(torch.float16).max:
        raise ValueError(f"weight {tuple(weight.shape)} has values up to {float(absmax.max()):.3g}, beyond what "
                         f"fp4's fp16 group scales can reach ({FP4_MAX * torch.finfo(torch.float16).max:.3g}); "
                         f"use --format int8")
    scales = (absmax / FP4_MAX).clamp(min=_MIN_SCALE).half()                        # (N, G)
    scaled = groups / scales.float()[:, :, None]                                    # (N, G, GROUP)
    codes = _fp4_codes(scaled).view(N, padded)                                      # (N, Kp) uint8
    return pack_fp4(codes), scales


def _fp4_codes(values: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of values already divided by their scale: nearest, ties to even,
    saturating at +-6."""
    magnitude = values.abs().clamp(max=FP4_MAX)
    boundaries = torch.tensor(_FP4_BOUNDARIES, device=values.device)
    code = torch.bucketize(magnitude, boundaries)          # the lower neighbour on an exact midpoint
    tie = magnitude == boundaries[code.clamp(max=len(_FP4_BOUNDARIES) - 1)]
    code = code + (tie & (code % 2 == 1)).long()           # ... unless its code is odd
    negative = (values < 0) & (code > 0)                   # no negative zero
    return (code + 8 * negative.long()).to(torch.uint8)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, Kp) uint8 in 0..15, Kp even -> (N, Kp / 2) uint8, element 2j in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """pack_fp4's inverse: (N, Kp / 2) uint8 -> codes (N, Kp) uint8."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 value of each E2M1 code."""
    table = torch.tensor(FP4_MAGNITUDES + tuple(-m for m in FP4_MAGNITUDES), device=codes.device)
    return table[codes.long()]


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, fmt: str, in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(qweight, scales) in fmt -> the (N, in_features) weight they encode, computed in fp32 and
    rounded once to dtype (as the kernels round the weights they feed to the matmul)."""
    check_format(fmt)
    if fmt == "int8":
        return (qweight.float() * scales.float()[:, None]).to(dtype)
    N = qweight.shape[0]
    # index_select: the fastest gather on the CPU, 8x plain indexing with an int32 index there
    pairs = _byte_values(qweight.device).index_select(0, qweight.reshape(-1).int())  # (N * Kp / 2, 2)
    weight = pairs.view(N, -1, GROUP) * scales.float()[:, :, None]                   # (N, G, GROUP)
    return weight.view(N, -1)[:, :in_features].to(dtype)


@functools.cache
def _byte_values(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the values of the low and the high code of every packed byte, so that
    dequantizing takes one lookup per byte instead of unpacking and two."""
    codes = torch.arange(256, device=device)
    return fp4_values(torch.stack((codes & 0xF, codes >> 4), dim=-1))
