"""Causal attention for a few queries in Triton, flash-decoding style: split keys, then combine.

Decode steps and speculative verification (Tq <= DECODE_MAX_TQ queries against a KV cache of Tk
keys) leave the training forward's one program per query tile with almost nothing to run in
parallel: a step of one sequence would be B * Hq programs on a GPU of a hundred SMs or more. So
one program per (KV head, split of the keys) packs the Tq rows of every query head of the GQA
group into one tile of at least 64 rows (the smallest warpgroup MMA), reads K and V once per
group, not once per query head, and runs the training forward's online softmax (fwd_blocks of
triton_attention_tiles.py) over its split; there are about DECODE_PROGRAMS_PER_SM programs per
SM. Each split writes its rows' normalised partial output and base-2 logsumexp (fp32); a combine
kernel, one program per query row, weights the splits by exp2(lse_split - lse).

Per-row key lengths (key_lengths, FlashAttention's cache_seqlens): row b of the batch uses only
its first key_lengths[b] keys, and its query i sits at position key_lengths[b] - Tq + i. The
kernel reads the row's length and treats it as that row's Tk: key tiles past it are neither
loaded nor computed (a split that starts past it writes an empty partial, weight 0 in the
combine), and the row mask of the last tile keeps the keys past it from being read, so whatever
the cache holds there, NaN included, never reaches the output. The splits cover the keys of k,
v (B, Hkv, Tk, D), so a caller that knows the longest row's length (a serving engine does) slices
the cache to it, and the splits are sized for that row.

Memory traffic: K and V once (per row, only up to its length), Q once, plus the partials
(splits * GROUP * Tq * (D + 1) fp32) written and read once; O and the lse written once.

NaN: as the training forward (triton_attention.py): a NaN in q row i, or in k or v at a
key row i attends, makes output row i NaN; a NaN value at a key loaded but masked for row i
(a later key of the last tile within the row's length) may reach it through 0 * NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritongpt.kernels.launching import Gpu, Launch, gpu_of, run
from tritongpt.kernels.triton_attention_tiles import LOG2E, constants, fwd_blocks, load_rows, new_outputs, strides

# Query counts up to this (decode steps, speculative verification) run the split-key kernels.
DECODE_MAX_TQ = 16
DECODE_BLOCK_N = 32
DECODE_PROGRAMS_PER_SM = 8


# ----------------------------------------------------------------------------- kernels

@triton.jit(do_not_specialize=["Tq", "Tk", "split_keys"])
def _causal_attention_decode_kernel(Q, K, V, KEY_LENGTHS, O_PART, LSE_PART,
                                    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt,
                                    stride_kd, stride_vb, stride_vh, stride_vt, stride_vd,
                                    n_kv_heads, Tq, Tk, split_keys, qk_scale,
                                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (b * n_kv_heads + kv head, split): the GROUP * Tq query rows of one KV head, packed
    # into one tile (row r is query head kv * GROUP + r // Tq, query r % Tq), against the keys
    # split * split_keys ... + split_keys. KEY_LENGTHS is None (a compile-time constant) when
    # every row uses all Tk keys.
    bh, split = tl.program_id(0), tl.program_id(1)
    b, hk = (bh // n_kv_heads).to(tl.int64), (bh % n_kv_heads).to(tl.int64)
    if KEY_LENGTHS is not None:
        Tk = tl.load(KEY_LENGTHS + b).to(tl.int32)       # this row's keys: its positions 0 .. Tk - 1
    n_rows = GROUP * Tq
    r = tl.arange(0, BLOCK_M)                                                     # (BLOCK_M,)
    i = r % Tq
    h = hk * GROUP + r // Tq
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = load_rows(q_ptrs, r, n_rows, offs_d, True, HEAD_DIM, BLOCK_D)             # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    pos = i + (Tk - Tq)                  # causal (keys <= pos), no window
    lo = split * split_keys
    hi = tl.minimum(lo + split_keys, Tk)                 # below lo for a split past the row's keys
    clean_end = tl.maximum(tl.minimum(hi, (Tk - Tq + 1) // BLOCK_N * BLOCK_N), lo)   # keys every row sees
    m_i, l_i = tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               K, V, b, hk, pos, lo, clean_end, Tk, qk_scale, 1.0, Tk, 0, offs_n, offs_d,
                               False, True, False, False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, False)
    acc, m_i, l_i = fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               K, V, b, hk, pos, clean_end, hi, Tk, qk_scale, 1.0, Tk, 0, offs_n, offs_d,
                               True, True, False, False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, False)
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



# ----------------------------------------------------------------------------- launchers

def decode_split(B: int, Hkv: int, Tk: int, gpu: Gpu) -> tuple[int, int, int]:
    """(BLOCK_N, splits, keys per split) of a decode step: about DECODE_PROGRAMS_PER_SM programs per
    SM, each a whole number of key tiles."""
    block_n = 16 if gpu.capability == 0 else DECODE_BLOCK_N
    splits = max(1, min(triton.cdiv(Tk, block_n), triton.cdiv(DECODE_PROGRAMS_PER_SM * gpu.sms, B * Hkv)))
    split_keys = triton.cdiv(triton.cdiv(Tk, splits), block_n) * block_n
    return block_n, triton.cdiv(Tk, split_keys), split_keys


def plan_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, o: torch.Tensor,
                 lse: torch.Tensor, gpu: Gpu, key_lengths: torch.Tensor | None = None) -> list[Launch]:
    """The launches of forward (below): the split-key kernel, then the combine."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    consts = constants(q)
    block_n, splits, split_keys = decode_split(B, Hkv, Tk, gpu)
    # Rows padded to 64, the smallest warpgroup MMA tile, on a GPU; the interpreter needs 16.
    block_m = max(16 if gpu.capability == 0 else 64, triton.next_power_of_2(group * Tq))
    o_part = torch.empty((B * Hkv, splits, group * Tq, consts["BLOCK_D"]), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B * Hkv, splits, group * Tq), dtype=torch.float32, device=q.device)
    split_args = dict(Q=q, K=k, V=v, KEY_LENGTHS=key_lengths, O_PART=o_part, LSE_PART=lse_part, **strides("q", q),
                      **strides("k", k), **strides("v", v), n_kv_heads=Hkv, Tq=Tq, Tk=Tk, split_keys=split_keys,
                      qk_scale=scale * LOG2E)
    combine_args = dict(O_PART=o_part, LSE_PART=lse_part, O=o, LSE=lse, **strides("o", o), n_kv_heads=Hkv, Tq=Tq,
                        n_splits=splits)
    return [
        Launch.fixed(_causal_attention_decode_kernel, (B * Hkv, splits), split_args, 4, 3,
                     GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, **consts),
        Launch.fixed(_causal_attention_combine_kernel, (B * Hq * Tq,), combine_args, 4,
                     GROUP=group, HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], BLOCK_S=16),
    ]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, o: torch.Tensor, lse: torch.Tensor,
            key_lengths: torch.Tensor | None = None) -> None:
    """Write o (B, Hq, Tq, D), any strides, and lse (B, Hq, Tq) contiguous fp32 (base-2 logsumexp
    of the scaled scores), from validated q (B, Hq, Tq, D), Tq <= DECODE_MAX_TQ, k, v
    (B, Hkv, Tk, D) and optional key_lengths (B,) int32 or int64, each in [Tq, Tk]."""
    run(plan_forward(q, k, v, scale, o, lse, gpu_of(q.device), key_lengths))


# ----------------------------------------------------------------------------- torch custom ops

@torch.library.custom_op("tritongpt::attention_decode", mutates_args=())
def _attention_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         key_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: triton_causal_attention.causal_attention sends a call with key_lengths here
    when it needs no gradient (the torch reference differentiates the others)."""
    o, lse = new_outputs(q)
    forward(q, k, v, scale, o, lse, key_lengths)
    return o, lse


@_attention_decode_op.register_fake
def _(q, k, v, scale, key_lengths):
    return new_outputs(q)


# ----------------------------------------------------------------------------- entry

def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_lengths: torch.Tensor) -> torch.Tensor:
    """(B, Hq, Tq, D): q against each row's first key_lengths[b] keys of k, v; forward only."""
    return _attention_decode_op(q, k, v, scale, key_lengths)[0]
