"""Shared by the post-training tests: a small tokenizer and a tiny "pretrained" run directory made
with checkpoint.save (no pretraining is run)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from model import GPT, ModelConfig
from train import checkpoint
from train.data.tasks import make_tasks
from model.tokenizer import Tokenizer


@lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    """A 300-token BPE (the four chat specials included) trained on a few task prompts and answers."""
    texts = [f"{t.prompt} {t.answer}" for t in make_tasks("train", 200, seed=123)]
    return Tokenizer.train(texts, vocab_size=300)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.preset("tiny", **{"vocab_size": tokenizer().n_vocab, "n_layer": 1, "n_embd": 64,
                                             "block_size": 128, **overrides}))


def make_run(run_dir: Path, seed: int = 0, **overrides) -> Path:
    """A run directory holding one checkpoint of a freshly initialised tiny model and tokenizer.json."""
    model = tiny_model(seed, **overrides)
    checkpoint.save(run_dir, 0, model.state_dict(), None,
                    {"tokens": 0, "job": "pretrain", "model_config": model.cfg.to_dict()})
    tokenizer().save(run_dir / "tokenizer.json")
    return run_dir
