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

Memory traffic (Tq = Tk = T, per query head): the forward reads Q and writes O once and reads K
and V about T / (2 BLOCK_M) times; the backward reads Q, dO about T / (2 BLOCK_N) times and K, V
about T / (2 BLOCK_M) times. O is written in (B, Tq, Hq, D) memory order behind a (B, Hq, Tq, D)
view, so the model's transpose back to (B, T, Hq * D) is free. All tensors are addressed through
their strides: transposed projections and slices of a preallocated KV cache are read in place.
Head dims that are not powers of two run on a power-of-two tile with masked columns. fp32 dots
are IEEE-exact; fp16/bf16 use tensor cores with fp32 accumulation. On a GPU every kernel is
autotuned over a few tiles pruned by shared memory and query count; the CPU interpreter
(TRITON_INTERPRET=1, for tests) uses fixed small tiles.

NaN (the rule of kernels.causal_attention): a NaN in q row i, or in k or v at a key that row
attends, makes output row i NaN through the online softmax (exp2(NaN - m) is NaN whatever max m
keeps). Masked scores are replaced by -inf (a select), so a NaN key never reaches a query that
does not attend it; a NaN value does reach the queries of the tiles that load its key, since
their masked probabilities are exactly 0 and 0 * NaN is NaN in the P @ V dot.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import triton
import triton.language as tl

from kernels.launching import interpreting

LOG2E = 1.4426950408889634
DELTA_BLOCK_M = 64


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
                pos, lo, hi, Tk, qk_scale, offs_n, offs_d,
                MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k_ptrs = _tile_ptrs(k_base, lo + offs_n, offs_d, stride_kt, stride_kd)       # (BLOCK_N, BLOCK_D)
    v_ptrs = _tile_ptrs(v_base, lo + offs_n, offs_d, stride_vt, stride_vd)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n                                                   # (BLOCK_N,)
        k = _load_rows(k_ptrs, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D)       # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale     # (BLOCK_M, BLOCK_N)
        if MASKED:
            s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
        # Every row sees key 0 in the first tile it loads, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 1))                                     # (BLOCK_M,)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_ptrs, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D)       # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["Tq", "Tk", "Q_BUCKET", "K_BUCKET"])
def _causal_attention_fwd_kernel(Q, K, V, O, LSE,
                                 stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                                 stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
                                 n_heads, group, Tq, Tk, qk_scale, Q_BUCKET, K_BUCKET,
                                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
                                pos, 0, clean_end, Tk, qk_scale, offs_n, offs_d,
                                False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    # Padding rows are not masked against keys >= Tk: those load as zeros and the rows are never stored.
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                pos, clean_end, end, Tk, qk_scale, offs_n, offs_d,
                                True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    _store_rows(_tile_ptrs(O + b * stride_ob + h * stride_oh, rows, offs_d, stride_ot, stride_od),
                acc / l_i[:, None], rows, Tq, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh.to(tl.int64) * Tq + rows, m_i + tl.math.log2(l_i), mask=rows < Tq)


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
                 stride_qt, stride_qd, stride_dt, stride_dd, lo, hi, offset, Tq, qk_scale, offs_m, offs_d,
                 MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    q_ptrs = _tile_ptrs(q_base, lo + offs_m, offs_d, stride_qt, stride_qd)       # (BLOCK_M, BLOCK_D)
    do_ptrs = _tile_ptrs(do_base, lo + offs_m, offs_d, stride_dt, stride_dd)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m                                                   # (BLOCK_M,)
        q = _load_rows(q_ptrs, rows, Tq, offs_d, MASKED, HEAD_DIM, BLOCK_D)       # (BLOCK_M, BLOCK_D)
        do = _load_rows(do_ptrs, rows, Tq, offs_d, MASKED, HEAD_DIM, BLOCK_D)
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
def _causal_attention_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                                  stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                                  stride_vb, stride_vh, stride_vt, stride_vd,
                                  stride_db, stride_dh, stride_dt, stride_dd, stride_gb, stride_gh, stride_gt, stride_gd,
                                  n_kv_heads, group, Tq, Tk, sm_scale, qk_scale, Q_BUCKET, K_BUCKET,
                                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
                              stride_qt, stride_qd, stride_dt, stride_dd, diag_start,
                              tl.minimum(clean_start, q_end), offset, Tq, qk_scale, offs_m, offs_d,
                              True, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                              stride_qt, stride_qd, stride_dt, stride_dd, clean_start, full_end,
                              offset, Tq, qk_scale, offs_m, offs_d,
                              False, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                              stride_qt, stride_qd, stride_dt, stride_dd, tl.maximum(clean_start, full_end),
                              q_end, offset, Tq, qk_scale, offs_m, offs_d,
                              True, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
    g_offset = b * stride_gb + hk * stride_gh
    _store_rows(_tile_ptrs(DK + g_offset, keys, offs_d, stride_gt, stride_gd), dk * sm_scale, keys, Tk,
                offs_d, HEAD_DIM, BLOCK_D)
    _store_rows(_tile_ptrs(DV + g_offset, keys, offs_d, stride_gt, stride_gd), dv, keys, Tk,
                offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
               pos, lo, hi, Tk, qk_scale, offs_n, offs_d,
               MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k_ptrs = _tile_ptrs(k_base, lo + offs_n, offs_d, stride_kt, stride_kd)       # (BLOCK_N, BLOCK_D)
    v_ptrs = _tile_ptrs(v_base, lo + offs_n, offs_d, stride_vt, stride_vd)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n                                                   # (BLOCK_N,)
        k = _load_rows(k_ptrs, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D)       # (BLOCK_N, BLOCK_D)
        v = _load_rows(v_ptrs, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D)
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
def _causal_attention_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                                stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                                stride_vb, stride_vh, stride_vt, stride_vd,
                                stride_db, stride_dh, stride_dt, stride_dd, stride_gb, stride_gh, stride_gt, stride_gd,
                                n_heads, group, Tq, Tk, sm_scale, qk_scale, Q_BUCKET, K_BUCKET,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
                    pos, 0, clean_end, Tk, qk_scale, offs_n, offs_d,
                    False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                    pos, clean_end, end, Tk, qk_scale, offs_n, offs_d,
                    True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    _store_rows(_tile_ptrs(DQ + b * stride_gb + h * stride_gh, rows, offs_d, stride_gt, stride_gd),
                dq * sm_scale, rows, Tq, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- launchers

def _prune(configs: list, named_args: dict, smem_rows: Callable[[int, int, int], int], **kwargs) -> list:
    """Keep the tiles whose shared-memory estimate fits this GPU and whose query tile is not far
    larger than the query count (decode steps get 16-row tiles); never return an empty list."""
    args = {**named_args, **kwargs}
    budget = torch.cuda.get_device_properties(args["Q"].device).shared_memory_per_block_optin
    row_bytes = args["Q"].element_size() * args["BLOCK_D"]

    def smem(c):
        return row_bytes * smem_rows(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages)

    kept = [c for c in configs if smem(c) <= budget and c.kwargs["BLOCK_M"] <= max(16, args["Q_BUCKET"])]
    return kept or [min(configs, key=smem)]


def _autotuned(kernel, tiles: list[tuple[int, int, int, int]], smem_rows: Callable[[int, int, int], int],
               interpreter_blocks: dict[str, int]) -> Callable:
    """launch(grid, *args, **constexprs): autotuned over (BLOCK_M, BLOCK_N, warps, stages) tiles on a
    GPU, the fixed interpreter_blocks in the interpreter."""
    # Called at import, when triton also decided whether the @triton.jit kernels run interpreted.
    if interpreting():
        return lambda grid, *args, **kw: kernel[grid](*args, **kw, **interpreter_blocks)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]
    tuned = triton.autotune(configs, key=["HEAD_DIM", "Q_BUCKET", "K_BUCKET"],
                            prune_configs_by={"early_config_prune": functools.partial(_prune, smem_rows=smem_rows)})(kernel)
    return lambda grid, *args, **kw: tuned[grid](*args, **kw)


# Interpreter tiles, smaller than the test shapes so every tiling path runs; tests swap them for
# the other BLOCK_M / BLOCK_N ratios of the GPU tiles.
INTERPRETER_TILES = {"fwd": {"BLOCK_M": 32, "BLOCK_N": 16}, "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32},
                     "dq": {"BLOCK_M": 32, "BLOCK_N": 16}}

# Shared-memory rows per config: the resident tiles once, the streamed tiles once per pipeline stage.
_FWD = _autotuned(_causal_attention_fwd_kernel,
                  [(16, 64, 4, 3), (16, 128, 4, 2), (64, 32, 4, 2), (64, 64, 4, 3), (64, 32, 4, 4),
                   (128, 32, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
                  lambda m, n, s: m + 2 * n * s, INTERPRETER_TILES["fwd"])
_DKDV = _autotuned(_causal_attention_dkdv_kernel,
                   [(16, 64, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 8, 2), (64, 64, 4, 2),
                    (64, 128, 8, 2), (64, 128, 8, 3)],
                   lambda m, n, s: 2 * n + 2 * m * s, INTERPRETER_TILES["dkdv"])
_DQ = _autotuned(_causal_attention_dq_kernel,
                 [(16, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 2),
                  (128, 64, 8, 2), (128, 32, 8, 3)],
                 lambda m, n, s: 2 * m + 2 * n * s, INTERPRETER_TILES["dq"])


def _constants(q: torch.Tensor) -> dict:
    head_dim = q.shape[-1]
    # fp32 must not silently drop to tf32; half-precision dots ignore the setting.
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _query_grid(Tq: int, bh: int) -> Callable[[dict], tuple[int]]:
    return lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * bh,)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            o: torch.Tensor, lse: torch.Tensor) -> None:
    """Write o (B, Hq, Tq, D), any strides, and lse (B, Hq, Tq) contiguous fp32 (base-2 logsumexp
    of the scaled scores), from validated q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D)."""
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    _FWD(_query_grid(Tq, B * Hq), q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
         Hq, Hq // Hkv, Tq, Tk, scale * LOG2E, triton.next_power_of_2(Tq), triton.next_power_of_2(Tk),
         **_constants(q))


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Write dq (like q) and dk, dv (like k; both with the same strides) from the forward's o, lse."""
    assert dk.stride() == dv.stride(), "dk and dv must share strides"
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    consts = _constants(q)
    delta = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    _causal_attention_delta_kernel[(triton.cdiv(Tq, DELTA_BLOCK_M) * B * Hq,)](
        o, do, delta, *o.stride(), *do.stride(), Hq, Tq,
        HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], BLOCK_M=DELTA_BLOCK_M)
    common = (Hq // Hkv, Tq, Tk, scale, scale * LOG2E, triton.next_power_of_2(Tq), triton.next_power_of_2(Tk))
    _DKDV(lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]) * B * Hkv,),
          q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
          Hkv, *common, **consts)
    _DQ(_query_grid(Tq, B * Hq), q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *dq.stride(), Hq, *common, **consts)


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
