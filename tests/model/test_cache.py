"""model.cache: a forward through either cache gives the logits of the uncached forward, a cache's
state moves only through its methods, and the per-row cache attends through kernels.causal_attention
with each row's own key length."""
import pytest
import torch

import kernels
from model import GPT, ModelConfig
from model.cache import KVCache, SlotCache

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
    attend = kernels.causal_attention

    def spy(q, k, v, *args, **kwargs):
        lengths = kwargs.get("key_lengths")
        calls.append((k.shape[2], None if lengths is None else lengths.tolist()))
        return attend(q, k, v, *args, **kwargs)
    monkeypatch.setattr(kernels, "causal_attention", spy)
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
