"""model.cache: a forward through either cache gives the logits of the uncached forward, a cache's
state moves only through its methods, the per-row cache attends through kernels.attention with each
row's own key length, and its packed prefill (several prompts in one row, one forward) writes each
prompt into its own row and gives each prompt's last logits, as prefilling them one by one does."""
import pytest
import torch

from tritongpt import kernels
from model import GPT, ModelConfig
from model.cache import KVCache, SlotCache
from model.documents import Documents

V = 256


@pytest.fixture
def tiny() -> GPT:
    return GPT(ModelConfig.preset("tiny", vocab_size=V, n_layer=2, block_size=64)).eval()


def slot_cache(model: GPT, slots: int) -> SlotCache:
    return SlotCache(model.cfg, slots, "cpu", torch.float32)


def test_cache_forward_equals_full_forward(tiny):
    idx = torch.randint(0, V, (2, 24))
    full = tiny(idx)
    cache = KVCache(tiny.cfg, 2, "cpu", torch.float32)
    parts = [tiny(idx[:, :10], cache=cache), tiny(idx[:, 10:11], cache=cache), tiny(idx[:, 11:], cache=cache)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_reset_refills_from_position_zero_and_length_is_read_only(tiny):
    idx = torch.randint(0, V, (1, 8))
    cache = KVCache(tiny.cfg, 1, "cpu", torch.float32)
    with torch.no_grad():
        first = tiny(idx, cache=cache)
        cache.reset()
        assert cache.length == 0
        again = tiny(idx, cache=cache)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    with pytest.raises(AttributeError):
        cache.length = 0


def test_batched_decoding_step_matches_separate_forwards(tiny, nan_outputs):
    # Three sequences of different lengths in one SlotCache step give the logits each gets alone,
    # though the cache's unwritten memory is NaN (no key past a row's length is read).
    cache = slot_cache(tiny, 3)
    seqs = [torch.randint(0, V, (1, n)) for n in (5, 9, 2)]
    with torch.no_grad():
        for row, s in enumerate(seqs):
            cache.select(slice(row, row + 1))
            tiny(s[:, :-1], cache=cache)
        cache.select(slice(0, 3))
        batched = tiny(torch.cat([s[:, -1:] for s in seqs]), cache=cache)[:, -1]          # (3, V)
        alone = torch.cat([tiny(s)[:, -1] for s in seqs])
    assert [cache.row_length(row) for row in range(3)] == [5, 9, 2]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_each_row_attends_through_kernels_with_its_own_key_length(tiny, monkeypatch):
    calls = []
    attend = kernels.attention

    def spy(q, k, v, *args, **kwargs):
        lengths = kwargs.get("key_lengths")
        calls.append((k.shape[2], None if lengths is None else lengths.tolist()))
        return attend(q, k, v, *args, **kwargs)
    monkeypatch.setattr(kernels, "attention", spy)
    cache = slot_cache(tiny, 2)
    with torch.no_grad():
        for row, n in enumerate((3, 6)):
            cache.select(slice(row, row + 1))
            tiny(torch.randint(0, V, (1, n)), cache=cache)
        cache.select(slice(0, 2))
        tiny(torch.randint(0, V, (2, 1)), cache=cache)
    # per layer: (keys passed: the longest row's, each row's own count); a prefill passes its row's
    # keys and no lengths, the plain causal case that runs on the training kernels on a GPU
    assert calls == [(3, None)] * 2 + [(6, None)] * 2 + [(7, [4, 7])] * 2


def test_a_row_continues_its_sequence_after_a_reset_and_a_move(tiny):
    long, short = torch.randint(0, V, (1, 12)), torch.randint(0, V, (1, 4))
    cache = slot_cache(tiny, 2)
    with torch.no_grad():
        cache.select(slice(0, 1))
        tiny(long, cache=cache)
        cache.select(slice(1, 2))
        tiny(short[:, :-1], cache=cache)
        cache.move(1, 0)                      # row 0 retires; row 1's sequence moves into it
        cache.reset(1)
        assert (cache.row_length(0), cache.row_length(1)) == (3, 0)
        cache.select(slice(0, 1))
        moved = tiny(short[:, -1:], cache=cache)[:, -1]
        alone = tiny(short)[:, -1]
    torch.testing.assert_close(moved, alone, rtol=1e-5, atol=1e-5)


def test_packed_prefill_writes_each_prompt_into_its_own_row_as_one_by_one_does(tiny, nan_outputs):
    # Rows 1..3 prefilled in one forward of one (1, 16) row; row 0 holds a sequence already, which
    # neither the packed forward nor the step after it may disturb. The unwritten memory is NaN.
    lengths = (5, 9, 2)
    prompts = [torch.randint(0, V, (1, n)) for n in lengths]
    held, nexts = torch.randint(0, V, (1, 7)), torch.randint(0, V, (4, 1))
    packed, one_by_one = slot_cache(tiny, 4), slot_cache(tiny, 4)
    with torch.no_grad():
        for cache in (packed, one_by_one):
            cache.select(slice(0, 1))
            tiny(held, cache=cache)
        documents = packed.select_packed(slice(1, 4), list(lengths))
        assert documents.cu_seqlens.tolist() == [0, 5, 14, 16] and packed.packed is documents
        last = tiny(torch.cat(prompts, dim=1), cache=packed, documents=documents, last_only=True)   # (3, 1, V)
        alone = []
        for row, prompt in enumerate(prompts, start=1):
            one_by_one.select(slice(row, row + 1))
            alone.append(tiny(prompt, cache=one_by_one, last_only=True)[:, -1])
        assert packed.packed is None
        assert [packed.row_length(row) for row in range(4)] == [7, *lengths]
        torch.testing.assert_close(last[:, -1], torch.cat(alone), rtol=1e-5, atol=1e-5)
        uncached = tiny(torch.cat(prompts, dim=1), documents=documents, last_only=True)      # the same, no cache
        torch.testing.assert_close(uncached, last, rtol=1e-5, atol=1e-5)
        for layer in range(tiny.cfg.n_layer):
            for row, n in enumerate((7, *lengths)):           # keys at positions 0..n-1 of its row
                for mine, theirs in ((packed._k, one_by_one._k), (packed._v, one_by_one._v)):
                    torch.testing.assert_close(mine[layer][row, :, :n], theirs[layer][row, :, :n],
                                               rtol=1e-5, atol=1e-5)
                    assert mine[layer][row, :, n:].isnan().all()          # and nothing past them
        steps = []
        for cache in (packed, one_by_one):                    # decoding continues from each row's length
            cache.select(slice(0, 4))
            steps.append(tiny(nexts, cache=cache)[:, -1])
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-5, atol=1e-5)
    whole = [torch.cat((s, n[None]), dim=1) for s, n in zip((held, *prompts), nexts)]
    torch.testing.assert_close(steps[0], torch.cat([tiny(s)[:, -1] for s in whole]), rtol=1e-5, atol=1e-5)


def test_packed_prefill_attends_once_per_layer_through_varlen_attention(tiny, monkeypatch):
    calls = []
    varlen = kernels.varlen_attention

    def spy(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append((tuple(q.shape), cu_q.tolist(), cu_k.tolist(), max_q, max_k))
        return varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    monkeypatch.setattr(kernels, "varlen_attention", spy)
    cache = slot_cache(tiny, 3)
    with torch.no_grad():
        documents = cache.select_packed(slice(0, 3), [4, 1, 6])
        tiny(torch.randint(0, V, (1, 11)), cache=cache, documents=documents, last_only=True)
    H, D = tiny.cfg.n_head, tiny.cfg.head_dim
    assert calls == [((11, H, D), [0, 4, 5, 11], [0, 4, 5, 11], 6, 6)] * tiny.cfg.n_layer


def test_packed_prefill_fits_each_prompt_not_their_sum_and_refuses_other_documents(tiny):
    cache = slot_cache(tiny, 3)
    prompts = torch.randint(0, V, (1, 120))                   # 3 x 40 tokens: each fits a 64-token context
    with torch.no_grad():
        documents = cache.select_packed(slice(0, 3), [40, 40, 40])
        last = tiny(prompts, cache=cache, documents=documents, last_only=True)[:, -1]
        alone = torch.cat([tiny(prompts[:, i:i + 40])[:, -1] for i in (0, 40, 80)])
        torch.testing.assert_close(last, alone, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="exceeds block_size 64"):
            cache.select_packed(slice(0, 2), [65, 3])
            tiny(torch.randint(0, V, (1, 68)), cache=cache, documents=cache.packed)
        cache.select(slice(0, 1))                              # documents the cache was not packed for
        with pytest.raises(ValueError, match="select_packed"):
            tiny(prompts[:, :8], cache=cache, documents=Documents.from_lengths([[4, 4]], 8))
        with pytest.raises(ValueError, match="one length per row"):
            cache.select_packed(slice(0, 3), [4, 4])
        with pytest.raises(ValueError, match="at least one token"):
            cache.select_packed(slice(0, 2), [4, 0])
