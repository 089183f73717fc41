"""model.io.hf: our GPT and transformers' LlamaForCausalLM with the mapped config and weights are the
same network (logits, loss and greedy tokens), on the CPU in fp32."""
import sys

import pytest
import torch

from tritongpt import kernels
from model import GPT, ModelConfig
from model.generate import generate

transformers = pytest.importorskip("transformers")
from model.io import hf  # noqa: E402

# The tiny preset with random weights at a few sizes: GQA (the preset), MHA, MQA, wider heads,
# with a non-default rope_theta and norm_eps so that a dropped field shows. init_std 0.1 makes the
# logits far from uniform, so greedy picks are not near-ties and the comparison has teeth.
CONFIGS = {
    "gqa": dict(),
    "mha": dict(n_kv_head=4),
    "mqa": dict(n_kv_head=1),
    "wide-heads": dict(n_head=2, n_kv_head=1, n_embd=128, rope_theta=500000.0, norm_eps=1e-5),
    "untied": dict(tie_embeddings=False),
    # Llama 3's scaling with a short original context, so all three frequency bands occur.
    "llama3-rope": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 32}),
}


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **{"vocab_size": 512, "block_size": 64, "init_std": 0.1, **overrides})


@pytest.fixture(autouse=True)
def _torch_kernels():
    with kernels.use("torch"):
        yield


def pair(cfg: ModelConfig, attn_implementation: str = "sdpa"):
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    return ours, hf.llama_model(ours, attn_implementation=attn_implementation)


def test_config_fields():
    cfg = tiny(**CONFIGS["wide-heads"])
    c = hf.llama_config(cfg)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (512, 128, cfg.mlp_hidden, 4)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, 64)
    assert (c.max_position_embeddings, c.rms_norm_eps, c.hidden_act) == (64, 1e-5, "silu")
    theta = c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta
    assert theta == 500000.0
    assert c.tie_word_embeddings and not c.attention_bias and not c.mlp_bias
    assert c.eos_token_id is None and hf.llama_config(cfg, eos_token_id=7).eos_token_id == 7


@pytest.mark.parametrize("field, value", [("attn_window", 16), ("attn_softcap", 30.0)])
def test_llama_refuses_what_it_does_not_have(field, value):
    """transformers' Llama has no sliding window or softcap: a model trained with one would export
    to different logits, so the export refuses and names the field."""
    with pytest.raises(ValueError, match=f"this model has {field}={value}, which transformers' Llama does not have"):
        hf.llama_config(tiny(**{field: value}))


def test_state_dict_names_shapes_and_tying():
    ours, theirs = pair(tiny())
    mapped = hf.llama_state_dict(ours)
    expected = theirs.state_dict()
    assert mapped.keys() == expected.keys()
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in expected.items()}
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    # The fused qkv rows are [q heads, k heads, v heads]: k_proj's first row is row n_head * head_dim.
    cfg = ours.cfg
    assert torch.equal(mapped["model.layers.0.self_attn.k_proj.weight"][0],
                       ours.blocks[0].attn.qkv.weight[cfg.n_head * cfg.head_dim])
    # llama_model copies: the two models do not share storage.
    assert theirs.model.embed_tokens.weight.data_ptr() != ours.embed.weight.data_ptr()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_logits_and_loss(name, attn_implementation):
    ours, theirs = pair(tiny(**CONFIGS[name]), attn_implementation)
    x = torch.randint(0, 512, (3, 64))
    with torch.no_grad():
        logits = ours(x)
        ref = theirs(input_ids=x).logits
        assert ref.shape == logits.shape == (3, 64, 512)
        assert logits.std() > 0.5                       # far from uniform: the comparison has teeth
        assert (logits - ref).abs().max().item() <= 1e-4
        # Loss: transformers shifts its labels; ours takes the targets aligned, last one ignored.
        y = torch.randint(0, 512, (3, 64))
        y[:, -1] = -100
        labels = torch.cat((y[:, :1], y[:, :-1]), dim=1)
        assert abs(ours(x, targets=y).item() - theirs(input_ids=x, labels=labels).loss.item()) <= 1e-5


@pytest.mark.parametrize("name", ["gqa", "mqa"])
def test_same_greedy_tokens(name):
    ours, theirs = pair(tiny(**CONFIGS[name]))
    prompt = torch.randint(0, 512, (2, 8))
    new = 24
    expected = theirs.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=new, min_new_tokens=new)
    for use_cache in (True, False):
        assert torch.equal(generate(ours, prompt, new, temperature=0, use_cache=use_cache), expected)


def test_transformers_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)       # import transformers raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[hf\]"'):
        hf.llama_config(tiny())
