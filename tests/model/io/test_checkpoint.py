"""Reading a run (model/io/checkpoint.py): the tokenizer must be the one the checkpoint trained with,
and the run's intact checkpoints are listed newest first."""
import random

import pytest

from model.io.checkpoint import checkpoints, load_tokenizer
from model.tokenizer import Tokenizer
from posttrain_fixtures import tiny_model, tokenizer
from train import checkpoint


def save_run(run_dir, tok, steps=(1,)):
    model = tiny_model()
    for step in steps:
        checkpoint.save(run_dir, step, model.state_dict(), None,
                        {"tokens": 0, "job": "pretrain", "model_config": model.cfg.to_dict(),
                         "tokenizer": tok.fingerprint})
    tok.save(run_dir / "tokenizer.json")


def test_a_tokenizer_of_the_same_size_from_other_text_is_refused(tmp_path):
    tok = tokenizer()
    save_run(tmp_path / "run", tok)
    assert load_tokenizer(tmp_path / "run").fingerprint == tok.fingerprint
    rng = random.Random(0)
    words = " ".join("".join(rng.choice("klmnopqrstuv") for _ in range(rng.randint(2, 9))) for _ in range(3000))
    other = Tokenizer.train([words], vocab_size=tok.n_vocab)
    assert other.n_vocab == tok.n_vocab and other.fingerprint != tok.fingerprint
    other.save(tmp_path / "run" / "tokenizer.json")
    with pytest.raises(ValueError, match=f"trained with tokenizer {tok.fingerprint}.*given is {other.fingerprint}"):
        load_tokenizer(tmp_path / "run")


def test_checkpoints_newest_first_and_only_with_weights(tmp_path):
    save_run(tmp_path / "run", tokenizer(), steps=(3, 7))
    (tmp_path / "run" / "checkpoints" / "step_000009").mkdir()              # no weights: not a checkpoint
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step_000007", "step_000003"]
