"""The tritongpt model: configuration, the GPT, generation (model.generate), the tokenizer and chat
template; file formats in model/io, serving in model/serve.

GPT and ModelConfig are imported on first use, so the modules that need no torch (model.io.files,
model.chat_format) stay light for tools such as bench.report.

Importing this package before torch (every `python -m model.X` and `python -m train.X` does) sets
OMP_WAIT_POLICY=PASSIVE unless it is set: OpenMP's threads then sleep between parallel regions
instead of spinning, which on a CPU shared with another busy process is the difference between
a training step at 2,300-5,200 tokens/s and one at 530-2,700 (tiny preset, 2 threads, 2-vCPU
Xeon beside one busy process); libgomp reads it once, when torch loads it.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.gpt import GPT

__all__ = ["GPT", "ModelConfig"]


def __getattr__(name: str):
    if name == "GPT":
        from model.gpt import GPT
        return GPT
    if name == "ModelConfig":
        from model.config import ModelConfig
        return ModelConfig
    raise AttributeError(f"module 'model' has no attribute {name!r}")
