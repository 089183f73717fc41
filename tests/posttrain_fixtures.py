"""Shared by the post-training tests: a small tokenizer, a tiny corpus prepared with it, and a tiny
"pretrained" run directory made with checkpoint.save (no pretraining is run) whose config.json
names that corpus, as a pretraining run's does."""
from __future__ import annotations

import json
import random
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from model import GPT, ModelConfig
from train import checkpoint
from train.data.prepare import prepare
from train.data.tasks import WORDS, make_tasks
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


@lru_cache(maxsize=1)
def corpus() -> Path:
    """A prepared dataset (made once per test session) of 80 documents of seeded random words, tokenized
    with tokenizer(): about 25k training tokens and a validation split of a few windows of 128."""
    root = Path(tempfile.mkdtemp(prefix="tritongpt-corpus-"))
    rng = random.Random(0)
    for i in range(80):
        lines = (" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(25))
        (root / "text" / f"doc{i}.txt").parent.mkdir(exist_ok=True)
        (root / "text" / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return prepare(str(root / "text"), out=root / "prepared", tokenizer=tokenizer(), val_fraction=0.1, verbose=False)


def make_run(run_dir: Path, seed: int = 0, **overrides) -> Path:
    """A run directory holding one checkpoint of a freshly initialised tiny model, tokenizer.json, and
    a config.json of a pretraining run on corpus()."""
    model = tiny_model(seed, **overrides)
    checkpoint.save(run_dir, 0, model.state_dict(), None,
                    {"tokens": 0, "job": "pretrain", "model_config": model.cfg.to_dict()})
    tokenizer().save(run_dir / "tokenizer.json")
    (run_dir / "config.json").write_text(json.dumps({"job": "pretrain", "args": {
        "data": str(corpus()), "vocab_size": tokenizer().n_vocab, "data_dir": str(run_dir.parent), "init": ""}}))
    return run_dir
