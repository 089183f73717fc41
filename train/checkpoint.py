"""Checkpoints of a training run: the weights and state (model.checkpoint.write, atomic) plus the
optimizer and RNG states that make a resume exact."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from model.io.checkpoint import write


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
    """Write checkpoint step_<step> (with the optimizer and RNG states when optimizer_state is given)
    atomically, point `latest` at it, prune old ones; returns its path (model.checkpoint.write)."""
    def optimizer_file(tmp: Path) -> None:
        torch.save({"optimizer": optimizer_state, "rng": rng_state()}, tmp / "optimizer.pt")

    return write(run_dir, step, model_state, state, None if optimizer_state is None else optimizer_file)


def load_optimizer(ckpt: Path) -> dict:
    try:
        return torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"corrupt checkpoint {ckpt}: optimizer.pt unreadable ({e})") from e
