"""Causal attention in Triton, FlashAttention-2 style: forward, backward, GQA and KV-cache offsets.

q (B, Hq, Tq, D) attends k, v (B, Hkv, Tk, D); query head h reads KV head h // (Hq / Hkv), and
query i sits at absolute position Tk - Tq + i, so it sees keys 0 .. Tk - Tq + i.

Forward, one program per BLOCK_M query rows of one head: the query tile stays in registers while
BLOCK_N-key tiles of K and V stream past, under an online softmax in fp32 (running row max m,
denominator l and unnormalised output, rescaled by exp2(m_old - m_new) when the max grows). The
softmax scale and log2(e) are folded into one multiplier, so every exponential is an exp2. Key
tiles wholly after the last query position are never loaded, tiles wholly at or before the first
query position run unmasked, and only the tiles crossing the diagonal apply a mask. Each row
saves its logsumexp (base 2, scaled units) for the backward; nothing O(T^2) is ever stored.

Backward, recomputing P = exp2(S - lse): (1) delta = rowsum(O * dO) in fp32, so that
dS = P * (dP - delta); (2) one program per key tile of one KV head keeps K, V and fp32 dK, dV
resident and streams the query tiles that see those keys, for every query head of its GQA group,
so the group sum needs no atomics: dV += P^T dO, dK += dS^T Q; (3) one program per query tile
streams key tiles with the forward's skipping: dQ += dS K.

Decoding (Tq <= DECODE_MAX_TQ: decode steps, speculative verification), flash-decoding style: one
program per (KV head, split of the keys) packs the Tq rows of every query head of the GQA group
into one tile of at least 64 rows (the smallest warpgroup MMA), so K and V are read once per
group, not once per query head, and a step of a single sequence still spreads over the GPU
(about DECODE_PROGRAMS_PER_SM programs per SM). Each split writes its rows' normalised partial
output and base-2 logsumexp (fp32); a combine kernel weights the splits by exp2(lse_split - lse).
Traffic: K and V once, plus the partials (splits * group * Tq * (D + 1) fp32) written and read.

Memory traffic (Tq = Tk = T, per query head): the forward reads Q and writes O once and reads K
and V about T / (2 BLOCK_M) times; the backward reads Q, dO about T / (2 BLOCK_N) times and K, V
about T / (2 BLOCK_M) times. O is written in (B, Tq, Hq, D) memory order behind a (B, Hq, Tq, D)
view, so the model's transpose back to (B, T, Hq * D) is free. All tensors are addressed through
their strides: transposed projections and slices of a preallocated KV cache are read in place.
Head dims that are not powers of two run on a power-of-two tile with masked columns. fp32 dots
are IEEE-exact; fp16/bf16 use tensor cores with fp32 accumulation. On a GPU every kernel is
autotuned over a few tiles per head dim, pruned by shared memory and query count, none of which
spills registers on sm_90a (python -m bench.compiled shows it); on Hopper some candidates stream
their tiles through TMA tensor descriptors (one per (B, H, T, D) tensor, whose out-of-bounds rows
and columns load as zeros), so the autotuner picks TMA or pointer loads by measurement. The CPU
interpreter (TRITON_INTERPRET=1, for tests) uses fixed small tiles.

NaN (the rule of kernels.causal_attention): a NaN in q row i, or in k or v at a key that row
attends, makes output row i NaN through the online softmax (exp2(NaN - m) is NaN whatever max m
keeps). Masked scores are replaced by -inf (a select), so a NaN key never reaches a query that
does not attend it; a NaN value does reach the queries of the tiles that load its key, since
their masked probabilities are exactly 0 and 0 * NaN is NaN in the P @ V dot.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.launching import Gpu, Launch, gpu_of, interpreting, run

LOG2E = 1.4426950408889634
DELTA_BLOCK_M = 64
# Query counts up to this (decode steps, speculative verification) run the split-key kernels.
DECODE_MAX_TQ = 16
DECODE_BLOCK_N = 32
DECODE_PROGRAMS_PER_SM = 8


# ----------------------------------------------------------------------------- kernels: tile helpers

@triton.jit
def _tile_ptrs(base, rows, offs_d, stride_t, stride_d):
    return base + rows[:, None] * stride_t + offs_d[None, :] * stride_d        # (rows, BLOCK_D)


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
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
def _stream_rows(ptrs, desc, b, h, start, rows, n_rows, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    """A streamed (BLOCK_ROWS, BLOCK_D) tile: through its TMA descriptor of the (B, H, T, D) tensor,
    whose rows past T and columns past HEAD_DIM come back as zeros like the masked loads', or
    through pointers."""
    if USE_TMA:
        return desc.load([b.to(tl.int32), h.to(tl.int32), start, 0]).reshape(BLOCK_ROWS, BLOCK_D)
    return _load_rows(ptrs, rows, n_rows, offs_d, CHECK_ROWS, HEAD_DIM, BLOCK_D)


@triton.jit
def _store_rows(ptrs, tile, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if HEAD_DIM == BLOCK_D:
        mask = rows[:, None] < n_rows
    else:
        mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, tile.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _query_tile(pid, Tq, BLOCK_M: tl.constexpr):
    """(query tile index, batch*head index) of a 1-D grid; longest causal rows are scheduled first."""
    n_tiles = tl.cdiv(Tq, BLOCK_M)
    return n_tiles - 1 - pid % n_tiles, pid // n_tiles


# ----------------------------------------------------------------------------- kernels: forward

@triton.jit
def _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                k_desc, v_desc, b, hk, pos, lo, hi, Tk, qk_scale, offs_n, offs_d,
                MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    k_ptrs = _tile_ptrs(k_base, lo + offs_n, offs_d, stride_kt, stride_kd)       # (BLOCK_N, BLOCK_D)
    v_ptrs = _tile_ptrs(v_base, lo + offs_n, offs_d, stride_vt, stride_vd)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n                                                   # (BLOCK_N,)
        k = _stream_rows(k_ptrs, k_desc, b, hk, start_n, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_N,
                         USE_TMA)                                                 # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale     # (BLOCK_M, BLOCK_N)
        if MASKED:
            s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))                                     # (BLOCK_M,)
        # A row that has seen no key yet (a decode split after its position) keeps m = -inf;
        # subtracting 0 instead keeps its p and alpha at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _stream_rows(v_ptrs, v_desc, b, hk, start_n, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_N,
                         USE_TMA)                                                 # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["Tq", "Tk", "Q_BUCKET", "K_BUCKET"])
def _causal_attention_fwd_kernel(Q, K, V, K_DESC, V_DESC, O, LSE,
                                 stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                                 stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
                                 n_heads, group, Tq, Tk, qk_scale, Q_BUCKET, K_BUCKET,
                                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    # Q_BUCKET, K_BUCKET (powers of two >= Tq, Tk) only key the autotuner, so that a decode loop
    # with a growing Tk does not re-tune every step.
    pid_m, bh = _query_tile(tl.program_id(0), Tq, BLOCK_M)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                # (BLOCK_M,)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    q = _load_rows(_tile_ptrs(Q + b * stride_qb + h * stride_qh, rows, offs_d, stride_qt, stride_qd),
                   rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)                     # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    v_base = V + b * stride_vb + (h // group) * stride_vh
    pos = rows + (Tk - Tq)                               # absolute positions; rows >= Tq are padding
    first = (Tk - Tq) + pid_m * BLOCK_M
    clean_end = (first + 1) // BLOCK_N * BLOCK_N         # key tiles every row sees whole
    end = tl.minimum(first + BLOCK_M, Tk)                # past the last key any row sees
    m_i, l_i = tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                K_DESC, V_DESC, b, h // group, pos, 0, clean_end, Tk, qk_scale, offs_n, offs_d,
                                False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA)
    # Padding rows are not masked against keys >= Tk: those load as zeros and the rows are never stored.
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                K_DESC, V_DESC, b, h // group, pos, clean_end, end, Tk, qk_scale, offs_n, offs_d,
                                True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA)
    _store_rows(_tile_ptrs(O + b * stride_ob + h * stride_oh, rows, offs_d, stride_ot, stride_od),
                acc / l_i[:, None], rows, Tq, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh.to(tl.int64) * Tq + rows, m_i + tl.math.log2(l_i), mask=rows < Tq)


# ----------------------------------------------------------------------------- kernels: decoding

@triton.jit(do_not_specialize=["Tq", "Tk", "split_keys"])
def _causal_attention_decode_kernel(Q, K, V, O_PART, LSE_PART,
                                    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt,
                                    stride_kd, stride_vb, stride_vh, stride_vt, stride_vd,
                                    n_kv_heads, Tq, Tk, split_keys, qk_scale,
                                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (b * n_kv_heads + kv head, split): the GROUP * Tq query rows of one KV head, packed
    # into one tile (row r is query head kv * GROUP + r // Tq, query r % Tq), against the keys
    # split * split_keys ... + split_keys.
    bh, split = tl.program_id(0), tl.program_id(1)
    b, hk = (bh // n_kv_heads).to(tl.int64), (bh % n_kv_heads).to(tl.int64)
    n_rows = GROUP * Tq
    r = tl.arange(0, BLOCK_M)                                                     # (BLOCK_M,)
    i = r % Tq
    h = hk * GROUP + r // Tq
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = _load_rows(q_ptrs, r, n_rows, offs_d, True, HEAD_DIM, BLOCK_D)            # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    pos = i + (Tk - Tq)
    lo = split * split_keys
    hi = tl.minimum(lo + split_keys, Tk)
    clean_end = tl.maximum(tl.minimum(hi, (Tk - Tq + 1) // BLOCK_N * BLOCK_N), lo)   # keys every row sees
    m_i, l_i = tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                K, V, b, hk, pos, lo, clean_end, Tk, qk_scale, offs_n, offs_d,
                                False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, False)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                K, V, b, hk, pos, clean_end, hi, Tk, qk_scale, offs_n, offs_d,
                                True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, False)
    # A row that sees no key of this split leaves o = 0 and lse = -inf: weight 0 in the combine.
    seen = l_i > 0
    part = (bh * tl.num_programs(1) + split).to(tl.int64) * n_rows
    o_ptrs = O_PART + (part + r[:, None]) * BLOCK_D + offs_d[None, :]
    tl.store(o_ptrs, tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0),
             mask=r[:, None] < n_rows)
    tl.store(LSE_PART + part + r, tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf")),
             mask=r < n_rows)


@triton.jit
def _causal_attention_combine_kernel(O_PART, LSE_PART, O, LSE, stride_ob, stride_oh, stride_ot, stride_od,
                                     n_kv_heads, Tq, n_splits, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                                     BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    # Program per packed row of one KV head: the splits' partial outputs weighted by their share
    # of the softmax, exp2(lse_split - lse), with lse the log-sum-exp of the splits' lse.
    n_rows = GROUP * Tq
    bh, r = tl.program_id(0) // n_rows, tl.program_id(0) % n_rows
    b, hk = (bh // n_kv_heads).to(tl.int64), (bh % n_kv_heads).to(tl.int64)
    h, i = hk * GROUP + r // Tq, r % Tq
    offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    m, l = float("-inf"), 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, n_splits, BLOCK_S):
        splits = start + offs_s                                                   # (BLOCK_S,)
        rows = (bh.to(tl.int64) * n_splits + splits) * n_rows + r
        lse_s = tl.load(LSE_PART + rows, mask=splits < n_splits, other=float("-inf"))
        o_s = tl.load(O_PART + rows[:, None] * BLOCK_D + offs_d[None, :], mask=(splits < n_splits)[:, None],
                      other=0.0)                                                  # (BLOCK_S, BLOCK_D)
        m_new = tl.maximum(m, tl.max(lse_s, 0))   # split 0 holds key 0, seen by every row: finite
        w = tl.math.exp2(lse_s - m_new)
        alpha = tl.math.exp2(m - m_new)
        l = l * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o_s, 0)
        m = m_new
    o_ptrs = O + b * stride_ob + h * stride_oh + i * stride_ot + offs_d * stride_od
    tl.store(o_ptrs, (acc / l).to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(LSE + (b * n_kv_heads * GROUP + h) * Tq + i, m + tl.math.log2(l))


# ----------------------------------------------------------------------------- kernels: backward

@triton.jit
def _causal_attention_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_od,
                                   stride_db, stride_dh, stride_dt, stride_dd, n_heads, Tq,
                                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, bh = _query_tile(tl.program_id(0), Tq, BLOCK_M)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(_tile_ptrs(O + b * stride_ob + h * stride_oh, rows, offs_d, stride_ot, stride_od),
                   rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)                     # (BLOCK_M, BLOCK_D)
    do = _load_rows(_tile_ptrs(DO + b * stride_db + h * stride_dh, rows, offs_d, stride_dt, stride_dd),
                    rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                       # (BLOCK_M,)
    tl.store(DELTA + bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                 stride_qt, stride_qd, stride_dt, stride_dd, q_desc, do_desc, b, h,
                 lo, hi, offset, Tq, qk_scale, offs_m, offs_d,
                 MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    q_ptrs = _tile_ptrs(q_base, lo + offs_m, offs_d, stride_qt, stride_qd)       # (BLOCK_M, BLOCK_D)
    do_ptrs = _tile_ptrs(do_base, lo + offs_m, offs_d, stride_dt, stride_dd)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m                                                   # (BLOCK_M,)
        q = _stream_rows(q_ptrs, q_desc, b, h, start_m, rows, Tq, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_M,
                         USE_TMA)                                                 # (BLOCK_M, BLOCK_D)
        do = _stream_rows(do_ptrs, do_desc, b, h, start_m, rows, Tq, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_M,
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
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale   # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(rows[None, :] + offset >= keys[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)       # (BLOCK_N, BLOCK_D)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)            # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)         # (BLOCK_N, BLOCK_D)
    return dk, dv


@triton.jit(do_not_specialize=["Tq", "Tk", "Q_BUCKET", "K_BUCKET"])
def _causal_attention_dkdv_kernel(Q, K, V, DO, Q_DESC, DO_DESC, DK, DV, LSE, DELTA,
                                  stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                                  stride_vb, stride_vh, stride_vt, stride_vd,
                                  stride_db, stride_dh, stride_dt, stride_dd, stride_gb, stride_gh, stride_gt, stride_gd,
                                  n_kv_heads, group, Tq, Tk, sm_scale, qk_scale, Q_BUCKET, K_BUCKET,
                                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    # DK and DV are allocated alike and share the stride_g* strides.
    n_tiles = tl.cdiv(Tk, BLOCK_N)
    pid_n, bh = tl.program_id(0) % n_tiles, tl.program_id(0) // n_tiles
    b, hk = (bh // n_kv_heads).to(tl.int64), (bh % n_kv_heads).to(tl.int64)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                # (BLOCK_N,)
    offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    k = _load_rows(_tile_ptrs(K + b * stride_kb + hk * stride_kh, keys, offs_d, stride_kt, stride_kd),
                   keys, Tk, offs_d, True, HEAD_DIM, BLOCK_D)                     # (BLOCK_N, BLOCK_D)
    v = _load_rows(_tile_ptrs(V + b * stride_vb + hk * stride_vh, keys, offs_d, stride_vt, stride_vd),
                   keys, Tk, offs_d, True, HEAD_DIM, BLOCK_D)
    dk, dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32), tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    offset = Tk - Tq                                     # query row i sees key j iff i + offset >= j
    first_key = pid_n * BLOCK_N
    last_key = tl.minimum(first_key + BLOCK_N, Tk) - 1
    diag_start = tl.maximum(first_key - offset, 0) // BLOCK_M * BLOCK_M        # first tile seeing a key
    clean_start = tl.cdiv(tl.maximum(last_key - offset, 0), BLOCK_M) * BLOCK_M  # tiles seeing all keys
    full_end = Tq // BLOCK_M * BLOCK_M                                        # tiles without padding rows
    q_end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    n_heads = n_kv_heads * group
    for g in range(0, group):                            # the query heads sharing this KV head
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        lse_base = LSE + (b * n_heads + h) * Tq
        delta_base = DELTA + (b * n_heads + h) * Tq
        dk, dv = _dkdv_blocks(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                              stride_qt, stride_qd, stride_dt, stride_dd, Q_DESC, DO_DESC, b, h,
                              diag_start, tl.minimum(clean_start, q_end), offset, Tq, qk_scale, offs_m, offs_d,
                              True, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA)
        dk, dv = _dkdv_blocks(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                              stride_qt, stride_qd, stride_dt, stride_dd, Q_DESC, DO_DESC, b, h,
                              clean_start, full_end, offset, Tq, qk_scale, offs_m, offs_d,
                              False, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA)
        dk, dv = _dkdv_blocks(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                              stride_qt, stride_qd, stride_dt, stride_dd, Q_DESC, DO_DESC, b, h,
                              tl.maximum(clean_start, full_end), q_end, offset, Tq, qk_scale, offs_m, offs_d,
                              True, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA)
    g_offset = b * stride_gb + hk * stride_gh
    _store_rows(_tile_ptrs(DK + g_offset, keys, offs_d, stride_gt, stride_gd), dk * sm_scale, keys, Tk,
                offs_d, HEAD_DIM, BLOCK_D)
    _store_rows(_tile_ptrs(DV + g_offset, keys, offs_d, stride_gt, stride_gd), dv, keys, Tk,
                offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
               k_desc, v_desc, b, hk, pos, lo, hi, Tk, qk_scale, offs_n, offs_d,
               MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    k_ptrs = _tile_ptrs(k_base, lo + offs_n, offs_d, stride_kt, stride_kd)       # (BLOCK_N, BLOCK_D)
    v_ptrs = _tile_ptrs(v_base, lo + offs_n, offs_d, stride_vt, stride_vd)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n                                                   # (BLOCK_N,)
        k = _stream_rows(k_ptrs, k_desc, b, hk, start_n, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_N,
                         USE_TMA)                                                 # (BLOCK_N, BLOCK_D)
        v = _stream_rows(v_ptrs, v_desc, b, hk, start_n, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_N,
                         USE_TMA)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale     # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(keys[None, :] <= pos[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)              # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)           # (BLOCK_M, BLOCK_D)
    return dq


@triton.jit(do_not_specialize=["Tq", "Tk", "Q_BUCKET", "K_BUCKET"])
def _causal_attention_dq_kernel(Q, K, V, DO, K_DESC, V_DESC, DQ, LSE, DELTA,
                                stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                                stride_vb, stride_vh, stride_vt, stride_vd,
                                stride_db, stride_dh, stride_dt, stride_dd, stride_gb, stride_gh, stride_gt, stride_gd,
                                n_heads, group, Tq, Tk, sm_scale, qk_scale, Q_BUCKET, K_BUCKET,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    pid_m, bh = _query_tile(tl.program_id(0), Tq, BLOCK_M)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                # (BLOCK_M,)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    q = _load_rows(_tile_ptrs(Q + b * stride_qb + h * stride_qh, rows, offs_d, stride_qt, stride_qd),
                   rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)                     # (BLOCK_M, BLOCK_D)
    do = _load_rows(_tile_ptrs(DO + b * stride_db + h * stride_dh, rows, offs_d, stride_dt, stride_dd),
                    rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=float("inf"))   # (BLOCK_M,)
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    v_base = V + b * stride_vb + (h // group) * stride_vh
    pos = rows + (Tk - Tq)
    first = (Tk - Tq) + pid_m * BLOCK_M
    clean_end = (first + 1) // BLOCK_N * BLOCK_N
    end = tl.minimum(first + BLOCK_M, Tk)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                    K_DESC, V_DESC, b, h // group, pos, 0, clean_end, Tk, qk_scale, offs_n, offs_d,
                    False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                    K_DESC, V_DESC, b, h // group, pos, clean_end, end, Tk, qk_scale, offs_n, offs_d,
                    True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA)
    _store_rows(_tile_ptrs(DQ + b * stride_gb + h * stride_gh, rows, offs_d, stride_gt, stride_gd),
                dq * sm_scale, rows, Tq, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- launchers

def _config_dict(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _descriptor(t: torch.Tensor, block_d: int) -> TensorDescriptor | None:
    """A TMA descriptor of a (B, H, T, D) tensor, its tile rows set per config by _Tiles.prepare;
    None when TMA cannot address it (16-byte aligned base and strides, unit column stride)."""
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, block_d])


class _Tiles:
    """The tiles of one attention kernel: on a GPU, autotune candidates (BLOCK_M, BLOCK_N, warps,
    stages, TMA) pruned by shared memory, query count and TMA support; in the interpreter, one
    fixed small tile. streamed names the descriptor arguments and the tile rows they load."""

    def __init__(self, kernel, name: str, tiles: dict[int, list[tuple]], smem_rows: Callable[[int, int, int], int],
                 streamed: dict[str, str]):
        """tiles: for each widest BLOCK_D it serves (ascending), (BLOCK_M, BLOCK_N, warps, stages[,
        kind]); kind "sm90": Hopper or later only, "tma": that and through TMA."""
        self.kernel, self.name, self.smem_rows, self.streamed = kernel, name, smem_rows, streamed
        self.arg_names = [n for n, p in inspect.signature(kernel.fn).parameters.items()
                          if "constexpr" not in str(p.annotation)]              # the run-time arguments
        self.tiles = {d: [{"BLOCK_M": t[0], "BLOCK_N": t[1], "num_warps": t[2], "num_stages": t[3],
                           "USE_TMA": t[4:] == ("tma",)} for t in ts] for d, ts in tiles.items()}
        self.hopper_only = {(d, tuple(c.items())) for d, ts in tiles.items() for t, c in zip(ts, self.tiles[d])
                            if t[4:]}
        every = {tuple(c.items()) for ts in self.tiles.values() for c in ts}
        # Created at import, when triton also decided whether the @triton.jit kernels run interpreted.
        self.tuner = None if interpreting() else triton.autotune(
            [triton.Config({k: v for k, v in c.items() if not k.startswith("num_")}, num_warps=c["num_warps"],
                           num_stages=c["num_stages"], pre_hook=self.prepare) for c in map(dict, sorted(every))],
            key=["HEAD_DIM", "Q_BUCKET", "K_BUCKET"], prune_configs_by={"early_config_prune": self._prune})(kernel)

    def candidates(self, q: torch.Tensor, block_d: int, q_bucket: int, tma: bool, gpu: Gpu) -> list[dict]:
        """The configs the autotuner may pick: the tiles for this head dim whose shared-memory
        estimate fits the GPU, whose query tile is not far larger than the query count (decode
        steps get 16-row tiles), and which use TMA only on Hopper or later when the tensors allow
        it (tma); never empty. In the interpreter: INTERPRETER_TILES."""
        if gpu.capability == 0:
            fixed = INTERPRETER_TILES[self.name]
            return [{**fixed, "USE_TMA": fixed.get("USE_TMA", False) and tma, "num_warps": 4, "num_stages": 1}]
        dim = next((d for d in self.tiles if block_d <= d), list(self.tiles)[-1])
        configs = self.tiles[dim]
        row_bytes = q.element_size() * block_d

        def smem(c):
            return row_bytes * self.smem_rows(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"])

        usable = [c for c in configs if (gpu.capability >= 90 and (tma or not c["USE_TMA"]))
                  or (dim, tuple(c.items())) not in self.hopper_only]
        kept = [c for c in usable if smem(c) <= gpu.smem_per_block and c["BLOCK_M"] <= max(16, q_bucket)]
        return kept or [min(usable, key=smem)]

    def prepare(self, named: dict) -> None:
        """Set the descriptors' tile rows to the config's (they are part of the kernel's signature)."""
        for arg, rows in self.streamed.items():
            if isinstance(named[arg], TensorDescriptor):
                named[arg].block_shape = [1, 1, named[rows], named["BLOCK_D"]]

    def launch(self, grid: Callable[[dict], tuple[int]], args: tuple, consts: dict, q: torch.Tensor,
               q_bucket: int, gpu: Gpu) -> Launch:
        """The Launch of the kernel on args (every run-time argument but the streamed ones, in
        order); each streamed argument gets its tensor's descriptor or, where TMA cannot address
        one of them, the tensor itself."""
        named = dict(zip([n for n in self.arg_names if n not in self.streamed], args))
        descriptors = {arg: _descriptor(named[arg.removesuffix("_DESC")], consts["BLOCK_D"]) for arg in self.streamed}
        tma = all(d is not None for d in descriptors.values())
        named.update({arg: d if tma else named[arg.removesuffix("_DESC")] for arg, d in descriptors.items()})
        configs = self.candidates(q, consts["BLOCK_D"], q_bucket, tma, gpu)
        ordered = tuple(named[n] for n in self.arg_names)
        return Launch(self.kernel, grid, ordered, consts, configs, None if gpu.capability == 0 else self.tuner,
                      self.prepare)

    def _prune(self, configs: list, named_args: dict, **kwargs) -> list:
        args = {**named_args, **kwargs}
        tma = all(isinstance(args[arg], TensorDescriptor) for arg in self.streamed)
        keep = self.candidates(args["Q"], args["BLOCK_D"], args["Q_BUCKET"], tma, gpu_of(args["Q"].device))
        return [c for c in configs if _config_dict(c) in keep]


# Interpreter tiles, smaller than the test shapes so every tiling path runs; tests swap them for
# the other BLOCK_M / BLOCK_N ratios of the GPU tiles.
INTERPRETER_TILES = {"fwd": {"BLOCK_M": 32, "BLOCK_N": 16}, "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32},
                     "dq": {"BLOCK_M": 32, "BLOCK_N": 16}}

# Tiles by head dim: bench/compiled.py shows that none spills registers at head dims 64 and 128 on
# sm_90a, nor the others on sm_80 (the ones left out spill: a (64, 64)-tile dK/dV with 4 warps
# holds K, V and the fp32 dK, dV for 64 keys in 128 threads). A fifth entry "sm90" keeps a tile to
# Hopper and later (it spills with sm_80's register-held MMA operands), "tma" also streams its
# tiles through TMA when the strides allow. (Triton 3.9's warp specialization does not take these
# loops on sm_90a: the 4-warp forward fails to compile with it, the 8-warp one compiles unchanged.)
# Shared-memory rows per config: the resident tiles once, the streamed tiles once per stage.
FWD_TILES = _Tiles(_causal_attention_fwd_kernel, "fwd",
                   {64: [(16, 64, 4, 3), (16, 128, 4, 2), (64, 32, 4, 2), (64, 64, 4, 3), (64, 32, 4, 4),
                         (128, 32, 4, 4), (128, 64, 8, 3), (128, 64, 4, 3, "sm90"), (128, 128, 8, 2, "sm90"),
                         (64, 64, 4, 3, "tma"), (128, 64, 8, 3, "tma"), (128, 128, 8, 2, "tma")],
                    256: [(16, 64, 4, 3), (16, 128, 4, 2), (64, 32, 4, 2), (64, 32, 4, 4), (64, 64, 4, 3, "sm90"),
                          (128, 32, 4, 4, "sm90"), (128, 64, 8, 3, "sm90"), (128, 128, 8, 2, "sm90"),
                          (64, 64, 4, 3, "tma"), (128, 64, 8, 3, "tma"), (128, 128, 8, 2, "tma")]},
                   lambda m, n, s: m + 2 * n * s, {"K_DESC": "BLOCK_N", "V_DESC": "BLOCK_N"})
DKDV_TILES = _Tiles(_causal_attention_dkdv_kernel, "dkdv",
                    {64: [(16, 64, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 8, 2), (64, 128, 8, 3),
                          (64, 64, 8, 2, "sm90"), (64, 128, 8, 2, "sm90"), (32, 64, 4, 3, "tma"),
                          (64, 128, 8, 2, "tma")],
                     256: [(16, 64, 4, 2), (32, 64, 8, 2), (16, 128, 8, 2), (32, 64, 4, 3, "sm90"),
                           (32, 128, 8, 3, "sm90"), (32, 64, 4, 3, "tma"), (32, 128, 8, 3, "tma")]},
                    lambda m, n, s: 2 * n + 2 * m * s, {"Q_DESC": "BLOCK_M", "DO_DESC": "BLOCK_M"})
_DQ = [(16, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2, "tma"),
       (128, 64, 8, 2, "tma")]
DQ_TILES = _Tiles(_causal_attention_dq_kernel, "dq", {64: _DQ + [(64, 64, 4, 2), (128, 64, 8, 2)],
                                                      256: _DQ + [(128, 64, 8, 2, "sm90")]},
                  lambda m, n, s: 2 * m + 2 * n * s, {"K_DESC": "BLOCK_N", "V_DESC": "BLOCK_N"})


def _constants(q: torch.Tensor) -> dict:
    head_dim = q.shape[-1]
    # fp32 must not silently drop to tf32; half-precision dots ignore the setting.
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _query_grid(Tq: int, bh: int) -> Callable[[dict], tuple[int]]:
    return lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * bh,)


def decode_split(B: int, Hkv: int, Tk: int, gpu: Gpu) -> tuple[int, int, int]:
    """(BLOCK_N, splits, keys per split) of a decode step: about DECODE_PROGRAMS_PER_SM programs per
    SM, each a whole number of key tiles."""
    block_n = 16 if gpu.capability == 0 else DECODE_BLOCK_N
    splits = max(1, min(triton.cdiv(Tk, block_n), triton.cdiv(DECODE_PROGRAMS_PER_SM * gpu.sms, B * Hkv)))
    split_keys = triton.cdiv(triton.cdiv(Tk, splits), block_n) * block_n
    return block_n, triton.cdiv(Tk, split_keys), split_keys


def _plan_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, o: torch.Tensor,
                 lse: torch.Tensor, gpu: Gpu) -> list[Launch]:
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    consts = _constants(q)
    block_n, splits, split_keys = decode_split(B, Hkv, Tk, gpu)
    # Rows padded to 64, the smallest warpgroup MMA tile, on a GPU; the interpreter needs 16.
    block_m = max(16 if gpu.capability == 0 else 64, triton.next_power_of_2(group * Tq))
    o_part = torch.empty((B * Hkv, splits, group * Tq, consts["BLOCK_D"]), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B * Hkv, splits, group * Tq), dtype=torch.float32, device=q.device)
    return [
        Launch.fixed(_causal_attention_decode_kernel, (B * Hkv, splits),
                     (q, k, v, o_part, lse_part, *q.stride(), *k.stride(), *v.stride(), Hkv, Tq, Tk, split_keys,
                      scale * LOG2E), 4, 3, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, **consts),
        Launch.fixed(_causal_attention_combine_kernel, (B * Hq * Tq,),
                     (o_part, lse_part, o, lse, *o.stride(), Hkv, Tq, splits), 4, GROUP=group, HEAD_DIM=D,
                     BLOCK_D=consts["BLOCK_D"], BLOCK_S=16),
    ]


def plan_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, o: torch.Tensor,
                 lse: torch.Tensor, gpu: Gpu) -> list[Launch]:
    """The launches of forward (below): split-key decoding for Tq <= DECODE_MAX_TQ, else one."""
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Tq <= DECODE_MAX_TQ:
        return _plan_decode(q, k, v, scale, o, lse, gpu)
    q_bucket = triton.next_power_of_2(Tq)
    args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            Hq, Hq // Hkv, Tq, Tk, scale * LOG2E, q_bucket, triton.next_power_of_2(Tk))
    return [FWD_TILES.launch(_query_grid(Tq, B * Hq), args, _constants(q), q, q_bucket, gpu)]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            o: torch.Tensor, lse: torch.Tensor) -> None:
    """Write o (B, Hq, Tq, D), any strides, and lse (B, Hq, Tq) contiguous fp32 (base-2 logsumexp
    of the scaled scores), from validated q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D)."""
    run(plan_forward(q, k, v, scale, o, lse, gpu_of(q.device)))


def plan_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                  delta: torch.Tensor, gpu: Gpu) -> list[Launch]:
    """The launches of backward (below); delta (B, Hq, Tq) fp32 contiguous is their scratch."""
    assert dk.stride() == dv.stride(), "dk and dv must share strides"
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    consts = _constants(q)
    q_bucket = triton.next_power_of_2(Tq)
    common = (Hq // Hkv, Tq, Tk, scale, scale * LOG2E, q_bucket, triton.next_power_of_2(Tk))
    return [
        Launch.fixed(_causal_attention_delta_kernel, (triton.cdiv(Tq, DELTA_BLOCK_M) * B * Hq,),
                     (o, do, delta, *o.stride(), *do.stride(), Hq, Tq), 4,
                     HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], BLOCK_M=DELTA_BLOCK_M),
        DKDV_TILES.launch(lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]) * B * Hkv,),
                          (q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                           *dk.stride(), Hkv, *common), consts, q, q_bucket, gpu),
        DQ_TILES.launch(_query_grid(Tq, B * Hq),
                        (q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                         *dq.stride(), Hq, *common), consts, q, q_bucket, gpu),
    ]


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Write dq (like q) and dk, dv (like k; both with the same strides) from the forward's o, lse."""
    delta = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    run(plan_backward(do, q, k, v, o, lse, scale, dq, dk, dv, delta, gpu_of(q.device)))


# ----------------------------------------------------------------------------- torch custom ops

def _new_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, Tq, D = q.shape
    o = q.new_empty_strided((B, Hq, Tq, D), (Tq * Hq * D, D, Hq * D, 1))   # (B, Tq, Hq, D) in memory
    return o, q.new_empty((B, Hq, Tq), dtype=torch.float32)


def _new_grads(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape)


@torch.library.custom_op("tritongpt::causal_attention", mutates_args=())
def _causal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _new_outputs(q)
    forward(q, k, v, scale, o, lse)
    return o, lse


@_causal_attention_op.register_fake
def _(q, k, v, scale):
    return _new_outputs(q)


@torch.library.custom_op("tritongpt::causal_attention_backward", mutates_args=())
def _causal_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  o: torch.Tensor, lse: torch.Tensor,
                                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _new_grads(q, k)
    backward(do, q, k, v, o, lse, scale, dq, dk, dv)
    return dq, dk, dv


@_causal_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, scale):
    return _new_grads(q, k)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _causal_attention_backward_op(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_causal_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The triton backend of kernels.causal_attention (inputs validated there); see the module doc."""
    return _causal_attention_op(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale))[0]
