"""The tritongpt model: configuration, the GPT, generation (model.generate), the tokenizer and chat
template, and reading trained runs (model.io.checkpoint).

GPT and ModelConfig are imported on first use, so the modules that need no torch (model.io.files,
model.chat_format) stay light for tools such as bench.report.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

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
