"""What the post-training stages share: the pretraining text mixed into every batch (its share of the
positions, its loss, the corpus found through the runs' config.json, pretrain_val_loss), and
refusals in one line."""
import json
import shutil

import pytest
import torch

from posttrain_fixtures import corpus, make_run, tiny_model, tokenizer
from model.tokenizer import Tokenizer
from train import dpo, posttrain, sft
from train.data import tasks
from train.data.prepare import PreparedData
from train.data.sft_data import encode
from train.runtime import setup

TINY = ["--device", "cpu", "--batch-size", "8", "--n-train", "64", "--eval-examples", "14", "--lr", "3e-3",
        "--warmup-steps", "2", "--log-interval", "1", "--eval-interval", "0"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sft_job(mix: float, world_size: int = 1, rank: int = 0) -> sft.SFTJob:
    tok = tokenizer()
    examples, _ = encode([t.messages() for t in tasks.make_tasks("train", 64)], tok, 128)
    rt = setup("cpu", "fp32")
    rt.world_size, rt.rank = world_size, rank
    cfg = sft.SFTConfig(batch_size=8, pretrain_mix=mix)
    return sft.SFTJob(examples, [], tasks.make_tasks("test", 7), tok, cfg, rt, 0, PreparedData(corpus()), 128)


@pytest.mark.parametrize("mix", [0.1, 0.2, 0.5])
def test_pretraining_windows_are_their_share_of_the_positions(mix):
    job = sft_job(mix)
    batch = job.batch(3, 0)
    text = batch["pretrain"]["x"].numel()
    assert text / (text + batch["tokens"]) == pytest.approx(mix, abs=0.02)
    assert batch["pretrain"]["x"].shape[1] <= 128 and job.tokens(batch) == batch["tokens"] + text
    assert torch.equal(batch["pretrain"]["y"][:, :-1], batch["pretrain"]["x"][:, 1:])     # next tokens
    assert torch.equal(job.batch(3, 0)["pretrain"]["x"], batch["pretrain"]["x"])           # a pure function
    assert not torch.equal(job.batch(4, 0)["pretrain"]["x"], batch["pretrain"]["x"])


def test_each_rank_draws_its_own_windows():
    one, two = (sft_job(0.2, world_size=2, rank=r).batch(0, 0)["pretrain"]["x"] for r in (0, 1))
    assert not torch.equal(one[:, :10], two[:, :10])
    assert torch.equal(one, sft_job(0.2, world_size=2, rank=0).batch(0, 0)["pretrain"]["x"])


def test_loss_adds_the_mean_next_token_loss_of_the_text():
    job, model = sft_job(0.2), tiny_model()
    batch = job.batch(0, 0)
    loss, metrics = job.loss(model, batch)
    plain = model(batch["x"], targets=batch["y"], documents=batch.get("documents"))
    text = model(batch["pretrain"]["x"], targets=batch["pretrain"]["y"])
    assert loss.item() == pytest.approx((plain + text).item(), rel=1e-6)
    assert metrics["pretrain_loss"].item() == pytest.approx(text.item(), rel=1e-6)
    no_mix = sft_job(0.0)
    no_mix.corpus = None
    assert "pretrain" not in no_mix.batch(0, 0)


def test_the_corpus_passes_from_run_to_run_and_keeps_the_text_learnt(tmp_path):
    init = make_run(tmp_path / "init")
    mixed = sft.main(["--init", str(init), *TINY, "--max-steps", "15", "--out", str(tmp_path / "sft")])
    saved = json.loads((tmp_path / "sft" / "config.json").read_text())["args"]
    assert saved["pretrain_data"] == str(corpus().resolve())
    assert "pretrain_val_loss" in records(tmp_path / "sft")[0] and "pretrain_loss" in records(tmp_path / "sft")[-1]
    before = records(tmp_path / "sft")[0]["pretrain_val_loss"]
    assert mixed["pretrain_val_loss"] < before                         # it learns the text, too
    # DPO from the SFT run finds the corpus through the SFT run's config.json.
    (init / "config.json").unlink()
    assert posttrain.corpus_of(str(tmp_path / "sft"), tokenizer()) == corpus().resolve()
    dpo.main(["--init", str(tmp_path / "sft"), *TINY, "--rejected", "rule", "--max-steps", "2",
              "--out", str(tmp_path / "dpo")])
    assert "pretrain_val_loss" in records(tmp_path / "dpo")[-1]


def test_a_run_that_names_no_corpus_trains_without_and_says_so(tmp_path, capsys):
    init = make_run(tmp_path / "init")
    (init / "config.json").unlink()                 # as a model imported from transformers
    sft.main(["--init", str(init), *TINY, "--max-steps", "2", "--out", str(tmp_path / "sft")])
    assert "pretraining text: none mixed in" in capsys.readouterr().out
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["args"]["pretrain_mix"] == 0.0
    assert "pretrain_loss" not in records(tmp_path / "sft")[-1]


def test_a_corpus_of_another_tokenizer_is_refused(tmp_path):
    init = make_run(tmp_path / "init")
    other = tmp_path / "other"
    shutil.copytree(corpus(), other)
    texts = [f"{t.prompt} {t.answer}" for t in tasks.make_tasks("train", 50, seed=9)]
    Tokenizer.train(texts, vocab_size=290).save(init / "tokenizer.json")
    with pytest.raises((ValueError, SystemExit), match="another tokenizer"):
        sft.main(["--init", str(init), *TINY, "--max-steps", "1", "--out", str(tmp_path / "sft"),
                  "--pretrain-data", str(other)])


def test_pretrain_mix_must_be_a_fraction(capsys):
    with pytest.raises(SystemExit):
        sft.main([*TINY, "--pretrain-mix", "1"])
    assert "--pretrain-mix: must be in [0, 1), got 1.0" in capsys.readouterr().err
