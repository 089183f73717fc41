"""model/io/quantized.py: a quantized run saves and loads with the outputs it was written with, is
inference-only, and every bad input (a second quantization, a corrupt state.json entry, wrong
shapes, a command-line mistake) is one clear error."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import GPT
from model.command import run_command
from model.io.checkpoint import load_model, quantized_as
from model.io.quantized import main, quantize_run
from model.quantized import quantize
from posttrain_fixtures import make_run

ROOT = Path(__file__).resolve().parents[3]


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


def test_save_then_load_gives_identical_outputs(tmp_path):
    run = make_run(tmp_path / "run")
    for fmt, head in (("int8", False), ("fp4", True)):
        out, stored, bf16 = quantize_run(run, fmt, tmp_path / f"q-{fmt}", head=head)
        model, state = load_model(out)
        assert state["quantization"] == {"format": fmt, "head": head} and quantized_as(state) == fmt
        expected = quantize(load_model(run)[0], fmt, head=head)
        idx = torch.randint(0, model.cfg.vocab_size, (2, 12))
        assert torch.equal(logits(model, idx), logits(expected, idx))
        assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
        assert stored < bf16


def test_a_quantized_run_is_inference_only(tmp_path):
    out, _, _ = quantize_run(make_run(tmp_path / "run"), "int8", tmp_path / "q")
    with pytest.raises(ValueError, match=r"is quantized \(int8\), which is inference-only; start training from"):
        load_model(out, trainable=True)


def test_quantizing_a_quantized_run_is_refused(tmp_path):
    out, _, _ = quantize_run(make_run(tmp_path / "run"), "int8", tmp_path / "q")
    with pytest.raises(ValueError, match=r"is already quantized \(int8\); quantize the full-precision run"):
        quantize_run(out, "fp4", tmp_path / "q2")
    with pytest.raises(ValueError, match=r"is already quantized \(int8\); drop --quantize"):
        load_model(out, quantize="fp4")
    assert not (tmp_path / "q2").exists()


@pytest.mark.parametrize("entry", [{"format": "int4", "head": False}, {"format": "int8"}, "int8"])
def test_a_corrupt_quantization_entry_is_refused(tmp_path, entry):
    out, _, _ = quantize_run(make_run(tmp_path / "run"), "int8", tmp_path / "q")
    state_file = next((out / "checkpoints").glob("step_*")) / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "quantization": entry}))
    with pytest.raises(ValueError, match=r"corrupt checkpoint .*state.json's quantization is .*python -m model.quantize"):
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
