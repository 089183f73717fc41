import pytest

from model import ModelConfig


def test_presets_and_overrides():
    cfg = ModelConfig.preset("tiny", vocab_size=300, n_layer=2)
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_embd) == (300, 2, 128)
    assert cfg.mlp_hidden % 64 == 0 and cfg.mlp_hidden >= 8 * cfg.n_embd // 3
    assert ModelConfig.preset("small").n_layer == 12
    assert ModelConfig.preset("medium").n_embd == 1024


def test_json_round_trip():
    cfg = ModelConfig.preset("small", vocab_size=1000, rope_theta=5e5, extra={"note": "x"})
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=130, n_head=4), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(n_embd=12, n_head=4, n_kv_head=4), "even for rotary"),
    (dict(vocab_size=0), "vocab_size must be positive"),
])
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny", **kwargs)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="tiny, small, medium"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig fields.*'n_layers'"):
        ModelConfig.from_dict({"n_layers": 3})
