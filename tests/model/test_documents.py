"""model/documents.py and the GPT's packed documents: a row of several documents computes exactly
what each document computes alone in its own row (attention, RoPE positions, loss), and the
sliding window and softcap of ModelConfig change attention as kernels.attention says."""
import pytest
import torch

from tritongpt import kernels
from model import GPT, ModelConfig
from model.documents import Documents

V = 97
EOT = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig.preset("tiny", vocab_size=V, block_size=32, init_std=0.1)).eval()


def test_starting_at_starts_a_document_at_each_end_of_text():
    idx = torch.tensor([[5, 6, EOT, 7, 8, 9, EOT, 1], [EOT, 2, 3, 4, 5, 6, 7, 8]])
    docs = Documents.starting_at(idx, EOT)
    assert docs.cu_seqlens.tolist() == [0, 2, 6, 8, 16] and docs.cu_seqlens.dtype == torch.int32
    assert docs.max_seqlen == 8
    assert docs.positions.tolist() == [[0, 1, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]


def test_from_lengths_makes_the_rest_of_a_row_one_document():
    docs = Documents.from_lengths([[3, 2], [6], []], 6)
    assert docs.cu_seqlens.tolist() == [0, 3, 5, 6, 12, 18]
    assert docs.positions[0].tolist() == [0, 1, 2, 0, 1, 0]
    with pytest.raises(ValueError, match="row 0 packs 7 tokens into 6 positions"):
        Documents.from_lengths([[4, 3]], 6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_documents_equal_each_document_alone(model, backend):
    torch.manual_seed(1)
    idx = torch.randint(1, V, (2, 24))
    idx[0, 4], idx[0, 15], idx[1, 9] = EOT, EOT, EOT
    docs = Documents.starting_at(idx, EOT)
    bounds = docs.cu_seqlens.tolist()
    with kernels.use(attention=backend, varlen_attention=backend), torch.no_grad():
        packed = model(idx, documents=docs).reshape(48, V)                    # (B * T, V)
        alone = torch.cat([model(idx.reshape(1, 48)[:, a:b]).reshape(b - a, V) for a, b in zip(bounds, bounds[1:])])
        unmasked = model(idx).reshape(48, V)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(packed, unmasked, atol=1e-3)                     # the mask changes something


def test_documents_and_a_cache_are_refused(model):
    from model.cache import KVCache
    idx = torch.randint(1, V, (1, 8))
    with pytest.raises(ValueError, match="documents and a cache combine only in a packed prefill"):
        model(idx, cache=KVCache(model.cfg, 1, "cpu", torch.float32), documents=Documents.starting_at(idx, EOT))


def test_window_and_softcap_reach_attention(model):
    """attn_window=W: each token sees itself and W - 1 before it; attn_softcap caps the scores: the
    model's attention is kernels.attention with those options."""
    torch.manual_seed(2)
    idx = torch.randint(1, V, (1, 20))
    for overrides, options in [(dict(attn_window=5), dict(window_size=(4, 0))), (dict(attn_softcap=0.5),
                                                                                 dict(softcap=0.5))]:
        other = GPT(ModelConfig.preset("tiny", vocab_size=V, block_size=32, init_std=0.1, **overrides)).eval()
        other.load_state_dict(model.state_dict())
        calls = []
        attend = kernels.attention

        def spy(q, k, v, **kwargs):
            calls.append(kwargs)
            return attend(q, k, v, **kwargs)
        kernels.attention = spy
        try:
            with torch.no_grad():
                changed, plain = other(idx), model(idx)
        finally:
            kernels.attention = attend
        assert all(c == {"window_size": options.get("window_size", (-1, 0)), "softcap": options.get("softcap", 0.0)}
                   for c in calls[:4])
        assert not torch.allclose(changed, plain, atol=1e-3)
        # the first attn_window positions see everything they would without a window
        if "attn_window" in overrides:
            torch.testing.assert_close(changed[:, :5], plain[:, :5])


def test_config_refuses_bad_window_and_softcap():
    with pytest.raises(ValueError, match="attn_window must be >= 0"):
        ModelConfig.preset("tiny", attn_window=-1)
    with pytest.raises(ValueError, match="attn_softcap must be a finite number >= 0"):
        ModelConfig.preset("tiny", attn_softcap=float("inf"))
