"""SFT: the masked loss, and short end-to-end runs of `python -m train.sft` through main(argv)."""
import json

import pytest
import torch
import torch.nn.functional as F

from posttrain_fixtures import make_run, tiny_model, tokenizer
from train import sft
from train.data import tasks
from model.chat_format import ChatTokens
from train.config import TrainConfig
from train.runtime import setup
from train.data.sft_data import encode

TINY = ["--device", "cpu", "--batch-size", "8", "--n-train", "64", "--eval-examples", "14", "--lr", "3e-3",
        "--warmup-steps", "2", "--log-interval", "1", "--eval-interval", "0"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_is_cross_entropy_on_reply_tokens_only():
    tok, model = tokenizer(), tiny_model()
    examples, _ = encode([t.messages() for t in tasks.make_tasks("train", 8)], tok, 128)
    job = sft.SFTJob(examples, [], tasks.make_tasks("test", 7), tok, TrainConfig(batch_size=8), setup("cpu", "fp32"))
    batch = job.batch(0, 0)
    loss, _ = job.loss(model, batch)
    logits = model(batch["x"])                                                   # (B, T, V)
    keep = batch["y"] != -100
    expected = F.cross_entropy(logits[keep], batch["y"][keep])
    assert torch.allclose(loss, expected, rtol=1e-5)
    # Only reply tokens and their <|end|> are targets: never a role tag or <|endoftext|>.
    ct = ChatTokens.of(tok)
    assert not torch.isin(batch["y"][keep], torch.tensor([ct.bos, ct.user, ct.assistant])).any()
    assert (batch["y"] == ct.end).sum() == 8


def per_example_losses(model, batch, n):
    """Each example's summed per-token loss, from the batch's rows (padded or packed): (n,)."""
    losses = model(batch["x"], targets=batch["y"], reduction="none", documents=batch.get("documents"))
    return torch.zeros(n + 1).index_add(0, batch["segment"].flatten(), losses.flatten())[:n]


def test_packed_rows_give_each_example_the_loss_it_has_padded():
    tok, model = tokenizer(), tiny_model()
    conversations = [t.messages() for t in tasks.make_tasks("train", 24)]
    conversations[3] = [*conversations[3][:2], *tasks.make_tasks("test", 1)[0].messages()]      # a 2-turn one
    examples, _ = encode(conversations, tok, 128)
    rt, cfg = setup("cpu", "fp32"), TrainConfig(batch_size=24)
    padded_job = sft.SFTJob(examples, [], [], tok, cfg, rt)
    packed_job = sft.SFTJob(examples, [], [], tok, cfg, rt, pack_to=128)
    padded, packed = padded_job.batch(0, 0), packed_job.batch(0, 0)
    assert packed["x"].numel() < 0.8 * padded["x"].numel() and packed["x"].shape[0] < 24
    assert packed_job.tokens(packed) == padded_job.tokens(padded) == sum(len(e) - 1 for e in examples)
    want, got = per_example_losses(model, padded, 24), per_example_losses(model, packed, 24)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(packed_job.loss(model, packed)[0], padded_job.loss(model, padded)[0], rtol=1e-5)
    # Without the documents, later examples of a row would see the earlier ones and lose that equality.
    crossing = per_example_losses(model, {**packed, "documents": None}, 24)
    assert not torch.allclose(crossing, want, rtol=1e-3, atol=1e-3)
    assert sft.masked_loss(model, examples, padded_job.pad_id, 10, rt.device, pack_to=128) == \
        pytest.approx(sft.masked_loss(model, examples, padded_job.pad_id, 10, rt.device), rel=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_cli_run_writes_a_run_directory_and_learns(tmp_path, capsys, packing):
    init = make_run(tmp_path / "base")
    out = tmp_path / "sft"
    result = sft.main(["--init", str(init), "--out", str(out), "--max-steps", "8", *TINY]
                      + ([] if packing else ["--no-packing"]))
    for name in ("config.json", "metrics.jsonl", "tokenizer.json", "samples.txt", "checkpoints/latest"):
        assert (out / name).exists(), name
    assert (out / "tokenizer.json").read_text() == (init / "tokenizer.json").read_text()
    logged = records(out)
    assert logged[0]["step"] == 0 and "exact_match" in logged[0] and "em_copy" in logged[0]
    assert [r["step"] for r in logged[1:]] == list(range(1, 9))
    assert result["step"] == 8 and result["val_loss"] < 0.9 * result["before"]["val_loss"]
    assert logged[0]["val_loss"] == result["before"]["val_loss"]
    table = capsys.readouterr().out
    assert "metric" in table and "before" in table and "exact_match" in table


def test_jsonl_data_and_resume(tmp_path):
    init = make_run(tmp_path / "base")
    data = tasks.write_jsonl(tmp_path / "train.jsonl", [tasks.sft_record(t) for t in tasks.make_tasks("train", 40)])
    out = tmp_path / "sft"
    sft.main(["--init", str(init), "--out", str(out), "--data", str(data), "--max-steps", "4", "--stop-after", "2", *TINY])
    assert [r["step"] for r in records(out)] == [0, 1, 2]
    result = sft.main(["--resume", str(out)])
    assert result["step"] == 4 and [r["step"] for r in records(out)] == [0, 1, 2, 3, 4]
    assert "val_loss" in result          # the last 5% of the file is held out


def test_max_minutes_stops_sft_as_it_stops_pretraining(tmp_path, capsys):
    init = make_run(tmp_path / "base")
    out = tmp_path / "sft"
    result = sft.main(["--init", str(init), "--out", str(out), "--max-steps", "8", "--max-minutes", "1e-9", *TINY])
    assert result["stopped_early"] == "step 1 of 8 (--max-minutes 1e-09 reached)"
    assert (out / "checkpoints" / "latest").read_text() == "step_000001"
    assert f"Continue with: python -m train.sft --resume {out}" in capsys.readouterr().out


def test_missing_init_is_explained(tmp_path):
    with pytest.raises(SystemExit, match="--init RUN_OR_CKPT is required"):
        sft.main(["--out", str(tmp_path / "x"), *TINY])
