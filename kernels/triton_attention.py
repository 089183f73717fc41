"""Attention in Triton for training, FlashAttention-2 style: forward, backward, GQA, every mask.

q (B, Hq, Tq, D) attends k, v (B, Hkv, Tk, D); query head h reads KV head h // (Hq / Hkv). Query i
sits at key position p = Tk - Tq + i and sees the keys j with p - left <= j <= p + right (a Mask:
causal is right = 0 with left unbounded; a sliding window bounds left; non-causal leaves both
unbounded, UNBOUNDED standing for -1 in kernels.attention), and with a softcap c each scaled score
s becomes c * tanh(s / c). Packed sequences (kernels.varlen_attention, triton_varlen_attention.py)
run the same kernels: each program reads its sequence's first row and length from cu_seqlens and
is then a program of a padded batch (Packed).

Forward, one program per BLOCK_M query rows of one head: the query tile stays in registers while
BLOCK_N-key tiles of K and V stream past, under an online softmax in fp32 (running row max m,
denominator l and unnormalised output, rescaled by exp2(m_old - m_new) when the max grows). The
softmax scale and log2(e) are folded into one multiplier, so every exponential is an exp2 (with a
softcap: scale / c before the tanh, c * log2(e) after). The key tiles a query tile visits are
those its rows' windows reach, in three runs (_key_range): a masked run where the window's left
edge crosses the tiles, the tiles every row sees whole (no mask at all), and a masked run where
the diagonal (or the right edge, or Tk) crosses them; tiles outside every row's window are never
loaded, so a window of W keys costs O(T W), not O(T^2). Each row saves its logsumexp (base 2,
scaled units); a row that sees no key writes 0 and an lse of +inf. Nothing O(T^2) is stored.

Backward, recomputing P = exp2(S - lse): (1) delta = rowsum(O * dO) in fp32, so that
dS = P * (dP - delta) (times 1 - tanh^2 under a softcap); (2) one program per key tile of one KV
head keeps K, V and fp32 dK, dV resident and streams the query tiles that see those keys (the
forward's three runs with queries and keys swapped), for every query head of its GQA group, so
the group sum needs no atomics: dV += P^T dO, dK += dS^T Q; (3) one program per query tile
streams key tiles with the forward's runs: dQ += dS K.

Few queries (Tq <= DECODE_MAX_TQ, each seeing a key: decode steps, speculative verification)
under the plain causal mask, and calls with per-row key lengths, go to the split-key kernels of
triton_attention_decode.py; the tile helpers and the forward's inner loop (fwd_blocks) that both
use live in triton_attention_tiles.py.

Memory traffic (Tq = Tk = T, per query head, causal): the forward reads Q and writes O once and
reads K and V about T / (2 BLOCK_M) times; the backward reads Q, dO about T / (2 BLOCK_N) times and
K, V about T / (2 BLOCK_M) times (a window of W keys: W / BLOCK_M and W / BLOCK_N times instead; a
packed batch: the sum over its sequences). O is written in (B, Tq, Hq, D) memory order behind a
(B, Hq, Tq, D) view, so the model's transpose back to (B, T, Hq * D) is free. All tensors are
addressed through their strides: transposed projections and slices of a preallocated KV cache are
read in place. Head dims that are not powers of two run on a power-of-two tile with masked
columns. fp32 dots are IEEE-exact; fp16/bf16 use tensor cores with fp32 accumulation. On a GPU
every kernel is autotuned (launching.Autotune) over a few named tiles per head dim, pruned by
shared memory and query count, none of which spills registers (python -m bench.compiled shows
it); on Hopper some candidates stream their tiles through TMA tensor descriptors (one per
(B, H, T, D) tensor, whose out-of-bounds rows and columns load as zeros; packed sequences use
pointers), so the autotuner picks TMA or pointer loads by measurement. The CPU interpreter
(TRITON_INTERPRET=1, for tests) uses fixed small tiles.

NaN (the rule of kernels.causal_attention): a NaN in q row i, or in k or v at a key that row
attends, makes output row i NaN through the online softmax (exp2(NaN - m) is NaN whatever max m
keeps). Masked scores are replaced by -inf (a select), so a NaN key never reaches a query that
does not attend it; a NaN value does reach the queries of the tiles that load its key, since
their masked probabilities are exactly 0 and 0 * NaN is NaN in the P @ V dot.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tritongpt.kernels import reference, triton_attention_decode as decode
from tritongpt.kernels.launching import Autotune, Gpu, Launch, Tile, gpu_of, run
from tritongpt.kernels.triton_attention_tiles import (LOG2E, UNBOUNDED, constants, fwd_blocks, load_rows, new_outputs,
                                            store_rows, stream_rows, strides, tanh, tile_ptrs, visible)

DELTA_BLOCK_M = 64      # rows per delta program; half at head dims over 64 on datacenter Blackwell (_delta_rows)


# ----------------------------------------------------------------------------- kernels: forward

@triton.jit
def _query_tile(pid, Tq, BLOCK_M: tl.constexpr):
    """(query tile index, batch*head index) of a 1-D grid; longest causal rows are scheduled first."""
    n_tiles = tl.cdiv(Tq, BLOCK_M)
    return n_tiles - 1 - pid % n_tiles, pid // n_tiles


@triton.jit
def _key_range(first, last, Tk, left, right, BLOCK_N: tl.constexpr):
    """The key tiles that query positions first..last see, in three runs: [lo, mid) masked,
    [mid, clean_end) seen whole by every row, [clean_end, hi) masked (either run may be empty)."""
    lo = tl.maximum(first - left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(last + right + 1, Tk)
    mid = tl.maximum(lo, tl.cdiv(tl.maximum(last - left, 0), BLOCK_N) * BLOCK_N)
    clean_end = tl.maximum(mid, tl.minimum(first + right + 1, Tk) // BLOCK_N * BLOCK_N)
    return lo, tl.minimum(mid, hi), mid, clean_end, hi


@triton.jit
def _sequence(CU, b, T):
    """(first packed row, length) of sequence b: from the offsets CU of packed sequences, or (0, T)."""
    if CU is None:
        start, length = tl.zeros([], tl.int64), T
    else:
        start = tl.load(CU + b).to(tl.int64)
        length = (tl.load(CU + b + 1) - start).to(tl.int32)
    return start, length


@triton.jit(do_not_specialize=["Tq", "Tk", "Q_BUCKET", "K_BUCKET", "left", "right"])
def _attention_fwd_kernel(Q, K, V, K_DESC, V_DESC, O, LSE, CU_Q, CU_K,
                          stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
                          stride_lb, stride_lh, n_heads, group, Tq, Tk, qk_scale, cap_scale, left, right,
                          Q_BUCKET, K_BUCKET, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                          SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    # Q_BUCKET, K_BUCKET (powers of two >= Tq, Tk) only key the autotuner, so that a decode loop
    # with a growing Tk does not re-tune every step. With CU_Q, CU_K (packed sequences) b is the
    # sequence, Tq and Tk are the longest lengths, and a tile past its sequence's queries is idle.
    pid_m, bh = _query_tile(tl.program_id(0), Tq, BLOCK_M)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    q_start, Tq = _sequence(CU_Q, b, Tq)
    k_start, Tk = _sequence(CU_K, b, Tk)
    if pid_m * BLOCK_M >= Tq:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                # (BLOCK_M,)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    q = load_rows(tile_ptrs(Q + b * stride_qb + h * stride_qh + q_start * stride_qt, rows, offs_d, stride_qt,
                            stride_qd), rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)   # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + (h // group) * stride_kh + k_start * stride_kt
    v_base = V + b * stride_vb + (h // group) * stride_vh + k_start * stride_vt
    pos = rows + (Tk - Tq)                               # key positions; rows >= Tq are padding
    first = (Tk - Tq) + pid_m * BLOCK_M
    last = (Tk - Tq) + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1
    lo, mid_masked, mid, clean_end, hi = _key_range(first, last, Tk, left, right, BLOCK_N)
    m_i, l_i = tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if WINDOW:  # below mid, the window's left edge crosses the tiles (without a window lo = mid = 0)
        acc, m_i, l_i = fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                   K_DESC, V_DESC, b, h // group, pos, lo, mid_masked, Tk, qk_scale, cap_scale,
                                   left, right, offs_n, offs_d, True, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM, BLOCK_D,
                                   BLOCK_N, DOT_PRECISION, USE_TMA)
    acc, m_i, l_i = fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               K_DESC, V_DESC, b, h // group, pos, mid, clean_end, Tk, qk_scale, cap_scale,
                               left, right, offs_n, offs_d, False, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM, BLOCK_D,
                               BLOCK_N, DOT_PRECISION, USE_TMA)
    acc, m_i, l_i = fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               K_DESC, V_DESC, b, h // group, pos, clean_end, hi, Tk, qk_scale, cap_scale,
                               left, right, offs_n, offs_d, True, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM, BLOCK_D,
                               BLOCK_N, DOT_PRECISION, USE_TMA)
    # A row that saw no key (l = 0) returns 0, and its lse of +inf zeroes its probabilities in the
    # backward; a NaN row keeps l = NaN and stays NaN.
    empty = l_i == 0.0
    l_i = tl.where(empty, 1.0, l_i)
    store_rows(tile_ptrs(O + b * stride_ob + h * stride_oh + q_start * stride_ot, rows, offs_d, stride_ot,
                         stride_od), acc / l_i[:, None], rows, Tq, offs_d, HEAD_DIM, BLOCK_D)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_i))
    tl.store(LSE + b * stride_lb + h * stride_lh + q_start + rows, lse, mask=rows < Tq)


# ----------------------------------------------------------------------------- kernels: backward

@triton.jit
def _attention_delta_kernel(O, DO, DELTA, CU_Q, stride_ob, stride_oh, stride_ot, stride_od,
                            stride_db, stride_dh, stride_dt, stride_dd, stride_lb, stride_lh, n_heads, Tq,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, bh = _query_tile(tl.program_id(0), Tq, BLOCK_M)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    q_start, Tq = _sequence(CU_Q, b, Tq)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_rows(tile_ptrs(O + b * stride_ob + h * stride_oh + q_start * stride_ot, rows, offs_d, stride_ot,
                            stride_od), rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)   # (BLOCK_M, BLOCK_D)
    do = load_rows(tile_ptrs(DO + b * stride_db + h * stride_dh + q_start * stride_dt, rows, offs_d, stride_dt,
                             stride_dd), rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                       # (BLOCK_M,)
    tl.store(DELTA + b * stride_lb + h * stride_lh + q_start + rows, delta, mask=rows < Tq)


@triton.jit
def _scores(a, b_t, qk_scale, cap_scale, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores a @ b_t in base-2 units, and d(capped score) / d(uncapped score) (1 without softcap):
    with softcap c, qk_scale is scale / c and cap_scale c * log2(e), and the score is
    c * tanh(scale * s / c)."""
    s = tl.dot(a, b_t, input_precision=DOT_PRECISION) * qk_scale
    cap_grad = 1.0
    if SOFTCAP:  # (one return: a compiled function's returns must agree in type)
        t = tanh(s)
        s, cap_grad = t * cap_scale, 1.0 - t * t
    return s, cap_grad


@triton.jit
def _dkdv_blocks(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                 stride_qt, stride_qd, stride_dt, stride_dd, q_desc, do_desc, b, h,
                 lo, hi, offset, Tq, Tk, qk_scale, cap_scale, left, right, offs_m, offs_d,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 USE_TMA: tl.constexpr):
    q_ptrs = tile_ptrs(q_base, lo + offs_m, offs_d, stride_qt, stride_qd)       # (BLOCK_M, BLOCK_D)
    do_ptrs = tile_ptrs(do_base, lo + offs_m, offs_d, stride_dt, stride_dd)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m                                                   # (BLOCK_M,)
        q = stream_rows(q_ptrs, q_desc, b, h, start_m, rows, Tq, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_M,
                        USE_TMA)                                                  # (BLOCK_M, BLOCK_D)
        do = stream_rows(do_ptrs, do_desc, b, h, start_m, rows, Tq, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_M,
                         USE_TMA)
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dt
        if MASKED:  # an infinite lse zeroes the padding rows' probabilities
            lse = tl.load(lse_base + rows, mask=rows < Tq, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=rows < Tq, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        # Transposed scores (keys x queries) so both accumulations are plain dots without a transpose.
        s_t, cap_grad = _scores(k, tl.trans(q), qk_scale, cap_scale, SOFTCAP, DOT_PRECISION)   # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(tl.trans(visible(keys, rows + offset, Tk, left, right, CAUSAL, WINDOW)), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)       # (BLOCK_N, BLOCK_D)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)            # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :]) * cap_grad
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)         # (BLOCK_N, BLOCK_D)
    return dk, dv


@triton.jit(do_not_specialize=["Tq", "Tk", "Q_BUCKET", "K_BUCKET", "left", "right"])
def _attention_dkdv_kernel(Q, K, V, DO, Q_DESC, DO_DESC, DK, DV, LSE, DELTA, CU_Q, CU_K,
                           stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                           stride_vb, stride_vh, stride_vt, stride_vd,
                           stride_db, stride_dh, stride_dt, stride_dd, stride_gb, stride_gh, stride_gt, stride_gd,
                           stride_lb, stride_lh, n_kv_heads, group, Tq, Tk, sm_scale, qk_scale, cap_scale,
                           left, right, Q_BUCKET, K_BUCKET, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                           SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    # DK and DV are allocated alike and share the stride_g* strides.
    n_tiles = tl.cdiv(Tk, BLOCK_N)
    pid_n, bh = tl.program_id(0) % n_tiles, tl.program_id(0) // n_tiles
    b, hk = (bh // n_kv_heads).to(tl.int64), (bh % n_kv_heads).to(tl.int64)
    q_start, Tq = _sequence(CU_Q, b, Tq)
    k_start, Tk = _sequence(CU_K, b, Tk)
    if pid_n * BLOCK_N >= Tk:
        return
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                # (BLOCK_N,)
    offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    k = load_rows(tile_ptrs(K + b * stride_kb + hk * stride_kh + k_start * stride_kt, keys, offs_d, stride_kt,
                            stride_kd), keys, Tk, offs_d, True, HEAD_DIM, BLOCK_D)   # (BLOCK_N, BLOCK_D)
    v = load_rows(tile_ptrs(V + b * stride_vb + hk * stride_vh + k_start * stride_vt, keys, offs_d, stride_vt,
                            stride_vd), keys, Tk, offs_d, True, HEAD_DIM, BLOCK_D)
    dk, dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32), tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    offset = Tk - Tq                                     # query row i sits at key position i + offset
    # The query rows that see these keys, in the forward's three runs with the roles of keys and
    # queries swapped (a key j is seen from positions j - right .. j + left), clipped to whole
    # tiles of real rows for the unmasked run.
    first_key = pid_n * BLOCK_N
    last_key = tl.minimum(first_key + BLOCK_N, Tk) - 1
    lo, mid_masked, mid, clean_end, hi = _key_range(first_key - offset, last_key - offset, Tq, right, left,
                                                    BLOCK_M)
    clean_end = tl.maximum(mid, tl.minimum(clean_end, Tq // BLOCK_M * BLOCK_M))
    n_heads = n_kv_heads * group
    for g in range(0, group):                            # the query heads sharing this KV head
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh + q_start * stride_qt
        do_base = DO + b * stride_db + h * stride_dh + q_start * stride_dt
        lse_base = LSE + b * stride_lb + h * stride_lh + q_start
        delta_base = DELTA + b * stride_lb + h * stride_lh + q_start
        dk, dv = _dkdv_blocks(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                              stride_qt, stride_qd, stride_dt, stride_dd, Q_DESC, DO_DESC, b, h,
                              lo, mid_masked, offset, Tq, Tk, qk_scale, cap_scale, left, right, offs_m, offs_d,
                              True, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA)
        dk, dv = _dkdv_blocks(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                              stride_qt, stride_qd, stride_dt, stride_dd, Q_DESC, DO_DESC, b, h,
                              mid, clean_end, offset, Tq, Tk, qk_scale, cap_scale, left, right, offs_m, offs_d,
                              False, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA)
        dk, dv = _dkdv_blocks(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                              stride_qt, stride_qd, stride_dt, stride_dd, Q_DESC, DO_DESC, b, h,
                              clean_end, hi, offset, Tq, Tk, qk_scale, cap_scale, left, right, offs_m, offs_d,
                              True, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA)
    g_offset = b * stride_gb + hk * stride_gh + k_start * stride_gt
    store_rows(tile_ptrs(DK + g_offset, keys, offs_d, stride_gt, stride_gd), dk * sm_scale, keys, Tk,
               offs_d, HEAD_DIM, BLOCK_D)
    store_rows(tile_ptrs(DV + g_offset, keys, offs_d, stride_gt, stride_gd), dv, keys, Tk,
               offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
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
        v = stream_rows(v_ptrs, v_desc, b, hk, start_n, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_N,
                        USE_TMA)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
        s, cap_grad = _scores(q, tl.trans(k), qk_scale, cap_scale, SOFTCAP, DOT_PRECISION)   # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(visible(keys, pos, Tk, left, right, CAUSAL, WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)              # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None]) * cap_grad
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)           # (BLOCK_M, BLOCK_D)
    return dq


@triton.jit(do_not_specialize=["Tq", "Tk", "Q_BUCKET", "K_BUCKET", "left", "right"])
def _attention_dq_kernel(Q, K, V, DO, K_DESC, V_DESC, DQ, LSE, DELTA, CU_Q, CU_K,
                         stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                         stride_vb, stride_vh, stride_vt, stride_vd,
                         stride_db, stride_dh, stride_dt, stride_dd, stride_gb, stride_gh, stride_gt, stride_gd,
                         stride_lb, stride_lh, n_heads, group, Tq, Tk, sm_scale, qk_scale, cap_scale, left, right,
                         Q_BUCKET, K_BUCKET, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                         SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    pid_m, bh = _query_tile(tl.program_id(0), Tq, BLOCK_M)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    q_start, Tq = _sequence(CU_Q, b, Tq)
    k_start, Tk = _sequence(CU_K, b, Tk)
    if pid_m * BLOCK_M >= Tq:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                # (BLOCK_M,)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    q = load_rows(tile_ptrs(Q + b * stride_qb + h * stride_qh + q_start * stride_qt, rows, offs_d, stride_qt,
                            stride_qd), rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)   # (BLOCK_M, BLOCK_D)
    do = load_rows(tile_ptrs(DO + b * stride_db + h * stride_dh + q_start * stride_dt, rows, offs_d, stride_dt,
                             stride_dd), rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)
    lse_offset = b * stride_lb + h * stride_lh + q_start
    lse = tl.load(LSE + lse_offset + rows, mask=rows < Tq, other=float("inf"))   # (BLOCK_M,)
    delta = tl.load(DELTA + lse_offset + rows, mask=rows < Tq, other=0.0)
    k_base = K + b * stride_kb + (h // group) * stride_kh + k_start * stride_kt
    v_base = V + b * stride_vb + (h // group) * stride_vh + k_start * stride_vt
    pos = rows + (Tk - Tq)
    first = (Tk - Tq) + pid_m * BLOCK_M
    last = (Tk - Tq) + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1
    lo, mid_masked, mid, clean_end, hi = _key_range(first, last, Tk, left, right, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if WINDOW:
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                        K_DESC, V_DESC, b, h // group, pos, lo, mid_masked, Tk, qk_scale, cap_scale, left, right,
                        offs_n, offs_d, True, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
                        USE_TMA)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                    K_DESC, V_DESC, b, h // group, pos, mid, clean_end, Tk, qk_scale, cap_scale, left, right,
                    offs_n, offs_d, False, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                    K_DESC, V_DESC, b, h // group, pos, clean_end, hi, Tk, qk_scale, cap_scale, left, right,
                    offs_n, offs_d, True, CAUSAL, WINDOW, SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA)
    store_rows(tile_ptrs(DQ + b * stride_gb + h * stride_gh + q_start * stride_gt, rows, offs_d, stride_gt,
                         stride_gd), dq * sm_scale, rows, Tq, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- launchers

def _descriptor(t: torch.Tensor, block_d: int) -> TensorDescriptor | None:
    """A TMA descriptor of a (B, H, T, D) tensor, its tile rows set per config by _set_tile_rows;
    None when TMA cannot address it (16-byte aligned base and strides, unit column stride)."""
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, block_d])


# Tiles by head dim (each list serves head dims up to its key's BLOCK_D; the last, any wider).
# hopper=True keeps a tile to Hopper-class targets (Gpu.hopper_class); tma=True also streams its
# tiles through TMA when the strides allow. bench/compiled.py shows that none spills registers on
# any of its six targets; the ones left out or kept to Hopper spill elsewhere:
# - everywhere: a (64, 64)-tile dK/dV with 4 warps (K, V and the fp32 dK, dV for 64 keys in 128
#   threads); at head dim 128 the pointer-loaded (16, 128), (128, 32) and (128, 128) forward and
#   (32, 64), (32, 128) dK/dV tiles (250-254 registers with the causal mask alone) once the
#   window's bounds and the packed sequences' offsets join them: at 128 only their TMA versions,
#   which hold no pointer tiles, are kept;
# - with register-held MMA operands (sm_80, sm_86, sm_89, sm_120): the (64, 64) and (128, 32)
#   forward, (64, 64) dQ and (64, 128) dK/dV tiles at head dim 64, the 16-row dK/dV tiles at 128,
#   and under a softcap (the tanh's registers) the 4-stage (64, 32) forward tile at 128 (sm_86)
#   and the (16, 128) forward tile at 64 (sm_80);
# - sm_120, whose ptxas caps these kernels at 128 or 255 registers: the 4-stage (64, 32) forward
#   and the (16, 64) and 3-stage (32, 64) dK/dV tiles at head dim 64;
# - sm_100 (spills_sm100: left out there; see Gpu.datacenter_blackwell), where ptxas holds 8 warps
#   to 128 registers: the pointer-loaded (128, 64) 8-warp forward (with a window or softcap) and
#   (32, 128), (64, 64) dK/dV tiles at head dim 64, and the (128, 32) dQ tiles (4-20 B each), and
#   the 4-warp (128, 64) forward under a softcap (255 registers, 24 B).
# (Triton 3.9's warp specialization does not take these loops on sm_90a: the 4-warp forward
# fails to compile with it, the 8-warp one compiles unchanged.)
_HOPPER, _TMA, _NOT_SM100 = dict(hopper=True), dict(tma=True, hopper=True), dict(spills_sm100=True)
_DQ = [Tile(16, 64, 4, 2), Tile(64, 32, 4, 2), Tile(64, 32, 4, 3), Tile(128, 32, 8, 2, **_NOT_SM100),
       Tile(128, 32, 8, 3, **_NOT_SM100),
       Tile(64, 32, 4, 2, **_TMA), Tile(128, 64, 8, 2, **_TMA)]
TILES: dict[str, dict[int, list[Tile]]] = {
    "fwd": {64: [Tile(16, 64, 4, 3), Tile(16, 128, 4, 2, **_HOPPER), Tile(64, 32, 4, 2),
                 Tile(64, 64, 4, 3, **_HOPPER), Tile(64, 32, 4, 4, **_HOPPER), Tile(128, 32, 4, 4, **_HOPPER),
                 Tile(128, 64, 8, 3, **_NOT_SM100), Tile(128, 64, 4, 3, **_HOPPER, **_NOT_SM100),
                 Tile(128, 128, 8, 2, **_HOPPER), Tile(64, 64, 4, 3, **_TMA), Tile(128, 64, 8, 3, **_TMA),
                 Tile(128, 128, 8, 2, **_TMA)],
            256: [Tile(16, 64, 4, 3), Tile(64, 32, 4, 2), Tile(64, 32, 4, 4, **_HOPPER), Tile(64, 64, 4, 3, **_HOPPER),
                  Tile(128, 64, 8, 3, **_HOPPER), Tile(64, 64, 4, 3, **_TMA), Tile(128, 64, 8, 3, **_TMA),
                  Tile(128, 128, 8, 2, **_TMA)]},
    "dkdv": {64: [Tile(16, 64, 4, 2, **_HOPPER), Tile(32, 64, 4, 2), Tile(32, 64, 4, 3, **_HOPPER),
                  Tile(32, 128, 8, 2, **_NOT_SM100),
                  Tile(64, 128, 8, 3, **_HOPPER),
                  Tile(64, 64, 8, 2, **_HOPPER, **_NOT_SM100), Tile(64, 128, 8, 2, **_HOPPER),
                  Tile(32, 64, 4, 3, **_TMA), Tile(64, 128, 8, 2, **_TMA)],
             256: [Tile(16, 64, 4, 2, **_HOPPER), Tile(32, 64, 8, 2), Tile(16, 128, 8, 2, **_HOPPER),
                   Tile(32, 64, 4, 3, **_TMA),
                   Tile(32, 128, 8, 3, **_TMA)]},
    "dq": {64: _DQ + [Tile(64, 64, 4, 2, **_HOPPER), Tile(128, 64, 8, 2)], 256: _DQ + [Tile(128, 64, 8, 2, **_HOPPER)]},
}
# Interpreter tiles, smaller than the test shapes so every tiling path runs; tests swap them for
# the other BLOCK_M / BLOCK_N ratios of the GPU tiles, and for TMA.
INTERPRETER_TILES = {"fwd": Tile(32, 16, 4, 1), "dkdv": Tile(16, 32, 4, 1), "dq": Tile(32, 16, 4, 1)}
# Shared-memory rows of a tile: the resident tiles once, the streamed tiles once per stage.
SMEM_ROWS: dict[str, Callable[[Tile], int]] = {
    "fwd": lambda t: t.block_m + 2 * t.block_n * t.stages,
    "dkdv": lambda t: 2 * t.block_n + 2 * t.block_m * t.stages,
    "dq": lambda t: 2 * t.block_m + 2 * t.block_n * t.stages,
}
# The descriptor arguments of each kernel and the constexpr giving their tile rows.
STREAMED = {"fwd": {"K_DESC": "BLOCK_N", "V_DESC": "BLOCK_N"}, "dkdv": {"Q_DESC": "BLOCK_M", "DO_DESC": "BLOCK_M"},
            "dq": {"K_DESC": "BLOCK_N", "V_DESC": "BLOCK_N"}}


def candidates(name: str, q: torch.Tensor, block_d: int, q_bucket: int, tma: bool, gpu: Gpu) -> list[Tile]:
    """The tiles kernel `name` may run with: those for this head dim whose shared-memory estimate
    fits the GPU, whose query tile is not far larger than the query count (few queries get
    16-row tiles), and which use TMA and Hopper-only tiles only on Gpu.hopper_class targets, TMA
    when the tensors allow it (tma), and no spills_sm100 tile on Gpu.datacenter_blackwell ones;
    never empty. In the interpreter: INTERPRETER_TILES[name] alone (with TMA only if tma)."""
    if gpu.capability == 0:
        tile = INTERPRETER_TILES[name]
        return [dataclasses.replace(tile, tma=tile.tma and tma)]
    table = TILES[name]
    tiles = table[next((d for d in table if block_d <= d), list(table)[-1])]
    row_bytes = q.element_size() * block_d
    usable = [t for t in tiles if (not t.hopper or (gpu.hopper_class and (tma or not t.tma)))
              and not (t.spills_sm100 and gpu.datacenter_blackwell)]
    kept = [t for t in usable
            if row_bytes * SMEM_ROWS[name](t) <= gpu.smem_per_block and t.block_m <= max(16, q_bucket)]
    return kept or [min(usable, key=SMEM_ROWS[name])]


def _set_tile_rows(name: str, named: dict) -> None:
    """Set the descriptors' tile rows to the config's (they are part of the kernel's signature)."""
    for arg, rows in STREAMED[name].items():
        if isinstance(named[arg], TensorDescriptor):
            named[arg].block_shape = [1, 1, named[rows], named["BLOCK_D"]]


def _autotune(name: str, kernel) -> Autotune:
    def allowed(named: dict, gpu: Gpu) -> list[Tile]:
        tma = all(isinstance(named[arg], TensorDescriptor) for arg in STREAMED[name])
        return candidates(name, named["Q"], named["BLOCK_D"], named["Q_BUCKET"], tma, gpu)

    return Autotune(kernel, [t for tiles in TILES[name].values() for t in tiles],
                    ["HEAD_DIM", "CAUSAL", "WINDOW", "SOFTCAP", "Q_BUCKET", "K_BUCKET"], allowed, functools.partial(_set_tile_rows, name))


AUTOTUNE = {"fwd": _autotune("fwd", _attention_fwd_kernel),
            "dkdv": _autotune("dkdv", _attention_dkdv_kernel),
            "dq": _autotune("dq", _attention_dq_kernel)}


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys a query at key position p sees, p - left .. p + right (UNBOUNDED: no limit on
    that side), and the softcap of the scores (0: none). The default is plain causal attention."""
    left: int = UNBOUNDED
    right: int = 0
    softcap: float = 0.0

    @classmethod
    def of(cls, causal: bool, window_size: tuple[int, int], softcap: float) -> "Mask":
        """From kernels.attention's arguments (causal puts the right side at 0 whatever window_size says)."""
        left, right = window_size
        return cls(UNBOUNDED if left < 0 else left, 0 if causal else UNBOUNDED if right < 0 else right, softcap)


CAUSAL = Mask()


@dataclasses.dataclass(frozen=True)
class Packed:
    """Packed sequences (kernels.varlen_attention): q (total_q, Hq, D), k, v (total_k, Hkv, D), the
    int32 offsets of each sequence and the longest lengths, which size the grids."""
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def _layout(name: str, t: torch.Tensor, packed: Packed | None) -> dict[str, int]:
    """stride_<name>b/h/t/d of a (B, H, T, D) tensor, or of a packed (total, H, D) one (b: 0, as the
    kernels offset each sequence by its first row)."""
    if packed is None:
        return strides(name, t)
    return {f"stride_{name}b": 0, f"stride_{name}h": t.stride(1), f"stride_{name}t": t.stride(0),
            f"stride_{name}d": t.stride(2)}


def _common(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, mask: Mask,
            packed: Packed | None) -> tuple[dict, int, int, int, int, int]:
    """The arguments every training kernel shares, and (B, Hq, Hkv, Tq, Tk): for packed sequences B
    is their count and Tq, Tk the longest lengths. lse is (B, Hq, Tq) or packed (Hq, total_q)."""
    if packed is None:
        (B, Hq, Tq, _), (Hkv, Tk) = q.shape, k.shape[1:3]
        cu, lse_strides = dict(CU_Q=None, CU_K=None), dict(stride_lb=lse.stride(0), stride_lh=lse.stride(1))
    else:
        B, Hq, Hkv = packed.cu_seqlens_q.numel() - 1, q.shape[1], k.shape[1]
        Tq, Tk = packed.max_seqlen_q, packed.max_seqlen_k
        cu, lse_strides = dict(CU_Q=packed.cu_seqlens_q, CU_K=packed.cu_seqlens_k), dict(stride_lb=0,
                                                                                        stride_lh=lse.stride(0))
    # With a softcap c the kernels scale the dot by scale / c, take tanh and scale by c * log2(e).
    qk_scale = scale / mask.softcap if mask.softcap else scale * LOG2E
    args = dict(**cu, **lse_strides, group=Hq // Hkv, Tq=Tq, Tk=Tk, qk_scale=qk_scale, cap_scale=mask.softcap * LOG2E,
                left=mask.left, right=mask.right, Q_BUCKET=triton.next_power_of_2(Tq),
                K_BUCKET=triton.next_power_of_2(Tk))
    return args, B, Hq, Hkv, Tq, Tk


def _constants(q: torch.Tensor, mask: Mask) -> dict:
    """The constexprs of the training kernels: triton_attention_tiles.constants and the mask's kind
    (CAUSAL: right is 0; WINDOW: left is bounded; SOFTCAP), so the plain causal mask compiles to
    the comparisons it needs and nothing else."""
    return dict(constants(q), CAUSAL=mask.right == 0, WINDOW=mask.left < UNBOUNDED, SOFTCAP=bool(mask.softcap))


def _with_descriptors(name: str, args: dict, block_d: int, packed: Packed | None) -> dict:
    """args plus kernel `name`'s descriptor arguments: each streamed tensor's TMA descriptor or,
    where TMA cannot address one of them (or the sequences are packed), the tensors themselves
    (the kernel then uses pointers)."""
    tensors = {arg: args[arg.removesuffix("_DESC")] for arg in STREAMED[name]}
    if packed is not None:
        return {**args, **tensors}
    descriptors = {arg: _descriptor(t, block_d) for arg, t in tensors.items()}
    tma = all(d is not None for d in descriptors.values())
    return {**args, **(descriptors if tma else tensors)}


def _query_grid(Tq: int, bh: int) -> Callable[[dict], tuple[int]]:
    return lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * bh,)


def plan_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, o: torch.Tensor,
                 lse: torch.Tensor, gpu: Gpu, mask: Mask = CAUSAL, packed: Packed | None = None) -> list[Launch]:
    """The launches of forward (below): split-key decoding for plain causal attention of a padded
    batch with Tq <= DECODE_MAX_TQ queries, each of which sees a key (Tq <= Tk), else one."""
    if packed is None and mask == CAUSAL and q.shape[2] <= min(decode.DECODE_MAX_TQ, k.shape[2]):
        return decode.plan_forward(q, k, v, scale, o, lse, gpu)
    consts = _constants(q, mask)
    common, B, Hq, _, Tq, _ = _common(q, k, lse, scale, mask, packed)
    args = dict(Q=q, K=k, V=v, O=o, LSE=lse, **_layout("q", q, packed), **_layout("k", k, packed),
                **_layout("v", v, packed), **_layout("o", o, packed), **common, n_heads=Hq)
    return [AUTOTUNE["fwd"].launch(_query_grid(Tq, B * Hq), _with_descriptors("fwd", args, consts["BLOCK_D"], packed),
                                   consts, gpu)]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, o: torch.Tensor, lse: torch.Tensor,
            mask: Mask = CAUSAL, packed: Packed | None = None) -> None:
    """Write o (like q, any strides) and lse (B, Hq, Tq), or packed (Hq, total_q), contiguous fp32
    (base-2 logsumexp of the scaled scores, +inf for a query that sees no key) from validated q
    (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D), or packed q (total_q, Hq, D), k, v (total_k, Hkv, D)."""
    run(plan_forward(q, k, v, scale, o, lse, gpu_of(q.device), mask, packed))


def _delta_rows(block_d: int, gpu: Gpu) -> int:
    """Rows per delta program: DELTA_BLOCK_M, halved at BLOCK_D > 64 on datacenter Blackwell, where
    ptxas holds the 64-row tile's 4 warps to 72 registers and spills 36 B (bf16, head dim 128)."""
    return DELTA_BLOCK_M // 2 if gpu.datacenter_blackwell and block_d > 64 else DELTA_BLOCK_M


def plan_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                  delta: torch.Tensor, gpu: Gpu, mask: Mask = CAUSAL, packed: Packed | None = None) -> list[Launch]:
    """The launches of backward (below); delta (like lse, fp32 contiguous) is their scratch."""
    assert dk.stride() == dv.stride(), "dk and dv must share strides"
    consts = _constants(q, mask)
    common, B, Hq, Hkv, Tq, Tk = _common(q, k, lse, scale, mask, packed)
    inputs = dict(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, **_layout("q", q, packed), **_layout("k", k, packed),
                  **_layout("v", v, packed), **_layout("d", do, packed), **common, sm_scale=scale)
    dkdv_args = _with_descriptors("dkdv", dict(inputs, DK=dk, DV=dv, **_layout("g", dk, packed), n_kv_heads=Hkv),
                                  consts["BLOCK_D"], packed)
    dq_args = _with_descriptors("dq", dict(inputs, DQ=dq, **_layout("g", dq, packed), n_heads=Hq), consts["BLOCK_D"],
                                packed)
    delta_args = dict(O=o, DO=do, DELTA=delta, CU_Q=common["CU_Q"], **_layout("o", o, packed),
                      **_layout("d", do, packed), stride_lb=common["stride_lb"], stride_lh=common["stride_lh"],
                      n_heads=Hq, Tq=Tq)
    delta_rows = _delta_rows(consts["BLOCK_D"], gpu)
    return [
        Launch.fixed(_attention_delta_kernel, (triton.cdiv(Tq, delta_rows) * B * Hq,), delta_args, 4,
                     HEAD_DIM=consts["HEAD_DIM"], BLOCK_D=consts["BLOCK_D"], BLOCK_M=delta_rows),
        AUTOTUNE["dkdv"].launch(lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]) * B * Hkv,), dkdv_args, consts, gpu),
        AUTOTUNE["dq"].launch(_query_grid(Tq, B * Hq), dq_args, consts, gpu),
    ]


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
             mask: Mask = CAUSAL, packed: Packed | None = None) -> None:
    """Write dq (like q) and dk, dv (like k; both with the same strides) from the forward's o, lse."""
    delta = torch.empty_like(lse)
    run(plan_backward(do, q, k, v, o, lse, scale, dq, dk, dv, delta, gpu_of(q.device), mask, packed))


# ----------------------------------------------------------------------------- torch custom ops

def _new_grads(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape)


@torch.library.custom_op("tritongpt::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, left: int, right: int,
                  softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = new_outputs(q)
    forward(q, k, v, scale, o, lse, Mask(left, right, softcap))
    return o, lse


@_attention_op.register_fake
def _(q, k, v, scale, left, right, softcap):
    return new_outputs(q)


@torch.library.custom_op("tritongpt::attention_backward", mutates_args=())
def _attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor, scale: float, left: int, right: int,
                           softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _new_grads(q, k)
    backward(do, q, k, v, o, lse, scale, dq, dk, dv, Mask(left, right, softcap))
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, scale, left, right, softcap):
    return _new_grads(q, k)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *ctx.options = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(do, q, k, v, o, lse, *ctx.options)
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, *,
              key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The triton backend of kernels.attention (inputs validated there); see the module doc.

    With key_lengths, plain causal attention of Tq <= DECODE_MAX_TQ queries without gradients
    runs the split-key decode kernels (the serving engine's decode steps); any other call with
    key_lengths runs the torch reference: the training kernels take no per-row lengths, and a
    prefill of one row runs without them on the cache sliced to its length.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask = Mask.of(causal, window_size, softcap)
    if key_lengths is None:
        return _attention_op(q, k, v, scale, mask.left, mask.right, mask.softcap)[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if mask != CAUSAL or q.shape[2] > decode.DECODE_MAX_TQ or needs_grad:
        return reference.attention(q, k, v, causal, scale, window_size, softcap, key_lengths=key_lengths)
    return decode.attend(q, k, v, scale, key_lengths)
