"""model/quantized.py: a quantized GPT stays close to the full one, generates with the KV cache, stores
a half or a quarter of the bytes, is inference-only, and a bad format or a second quantization is
one clear error."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from model import GPT, ModelConfig
from model.generate import generate
from model.quantized import QuantizedLinear, projection_bytes, quantize, quantized_format


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.preset("tiny", vocab_size=300, **overrides)).eval()


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


@pytest.mark.parametrize("fmt, least", [("int8", 0.999), ("fp4", 0.98)])
@pytest.mark.parametrize("head", [False, True])
def test_quantized_logits_stay_close(fmt, least, head):
    model, idx = tiny(), torch.randint(0, 300, (2, 33))
    full = logits(model, idx)
    quantized = quantize(copy.deepcopy(model), fmt, head=head)
    assert F.cosine_similarity(logits(quantized, idx).flatten(), full.flatten(), dim=0) > least
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 5 * model.cfg.n_layer + head
    assert quantized_format(quantized) == {"format": fmt, "head": head}
    assert torch.equal(quantized.embed.weight, model.embed.weight)            # the lookup stays full precision


def test_untied_head_and_odd_sizes():
    model = tiny(tie_embeddings=False, n_embd=96, n_head=3, n_kv_head=1, mlp_hidden=200)   # K = 200: fp4 pads
    idx = torch.randint(0, 300, (1, 17))
    for fmt in ("int8", "fp4"):
        quantized = quantize(copy.deepcopy(model), fmt, head=True)
        assert F.cosine_similarity(logits(quantized, idx).flatten(), logits(model, idx).flatten(), dim=0) > 0.98


def test_greedy_generation_with_the_cache_equals_without():
    model = quantize(tiny(), "int8")
    idx = torch.randint(0, 300, (3, 9))
    cached = generate(model, idx, 20, temperature=0, use_cache=True)
    assert torch.equal(cached, generate(model, idx, 20, temperature=0, use_cache=False))
    assert cached.shape == (3, 29)


def test_weight_bytes_are_half_and_a_quarter_of_bf16():
    model = tiny()
    assert projection_bytes(model)[0] == projection_bytes(model)[1]
    int8_model = quantize(copy.deepcopy(model), "int8")
    int8, bf16 = projection_bytes(int8_model)
    fp4, _ = projection_bytes(quantize(copy.deepcopy(model), "fp4"))
    rows = sum(m.out_features for m in int8_model.modules() if isinstance(m, QuantizedLinear))
    assert int8 == bf16 / 2 + 4 * rows                    # a byte a weight and an fp32 scale a row
    assert fp4 / bf16 == pytest.approx(4.5 / 16)          # half a byte a weight, 2 bytes per 32


def test_loss_runs_through_a_quantized_head():
    model = tiny()
    idx = torch.randint(0, 300, (2, 16))
    quantized = quantize(copy.deepcopy(model), "int8", head=True)
    with torch.no_grad():
        loss = quantized(idx[:, :-1], targets=idx[:, 1:])
        expected = F.cross_entropy(quantized(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_a_quantized_model_is_inference_only():
    model = quantize(tiny(), "fp4")
    with pytest.raises(ValueError, match=r"this model is quantized \(fp4\), which is inference-only"):
        model.train()


def test_quantizing_twice_is_refused():
    with pytest.raises(ValueError, match=r"already quantized \(int8\)"):
        quantize(quantize(tiny(), "int8"), "fp4")


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown quantization format 'int4'; choose one of int8, fp4"):
        quantize(tiny(), "int4")
