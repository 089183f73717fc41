"""The machinery of bench/test_attention.py and bench/test_varlen_attention.py: the FLOP counts
(unmasked pairs), the document lengths, the triton and torch rows calling the backends as the
public ops do, and the baselines computing what our ops compute, so that the rows compare like
with like: the explicit SDPA masks and FlexAttention's mask_mods and
score_mod (eager FlexAttention, forward, on CPU; compiled it runs on a GPU only) against the torch
reference of kernels.attention and kernels.varlen_attention."""
from __future__ import annotations

import warnings

import pytest
import torch

from tritongpt import kernels
from bench import conftest as bench_conftest
from bench import test_attention as attention_bench
from bench import test_varlen_attention as varlen_bench
from bench.conftest import DEVICE

DTYPE = torch.float32


@pytest.mark.parametrize("T", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("window", [0, 1, 2, 5, 64, 299, 300, 301, 4096])
def test_window_pairs_are_the_unmasked_ones(T, window):
    mask = attention_bench.dense_mask(attention_bench.causal_window_mask_mod(window), T, T)
    assert attention_bench.visible_pairs(T, window) == int(mask.sum())
    # The mask is kernels.attention's window_size=(window - 1, 0): each query sees its last `window` keys.
    assert int(mask[-1].sum()) == (min(window, T) if window else T)


@pytest.mark.parametrize("total, shortest, longest",
                         [(16384, 64, 4096), (1024, 16, 256), (4096, 64, 128), (64, 64, 128)])
def test_document_lengths(total, shortest, longest):
    for seed in range(200):
        lengths = varlen_bench.document_lengths(total, shortest, longest, seed)
        assert sum(lengths) == total, seed
        assert shortest <= min(lengths) and max(lengths) <= longest, (seed, lengths)
    assert varlen_bench.document_lengths(total, shortest, longest, 3) == varlen_bench.document_lengths(
        total, shortest, longest, 3)


def test_benchmark_documents():
    """The GPU shape's documents, as bench/test_varlen_attention.py's docstring states them."""
    lengths = varlen_bench.document_lengths(16384, 64, 4096, varlen_bench.SEED)
    assert (len(lengths), min(lengths), max(lengths)) == (18, 68, 4022)
    with pytest.raises(ValueError, match="cannot pack"):
        varlen_bench.document_lengths(100, 64, 100)


def test_document_pairs_are_the_unmasked_ones():
    lengths = varlen_bench.document_lengths(1024, 16, 256)
    mask = attention_bench.dense_mask(varlen_bench.document_causal_mask_mod(lengths), 1024, 1024)
    assert varlen_bench.visible_pairs(lengths) == int(mask.sum())
    assert varlen_bench.visible_pairs([3, 2]) == 6 + 3


def inputs(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn(*shape, generator=generator, device=DEVICE, dtype=DTYPE) for shape in shapes]


@pytest.mark.parametrize("Hkv", [4, 2])
def test_sdpa_mask_computes_windowed_attention(Hkv):
    B, H, T, D, window = 2, 4, 96, 16, 24
    q, k, v = inputs((B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D))
    fn = attention_bench.sdpa_mask(attention_bench.causal_window_mask_mod(window), T, T)
    with kernels.use(attention="torch"):
        expected = kernels.attention(q, k, v, window_size=(window - 1, 0))
    torch.testing.assert_close(fn(q, k, v), expected)


@pytest.mark.parametrize("Hkv", [4, 2])
def test_sdpa_mask_computes_varlen_attention(Hkv):
    lengths = varlen_bench.document_lengths(256, 8, 64, seed=1)
    q, k, v = inputs((256, 4, 16), (256, Hkv, 16), (256, Hkv, 16))
    cu_seqlens = torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)
    with kernels.use(varlen_attention="torch"):
        expected = kernels.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max(lengths), max(lengths))
    torch.testing.assert_close(varlen_bench.varlen_fn("sdpa_mask", lengths)(q, k, v), expected)


def eager_flex(mask_mod, T: int, score_mod=None):
    """FlexAttention as the flex rows call it, but eager (CPU: forward only)."""
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")
    block_mask = flex_attention.create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=DEVICE)

    def attention(q, k, v):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # "flex_attention called without torch.compile()"
            return flex_attention.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                 enable_gqa=q.shape[1] != k.shape[1])
    return attention


@pytest.mark.parametrize("window, softcap", [(40, 0.0), (0, 2.0), (40, 2.0)])
def test_flex_mods_compute_our_attention(window, softcap):
    """A softcap of 2 with scores of a few units: tanh far from linear, so a wrong cap shows."""
    B, H, Hkv, T, D = 1, 4, 2, 256, 16
    q, k, v = inputs((B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D))
    q = q * 3
    fn = eager_flex(attention_bench.causal_window_mask_mod(window), T,
                    attention_bench.softcap_score_mod(softcap) if softcap else None)
    with kernels.use(attention="torch"):
        expected = kernels.attention(q, k, v, window_size=(window - 1 if window else -1, 0), softcap=softcap)
    torch.testing.assert_close(fn(q, k, v), expected)


def test_flex_document_mask_computes_varlen_attention():
    lengths = varlen_bench.document_lengths(256, 8, 64, seed=2)
    q, k, v = inputs((256, 4, 16), (256, 4, 16), (256, 4, 16))
    cu_seqlens = torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)
    fn = eager_flex(varlen_bench.document_causal_mask_mod(lengths), 256)
    out = fn(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)))[0].transpose(0, 1)
    with kernels.use(varlen_attention="torch"):
        expected = kernels.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max(lengths), max(lengths))
    torch.testing.assert_close(out, expected)


def test_runnable_skips_only_baselines():
    """A baseline that cannot run the shape is skipped with its reason; our kernels' errors fail."""
    def broken(*args):
        raise RuntimeError("no kernel for this shape\nmore detail")
    x = torch.ones(2, requires_grad=True)
    for backend in ("sdpa_mask", "flex"):
        with pytest.raises(pytest.skip.Exception, match=f"{backend} cannot run this shape: RuntimeError: no kernel"):
            attention_bench.runnable(broken, backend, x)
    with pytest.raises(RuntimeError):
        attention_bench.runnable(broken, "torch", x)
    attention_bench.runnable(broken, "triton", x)      # not run here: measure() runs it and fails loudly

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(pytest.skip.Exception, match="torch cannot run this shape: OutOfMemoryError"):
        attention_bench.runnable(out_of_memory, "torch", x)
    attention_bench.runnable(lambda t: (t * 2).sum(), "torch", x)
    assert x.grad is None                               # the trial's gradients are dropped


def test_triton_and_torch_rows_compute_the_ops(monkeypatch):
    """The rows call the backends' raw functions with the options as kernels.attention and
    kernels.varlen_attention hand them on (normalised: causal means a right window of 0), so the
    triton rows (interpreted here) compute what the torch rows and the public ops compute."""
    monkeypatch.setattr(bench_conftest, "ON_GPU", True)     # implementation() skips triton on CPU otherwise
    try:
        lengths = varlen_bench.document_lengths(96, 8, 32, seed=1)
        q, k, v = inputs((96, 4, 16), (96, 2, 16), (96, 2, 16))
        cu_seqlens = torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)
        with kernels.use(varlen_attention="torch"):
            expected = kernels.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max(lengths), max(lengths))
        for backend in ("torch", "triton"):
            torch.testing.assert_close(varlen_bench.varlen_fn(backend, lengths)(q, k, v), expected,
                                       atol=1e-4, rtol=1e-4, msg=lambda m: f"varlen {backend}: {m}")
        q, k, v = inputs((2, 4, 64, 16), (2, 2, 64, 16), (2, 2, 64, 16))
        for window, softcap in ((16, 0.0), (0, 2.0)):
            with kernels.use(attention="torch"):
                expected = kernels.attention(q, k, v, window_size=(window - 1 if window else -1, 0), softcap=softcap)
            for backend in ("torch", "triton"):
                out = attention_bench.attention_fn(backend, 64, window, softcap)(q, k, v)
                torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"{backend} window={window} softcap={softcap}: {m}")
    finally:
        bench_conftest.implementation.cache_clear()
