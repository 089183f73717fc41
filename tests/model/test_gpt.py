import math

import pytest
import torch

from tritongpt import kernels
from model import GPT, ModelConfig
from model.cache import KVCache

V = 256


@pytest.fixture
def tiny() -> GPT:
    return GPT(ModelConfig.preset("tiny", vocab_size=V, n_layer=2, block_size=64))


def test_shapes_and_loss_reductions(tiny):
    idx = torch.randint(0, V, (3, 17))
    targets = torch.randint(0, V, (3, 17))
    assert tiny(idx).shape == (3, 17, V)
    assert tiny(idx, last_only=True).shape == (3, 1, V)
    per_token = tiny(idx, targets=targets, reduction="none")
    assert per_token.shape == (3, 17)
    torch.testing.assert_close(tiny(idx, targets=targets), per_token.mean())


def test_loss_matches_logits(tiny):
    idx, targets = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9))
    targets[0, :4] = -100
    logits = tiny(idx)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1))
    torch.testing.assert_close(tiny(idx, targets=targets), expected)


def test_causality(tiny):
    idx = torch.randint(0, V, (1, 20))
    changed = idx.clone()
    changed[0, 12] = (idx[0, 12] + 1) % V
    a, b = tiny(idx), tiny(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_initial_loss_near_uniform(tiny):
    idx, targets = torch.randint(0, V, (8, 64)), torch.randint(0, V, (8, 64))
    assert abs(tiny(idx, targets=targets).item() - math.log(V)) < 0.2


def test_training_lowers_loss(tiny):
    idx = torch.randint(0, V, (4, 32))
    targets = torch.roll(idx, -1, dims=1)
    opt = torch.optim.AdamW(tiny.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = tiny(idx, targets=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_tied_head_and_scaled_residual_init(tiny):
    cfg = tiny.cfg
    names = dict(tiny.named_parameters())
    assert "lm_head.weight" not in names and names["embed.weight"].shape == (V, cfg.n_embd)
    residual_std = names["blocks.0.attn.out.weight"].std().item()
    assert residual_std == pytest.approx(cfg.init_std / math.sqrt(2 * cfg.n_layer), rel=0.1)
    assert names["blocks.0.attn.qkv.weight"].std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert torch.equal(names["norm.weight"], torch.ones(cfg.n_embd))


def test_projections_are_bias_free_linear_layers():
    model = GPT(ModelConfig.preset("tiny", vocab_size=64, n_layer=1, tie_embeddings=False))
    projections = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert sorted(projections) == ["blocks.0.attn.out", "blocks.0.attn.qkv", "blocks.0.mlp.gate", "blocks.0.mlp.out",
                                   "blocks.0.mlp.up", "head"]
    assert all(m.bias is None and list(m.state_dict()) == ["weight"] for m in projections.values())
    x = torch.randn(3, model.cfg.n_embd)
    torch.testing.assert_close(model.head(x), x @ model.head.weight.T)


def test_num_params_and_flops(tiny):
    cfg = tiny.cfg
    per_block = (cfg.n_embd * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim + cfg.n_embd ** 2
                 + 3 * cfg.n_embd * cfg.mlp_hidden + 2 * cfg.n_embd)
    expected = V * cfg.n_embd + cfg.n_layer * per_block + cfg.n_embd
    assert tiny.num_params() == expected
    norms = (2 * cfg.n_layer + 1) * cfg.n_embd
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * 32
    assert tiny.flops_per_token(32) == 6 * (expected - norms) + attention


def test_too_long_input_is_rejected(tiny):
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        tiny(torch.zeros(1, 65, dtype=torch.long))


def test_token_ids_outside_the_vocabulary_are_explained():
    model = GPT(ModelConfig.preset("tiny", vocab_size=300, n_layer=1))
    with pytest.raises(ValueError, match="token ids 3..300 do not fit the vocabulary 0..299; encode with the tokenizer"):
        model(torch.tensor([[3, 300]]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_keeps_no_projection_buffer_and_its_output_transpose_is_free(backend, monkeypatch):
    """q, k, v each own exactly their storage (attention saving them for backward does not keep
    the fused qkv projection alive), and the output is laid out (B, T, H, D) in memory, so the
    model's transpose back to (B, T, C) needs no copy."""
    model = GPT(ModelConfig.preset("tiny", vocab_size=300, n_layer=1, n_head=4, n_kv_head=2, n_embd=64))
    seen = []
    attend = kernels.attention

    def spy(q, k, v, **kwargs):
        seen.append((q, k, v, attend(q, k, v, **kwargs)))
        return seen[-1][-1]
    monkeypatch.setattr(kernels, "attention", spy)
    with kernels.use(attention=backend):
        model(torch.randint(0, 300, (2, 9)))
    (q, k, v, y), = seen
    for t in (q, k, v):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert y.shape == (2, 4, 9, 16) and y.transpose(1, 2).is_contiguous()


def test_no_forward_changes_how_the_parameters_are_stored(tiny):
    """Decoding (a KV cache of any size, under inference mode), training and a plain no-grad
    forward all leave every parameter as it was: the same values, contiguous, an ordinary tensor
    that requires grad, with contiguous gradients."""
    idx = torch.randint(0, V, (2, 12))
    before = {name: p.detach().clone() for name, p in tiny.named_parameters()}
    expected = tiny(idx)
    assert all(p.is_contiguous() for p in tiny.parameters())

    with torch.inference_mode():
        got = tiny(idx, cache=KVCache(tiny.cfg, 2, "cpu", torch.float32))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for name, p in tiny.named_parameters():
        assert p.is_contiguous(), name
        assert not p.is_inference() and p.requires_grad
        torch.testing.assert_close(p, before[name], atol=0, rtol=0)
    assert tiny.state_dict()["embed.weight"].is_contiguous()         # writers need no .contiguous()

    loss = tiny(idx, targets=idx)
    loss.backward()
    assert all(p.is_contiguous() and p.grad.is_contiguous() for p in tiny.parameters())
    with torch.no_grad():
        tiny(idx)
    assert all(p.is_contiguous() for p in tiny.parameters())

    with torch.inference_mode():
        tiny(idx[:1], cache=KVCache(tiny.cfg, 1, "cpu", torch.float32))
        assert tiny.embed.weight.is_contiguous()
        tiny(idx[:1].expand(3, -1), cache=KVCache(tiny.cfg, 3, "cpu", torch.float32))
        assert all(p.is_contiguous() for p in tiny.parameters())
