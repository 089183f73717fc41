"""The @triton.jit tile helpers both attention modules share (triton_attention.py for
training, triton_attention_decode.py for decoding), and the constexprs they derive from q.

A tile is BLOCK rows of one (B, H, T, D) tensor at one (batch, head), addressed through the
tensor's strides, so transposed projections and slices of a KV cache are read in place; head dims
that are not powers of two load onto a power-of-two BLOCK_D with masked columns. _fwd_blocks is
the forward's inner loop, an online softmax over a range of key tiles: the query tile stays in
registers while BLOCK_N-key tiles of K and V stream past (each read once per call), with the
running row max m, denominator l and unnormalised output in fp32, rescaled by exp2(m_old - m_new)
when the max grows (scores are in base-2 units: the softmax scale times log2(e)). Its masked
tiles keep the keys < Tk inside each row's window (visible); with SOFTCAP the scores are capped
first. UNBOUNDED is the window side that stands for "no limit" (-1 in kernels.attention).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
UNBOUNDED = 1 << 30     # a window side without limit: past any position, and int32-safe when added to one


def constants(q: torch.Tensor) -> dict:
    """HEAD_DIM, BLOCK_D and DOT_PRECISION of every attention kernel, from q (..., D)."""
    head_dim = q.shape[-1]
    # fp32 must not silently drop to tf32; half-precision dots ignore the setting.
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def strides(name: str, t: torch.Tensor) -> dict[str, int]:
    """The kernel arguments stride_<name>b, _<name>h, _<name>t, _<name>d of a (B, H, T, D) tensor."""
    return {f"stride_{name}{axis}": stride for axis, stride in zip("bhtd", t.stride())}


def new_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o like q but (B, Tq, Hq, D) in memory, so the model's transpose back to (B, Tq, Hq * D) is
    free, and the fp32 lse (B, Hq, Tq)."""
    B, Hq, Tq, D = q.shape
    o = q.new_empty_strided((B, Hq, Tq, D), (Tq * Hq * D, D, Hq * D, 1))   # (B, Tq, Hq, D) in memory
    return o, q.new_empty((B, Hq, Tq), dtype=torch.float32)


@triton.jit
def tile_ptrs(base, rows, offs_d, stride_t, stride_d):
    return base + rows[:, None] * stride_t + offs_d[None, :] * stride_d        # (rows, BLOCK_D)


@triton.jit
def load_rows(ptrs, rows, n_rows, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    # Interior tiles skip the row mask so the hot loops issue unpredicated, vectorised loads.
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def stream_rows(ptrs, desc, b, h, start, rows, n_rows, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    """A streamed (BLOCK_ROWS, BLOCK_D) tile: through its TMA descriptor of the (B, H, T, D) tensor,
    whose rows past T and columns past HEAD_DIM come back as zeros like the masked loads', or
    through pointers."""
    if USE_TMA:
        return desc.load([b.to(tl.int32), h.to(tl.int32), start, 0]).reshape(BLOCK_ROWS, BLOCK_D)
    return load_rows(ptrs, rows, n_rows, offs_d, CHECK_ROWS, HEAD_DIM, BLOCK_D)


@triton.jit
def store_rows(ptrs, tile, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if HEAD_DIM == BLOCK_D:
        mask = rows[:, None] < n_rows
    else:
        mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, tile.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def tanh(x):
    """tanh in fp32 to a few ulp without libdevice (the interpreter has none): an odd Taylor series
    below |x| = 1/4, where 1 - exp(-2|x|) would cancel away the small result's digits, and
    (1 - e) / (1 + e), e = exp(-2|x|), above it."""
    a = tl.abs(x)
    e = tl.math.exp2(-2.8853900817779268 * a)                                  # exp(-2a): 2 log2(e) = 2.885...
    large = (1.0 - e) / (1.0 + e)
    x2 = a * a
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0
                                                                                    - x2 * (1382.0 / 155925.0))))))
    t = tl.where(a < 0.25, small, large)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def visible(keys, pos, Tk, left, right, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(rows, keys) mask of the keys < Tk that query positions pos see: pos - left <= key <= pos + right.
    CAUSAL (right is 0: key <= pos < Tk) and WINDOW (left is bounded) drop the comparisons that
    cannot fail, which the plain causal mask, the hottest, does not pay for."""
    if CAUSAL:
        seen = keys[None, :] <= pos[:, None]
    else:
        seen = (keys[None, :] < Tk) & (keys[None, :] <= pos[:, None] + right)
    if WINDOW:
        seen = seen & (keys[None, :] >= pos[:, None] - left)
    return seen


@triton.jit
def fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
               k_desc, v_desc, b, hk, pos, lo, hi, Tk, qk_scale, cap_scale, left, right, offs_n, offs_d,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
               USE_TMA: tl.constexpr):
    k_ptrs = tile_ptrs(k_base, lo + offs_n, offs_d, stride_kt, stride_kd)       # (BLOCK_N, BLOCK_D)
    v_ptrs = tile_ptrs(v_base, lo + offs_n, offs_d, stride_vt, stride_vd)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n                                                   # (BLOCK_N,)
        k = stream_rows(k_ptrs, k_desc, b, hk, start_n, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_N,
                        USE_TMA)                                                  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale     # (BLOCK_M, BLOCK_N)
        if SOFTCAP:  # cap * tanh(s) (see the callers' scales)
            s = tanh(s) * cap_scale
        if MASKED:
            s = tl.where(visible(keys, pos, Tk, left, right, CAUSAL, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))                                     # (BLOCK_M,)
        # A row that has seen no key yet (a decode split after its position, a window not yet
        # reached) keeps m = -inf; subtracting 0 instead keeps its p and alpha at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = stream_rows(v_ptrs, v_desc, b, hk, start_n, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_N,
                        USE_TMA)                                                  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, m_i, l_i
