"""Reading a run: its checkpoints, the model they hold and the tokenizer it trained with.

Layout of a run directory's checkpoints (written by train/checkpoint.py):
    checkpoints/step_000100/model.safetensors   weights (fp32 masters, tied embedding once)
    checkpoints/step_000100/state.json          step, tokens, model config, task-specific state
    checkpoints/step_000100/optimizer.pt        optimizer state dict and RNG states (exact resume)
    checkpoints/latest                          the name of the newest complete checkpoint
    tokenizer.json                              the tokenizer (in the run directory itself)

Everything that uses a trained model (training's --init and --resume, chat, export) loads it here,
and this module is the only code that reads or writes state.json; what other code needs of a
loaded state's entries it asks here (quantized_as, made_from). write() is the one writer
(training's checkpoints; write_derived for the runs that model.hf import and model.quantize
make): a checkpoint is written into a temporary directory that is renamed into place, and
`latest` is replaced atomically afterwards, so a process killed at any moment leaves the
previous checkpoint loadable and never a half-written one that looks complete.

A quantized run (model/quantized.py) records {"quantization": {"format": "int8" or "fp4", "head":
whether the LM head is quantized too}} in state.json, and its model.safetensors holds
`<layer>.qweight` and `<layer>.scales` in place of `<layer>.weight`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tritongpt.kernels.quantization import FORMATS
from model.config import ModelConfig
from model.io.files import atomic_write_text, give_plain_modes
from model.gpt import GPT
from model.quantized import prepare, quantize as quantize_model, quantized_format
from model.tokenizer import Tokenizer


KEEP_LAST = 2


def write(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], state: dict,
          extra: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint step_<step> of run_dir atomically (extra(tmp_dir) may add files to it),
    point `latest` at it and keep the KEEP_LAST newest; returns its path."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    atomic_write_text(tmp / "state.json", json.dumps({"step": step, **state}, indent=2))
    if extra is not None:
        extra(tmp)
    give_plain_modes(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-KEEP_LAST]:
        shutil.rmtree(old)
    return final


def resolve(path: str | Path) -> Path:
    """A run directory (-> its latest checkpoint) or a checkpoint directory -> the checkpoint directory."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.exists():
        ckpt = path / "checkpoints" / latest.read_text().strip()
        if (ckpt / "model.safetensors").exists():
            return ckpt
        raise ValueError(f"{latest} points at {ckpt.name}, which is missing or incomplete; "
                         f"edit {latest} to name a complete checkpoint under {latest.parent}")
    raise ValueError(f"no checkpoint at {path}: expected a run directory with checkpoints/latest "
                     f"or a checkpoint directory with model.safetensors")


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint directories that hold weights, newest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step_*") if (p / "model.safetensors").is_file()), reverse=True)


def load_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt checkpoint {ckpt}: state.json unreadable ({e}); resume from an older "
                         f"checkpoint directory instead") from e


def read_weights(ckpt: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """model.safetensors of ckpt, checked against the names and shapes of `expected` (a state dict)."""
    try:
        weights = load_file(str(Path(ckpt) / "model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"corrupt checkpoint {ckpt}: model.safetensors unreadable ({e})") from e
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        raise ValueError(f"checkpoint {ckpt} does not match the model ({'; '.join(problems[:5])}); "
                         f"build the model from the checkpoint's own config (state.json)")
    return weights


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    model.load_state_dict(read_weights(ckpt, model.state_dict()))


def load_model(path: str | Path, device: str | torch.device = "cpu", trainable: bool = False,
               quantize: str | None = None) -> tuple[GPT, dict]:
    """A GPT built from a checkpoint's config with its weights, and the checkpoint's state.

    A quantized run (written by python -m model.quantize) loads with its quantized projections, for
    inference; trainable=True (training's --init) refuses it. quantize="int8" or "fp4" quantizes a
    full-precision run's projections on loading (a --quantize flag)."""
    ckpt = resolve(path)
    state = load_state(ckpt)
    quantized = state.get("quantization")
    if quantized is not None and not (isinstance(quantized, dict) and quantized.get("format") in FORMATS
                                      and isinstance(quantized.get("head"), bool)):
        raise ValueError(f"corrupt checkpoint {ckpt}: state.json's quantization is {quantized!r}, expected "
                         f"{{\"format\": \"int8\" or \"fp4\", \"head\": true or false}}; quantize the "
                         f"full-precision run again with python -m model.quantize")
    if quantized and trainable:
        raise ValueError(f"{ckpt} is quantized ({quantized['format']}), which is inference-only; start training "
                         f"from the full-precision run it was quantized from ({made_from(state)})")
    if quantized and quantize:
        raise ValueError(f"{ckpt} is already quantized ({quantized['format']}); drop --quantize, or quantize the "
                         f"full-precision run it was made from ({made_from(state)})")
    model = GPT(ModelConfig.from_dict(state["model_config"]))
    if quantized:
        prepare(model, quantized["format"], quantized["head"])
    load_weights(ckpt, model)
    if quantize:
        quantize_model(model, quantize)
    return model.to(device), state


def quantized_as(state: dict) -> str | None:
    """The format ("int8" or "fp4") of a quantized checkpoint's weights, None for full precision;
    state as load_model returns it (which has checked the entry)."""
    return (state.get("quantization") or {}).get("format")


def made_from(state: dict) -> str:
    """What a run made by a command (import, quantization) was made from, for messages."""
    return state.get("source", "its source")


def write_derived(run_dir: Path, model: GPT, tok: Tokenizer, job: str, source: Path,
                  source_state: dict | None = None) -> Path:
    """Write a run made from another model rather than trained (job "import" or "quantize"): its one
    checkpoint, with the model's config and quantization (read off its layers), and its tokenizer.json.
    Step and tokens carry over from source_state, the state of the checkpoint it was made from."""
    progress = source_state or {}
    quantization = quantized_format(model)
    ckpt = write(run_dir, progress.get("step", 0), model.state_dict(),
                 {"tokens": progress.get("tokens", 0), "job": job, "source": str(Path(source).resolve()),
                  "model_config": model.cfg.to_dict(), "tokenizer": tok.fingerprint,
                  **({"quantization": quantization} if quantization else {})})
    tok.save(Path(run_dir) / "tokenizer.json")
    return ckpt


def run_dir_of(path: str | Path) -> Path:
    """The run directory a run-or-checkpoint path belongs to."""
    ckpt = resolve(path)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def check_tokenizer(state: dict, tok: Tokenizer | None, ckpt: Path) -> None:
    """Refuse a tokenizer other than the one the checkpoint was trained with (by fingerprint)."""
    trained_with = state.get("tokenizer")
    if trained_with and tok is not None and tok.fingerprint != trained_with:
        raise ValueError(f"tokenizer mismatch: {ckpt} was trained with tokenizer {trained_with}, but the "
                         f"tokenizer given is {tok.fingerprint}; use the tokenizer.json of the run that wrote "
                         f"the checkpoint (the same vocabulary size is not enough)")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a run trained with (saved as tokenizer.json in its run directory), checked
    against the fingerprint its checkpoint recorded."""
    ckpt = resolve(path)
    tok_path = run_dir_of(path) / "tokenizer.json"
    if not tok_path.exists():
        raise ValueError(f"no tokenizer.json in {tok_path.parent}; it is written by every training job "
                         f"into its run directory; copy the one of the data the model was trained on there")
    tok = Tokenizer.load(tok_path)
    check_tokenizer(load_state(ckpt), tok, ckpt)
    return tok
