"""kernels.attention (FlashAttention's options: causal, window_size, softcap, GQA, Tq != Tk, key
lengths) on both backends against an explicit float64 implementation written out here.

The cases are FlashAttention's own (test_flash_attn.py of Dao-AILab/flash-attention),
scaled down for the Triton interpreter:

- test_flash_attn_output: MHA / MQA / GQA, causal or not, local (window_size) or not, softcap 0 or
  on (with q scaled up so the scores reach the cap), head dims that are not powers of two, and the
  seqlen pairs (113, 203), (128, 217), (108, 256), (512, 256), (1024, 1024), (1023, 1024),
  (1024, 1023), (1, 147) -> CASES;
- test_flash_attn_causal / test_flash_attn_varlen_causal with swap_sq_sk (seqlen_q > seqlen_k: the
  first queries see no key and return 0) -> the Tq > Tk entries of CASES, checked for exact zeros;
- test_flash_attn_kvcache (cache_seqlens, with local and softcap) -> KEY_LENGTH_CASES;
- attention_ref / construct_local_mask, the float64 reference with an explicit (Tq, Tk) mask ->
  visible() and attention64() here, themselves pinned by hand-written cases
  (test_visible_mask_by_hand, test_attention64_by_hand).

Method (tests/numerics.py, that of the FlashAttention tests): forward and every gradient of the
backend are within 2 * the error of the torch reference run in the same dtype (+ atol) of the
float64 result, and within ~1e-5 relative in float32. The torch reference itself is checked
against attention64 in float64 (test_reference_matches_attention64).

The triton backend (kernels/triton_attention.py) is skipped until that module exists. Its cost in
the interpreter: CASES 21 x fp32 + 8 x fp16 and a few single tests, each a forward and a backward
of at most B * Hq = 4 heads of <= 33 tokens (the key-length cases run the torch fallback there).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tritongpt import kernels
from tritongpt.kernels import checks, reference
from numerics import DEVICE, assert_matches, cpu_randn, randn


# ----------------------------------------------------------------------------- backends

@pytest.fixture(params=["torch", "triton"])
def backend(request) -> str:
    """The backend of kernels.attention under test; triton is skipped while it has no Triton version."""
    if request.param == "triton" and not kernels.triton_available("attention"):
        pytest.skip("kernels/triton_attention.py is not written yet (or triton is not installed)")
    return request.param


# ----------------------------------------------------------------------------- the float64 definition

def visible(Tq: int, Tk: int, causal: bool, window: tuple[int, int], key_length: int | None = None,
            query_length: int | None = None) -> torch.Tensor:
    """(Tq, Tk) bool: which keys each query sees, element by element from kernels.attention's
    docstring. Query i sits at key position p = key_length - query_length + i (bottom-right
    aligned); it sees key j < key_length when j <= p (causal), j >= p - left (left >= 0) and
    j <= p + right (right >= 0; 0 when causal). Queries at i >= query_length see nothing."""
    key_length = Tk if key_length is None else key_length
    query_length = Tq if query_length is None else query_length
    left, right = window
    if causal:
        right = 0
    rows = []
    for i in range(Tq):
        p = key_length - query_length + i
        row = []
        for j in range(Tk):
            sees = i < query_length and j < key_length
            if causal:
                sees = sees and j <= p
            if left >= 0:
                sees = sees and j >= p - left
            if right >= 0:
                sees = sees and j <= p + right
            row.append(sees)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(Tq, Tk)


def attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, scale: float | None = None,
                softcap: float = 0.0) -> torch.Tensor:
    """Materialised attention of q (B, Hq, Tq, D) to k, v (B, Hkv, Tk, D) under the mask seen
    (B, Tq, Tk); query head h reads key/value head h // (Hq // Hkv); a row that sees no key is 0."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    kv_head = torch.arange(Hq, device=q.device) // (Hq // Hkv)
    k, v = k[:, kv_head], v[:, kv_head]                                           # (B, Hq, Tk, D)
    scores = q @ k.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)  # (B, Hq, Tq, Tk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    seen = seen.to(q.device)[:, None]                                             # (B, 1, Tq, Tk)
    scores = scores.masked_fill(~seen, -math.inf)
    empty = ~seen.any(dim=-1, keepdim=True)                                       # (B, 1, Tq, 1)
    # The softmax is shift-invariant: a detached row max, 0 for an empty row (whose exps are all 0).
    top = scores.detach().amax(dim=-1, keepdim=True).masked_fill(empty, 0.0)
    e = torch.exp(scores - top)
    p = e / torch.where(empty, 1.0, e.sum(dim=-1, keepdim=True))
    return p @ v


def masks(B: int, Tq: int, Tk: int, causal: bool, window: tuple[int, int],
          key_lengths: list[int] | None = None) -> torch.Tensor:
    """(B, Tq, Tk) visible() of each row (each with its key length)."""
    lengths = key_lengths or [Tk] * B
    return torch.stack([visible(Tq, Tk, causal, window, key_length=n) for n in lengths])


# ----------------------------------------------------------------------------- the check

def _run(fn, inputs, do) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn(q, k, v) on fresh leaves; returns the output and (dq, dk, dv) for output gradient do."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype), allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def make_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, q_scale=1.0):
    return (randn(B, Hq, Tq, D, dtype=dtype, scale=q_scale), randn(B, Hkv, Tk, D, dtype=dtype),
            randn(B, Hkv, Tk, D, dtype=dtype), randn(B, Hq, Tq, D, dtype=dtype))


def check_attention(backend: str, q, k, v, do, *, causal: bool, window: tuple[int, int], softcap: float,
                    scale: float | None = None, key_lengths: torch.Tensor | None = None) -> None:
    """kernels.attention on `backend` against attention64 (float64), within the error of the torch
    reference in the same dtype; queries that see no key, and keys no query sees, get exact zeros."""
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    lengths = None if key_lengths is None else key_lengths.tolist()
    seen = masks(B, Tq, Tk, causal, window, lengths)
    options = dict(causal=causal, scale=scale, window_size=window, softcap=softcap)

    def public(q, k, v):
        with kernels.use(attention=backend):
            return kernels.attention(q, k, v, **options, key_lengths=key_lengths)

    def torch_reference(q, k, v):   # the torch backend, called as the public op calls it
        causal_, scale_, window_, softcap_ = checks.attention_options(causal, scale, window, softcap)
        return reference.attention(q, k, v, causal_, scale_, window_, softcap_, key_lengths=key_lengths)

    out, grads = _run(public, (q, k, v), do)
    ref_out, ref_grads = _run(torch_reference, (q, k, v), do)
    exact_out, exact_grads = _run(lambda q, k, v: attention64(q, k, v, seen, scale, softcap),
                                  [t.double() for t in (q, k, v)], do.double())
    assert out.dtype == q.dtype
    # With a softcap the Triton kernels compute tanh to ~2 ulp (no libdevice in the interpreter;
    # libdevice's tanhf is no closer), torch to 0.5 ulp, and the capped scores carry it times the cap.
    factor = 4.0 if softcap and backend == "triton" else 2.0
    assert_matches("out", out, ref_out, exact_out, factor=factor)
    for name, got, ref, exact in zip(("dq", "dk", "dv"), grads, ref_grads, exact_grads):
        assert got.dtype == q.dtype, f"{name}: dtype {got.dtype}"
        assert_matches(name, got, ref, exact, factor=factor)
    if key_lengths is not None:   # a serving step: no autograd (triton's split-key decoding path)
        with torch.no_grad():
            assert_matches("out without autograd", public(q, k, v), ref_out, exact_out)
    # A query that sees no key returns 0 and passes no gradient; a key no query sees gets none.
    empty = ~seen.any(dim=-1)                                                      # (B, Tq)
    unseen = ~seen.any(dim=-2)                                                     # (B, Tk)
    if empty.any():
        assert (out.transpose(1, 2)[empty.to(out.device)] == 0).all(), "a query that sees no key is not 0"
        assert (grads[0].transpose(1, 2)[empty.to(out.device)] == 0).all(), "dq of a query that sees no key"
    if unseen.any():
        for name, g in zip(("dk", "dv"), grads[1:]):
            assert (g.transpose(1, 2)[unseen.to(g.device)] == 0).all(), f"{name} of a key no query sees"


# ----------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    Hq: int
    Hkv: int
    Tq: int
    Tk: int
    D: int
    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    q_scale: float = 1.0          # FlashAttention scales q by the softcap so the scores reach it
    scale: float | None = None
    fp16: bool = False            # also run in float16 (fp32 always)

    def __str__(self) -> str:
        mask = "causal" if self.causal else "full"
        extra = f"-cap{self.softcap:g}" if self.softcap else ""
        extra += f"-scale{self.scale:g}" if self.scale is not None else ""
        return (f"B{self.B}-H{self.Hq}:{self.Hkv}-T{self.Tq}:{self.Tk}-D{self.D}-{mask}"
                f"-w{self.window[0]},{self.window[1]}{extra}")


# Scaled-down seqlen pairs: (113, 203) -> (7, 13) and (17, 33); (512, 256) -> (13, 7) and (33, 17);
# (1024, 1024) -> (16, 16); (1023, 1024) -> (15, 16); (1024, 1023) -> (16, 15); (1, 147) -> (1, 9).
CASES = [
    # test_flash_attn_output, local=False, softcap=0
    Case(2, 2, 2, 7, 13, 32, causal=True, fp16=True),                      # MHA
    Case(1, 4, 1, 7, 13, 32, causal=False),                                # MQA
    Case(1, 4, 2, 16, 16, 40, causal=True),                                # GQA, odd head dim
    Case(1, 2, 2, 15, 16, 24, causal=False),
    Case(1, 2, 1, 1, 9, 16, causal=True),                                  # one query (decoding)
    Case(1, 1, 1, 1, 1, 8, causal=True),                                   # one token, tiny head dim
    Case(1, 4, 2, 17, 33, 16, causal=False, scale=0.37),                   # softmax_scale
    # test_flash_attn_causal(swap_sq_sk=True) and (512, 256): seqlen_q > seqlen_k
    Case(1, 4, 2, 13, 7, 16, causal=True, fp16=True),                      # first 6 queries see nothing
    Case(1, 2, 1, 9, 1, 16, causal=True),                                  # only the last query sees a key
    Case(1, 4, 2, 33, 17, 32, causal=False),
    # test_flash_attn_output, local=True (FlashAttention draws window_size in [0, seqlen_k))
    Case(1, 2, 1, 17, 33, 24, causal=True, window=(3, -1), fp16=True),     # sliding window (Mistral)
    Case(1, 4, 2, 33, 17, 8, causal=False, window=(5, 5)),
    Case(1, 2, 2, 16, 15, 32, causal=False, window=(0, 0), fp16=True),     # each query sees one key
    Case(1, 2, 2, 15, 16, 32, causal=False, window=(-1, 2)),               # right side only
    Case(1, 2, 2, 13, 7, 16, causal=False, window=(-1, 2)),                # ... first 4 queries see nothing
    Case(1, 2, 1, 17, 33, 16, causal=False, window=(40, 40)),              # a window wider than the keys
    Case(1, 4, 2, 16, 16, 32, causal=True, window=(2, 5)),                 # right side ignored when causal
    # test_flash_attn_output, softcap=50 with q * softcap: here 30, and 1.0 (scores capped to +-1)
    Case(1, 4, 2, 17, 33, 16, causal=True, softcap=30.0, q_scale=30.0, fp16=True),
    Case(1, 4, 1, 13, 7, 40, causal=False, softcap=1.0, fp16=True),
    Case(1, 2, 2, 33, 17, 24, causal=True, window=(4, -1), softcap=1.0, fp16=True),
    Case(1, 2, 2, 16, 16, 32, causal=False, window=(3, 1), softcap=30.0, q_scale=30.0, fp16=True),
]
DTYPE_CASES = [pytest.param(c, torch.float32, id=f"{c}-fp32") for c in CASES] + \
              [pytest.param(c, torch.float16, id=f"{c}-fp16") for c in CASES if c.fp16]


@pytest.mark.parametrize("case, dtype", DTYPE_CASES)
def test_matches_float64(backend, case, dtype):
    q, k, v, do = make_inputs(case.B, case.Hq, case.Hkv, case.Tq, case.Tk, case.D, dtype, case.q_scale)
    check_attention(backend, q, k, v, do, causal=case.causal, window=case.window, softcap=case.softcap,
                    scale=case.scale)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_attention64(case):
    """The torch backend in float64 is the definition: checks the reference the tests measure against."""
    q, k, v, do = (t.double() for t in make_inputs(case.B, case.Hq, case.Hkv, case.Tq, case.Tk, case.D,
                                                   torch.float32, case.q_scale))
    seen = masks(case.B, case.Tq, case.Tk, case.causal, case.window)
    options = checks.attention_options(case.causal, case.scale, case.window, case.softcap)
    out, grads = _run(lambda q, k, v: reference.attention(q, k, v, *options), (q, k, v), do)
    exact, exact_grads = _run(lambda q, k, v: attention64(q, k, v, seen, case.scale, case.softcap), (q, k, v), do)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (exact, *exact_grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


# test_flash_attn_kvcache (cache_seqlens, local, softcap): row b has key_lengths[b] keys of Tk and
# its Tq queries are their last positions. (B, Hq, Hkv, Tq, Tk, D, causal, window, softcap, lengths)
KEY_LENGTH_CASES = [
    (3, 4, 2, 5, 13, 16, True, (-1, -1), 0.0, [5, 13, 9]),      # the causal_attention path
    (3, 4, 2, 5, 13, 32, True, (3, -1), 0.0, [5, 13, 9]),       # sliding window over a cache
    (3, 2, 1, 5, 13, 24, False, (2, 2), 1.0, [5, 13, 8]),
    (2, 2, 2, 4, 17, 16, False, (-1, -1), 0.0, [4, 11]),        # non-causal: every key below the length
    (3, 4, 1, 1, 13, 40, True, (4, -1), 30.0, [1, 7, 13]),      # decoding steps, q * softcap
]


def _key_length_id(B, Hq, Hkv, Tq, Tk, D, causal, window, softcap, lengths) -> str:
    return (f"B{B}-H{Hq}:{Hkv}-T{Tq}:{Tk}-D{D}-{'causal' if causal else 'full'}-w{window[0]},{window[1]}"
            f"-cap{softcap:g}-len{','.join(map(str, lengths))}")


@pytest.mark.parametrize("lengths_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("case", KEY_LENGTH_CASES,
                         ids=lambda c: _key_length_id(*c))
def test_key_lengths(backend, case, lengths_dtype):
    B, Hq, Hkv, Tq, Tk, D, causal, window, softcap, lengths = case
    q, k, v, do = make_inputs(B, Hq, Hkv, Tq, Tk, D, torch.float32, q_scale=softcap or 1.0)
    key_lengths = torch.tensor(lengths, dtype=lengths_dtype, device=DEVICE)
    check_attention(backend, q, k, v, do, causal=causal, window=window, softcap=softcap, key_lengths=key_lengths)


@pytest.mark.parametrize("case", KEY_LENGTH_CASES[1:3],
                         ids=lambda c: _key_length_id(*c))
def test_key_lengths_fp16(backend, case):
    B, Hq, Hkv, Tq, Tk, D, causal, window, softcap, lengths = case
    q, k, v, do = make_inputs(B, Hq, Hkv, Tq, Tk, D, torch.float16, q_scale=softcap or 1.0)
    key_lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    check_attention(backend, q, k, v, do, causal=causal, window=window, softcap=softcap, key_lengths=key_lengths)


@pytest.mark.parametrize("causal, window, softcap", [(True, (3, -1), 0.0), (False, (2, 2), 1.0)],
                         ids=["causal-w3,-1", "full-w2,2-cap1"])
def test_keys_past_the_lengths_are_never_read(backend, causal, window, softcap):
    """NaN past a row's length changes nothing, and those keys get zero gradients."""
    B, Hq, Hkv, Tq, Tk, D = 2, 2, 1, 4, 11, 16
    q, k, v, do = make_inputs(B, Hq, Hkv, Tq, Tk, D, torch.float32)
    key_lengths = torch.tensor([6, 9], device=DEVICE)
    past = (torch.arange(Tk, device=DEVICE) >= key_lengths[:, None])[:, None, :, None]   # (B, 1, Tk, 1)

    def run(k, v):
        with kernels.use(attention=backend):
            return _run(lambda q, k, v: kernels.attention(q, k, v, causal=causal, window_size=window,
                                                          softcap=softcap, key_lengths=key_lengths), (q, k, v), do)

    out, (dq, dk, dv) = run(k.masked_fill(past, math.nan), v.masked_fill(past, math.nan))
    clean_out, (clean_dq, clean_dk, clean_dv) = run(k, v)
    assert not out.isnan().any() and not dq.isnan().any()
    torch.testing.assert_close(out, clean_out, rtol=0, atol=0)
    torch.testing.assert_close(dq, clean_dq, rtol=0, atol=0)
    for name, g, clean in (("dk", dk, clean_dk), ("dv", dv, clean_dv)):
        assert (g.masked_select(past) == 0).all(), f"{name} past the key lengths"
        torch.testing.assert_close(g, clean, rtol=0, atol=0)


def test_causal_ignores_the_right_window(backend):
    """With causal=True the right side of the window is 0 whatever it is given as."""
    q, k, v, _ = make_inputs(1, 2, 1, 9, 12, 16, torch.float32)
    with kernels.use(attention=backend):
        outs = [kernels.attention(q, k, v, causal=True, window_size=(3, right)) for right in (0, -1, 4)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def test_window_and_softcap_change_the_result(backend):
    """The options are not no-ops: a window, and a softcap at the scale of the scores, move every
    output row (guards against an implementation that ignores them and a test that cannot tell)."""
    q, k, v, _ = make_inputs(1, 2, 2, 16, 16, 16, torch.float32)
    with kernels.use(attention=backend):
        plain = kernels.attention(q, k, v, causal=False)
        windowed = kernels.attention(q, k, v, causal=False, window_size=(1, 1))
        capped = kernels.attention(q, k, v, causal=False, softcap=1.0)
    assert ((windowed - plain).abs().amax(-1) > 1e-3).all()
    assert ((capped - plain).abs().amax(-1) > 1e-3).all()


# ----------------------------------------------------------------------------- the definition itself

def test_visible_mask_by_hand():
    """visible() against masks written out by hand (construct_local_mask's cases)."""
    # Causal, window (1, -1), 3 queries at positions 2, 3, 4 of 5 keys: keys p - 1 .. p.
    assert visible(3, 5, True, (1, -1)).int().tolist() == [[0, 1, 1, 0, 0],
                                                           [0, 0, 1, 1, 0],
                                                           [0, 0, 0, 1, 1]]
    # Non-causal, window (-1, 1), 4 queries at positions -2 .. 1 of 2 keys: keys j <= p + 1.
    assert visible(4, 2, False, (-1, 1)).int().tolist() == [[0, 0], [1, 0], [1, 1], [1, 1]]
    # Causal, more queries than keys: the first two see nothing; right side ignored.
    assert visible(4, 2, True, (-1, 5)).int().tolist() == [[0, 0], [0, 0], [1, 0], [1, 1]]
    # Window (0, 0): the diagonal of the bottom-right alignment.
    assert visible(2, 3, False, (0, 0)).int().tolist() == [[0, 1, 0], [0, 0, 1]]
    # Key length 3 of 5 with 2 queries: positions 1, 2; keys past the length never seen.
    assert visible(2, 5, True, (-1, -1), key_length=3).int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert visible(2, 4, False, (-1, -1), key_length=2, query_length=1).int().tolist() == [[1, 1, 0, 0],
                                                                                          [0, 0, 0, 0]]


def test_attention64_by_hand():
    """attention64 on cases whose result is known without a softmax."""
    q, k, v = (cpu_randn(1, 2, 6, 8).double() for _ in range(3))
    # Window (0, 0) with Tq == Tk: each query sees only its own key, so out == v.
    torch.testing.assert_close(attention64(q, k, v, masks(1, 6, 6, False, (0, 0))), v, rtol=0, atol=1e-15)
    # GQA: query heads 0 and 1 read key/value head 0.
    out = attention64(q, k[:, :1], v[:, :1], masks(1, 6, 6, False, (0, 0)))
    torch.testing.assert_close(out, v[:, :1].expand(1, 2, 6, 8), rtol=0, atol=1e-15)
    # Causal with 6 queries and 4 keys: queries 0, 1 see nothing (0), query 2 sees only key 0.
    out = attention64(q, k[:, :, :4], v[:, :, :4], masks(1, 6, 4, True, (-1, -1)))
    assert (out[:, :, :2] == 0).all()
    torch.testing.assert_close(out[:, :, 2], v[:, :, 0], rtol=0, atol=1e-15)
    # A tiny softcap flattens the scores: the output is the mean of the visible values.
    out = attention64(q, k, v, masks(1, 6, 6, True, (-1, -1)), softcap=1e-9)
    means = v.cumsum(dim=2) / torch.arange(1, 7, dtype=torch.float64)[:, None]
    torch.testing.assert_close(out, means, rtol=1e-7, atol=1e-7)
    # A huge softcap changes nothing.
    seen = masks(1, 6, 6, False, (-1, -1))
    torch.testing.assert_close(attention64(q, k, v, seen, softcap=1e9), attention64(q, k, v, seen))


# ----------------------------------------------------------------------------- bad inputs

def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, device=device).to(dtype)


_Q, _K = (1, 4, 5, 16), (1, 2, 7, 16)
# (q, k, v, keyword options, error type, message)
BAD_INPUTS = [
    (_t(*_Q), _t(*_K), _t(*_K), dict(window_size=(-2, 0)), ValueError, "window_size must be a pair"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(window_size=(3, -5)), ValueError, "window_size must be a pair"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(window_size=(3,)), ValueError, "window_size must be a pair"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(window_size=(1, 2, 3)), ValueError, "window_size must be a pair"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(window_size=(1.5, 2)), ValueError, "window_size must be a pair"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(window_size=(True, 0)), ValueError, "window_size must be a pair"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(window_size=4), ValueError, "window_size must be a pair"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(softcap=math.inf), ValueError, "softcap must be a finite number >= 0"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(softcap=math.nan), ValueError, "softcap must be a finite number >= 0"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(softcap=True), ValueError, "softcap must be a finite number >= 0"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(causal=1), ValueError, "causal must be True or False"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(causal="yes"), ValueError, "causal must be True or False"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(causal=None), ValueError, "causal must be True or False"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(scale=0.0), ValueError, "scale must be None"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(scale=-0.5), ValueError, "scale must be None"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(scale=math.inf), ValueError, "scale must be None"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(scale=True), ValueError, "scale must be None"),
    (_t(1, 3, 5, 16), _t(*_K), _t(*_K), {}, ValueError, "multiple of key/value heads"),
    (_t(1, 2, 5, 16), _t(1, 4, 7, 16), _t(1, 4, 7, 16), {}, ValueError, "multiple of key/value heads"),
    (_t(1, 4, 5, 32), _t(*_K), _t(*_K), {}, ValueError, "must share the head dim"),
    (_t(2, 4, 5, 16), _t(*_K), _t(*_K), {}, ValueError, "must share the batch size"),
    (_t(*_Q), _t(*_K), _t(1, 2, 6, 16), {}, ValueError, "they must match"),
    (_t(*_Q), _t(*_K, dtype=torch.float16), _t(*_K), {}, ValueError, "mismatched dtypes"),
    (_t(*_Q), _t(*_K, device="meta"), _t(*_K), {}, ValueError, "mismatched devices"),
    (_t(4, 5, 16), _t(2, 7, 16), _t(2, 7, 16), {}, ValueError, "expected 4 dims"),
    (_t(*_Q, dtype=torch.float64), _t(*_K, dtype=torch.float64), _t(*_K, dtype=torch.float64), {}, ValueError,
     "expected one of float32"),
    (_t(*_Q).tolist(), _t(*_K), _t(*_K), {}, TypeError, "q must be a torch.Tensor"),
    (_t(1, 4, 0, 16), _t(*_K), _t(*_K), {}, ValueError, "no queries"),
    (_t(*_Q), _t(1, 2, 0, 16), _t(1, 2, 0, 16), {}, ValueError, "no keys"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(key_lengths=torch.tensor([6.0], device=DEVICE)), ValueError,
     "key_lengths must be an int32 or int64"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(key_lengths=torch.tensor([6, 6], device=DEVICE)), ValueError,
     r"key_lengths has shape \(2,\)"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(key_lengths=torch.tensor([6], device="meta")), ValueError,
     "key_lengths is on meta"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(key_lengths=torch.tensor([4], device=DEVICE)), ValueError,
     r"key length 4 is outside \[5, 7\]"),
    (_t(*_Q), _t(*_K), _t(*_K), dict(key_lengths=torch.tensor([8], device=DEVICE)), ValueError,
     r"key length 8 is outside \[5, 7\]"),
]


@pytest.mark.parametrize("q, k, v, options, error, message", BAD_INPUTS, ids=[
    f"{m}-{'-'.join(f'{key}={value!r}' for key, value in o.items() if key != 'key_lengths')}"
    for *_, o, _, m in BAD_INPUTS])
def test_bad_inputs(backend, q, k, v, options, error, message):
    with kernels.use(attention=backend), pytest.raises(error, match=message):
        kernels.attention(q, k, v, **options)
