"""model/io/quantized.py: a quantized GPT stays close to the full one, generates with the KV cache,
saves and loads as a run, is inference-only, and every bad input is one clear error."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import GPT, ModelConfig
from model.io.checkpoint import load_model
from model.generate import generate
from model.command import run_command
from model.io.quantized import QuantizedLinear, main, projection_bytes, quantize, quantize_run, quantized_format
from posttrain_fixtures import make_run

ROOT = Path(__file__).resolve().parents[3]


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


def test_save_then_load_gives_identical_outputs(tmp_path):
    run = make_run(tmp_path / "run")
    for fmt, head in (("int8", False), ("fp4", True)):
        out, stored, bf16 = quantize_run(run, fmt, tmp_path / f"q-{fmt}", head=head)
        model, state = load_model(out)
        assert state["quantization"] == {"format": fmt, "head": head}
        expected = quantize(load_model(run)[0], fmt, head=head)
        idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
        assert torch.equal(logits(model, idx), logits(expected, idx))
        assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
        assert stored < bf16


def test_a_quantized_model_is_inference_only(tmp_path):
    model = quantize(tiny(), "fp4")
    with pytest.raises(ValueError, match=r"this model is quantized \(fp4\), which is inference-only"):
        model.train()
    out, _, _ = quantize_run(make_run(tmp_path / "run"), "int8", tmp_path / "q")
    with pytest.raises(ValueError, match=r"is quantized \(int8\), which is inference-only; start training from"):
        load_model(out, trainable=True)


def test_quantizing_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"already quantized \(int8\)"):
        quantize(quantize(tiny(), "int8"), "fp4")
    out, _, _ = quantize_run(make_run(tmp_path / "run"), "int8", tmp_path / "q")
    with pytest.raises(ValueError, match=r"is already quantized \(int8\); quantize the full-precision run"):
        quantize_run(out, "fp4", tmp_path / "q2")
    with pytest.raises(ValueError, match=r"is already quantized \(int8\); drop --quantize"):
        load_model(out, quantize="fp4")
    assert not (tmp_path / "q2").exists()


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown quantization format 'int4'; choose one of int8, fp4"):
        quantize(tiny(), "int4")


@pytest.mark.parametrize("entry", [{"format": "int4", "head": False}, {"format": "int8"}, "int8"])
def test_a_corrupt_quantization_entry_is_refused(tmp_path, entry):
    out, _, _ = quantize_run(make_run(tmp_path / "run"), "int8", tmp_path / "q")
    state_file = next((out / "checkpoints").glob("step_*")) / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "quantization": entry}))
    with pytest.raises(ValueError, match=r"corrupt checkpoint .*state.json's quantization is .*model.io.quantized"):
        load_model(out)


def test_wrong_scale_shapes_in_a_checkpoint_are_refused(tmp_path):
    out, _, _ = quantize_run(make_run(tmp_path / "run"), "fp4", tmp_path / "q")
    ckpt = next((out / "checkpoints").glob("step_*"))
    from safetensors.torch import load_file, save_file
    weights = load_file(ckpt / "model.safetensors")
    weights["blocks.0.mlp.up.scales"] = weights["blocks.0.mlp.up.scales"][:, :1].contiguous()
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"blocks.0.mlp.up.scales: checkpoint \(\d+, 1\) vs model \(\d+, 2\)"):
        load_model(out)


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_command_line(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    done = command("-m", "model.quantize", str(run), "--format", "int8", "--out", str(tmp_path / "q"))
    assert done.returncode == 0, done.stderr
    assert "x); chat with it: python -m model.chat" in done.stdout
    state = json.loads(next((tmp_path / "q" / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["quantization"] == {"format": "int8", "head": False} and state["job"] == "quantize"
    # a quantized run chats as it is; a full one with --quantize
    for path, extra in ((tmp_path / "q", ()), (run, ("--quantize", "fp4"))):
        chat = subprocess.run([sys.executable, "-m", "model.chat", str(path), "--max-tokens", "5", "--seed", "1", *extra],
                              cwd=ROOT, input="What is 2 + 3?", capture_output=True, text=True, timeout=300)
        assert chat.returncode == 0, chat.stderr
    # mistakes: one line, no traceback, nothing written
    for args, message, status in (
            ((str(run), "--format", "int4", "--out", str(tmp_path / "x")), "invalid choice: 'int4'", 2),
            ((str(run), "--out", str(tmp_path / "x")), "the following arguments are required: --format", 2),
            ((str(tmp_path / "q"), "--format", "fp4", "--out", str(tmp_path / "x")), "is already quantized", 1),
            ((str(tmp_path / "nope"), "--format", "fp4", "--out", str(tmp_path / "x")), "no checkpoint at", 1),
            ((str(run), "--format", "fp4", "--out", str(tmp_path / "q")), "already exists and is not an empty", 1)):
        with pytest.raises(SystemExit) as exited:
            run_command(lambda: main(list(args)))
        err = capsys.readouterr().err
        assert exited.value.code == status and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()
    sft = command("-m", "train.sft", "--init", str(tmp_path / "q"), "--out", str(tmp_path / "sft"), "--max-steps", "1")
    assert sft.returncode == 1 and "which is inference-only" in sft.stderr and "Traceback" not in sft.stderr
    assert not (tmp_path / "sft").exists() or not any((tmp_path / "sft").iterdir()), list((tmp_path / "sft").iterdir())
