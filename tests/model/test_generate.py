import pytest
import torch

from tritongpt import kernels
from model import GPT, ModelConfig
from model.generate import generate, generate_ragged, sample_next

V = 128


@pytest.fixture
def tiny() -> GPT:
    torch.manual_seed(1)
    return GPT(ModelConfig.preset("tiny", vocab_size=V, n_layer=2, block_size=32)).eval()


@pytest.mark.parametrize("prompt_len, new", [(1, 12), (7, 10), (30, 10), (40, 5)])
def test_greedy_cache_equals_no_cache(tiny, prompt_len, new):
    # (30, 10) and (40, 5) run past block_size 32, where the cache is refilled from the last 32 tokens.
    idx = torch.randint(0, V, (3, prompt_len))
    cached = generate(tiny, idx, new, temperature=0)
    uncached = generate(tiny, idx, new, temperature=0, use_cache=False)
    assert cached.shape == (3, prompt_len + new)
    assert torch.equal(cached[:, :prompt_len], idx)
    assert torch.equal(cached, uncached)


def test_greedy_matches_argmax_of_full_forward(tiny):
    idx = torch.randint(0, V, (2, 5))
    out = generate(tiny, idx, 6, temperature=0)
    for t in range(5, 11):
        assert torch.equal(out[:, t], tiny(out[:, :t])[:, -1].argmax(-1))


def test_sampling_is_seeded_and_cache_independent(tiny):
    idx = torch.randint(0, V, (2, 4))
    a = generate(tiny, idx, 15, temperature=1.0, top_p=0.9, seed=3)
    b = generate(tiny, idx, 15, temperature=1.0, top_p=0.9, seed=3, use_cache=False)
    c = generate(tiny, idx, 15, temperature=1.0, top_p=0.9, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_equals_greedy(tiny):
    idx = torch.randint(0, V, (2, 4))
    assert torch.equal(generate(tiny, idx, 8, top_k=1, seed=0), generate(tiny, idx, 8, temperature=0))


def test_top_k_never_samples_outside_the_k_largest():
    logits = torch.randn(4, 50)
    allowed = logits.topk(5, dim=-1).indices
    for seed in range(20):
        picked = sample_next(logits, top_k=5, generator=torch.Generator().manual_seed(seed))
        assert (allowed == picked[:, None]).any(dim=1).all()


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    seen = {int(sample_next(logits, top_p=0.8, generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}          # 0.5 + 0.3 reaches 0.8: token 2 and 3 are cut
    seen = {int(sample_next(logits, top_p=0.81, generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1, 2}
    seen = {int(sample_next(logits, top_p=0.4, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert seen == {0}             # the most likely token alone is always kept


def test_stop_tokens_stop_and_pad(tiny):
    idx = torch.randint(0, V, (2, 3))
    free = generate(tiny, idx, 10, temperature=0)
    stop = int(free[0, 5])         # the third generated token of row 0
    out = generate(tiny, idx, 10, temperature=0, stop_tokens=[stop])
    first = (free[0, 3:] == stop).nonzero()[0].item() + 3
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first:] == stop).all()
    # row 1 is unaffected until it stops itself
    row1_stop = (free[1, 3:] == stop).nonzero()
    end = out.shape[1] if not len(row1_stop) else row1_stop[0].item() + 4
    assert torch.equal(out[1, :end], free[1, :end])


def test_generation_ends_early_when_all_rows_stop(tiny):
    idx = torch.randint(0, V, (1, 3))
    free = generate(tiny, idx, 10, temperature=0)
    out = generate(tiny, idx, 10, temperature=0, stop_tokens=[int(free[0, 4])])
    assert out.shape[1] <= 5 and out[0, -1] == free[0, 4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
])
def test_bad_arguments(tiny, kwargs, message):
    args = dict(max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(tiny, torch.zeros(1, 2, dtype=torch.long), **args)
    with pytest.raises(ValueError, match="int64"):
        generate(tiny, torch.zeros(1, 2, dtype=torch.int32), 3)


def test_triton_attention_cache_equals_no_cache(tiny):
    idx = torch.randint(0, V, (2, 6))
    with kernels.use(attention="triton"):
        cached = generate(tiny, idx, 6, temperature=0)
        uncached = generate(tiny, idx, 6, temperature=0, use_cache=False)
    with kernels.use("torch"):
        reference = generate(tiny, idx, 6, temperature=0)
    assert torch.equal(cached, uncached) and torch.equal(cached, reference)


@pytest.mark.parametrize("options", [dict(attn_window=8), dict(attn_softcap=2.0), dict(attn_window=5, attn_softcap=1.0)],
                         ids=["window", "softcap", "both"])
def test_window_and_softcap_cache_equals_no_cache(options):
    """Decoding through the KV cache keeps a windowed or softcapped model's attention: the cached
    steps (kernels.attention with Tq < Tk) give the greedy tokens of full forwards, past the window."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=V, block_size=64, init_std=0.2, **options)).eval()
    idx = torch.randint(0, V, (2, 6))
    assert torch.equal(generate(model, idx, 20, temperature=0), generate(model, idx, 20, temperature=0, use_cache=False))


def test_ragged_batch_gives_each_prompt_its_own_greedy_reply(tiny):
    """Prompts of four lengths in one ragged batch: each row's greedy tokens are those of generating
    it alone, cut after its first stop token, and no longer than the room the longest prompt leaves."""
    torch.manual_seed(1)
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 9, 5, 3, 12)]
    alone = [generate(tiny, torch.tensor([p]), 10, temperature=0)[0, len(p):].tolist() for p in prompts]
    assert generate_ragged(tiny, prompts, 10, temperature=0) == alone
    stop = alone[1][2]
    cut = [row[:row.index(stop) + 1] if stop in row else row for row in alone]
    assert generate_ragged(tiny, prompts, 10, temperature=0, stop_tokens=[stop]) == cut
    assert all(len(r) == tiny.cfg.block_size - 12 for r in generate_ragged(tiny, prompts, 10_000, temperature=0))
    sampled = generate_ragged(tiny, prompts, 10, temperature=1.0, seed=3)
    assert sampled == generate_ragged(tiny, prompts, 10, temperature=1.0, seed=3) != alone
