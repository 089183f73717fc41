"""A run directory of a tiny model with a tokenizer trained on real code, for the transformers tests
(tests/model/io/test_hf_export.py and test_hf_import.py)."""
from __future__ import annotations

import glob
import os
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch

from model import GPT, ModelConfig
from model.tokenizer import Tokenizer
from train import checkpoint
from train.config import TrainConfig
from train.optim import make_optimizer

CORPUS = [
    "def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)  # 3.14159, 1e-6, 0x1F\n",
    "The quick brown fox jumps over the lazy dog. It's 12:45 -- isn't it? \"Quoted\" text...",
    "Ünïcödé: naïve café, 日本語のテキスト, русский текст, emoji 😀👍🏽 and ∑ ∫ ≤ math.",
    "tabs\tand\t\tspaces    runs\n\n\n  \r\n trailing   ",
    "12345678901234567890 digits 0 1 22 333 4444",
    "",
    " ",
]


@lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    """A 1024-token BPE trained on real code and prose: the json package's sources."""
    sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")))
    return Tokenizer.train([Path(p).read_text(encoding="utf-8") for p in sources] + CORPUS, 1024)


def make_run(run_dir: Path, trained: bool) -> GPT:
    """A run directory with one checkpoint of a tiny model (init_std 0.1: logits far from uniform),
    after a few AdamW steps on the corpus when trained."""
    tok = tokenizer()
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.n_vocab, n_layer=2, block_size=128, init_std=0.1))
    if trained:
        ids = torch.tensor([t for text in CORPUS for t in tok.encode(text)][:129])
        optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
        for _ in range(3):
            model(ids[None, :-1], targets=ids[None, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    checkpoint.save(run_dir, 3 if trained else 0, model.state_dict(), None,
                    {"tokens": 0, "job": "pretrain", "model_config": model.cfg.to_dict(),
                     "tokenizer": tok.fingerprint})
    tok.save(run_dir / "tokenizer.json")
    return model.eval()
