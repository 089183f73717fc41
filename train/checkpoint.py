"""Writing checkpoints, and the optimizer and RNG states that make a resume exact.

The layout is described in model/checkpoint.py, which reads it. A checkpoint is written into a
temporary directory that is renamed into place, and `latest` is replaced atomically afterwards, so a
process killed at any moment leaves the previous checkpoint loadable and never a half-written one
that looks complete.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from model.files import atomic_write_text, current_umask

KEEP_LAST = 2


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict | None,
         state: dict) -> Path:
    """Write checkpoint step_<step> atomically, point `latest` at it, prune old ones; returns its path."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    atomic_write_text(tmp / "state.json", json.dumps({"step": step, **state}, indent=2))
    if optimizer_state is not None:
        torch.save({"optimizer": optimizer_state, "rng": rng_state()}, tmp / "optimizer.pt")
    # mkdtemp makes the directory 0700 and safetensors its file 0600; give the modes of a plain mkdir/open.
    mask = current_umask()
    os.chmod(tmp, 0o777 & ~mask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~mask)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-KEEP_LAST]:
        shutil.rmtree(old)
    return final


def load_optimizer(ckpt: Path) -> dict:
    try:
        return torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"corrupt checkpoint {ckpt}: optimizer.pt unreadable ({e})") from e
