"""kernels.varlen_attention (FlashAttention's flash_attn_varlen_func: packed sequences with
cu_seqlens offsets) on both backends, against a float64 attention run on each sequence alone, and
against kernels.attention on each sequence alone.

The cases are FlashAttention's own (test_flash_attn.py of Dao-AILab/flash-attention),
scaled down for the Triton interpreter:

- test_flash_attn_varlen_output / test_flash_attn_varlen_qkvpacked: sequences cut from a padded
  batch by generate_random_padding_mask ("full", "random", "third") and unpad_input, MHA / MQA /
  GQA, causal or not, local or not, softcap -> VARLEN_CASES and test_random_lengths;
- the hopper tests' zero_lengths (every fifth sequence and the last have no tokens) and seqlen
  pairs such as (1, 147): 0- and 1-token sequences, a query sequence whose key sequence is empty;
- test_flash_attn_varlen_causal with swap_sq_sk: seqlen_q > seqlen_k per sequence, so the first
  queries of that sequence see no key and return 0;
- attention_ref with query/key padding masks -> varlen64 here: each sequence attended alone in
  float64 under an explicit (Tq, Tk) mask (construct_local_mask's role).

Method (tests/numerics.py): forward and every gradient within 2 * the error of the torch
reference in the same dtype (+ atol) of float64, ~1e-5 relative in float32; the torch reference
in float64 is itself checked against varlen64 (test_reference_matches_varlen64).

The triton backend (kernels/triton_varlen_attention.py) is skipped until that module exists. Its
cost in the interpreter: 11 cases x fp32 + 4 x fp16, 3 random-length cases, 3 per-sequence
comparisons (one kernels.attention call per sequence), 3 more single cases: each a forward and a
backward of at most ~60 packed tokens and 4 query heads.
"""
from __future__ import annotations

import math

import pytest
import torch

from tritongpt import kernels
from tritongpt.kernels import checks, reference
from numerics import DEVICE, assert_matches, randn


@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    """The backend of kernels.varlen_attention (and of kernels.attention, which it is compared
    with) under test; triton is skipped while varlen_attention has no Triton version."""
    if request.param == "triton" and not (kernels.triton_available("varlen_attention")
                                          and kernels.triton_available("attention")):
        pytest.skip("kernels/triton_varlen_attention.py is not written yet (or triton is not installed)")
    return request.param


# ----------------------------------------------------------------------------- packing

def offsets(lengths: list[int]) -> torch.Tensor:
    """cu_seqlens: int32 (n + 1,) cumulative offsets (0, len0, len0 + len1, ...)."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def random_lengths(n: int, max_len: int, mode: str, zero_lengths: bool = False) -> list[int]:
    """Sequence lengths as FlashAttention's generate_random_padding_mask draws them, scaled down:
    "full" all max_len, "random" in [max(1, max_len - 5), max_len], "third" in [max_len // 3,
    max_len]; zero_lengths empties every fifth sequence and the last."""
    low = {"full": max_len, "random": max(1, max_len - 5), "third": max_len // 3}[mode]
    lengths = torch.randint(low, max_len + 1, (n,)).tolist()
    if zero_lengths:
        lengths = [0 if i % 5 == 0 or i == n - 1 else length for i, length in enumerate(lengths)]
    return lengths


# ----------------------------------------------------------------------------- the float64 definition

def sequence_mask(Tq: int, Tk: int, causal: bool, window: tuple[int, int]) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i (at key position Tk - Tq + i) sees key j."""
    left, right = window[0], 0 if causal else window[1]
    seen = torch.ones(Tq, Tk, dtype=torch.bool)
    for i in range(Tq):
        p = Tk - Tq + i
        for j in range(Tk):
            if (causal and j > p) or (left >= 0 and j < p - left) or (right >= 0 and j > p + right):
                seen[i, j] = False
    return seen


def sequence_attention64(q, k, v, seen, scale, softcap):
    """One sequence: q (Tq, Hq, D), k, v (Tk, Hkv, D), seen (Tq, Tk) -> (Tq, Hq, D)."""
    Tq, Hq, D = q.shape
    group = Hq // k.shape[1]
    q, k, v = q.transpose(0, 1), k.repeat_interleave(group, dim=1).transpose(0, 1), \
        v.repeat_interleave(group, dim=1).transpose(0, 1)                         # (Hq, T, D)
    s = torch.einsum("hid,hjd->hij", q, k) * (D ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~seen.to(q.device), -math.inf)
    rows = seen.to(q.device).any(dim=-1)                                          # (Tq,)
    e = torch.exp(s - torch.where(rows, s.detach().amax(dim=-1), 0.0)[..., None])  # shift-invariant
    p = e / torch.where(rows[:, None], e.sum(dim=-1, keepdim=True), 1.0)          # empty rows: all 0
    return torch.einsum("hij,hjd->hid", p, v).transpose(0, 1)


def varlen64(q, k, v, lens_q, lens_k, causal, window, softcap, scale=None):
    """Each packed sequence attended alone; a query whose sequence has no key returns 0."""
    outs = []
    for qs, ks, vs in zip(q.split(lens_q), k.split(lens_k), v.split(lens_k)):
        if qs.shape[0] and ks.shape[0]:
            outs.append(sequence_attention64(qs, ks, vs, sequence_mask(len(qs), len(ks), causal, window),
                                             scale, softcap))
        else:
            outs.append(qs * 0)
    return torch.cat(outs)


def seen_tokens(lens_q, lens_k, causal, window) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_q,) True for a query that sees a key, (total_k,) True for a key some query sees."""
    queries, keys = [], []
    for Tq, Tk in zip(lens_q, lens_k):
        seen = sequence_mask(Tq, Tk, causal, window)
        queries.append(seen.any(dim=1))
        keys.append(seen.any(dim=0))
    return torch.cat(queries), torch.cat(keys)


# ----------------------------------------------------------------------------- the check

def _run(fn, inputs, do):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype), allow_unused=True) if out.numel() else \
        [None] * len(leaves)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def make_inputs(lens_q, lens_k, Hq, Hkv, D, dtype, q_scale=1.0):
    total_q, total_k = sum(lens_q), sum(lens_k)
    return (randn(total_q, Hq, D, dtype=dtype, scale=q_scale), randn(total_k, Hkv, D, dtype=dtype),
            randn(total_k, Hkv, D, dtype=dtype), randn(total_q, Hq, D, dtype=dtype))


def varlen_on(backend, lens_q, lens_k, max_extra=0, **options):
    """kernels.varlen_attention(q, k, v) on backend with offsets from the lengths."""
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    max_q, max_k = max(max(lens_q), 1) + max_extra, max(max(lens_k), 1) + max_extra

    def fn(q, k, v):
        with kernels.use(varlen_attention=backend):
            return kernels.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    return fn


def torch_reference(lens_q, lens_k, causal, window, softcap, scale=None):
    """The torch backend in the inputs' dtype, called as the public op calls it."""
    cu_q, cu_k = offsets(lens_q), offsets(lens_k)
    options = checks.attention_options(causal, scale, window, softcap)
    return lambda q, k, v: reference.varlen_attention(q, k, v, cu_q, cu_k, max(max(lens_q), 1),
                                                      max(max(lens_k), 1), *options)


def check_varlen(backend, lens_q, lens_k, Hq, Hkv, D, dtype, *, causal, window=(-1, -1), softcap=0.0,
                 scale=None, q_scale=1.0, max_extra=0) -> None:
    q, k, v, do = make_inputs(lens_q, lens_k, Hq, Hkv, D, dtype, q_scale)
    fn = varlen_on(backend, lens_q, lens_k, max_extra, causal=causal, scale=scale, window_size=window,
                   softcap=softcap)
    out, grads = _run(fn, (q, k, v), do)
    ref_out, ref_grads = _run(torch_reference(lens_q, lens_k, causal, window, softcap, scale), (q, k, v), do)
    exact_out, exact_grads = _run(lambda q, k, v: varlen64(q, k, v, lens_q, lens_k, causal, window, softcap, scale),
                                  [t.double() for t in (q, k, v)], do.double())
    assert out.dtype == q.dtype
    # With a softcap the Triton kernels compute tanh to ~2 ulp (no libdevice in the interpreter;
    # libdevice's tanhf is no closer), torch to 0.5 ulp, and the capped scores carry it times the cap.
    factor = 4.0 if softcap and backend == "triton" else 2.0
    assert_matches("out", out, ref_out, exact_out, factor=factor)
    for name, got, ref, exact in zip(("dq", "dk", "dv"), grads, ref_grads, exact_grads):
        assert got.dtype == q.dtype, f"{name}: dtype {got.dtype}"
        assert_matches(name, got, ref, exact, factor=factor)
    # A query that sees no key returns 0 and passes no gradient; a key no query sees gets none.
    sees, seen = (t.to(out.device) for t in seen_tokens(lens_q, lens_k, causal, window))
    assert (out[~sees] == 0).all(), "a query that sees no key is not 0"
    assert (grads[0][~sees] == 0).all(), "dq of a query that sees no key"
    assert (grads[1][~seen] == 0).all() and (grads[2][~seen] == 0).all(), "dk, dv of a key no query sees"


# ----------------------------------------------------------------------------- cases

# (lens_q, lens_k, Hq, Hkv, D, causal, window, softcap, q_scale, also fp16)
VARLEN_CASES = [
    # test_flash_attn_varlen_qkvpacked: one padding mask for q and k (self-attention)
    ([5, 1, 9, 3], [5, 1, 9, 3], 4, 2, 16, True, (-1, -1), 0.0, 1.0, True),
    ([5, 1, 9, 3], [5, 1, 9, 3], 2, 2, 32, False, (-1, -1), 0.0, 1.0, False),
    # test_flash_attn_varlen_output / _causal (swap_sq_sk): Tq != Tk per sequence, 7 queries to 4 keys
    ([3, 7, 1, 6], [8, 4, 5, 6], 2, 1, 16, True, (-1, -1), 0.0, 1.0, True),
    ([3, 7, 1, 6], [8, 4, 5, 6], 2, 1, 24, False, (2, 1), 0.0, 1.0, False),          # local
    ([3, 7, 1, 6], [8, 4, 5, 6], 2, 1, 16, False, (-1, 0), 0.0, 1.0, False),         # causal, as a window
    # hopper's zero_lengths: empty sequences, and queries whose key sequence is empty
    ([0, 4, 0, 6, 1, 0], [0, 7, 3, 0, 1, 0], 2, 1, 16, True, (-1, -1), 0.0, 1.0, True),
    ([0, 4, 0, 6, 1, 0], [0, 7, 3, 0, 1, 0], 2, 1, 16, False, (1, 1), 1.0, 1.0, False),
    # softcap (FlashAttention scales q by the softcap), GQA / MQA, odd head dims
    ([9, 2, 17], [13, 17, 4], 4, 1, 40, False, (-1, -1), 1.0, 1.0, False),
    ([9, 2, 17], [13, 17, 4], 2, 1, 32, True, (4, -1), 30.0, 30.0, True),
    # decoding against caches of different lengths ((1, 147)); one long sequence, tiny head dim
    ([1, 1, 1, 1], [9, 1, 4, 16], 2, 1, 16, True, (-1, -1), 0.0, 1.0, False),
    ([17], [33], 2, 1, 8, True, (5, 5), 0.0, 1.0, False),
]


def _case_id(c) -> str:
    return "q{}-k{}-H{}:{}-D{}-{}-w{},{}-cap{:g}".format(
        ",".join(map(str, c[0])), ",".join(map(str, c[1])), c[2], c[3], c[4], "causal" if c[5] else "full",
        *c[6], c[7])


DTYPE_CASES = [pytest.param(c, torch.float32, id=f"{_case_id(c)}-fp32") for c in VARLEN_CASES] + \
              [pytest.param(c, torch.float16, id=f"{_case_id(c)}-fp16") for c in VARLEN_CASES if c[-1]]


@pytest.mark.parametrize("case, dtype", DTYPE_CASES)
def test_matches_float64(backend, case, dtype):
    lens_q, lens_k, Hq, Hkv, D, causal, window, softcap, q_scale, _ = case
    check_varlen(backend, lens_q, lens_k, Hq, Hkv, D, dtype, causal=causal, window=window, softcap=softcap,
                 q_scale=q_scale)


@pytest.mark.parametrize("case", VARLEN_CASES, ids=_case_id)
def test_reference_matches_varlen64(case):
    """The torch backend in float64 is the definition: checks the reference the tests measure against."""
    lens_q, lens_k, Hq, Hkv, D, causal, window, softcap, q_scale, _ = case
    q, k, v, do = (t.double() for t in make_inputs(lens_q, lens_k, Hq, Hkv, D, torch.float32, q_scale))
    out, grads = _run(torch_reference(lens_q, lens_k, causal, window, softcap), (q, k, v), do)
    exact, exact_grads = _run(lambda q, k, v: varlen64(q, k, v, lens_q, lens_k, causal, window, softcap),
                              (q, k, v), do)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (exact, *exact_grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("lens, max_extra", [([5, 1, 9, 3], 0), ([0, 4, 0, 6, 1, 0], 3), ([17], 0)])
def test_reference_one_offsets_tensor(lens, max_extra):
    """The packed model passes one cu_seqlens tensor for queries and keys, which the reference
    takes as plain causal self-attention (SDPA's is_causal over the unpacked rows): the same
    result as the masked path it skips, in float64."""
    q, k, v, do = (t.double() for t in make_inputs(lens, lens, 4, 2, 16, torch.float32))
    cu, longest = offsets(lens), max(lens) + max_extra
    out, grads = _run(lambda q, k, v: reference.varlen_attention(q, k, v, cu, cu, longest, longest), (q, k, v), do)
    exact, exact_grads = _run(lambda q, k, v: varlen64(q, k, v, lens, lens, True, (-1, -1), 0.0), (q, k, v), do)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (exact, *exact_grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode, zero_lengths, causal, window, softcap", [
    pytest.param("full", False, True, (-1, -1), 0.0, id="full-causal"),
    pytest.param("random", True, False, (3, 3), 0.0, id="random-zero_lengths-full-w3,3"),
    pytest.param("third", False, True, (-1, -1), 1.0, id="third-causal-cap1"),
])
def test_random_lengths(backend, mode, zero_lengths, causal, window, softcap):
    """Lengths drawn as generate_random_padding_mask draws them, independently for q and k."""
    lens_q = random_lengths(5, 11, mode, zero_lengths)
    lens_k = random_lengths(5, 14, mode, zero_lengths)
    check_varlen(backend, lens_q, lens_k, 2, 1, 16, torch.float32, causal=causal, window=window, softcap=softcap)


def test_max_seqlen_may_exceed_the_longest(backend):
    """max_seqlen only bounds the lengths (it sizes the launch): a larger one changes nothing."""
    check_varlen(backend, [3, 7, 1, 6], [8, 4, 5, 6], 2, 1, 16, torch.float32, causal=True, max_extra=9)


@pytest.mark.parametrize("lens_q, lens_k", [([3, 2], [0, 0]), ([0, 0], [3, 2])], ids=["no-keys", "no-queries"])
def test_one_side_empty(backend, lens_q, lens_k):
    """No keys at all: every query returns 0. No queries at all: an empty output, zero dk and dv."""
    check_varlen(backend, lens_q, lens_k, 2, 1, 16, torch.float32, causal=False)


# ----------------------------------------------------------------------------- against kernels.attention

@pytest.mark.parametrize("case", [VARLEN_CASES[2], VARLEN_CASES[6], VARLEN_CASES[8]], ids=_case_id)
def test_matches_attention_per_sequence(backend, case):
    """varlen_attention is kernels.attention run on each sequence alone (batch 1), output and
    gradients: no worse than 2 * that op's error (+ atol) against float64."""
    lens_q, lens_k, Hq, Hkv, D, causal, window, softcap, q_scale, _ = case
    q, k, v, do = make_inputs(lens_q, lens_k, Hq, Hkv, D, torch.float32, q_scale)
    options = dict(causal=causal, window_size=window, softcap=softcap)
    out, grads = _run(varlen_on(backend, lens_q, lens_k, **options), (q, k, v), do)

    def per_sequence(q, k, v):
        outs = []
        for qs, ks, vs in zip(q.split(lens_q), k.split(lens_k), v.split(lens_k)):
            if qs.shape[0] == 0 or ks.shape[0] == 0:      # kernels.attention takes no empty side
                outs.append(qs * 0)
                continue
            with kernels.use(attention=backend):
                o = kernels.attention(*(t.transpose(0, 1)[None] for t in (qs, ks, vs)), **options)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    alone, alone_grads = _run(per_sequence, (q, k, v), do)
    exact, exact_grads = _run(lambda q, k, v: varlen64(q, k, v, lens_q, lens_k, causal, window, softcap),
                              [t.double() for t in (q, k, v)], do.double())
    assert_matches("out", out, alone, exact)
    for name, got, ref, want in zip(("dq", "dk", "dv"), grads, alone_grads, exact_grads):
        assert_matches(name, got, ref, want)


# ----------------------------------------------------------------------------- bad inputs

def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, device=device).to(dtype)


def _cu(*values, dtype=torch.int32, device=DEVICE):
    return torch.tensor(values, dtype=dtype, device=device)


# Valid: two sequences of 3 and 5 queries, 4 and 6 keys; Hq = 4, Hkv = 2, D = 16.
_Q, _KV = (8, 4, 16), (10, 2, 16)
_GOOD = dict(cu_seqlens_q=(0, 3, 8), cu_seqlens_k=(0, 4, 10), max_seqlen_q=5, max_seqlen_k=6)


def _bad(message, error=ValueError, q=_Q, k=_KV, v=_KV, dtype=torch.float32, k_device=DEVICE, **changes):
    args = {**_GOOD, **changes}
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        if isinstance(args[name], tuple):
            args[name] = _cu(*args[name])
    tensors = (_t(*q, dtype=dtype), _t(*k, dtype=dtype, device=k_device), _t(*v, dtype=dtype))
    return pytest.param(tensors, args, error, message, id=message)


BAD_INPUTS = [
    _bad("cu_seqlens_q decreases at sequence 1", cu_seqlens_q=(0, 5, 3, 8), cu_seqlens_k=(0, 4, 7, 10)),
    _bad("cu_seqlens_k decreases at sequence 1", cu_seqlens_q=(0, 3, 5, 8), cu_seqlens_k=(0, 4, 2, 10)),
    _bad("cu_seqlens_q runs from 1 to 8", cu_seqlens_q=(1, 3, 8)),
    _bad("cu_seqlens_q runs from 0 to 7 but must run from 0 to the 8 packed tokens", cu_seqlens_q=(0, 3, 7)),
    _bad("cu_seqlens_k runs from 0 to 11 but must run from 0 to the 10 packed tokens", cu_seqlens_k=(0, 4, 11)),
    _bad("cu_seqlens_q must be a 1-D int32 tensor", cu_seqlens_q=_cu(0, 3, 8, dtype=torch.int64)),
    _bad("cu_seqlens_k must be a 1-D int32 tensor", cu_seqlens_k=_cu(0, 4, 10, dtype=torch.float32)),
    _bad("cu_seqlens_q must be a 1-D int32 tensor", cu_seqlens_q=_cu(0, 3, 8).view(1, 3)),
    _bad("cu_seqlens_q must be a 1-D int32 tensor", cu_seqlens_q=_cu(0)),
    _bad("cu_seqlens_k must be a 1-D int32 tensor", cu_seqlens_k=[0, 4, 10]),
    _bad("cu_seqlens_q is on meta", cu_seqlens_q=_cu(0, 3, 8, device="meta")),
    _bad("cu_seqlens_q has 2 sequences but cu_seqlens_k 1", cu_seqlens_k=(0, 10)),
    _bad("sequence 1 has 5 tokens, more than max_seqlen_q=4", max_seqlen_q=4),
    _bad("sequence 1 has 6 tokens, more than max_seqlen_k=5", max_seqlen_k=5),
    _bad("max_seqlen_q must be a positive int", max_seqlen_q=0),
    _bad("max_seqlen_k must be a positive int", max_seqlen_k=-1),
    _bad("max_seqlen_q must be a positive int", max_seqlen_q=5.0),
    _bad("max_seqlen_k must be a positive int", max_seqlen_k=True),
    _bad("max_seqlen_q must be a positive int", max_seqlen_q=None),
    _bad("expected 3 dims", q=(1, 8, 4, 16)),
    _bad("expected 3 dims", k=(1, 10, 2, 16), v=(1, 10, 2, 16)),
    _bad("multiple of key/value heads", q=(8, 3, 16)),
    _bad("must share the head dim", q=(8, 4, 32)),
    _bad("they must match", v=(10, 1, 16)),
    _bad("expected one of float32", dtype=torch.float64),
    _bad("mismatched devices", k_device="meta"),
    _bad("window_size must be a pair", window_size=(-2, -1)),
    _bad("softcap must be a finite number >= 0", softcap=-1.0),
    _bad("causal must be True or False", causal=0),
    _bad("scale must be None", scale=0.0),
]


@pytest.mark.parametrize("tensors, args, error, message", BAD_INPUTS)
def test_bad_inputs(backend, tensors, args, error, message):
    with kernels.use(varlen_attention=backend), pytest.raises(error, match=message):
        kernels.varlen_attention(*tensors, **args)
