"""The tritongpt model: configuration, the GPT, and generation (model.generate)."""
from model.config import ModelConfig
from model.gpt import GPT

__all__ = ["GPT", "ModelConfig"]
