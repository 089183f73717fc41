"""Causal attention in Triton for training, FlashAttention-2 style: forward, backward, GQA, offsets.

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

Few queries (Tq <= DECODE_MAX_TQ: decode steps, speculative verification) and calls with per-row
key lengths go to the split-key kernels of triton_attention_decode.py; the tile helpers and the
forward's inner loop (fwd_blocks) that both use live in triton_attention_tiles.py.

Memory traffic (Tq = Tk = T, per query head): the forward reads Q and writes O once and reads K
and V about T / (2 BLOCK_M) times; the backward reads Q, dO about T / (2 BLOCK_N) times and K, V
about T / (2 BLOCK_M) times. O is written in (B, Tq, Hq, D) memory order behind a (B, Hq, Tq, D)
view, so the model's transpose back to (B, T, Hq * D) is free. All tensors are addressed through
their strides: transposed projections and slices of a preallocated KV cache are read in place.
Head dims that are not powers of two run on a power-of-two tile with masked columns. fp32 dots
are IEEE-exact; fp16/bf16 use tensor cores with fp32 accumulation. On a GPU every kernel is
autotuned (launching.Autotune) over a few named tiles per head dim, pruned by shared memory and
query count, none of which spills registers on sm_90a (python -m bench.compiled shows it); on
Hopper some candidates stream their tiles through TMA tensor descriptors (one per (B, H, T, D)
tensor, whose out-of-bounds rows and columns load as zeros), so the autotuner picks TMA or
pointer loads by measurement. The CPU
interpreter (TRITON_INTERPRET=1, for tests) uses fixed small tiles.

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

from kernels import reference, triton_attention_decode as decode
from kernels.launching import Autotune, Gpu, Launch, Tile, gpu_of, run
from kernels.triton_attention_tiles import (LOG2E, constants, fwd_blocks, load_rows, new_outputs, store_rows,
                                            stream_rows, strides, tile_ptrs)

DELTA_BLOCK_M = 64


# ----------------------------------------------------------------------------- kernels: forward

@triton.jit
def _query_tile(pid, Tq, BLOCK_M: tl.constexpr):
    """(query tile index, batch*head index) of a 1-D grid; longest causal rows are scheduled first."""
    n_tiles = tl.cdiv(Tq, BLOCK_M)
    return n_tiles - 1 - pid % n_tiles, pid // n_tiles



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
    q = load_rows(tile_ptrs(Q + b * stride_qb + h * stride_qh, rows, offs_d, stride_qt, stride_qd),
                   rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)                     # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + (h // group) * stride_kh
    v_base = V + b * stride_vb + (h // group) * stride_vh
    pos = rows + (Tk - Tq)                               # absolute positions; rows >= Tq are padding
    first = (Tk - Tq) + pid_m * BLOCK_M
    clean_end = (first + 1) // BLOCK_N * BLOCK_N         # key tiles every row sees whole
    end = tl.minimum(first + BLOCK_M, Tk)                # past the last key any row sees
    m_i, l_i = tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                K_DESC, V_DESC, b, h // group, pos, 0, clean_end, Tk, qk_scale, offs_n, offs_d,
                                False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA)
    # Padding rows are not masked against keys >= Tk: those load as zeros and the rows are never stored.
    acc, m_i, l_i = fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                K_DESC, V_DESC, b, h // group, pos, clean_end, end, Tk, qk_scale, offs_n, offs_d,
                                True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, USE_TMA)
    store_rows(tile_ptrs(O + b * stride_ob + h * stride_oh, rows, offs_d, stride_ot, stride_od),
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
    o = load_rows(tile_ptrs(O + b * stride_ob + h * stride_oh, rows, offs_d, stride_ot, stride_od),
                   rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)                     # (BLOCK_M, BLOCK_D)
    do = load_rows(tile_ptrs(DO + b * stride_db + h * stride_dh, rows, offs_d, stride_dt, stride_dd),
                    rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                       # (BLOCK_M,)
    tl.store(DELTA + bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, keys, q_base, do_base, lse_base, delta_base,
                 stride_qt, stride_qd, stride_dt, stride_dd, q_desc, do_desc, b, h,
                 lo, hi, offset, Tq, qk_scale, offs_m, offs_d,
                 MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    q_ptrs = tile_ptrs(q_base, lo + offs_m, offs_d, stride_qt, stride_qd)       # (BLOCK_M, BLOCK_D)
    do_ptrs = tile_ptrs(do_base, lo + offs_m, offs_d, stride_dt, stride_dd)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m                                                   # (BLOCK_M,)
        q = stream_rows(q_ptrs, q_desc, b, h, start_m, rows, Tq, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_M,
                         USE_TMA)                                                 # (BLOCK_M, BLOCK_D)
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
    k = load_rows(tile_ptrs(K + b * stride_kb + hk * stride_kh, keys, offs_d, stride_kt, stride_kd),
                   keys, Tk, offs_d, True, HEAD_DIM, BLOCK_D)                     # (BLOCK_N, BLOCK_D)
    v = load_rows(tile_ptrs(V + b * stride_vb + hk * stride_vh, keys, offs_d, stride_vt, stride_vd),
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
    store_rows(tile_ptrs(DK + g_offset, keys, offs_d, stride_gt, stride_gd), dk * sm_scale, keys, Tk,
                offs_d, HEAD_DIM, BLOCK_D)
    store_rows(tile_ptrs(DV + g_offset, keys, offs_d, stride_gt, stride_gd), dv, keys, Tk,
                offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
               k_desc, v_desc, b, hk, pos, lo, hi, Tk, qk_scale, offs_n, offs_d,
               MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    k_ptrs = tile_ptrs(k_base, lo + offs_n, offs_d, stride_kt, stride_kd)       # (BLOCK_N, BLOCK_D)
    v_ptrs = tile_ptrs(v_base, lo + offs_n, offs_d, stride_vt, stride_vd)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n                                                   # (BLOCK_N,)
        k = stream_rows(k_ptrs, k_desc, b, hk, start_n, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_N,
                         USE_TMA)                                                 # (BLOCK_N, BLOCK_D)
        v = stream_rows(v_ptrs, v_desc, b, hk, start_n, keys, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D, BLOCK_N,
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
    q = load_rows(tile_ptrs(Q + b * stride_qb + h * stride_qh, rows, offs_d, stride_qt, stride_qd),
                   rows, Tq, offs_d, True, HEAD_DIM, BLOCK_D)                     # (BLOCK_M, BLOCK_D)
    do = load_rows(tile_ptrs(DO + b * stride_db + h * stride_dh, rows, offs_d, stride_dt, stride_dd),
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
    store_rows(tile_ptrs(DQ + b * stride_gb + h * stride_gh, rows, offs_d, stride_gt, stride_gd),
                dq * sm_scale, rows, Tq, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- launchers

def _descriptor(t: torch.Tensor, block_d: int) -> TensorDescriptor | None:
    """A TMA descriptor of a (B, H, T, D) tensor, its tile rows set per config by _set_tile_rows;
    None when TMA cannot address it (16-byte aligned base and strides, unit column stride)."""
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, block_d])


# Tiles by head dim (each list serves head dims up to its key's BLOCK_D; the last, any wider):
# bench/compiled.py shows that none spills registers at head dims 64 and 128 on sm_90a, nor the
# others on sm_80 (the ones left out spill: a (64, 64)-tile dK/dV with 4 warps holds K, V and the
# fp32 dK, dV for 64 keys in 128 threads). hopper=True keeps a tile to Hopper and later (it spills
# with sm_80's register-held MMA operands); tma=True also streams its tiles through TMA when the
# strides allow. (Triton 3.9's warp specialization does not take these loops on sm_90a: the
# 4-warp forward fails to compile with it, the 8-warp one compiles unchanged.)
_HOPPER, _TMA = dict(hopper=True), dict(tma=True, hopper=True)
_DQ = [Tile(16, 64, 4, 2), Tile(64, 32, 4, 2), Tile(64, 32, 4, 3), Tile(128, 32, 8, 2), Tile(128, 32, 8, 3),
       Tile(64, 32, 4, 2, **_TMA), Tile(128, 64, 8, 2, **_TMA)]
TILES: dict[str, dict[int, list[Tile]]] = {
    "fwd": {64: [Tile(16, 64, 4, 3), Tile(16, 128, 4, 2), Tile(64, 32, 4, 2), Tile(64, 64, 4, 3), Tile(64, 32, 4, 4),
                 Tile(128, 32, 4, 4), Tile(128, 64, 8, 3), Tile(128, 64, 4, 3, **_HOPPER),
                 Tile(128, 128, 8, 2, **_HOPPER), Tile(64, 64, 4, 3, **_TMA), Tile(128, 64, 8, 3, **_TMA),
                 Tile(128, 128, 8, 2, **_TMA)],
            256: [Tile(16, 64, 4, 3), Tile(16, 128, 4, 2), Tile(64, 32, 4, 2), Tile(64, 32, 4, 4),
                  Tile(64, 64, 4, 3, **_HOPPER), Tile(128, 32, 4, 4, **_HOPPER), Tile(128, 64, 8, 3, **_HOPPER),
                  Tile(128, 128, 8, 2, **_HOPPER), Tile(64, 64, 4, 3, **_TMA), Tile(128, 64, 8, 3, **_TMA),
                  Tile(128, 128, 8, 2, **_TMA)]},
    "dkdv": {64: [Tile(16, 64, 4, 2), Tile(32, 64, 4, 2), Tile(32, 64, 4, 3), Tile(32, 128, 8, 2), Tile(64, 128, 8, 3),
                  Tile(64, 64, 8, 2, **_HOPPER), Tile(64, 128, 8, 2, **_HOPPER), Tile(32, 64, 4, 3, **_TMA),
                  Tile(64, 128, 8, 2, **_TMA)],
             256: [Tile(16, 64, 4, 2), Tile(32, 64, 8, 2), Tile(16, 128, 8, 2), Tile(32, 64, 4, 3, **_HOPPER),
                   Tile(32, 128, 8, 3, **_HOPPER), Tile(32, 64, 4, 3, **_TMA), Tile(32, 128, 8, 3, **_TMA)]},
    "dq": {64: _DQ + [Tile(64, 64, 4, 2), Tile(128, 64, 8, 2)], 256: _DQ + [Tile(128, 64, 8, 2, **_HOPPER)]},
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
    16-row tiles), and which use TMA only on Hopper or later when the tensors allow it (tma);
    never empty. In the interpreter: INTERPRETER_TILES[name] alone (with TMA only if tma)."""
    if gpu.capability == 0:
        tile = INTERPRETER_TILES[name]
        return [dataclasses.replace(tile, tma=tile.tma and tma)]
    table = TILES[name]
    tiles = table[next((d for d in table if block_d <= d), list(table)[-1])]
    row_bytes = q.element_size() * block_d
    usable = [t for t in tiles if not t.hopper or (gpu.capability >= 90 and (tma or not t.tma))]
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

    return Autotune(kernel, [t for tiles in TILES[name].values() for t in tiles], ["HEAD_DIM", "Q_BUCKET", "K_BUCKET"],
                    allowed, functools.partial(_set_tile_rows, name))


AUTOTUNE = {"fwd": _autotune("fwd", _causal_attention_fwd_kernel),
            "dkdv": _autotune("dkdv", _causal_attention_dkdv_kernel),
            "dq": _autotune("dq", _causal_attention_dq_kernel)}


def _with_descriptors(name: str, args: dict, block_d: int) -> dict:
    """args plus kernel `name`'s descriptor arguments: each streamed tensor's TMA descriptor or,
    where TMA cannot address one of them, the tensors themselves (the kernel then uses pointers)."""
    descriptors = {arg: _descriptor(args[arg.removesuffix("_DESC")], block_d) for arg in STREAMED[name]}
    tma = all(d is not None for d in descriptors.values())
    return {**args, **{arg: d if tma else args[arg.removesuffix("_DESC")] for arg, d in descriptors.items()}}


def _query_grid(Tq: int, bh: int) -> Callable[[dict], tuple[int]]:
    return lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]) * bh,)


def plan_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, o: torch.Tensor,
                 lse: torch.Tensor, gpu: Gpu) -> list[Launch]:
    """The launches of forward (below): split-key decoding for Tq <= DECODE_MAX_TQ, else one."""
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Tq <= decode.DECODE_MAX_TQ:
        return decode.plan_forward(q, k, v, scale, o, lse, gpu)
    consts, q_bucket = constants(q), triton.next_power_of_2(Tq)
    args = dict(Q=q, K=k, V=v, O=o, LSE=lse, **strides("q", q), **strides("k", k), **strides("v", v),
                **strides("o", o), n_heads=Hq, group=Hq // Hkv, Tq=Tq, Tk=Tk, qk_scale=scale * LOG2E,
                Q_BUCKET=q_bucket, K_BUCKET=triton.next_power_of_2(Tk))
    return [AUTOTUNE["fwd"].launch(_query_grid(Tq, B * Hq), _with_descriptors("fwd", args, consts["BLOCK_D"]),
                                   consts, gpu)]


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
    consts = constants(q)
    inputs = dict(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, **strides("q", q), **strides("k", k),
                  **strides("v", v), **strides("d", do), group=Hq // Hkv, Tq=Tq, Tk=Tk, sm_scale=scale,
                  qk_scale=scale * LOG2E, Q_BUCKET=triton.next_power_of_2(Tq), K_BUCKET=triton.next_power_of_2(Tk))
    dkdv_args = _with_descriptors("dkdv", dict(inputs, DK=dk, DV=dv, **strides("g", dk), n_kv_heads=Hkv),
                                  consts["BLOCK_D"])
    dq_args = _with_descriptors("dq", dict(inputs, DQ=dq, **strides("g", dq), n_heads=Hq), consts["BLOCK_D"])
    delta_args = dict(O=o, DO=do, DELTA=delta, **strides("o", o), **strides("d", do), n_heads=Hq, Tq=Tq)
    return [
        Launch.fixed(_causal_attention_delta_kernel, (triton.cdiv(Tq, DELTA_BLOCK_M) * B * Hq,), delta_args, 4,
                     HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], BLOCK_M=DELTA_BLOCK_M),
        AUTOTUNE["dkdv"].launch(lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]) * B * Hkv,), dkdv_args, consts, gpu),
        AUTOTUNE["dq"].launch(_query_grid(Tq, B * Hq), dq_args, consts, gpu),
    ]


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Write dq (like q) and dk, dv (like k; both with the same strides) from the forward's o, lse."""
    delta = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    run(plan_backward(do, q, k, v, o, lse, scale, dq, dk, dv, delta, gpu_of(q.device)))


# ----------------------------------------------------------------------------- torch custom ops

def _new_grads(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape)


@torch.library.custom_op("tritongpt::causal_attention", mutates_args=())
def _causal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = new_outputs(q)
    forward(q, k, v, scale, o, lse)
    return o, lse


@_causal_attention_op.register_fake
def _(q, k, v, scale):
    return new_outputs(q)


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

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The triton backend of kernels.causal_attention (inputs validated there); see the module doc.

    With key_lengths, Tq <= DECODE_MAX_TQ without gradients runs the split-key decode kernels
    (the serving engine's decode steps); more queries, or a call that needs gradients, runs the
    torch reference: the training kernels take no per-row lengths, and a prefill of one row runs
    without them on the cache sliced to its length.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if key_lengths is None:
        return _causal_attention_op(q, k, v, scale)[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.shape[2] > decode.DECODE_MAX_TQ or needs_grad:
        return reference.causal_attention(q, k, v, scale, key_lengths=key_lengths)
    return decode.attend(q, k, v, scale, key_lengths)
