"""python -m model.hf export: a run directory becomes a transformers Llama directory that AutoModelForCausalLM
and AutoTokenizer load with no custom code, computing our logits, greedy tokens and token ids."""
from __future__ import annotations

import glob
import json
import os
import stat
import subprocess
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from tritongpt import kernels
from model import GPT, ModelConfig
from model.chat_format import render, render_prompt
from model.generate import generate
from model.io.files import current_umask
from model.tokenizer import Tokenizer
from train import checkpoint
from train.config import TrainConfig
from train.optim import make_optimizer

transformers = pytest.importorskip("transformers")
from model.io import hf  # noqa: E402
from hf_fixtures import CORPUS, make_run, tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
@pytest.fixture(autouse=True)
def _torch_kernels():
    with kernels.use("torch"):
        yield


@pytest.fixture(scope="module", params=["random", "trained"])
def exported(request, tmp_path_factory):
    run = tmp_path_factory.mktemp(f"run-{request.param}")
    model = make_run(run, trained=request.param == "trained")
    out = hf.export(run, tmp_path_factory.mktemp("exports") / "llama")
    return model, out


def test_transformers_loads_the_export_and_computes_our_logits_and_tokens(exported):
    model, out = exported
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    text = torch.tensor([tokenizer().encode(CORPUS[0] + CORPUS[2])[:100]])
    with torch.no_grad():
        for ids in (torch.randint(0, model.cfg.vocab_size, (2, 64)), text):
            ours, ref = model(ids), theirs(input_ids=ids).logits
            assert ours.std() > 0.5 and (ours - ref).abs().max().item() <= 1e-4
        prompt = text[:, :8]
        mine = generate(model, prompt, 32, temperature=0)
        yours = theirs.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=32, min_new_tokens=32)
    assert torch.equal(mine, yours)


def test_files_have_the_mode_of_a_plain_open(exported):
    _, out = exported
    plain = 0o666 & ~current_umask()
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, oct(plain))


def test_config_carries_the_token_ids(exported):
    _, out = exported
    tok = tokenizer()
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    bos, end = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|end|>"]
    assert config["bos_token_id"] == generation["bos_token_id"] == bos
    assert config["eos_token_id"] == generation["eos_token_id"] == [end, bos]
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == tok.n_vocab


def test_auto_tokenizer_encodes_and_decodes_our_ids(exported):
    _, out = exported
    tok, theirs = tokenizer(), transformers.AutoTokenizer.from_pretrained(out)
    for text in CORPUS + [Path(hf.__file__).read_text(encoding="utf-8")]:
        ids = tok.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids
        assert theirs.decode(ids) == text
    # transformers maps special-token text to the special token; ours encodes all text as text.
    text = "a <|user|> b"
    assert theirs(text, add_special_tokens=False)["input_ids"] == [
        *tok.encode("a "), tok.special_tokens["<|user|>"], *tok.encode(" b")]
    assert theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tok.encode(text)


def test_chat_template_renders_our_turns(exported):
    _, out = exported
    tok, theirs = tokenizer(), transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": " 5, of course."},
            {"role": "user", "content": "And  7 * 6 ?\n"}]
    assert theirs.apply_chat_template(chat[:2], tokenize=True, return_dict=False) == render(chat[:2], tok)[0]
    assert (theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
            == render_prompt(chat, tok))


def test_refuses_a_nonempty_out_dir_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    run = tmp_path / "run"
    make_run(run, trained=False)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        hf.export(run, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    def broken(self, *args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        hf.export(run, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken"]


def test_refuses_a_quantized_run(tmp_path):
    from model.io.quantized import quantize_run
    run = tmp_path / "run"
    make_run(run, trained=False)
    quantized, _, _ = quantize_run(run, "int8", tmp_path / "q")
    with pytest.raises(ValueError, match=r"is quantized \(int8\); transformers' Llama holds full-precision weights"):
        hf.export(quantized, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_line(tmp_path):
    run = tmp_path / "run"
    make_run(run, trained=False)

    def command(*args):
        return subprocess.run([sys.executable, "-m", "model.hf", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    done = command("export", str(run), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "exported" in done.stdout and (tmp_path / "out" / "model.safetensors").exists()
    missing = command("export", str(tmp_path / "nowhere"), str(tmp_path / "out2"))
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert not (tmp_path / "out2").exists()
    usage = command("export", str(run))
    assert usage.returncode == 2 and "out_dir" in usage.stderr
