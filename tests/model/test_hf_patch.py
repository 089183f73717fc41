"""model.hf_patch: apply_tritongpt_kernels on transformers' Llama, Mistral, Qwen2 and Qwen3 gives the
unpatched model's loss and gradients (the float64 rule), trains under transformers' Trainer,
generates the same tokens, and refuses other architectures."""
import copy

import pytest
import torch

from tritongpt import kernels
from numerics import assert_matches

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("apply_tritongpt_kernels needs transformers 5", allow_module_level=True)
from model.hf_patch import apply_tritongpt_kernels  # noqa: E402

V, T = 97, 16
SHAPE = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5, max_position_embeddings=64)
# The configs in which the four architectures differ from Llama: Mistral's window is shorter than
# the sequence, Qwen2 has q/k/v biases, Qwen3 per-head q/k norms; Llama's head is untied.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=5000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict()),
}


def causal_lm(architecture: str = "llama", **overrides):
    """A random small model in eval mode (no dropout anywhere), fp32, on sdpa, with weights far from init."""
    config_class, model_class, fields = ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(**{**SHAPE, **fields, **overrides}, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)            # norms away from 1, biases away from 0
    return model.eval()


def batch(padded: bool):
    """input_ids, attention_mask and labels (B=3, T=16); padded: rows left-padded by 0, 5 and 9."""
    torch.manual_seed(1)
    ids = torch.randint(0, V, (3, T))
    mask = torch.ones(3, T, dtype=torch.long)
    if padded:
        for row, pad in enumerate((0, 5, 9)):
            mask[row, :pad] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def loss_and_grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


# Every architecture on the torch backend; the Triton interpreter (10-20 s a case) on the plain path
# with per-head norms, and on the unpadded path with a window.
CASES = [(architecture, padded, "torch") for architecture in ARCHITECTURES for padded in (False, True)]
CASES += [("qwen3", False, "triton"), ("mistral", True, "triton")]


@pytest.mark.parametrize("architecture, padded, backend", CASES)
def test_same_loss_and_gradients_as_unpatched(architecture, padded, backend):
    if backend == "triton" and not kernels.triton_available("attention"):
        pytest.skip("triton is not installed")
    model = causal_lm(architecture)
    exact = loss_and_grads(copy.deepcopy(model).double(), *batch(padded))
    ref = loss_and_grads(model, *batch(padded))
    patched = apply_tritongpt_kernels(copy.deepcopy(model))
    with kernels.use(backend):
        out = loss_and_grads(patched, *batch(padded))
    # The loss is one number summed in another order: the reference can land on it exactly by luck,
    # so its slack is fp32's relative bound rather than the absolute 1e-6 of an element.
    assert_matches("loss", out[0], ref[0], exact[0], atol=1e-5 * exact[0].abs().item())
    assert out[1].keys() == exact[1].keys()
    for name in exact[1]:
        assert_matches(f"grad of {name}", out[1][name], ref[1][name], exact[1][name])


def test_training_never_makes_the_logits():
    model = apply_tritongpt_kernels(causal_lm()).train()
    heads = []
    model.lm_head.register_forward_hook(lambda *args: heads.append(1))
    ids, mask, labels = batch(padded=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and torch.isfinite(out.loss) and not heads
    model.eval()
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits.shape == (3, T, V)


def test_attn_implementation_by_name(tmp_path):
    """from_pretrained(attn_implementation="tritongpt") runs our attention, with sdpa's logits."""
    model = causal_lm("mistral")
    model.save_pretrained(tmp_path)
    ours = type(model).from_pretrained(tmp_path, attn_implementation="tritongpt").eval()
    assert ours.config._attn_implementation == "tritongpt"
    ids, mask, _ = batch(padded=True)
    real = mask.bool()
    with torch.no_grad():
        exact = model.double()(input_ids=ids, attention_mask=mask).logits[real]
        ref = type(model).from_pretrained(tmp_path)(input_ids=ids, attention_mask=mask).logits[real]
        out = ours(input_ids=ids, attention_mask=mask).logits[real]
    assert_matches("logits", out, ref, exact)


def test_a_patched_model_saves_as_the_plain_one(tmp_path):
    """save_pretrained writes the architecture and attention of the unpatched model: the directory
    loads anywhere, patched or not."""
    apply_tritongpt_kernels(causal_lm("qwen2")).save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.architectures == ["Qwen2ForCausalLM"]
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == "Qwen2ForCausalLM"


def test_packed_sequences_attend_within_themselves():
    """Positions restarting at 0 in one row (padding-free packing) and transformers' flattening
    collator's cu_seq_lens give each sequence the logits it has alone."""
    model = apply_tritongpt_kernels(causal_lm("qwen3"))
    torch.manual_seed(2)
    first, second = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 9))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1)
        by_positions = model(input_ids=packed, position_ids=positions).logits
        cu = torch.tensor([0, 7, 16], dtype=torch.int32)
        by_offsets = model(input_ids=packed, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                           max_length_q=9, max_length_k=9).logits
    torch.testing.assert_close(by_positions, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_offsets, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_generation_gives_the_same_tokens(architecture):
    """Greedy generation with a KV cache from a left-padded batch: the same tokens patched or not."""
    model = causal_lm(architecture, max_position_embeddings=64)
    ids, mask, _ = batch(padded=True)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = model.generate(input_ids=ids, attention_mask=mask, **settings)
    got = apply_tritongpt_kernels(model).generate(input_ids=ids, attention_mask=mask, **settings)
    assert got.tolist() == expected.tolist()


def test_trainer_runs_five_steps(tmp_path):
    """transformers' Trainer, 5 steps with gradient accumulation (so the loss divides by the
    Trainer's num_items_in_batch): the same logged losses as the unpatched model."""
    ids, mask, labels = batch(padded=True)
    rows = [dict(input_ids=ids[i % 3], attention_mask=mask[i % 3], labels=labels[i % 3]) for i in range(20)]

    def train(model) -> list[float]:
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1,
                                              save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                              disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        assert trainer.state.global_step == 5
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    expected = train(causal_lm())
    got = train(apply_tritongpt_kernels(causal_lm()))
    assert len(got) == 5 and got[-1] < got[0]
    assert got == pytest.approx(expected, rel=1e-4)


def test_applying_twice_is_applying_once():
    model = apply_tritongpt_kernels(causal_lm())
    classes = [type(m) for m in model.modules()]
    assert [type(m) for m in apply_tritongpt_kernels(model).modules()] == classes


def test_unsupported_architecture_is_refused_by_name():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match=r"^apply_tritongpt_kernels supports LlamaForCausalLM, .*not GPT2LMHeadModel;"):
        apply_tritongpt_kernels(gpt2)


def test_other_activation_is_refused():
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        apply_tritongpt_kernels(causal_lm(hidden_act="gelu"))
