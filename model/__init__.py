"""The tritongpt model: configuration, the GPT, generation (model.generate), the tokenizer and chat
template; file formats in model/io, serving in model/serve.

GPT and ModelConfig are imported on first use, so the modules that need no torch (model.io.files,
model.chat_format) stay light for tools such as bench.report.

Importing this package before torch (every `python -m model.X` and `python -m train.X` does) caps
how long torch's OpenMP threads spin while they wait, GOMP_SPINCOUNT=10000 instead of libgomp's
300,000, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set. On a CPU shared with another busy
process, threads that spin take the cores from the threads they wait for: a tiny-preset train
step at 2 threads beside one busy process ran 3,600-3,700 tokens/s with the cap against 750
without, and 9,500 against 9,800-10,000 on the idle machine (OMP_WAIT_POLICY=PASSIVE, no spinning
at all: 4,800 busy, but 7,700-8,100 idle); 2-vCPU Xeon VM, 2026-12-07. libgomp reads both once,
when torch loads it.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

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
