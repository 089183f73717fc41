"""`python -m train.pretrain` through its command line: a whole run and its directory, exact resume,
kernel parity (torch vs Triton), and 2 gloo ranks (DDP and FSDP2) against 1 rank."""
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tritongpt import kernels
from corpus_fixtures import write_corpus
from model import GPT, ModelConfig
from model.command import run_command
from train.data.prepare import prepare
from train.eval import evaluate
from train.pretrain import CPU_DEFAULTS, STAGE, PretrainConfig, PretrainJob, main
from train.runtime import setup
from train.runlock import RunLock

ROOT = Path(__file__).resolve().parents[2]
SMALL_MODEL = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--n-kv-head", "2", "--block-size", "32"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"), n_files=60)
    out = tmp_path_factory.mktemp("data") / "ds"
    return prepare(str(corpus), out=out, vocab_size=320, val_fraction=0.1, verbose=False)


def flags(dataset, out, steps=12, batch_size=4, *extra):
    return ["--data", str(dataset), *SMALL_MODEL, "--batch-size", str(batch_size), "--max-steps", str(steps),
            "--warmup-steps", "2", "--lr", "3e-3", "--eval-interval", "6", "--eval-tokens", "1024",
            "--ckpt-interval", "5", "--log-interval", "1", "--device", "cpu", "--dtype", "fp32",
            "--out", str(out), *extra]


def losses(run_dir):
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


def test_run_writes_its_directory_and_learns(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    result = main(flags(dataset, run_dir, 30))
    printed = capsys.readouterr().out
    source = json.loads((dataset / "manifest.json").read_text())["args"]["source"]
    assert f"data: {source}  train" in printed and "parameters" in printed and "kernels: rms_norm=" in printed and "sample:" in printed
    assert result["step"] == 30 and result["perplexity"] > 1 and isinstance(result["sample"], str)
    assert result["throughput"]["tokens"] == 30 * 4 * 32
    assert f"throughput: {result['throughput']['tokens_per_s']:,.0f} tokens/s on average over this invocation" in printed

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in trained] == list(range(1, 31))
    assert {"tokens", "train_loss", "lr", "grad_norm", "tokens_per_s"} <= set(trained[-1])
    evals = [r for r in records if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, "the validation loss should fall clearly"
    assert {"val_loss", "perplexity"} <= set(evals[-1])

    config = json.loads((run_dir / "config.json").read_text())
    assert config["job"] == "pretrain" and config["model_config"]["n_layer"] == 2
    assert (run_dir / "tokenizer.json").is_file() and (run_dir / "samples.txt").read_text().strip()
    assert (run_dir / "loss.png").is_file()
    assert list((run_dir / "checkpoints").rglob("*.safetensors"))


def test_init_continues_pretraining_from_a_run(dataset, tmp_path, capsys):
    first = main(flags(dataset, tmp_path / "first", 12))
    again = flags(dataset, tmp_path / "second", 4)
    del again[2:2 + len(SMALL_MODEL)]                    # the model comes from --init
    result = main([*again, "--init", str(tmp_path / "first")])
    records = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if "val_loss" in r)
    assert start["step"] == 0 and abs(start["val_loss"] - first["val_loss"]) < 1e-4     # the first run's model
    assert result["step"] == 4
    assert (tmp_path / "second" / "tokenizer.json").read_text() == (tmp_path / "first" / "tokenizer.json").read_text()
    with pytest.raises(SystemExit, match="--init keeps the model"):
        main([*flags(dataset, tmp_path / "third", 4), "--init", str(tmp_path / "first")])


def test_resume_continues_exactly(dataset, tmp_path, capsys):
    straight = tmp_path / "straight"
    main(flags(dataset, straight, 20))
    split = tmp_path / "split"
    capsys.readouterr()
    main(flags(dataset, split, 20, 4, "--stop-after", "10"))
    assert len(losses(split)) == 10
    assert (f"stopped early at step 10 of 20 (--stop-after 10); the learning-rate schedule is not finished. "
            f"Continue with: python -m train.pretrain --resume {split}") in capsys.readouterr().out
    main(["--resume", str(split)])
    assert losses(split) == losses(straight)      # bit for bit: model, optimizer, schedule, data, RNG


def test_document_mask_gives_each_document_the_loss_it_has_alone():
    """A batch of windows holding several documents each (every one opened by <|endoftext|>, as the
    prepared data has them): the masked loss is that of each piece run apart, weighted per token
    alike, and not the loss of attending across the window."""
    V, T, B, eot = 50, 24, 4, 0
    rng = np.random.default_rng(0)
    stream = np.concatenate([np.r_[eot, rng.integers(1, V, rng.integers(2, 10))] for _ in range(300)])
    data = SimpleNamespace(train=stream, val=stream, tokenizer=SimpleNamespace(eot_id=eot))
    job = PretrainJob(data, PretrainConfig(batch_size=B, document_mask=True), T, setup("cpu", "fp32"))
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=V, n_layer=2, n_embd=64, block_size=T))
    batch = job.batch(3, 0)
    masked = job.loss(model, batch)[0]
    total = torch.zeros(())
    for x, y in zip(batch["x"], batch["y"]):
        starts = [0] + [t for t in range(1, T) if x[t] == eot]
        assert len(starts) >= 3                                          # several documents in every row
        for start, end in zip(starts, starts[1:] + [T]):
            total += model(x[None, start:end], targets=y[None, start:end], reduction="sum")
    assert masked.item() == pytest.approx(total.item() / (B * T), rel=1e-5)
    assert abs(model(batch["x"], targets=batch["y"]).item() - masked.item()) > 1e-3
    assert job.validate(model)["val_loss"] != pytest.approx(
        PretrainJob(data, PretrainConfig(batch_size=B), T, setup("cpu", "fp32")).validate(model)["val_loss"], rel=1e-4)


def test_document_mask_is_recorded_and_kept_by_resume_and_evaluate(dataset, tmp_path):
    run_dir = tmp_path / "masked"
    main(flags(dataset, run_dir, 4, 4, "--document-mask", "--stop-after", "2"))
    assert json.loads((run_dir / "config.json").read_text())["args"]["document_mask"] is True
    assert STAGE.parse(["--resume", str(run_dir)]).document_mask
    trained = main(["--resume", str(run_dir)])
    # python -m train.evaluate masks as the run trained: on the same val windows, the same loss.
    result = evaluate.main([str(run_dir), "--device", "cpu", "--max-tokens", "1024"])
    assert result["args"]["document_mask"] is True
    assert result["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-5)
    unmasked = evaluate.main([str(run_dir), "--device", "cpu", "--max-tokens", "1024", "--no-document-mask"])
    assert abs(unmasked["val_loss"] - trained["val_loss"]) > 1e-5      # few windows of this corpus cross documents


def test_clear_errors_for_runs(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(flags(dataset, run_dir, 2))
    with pytest.raises(SystemExit, match="already holds a run"):
        main(flags(dataset, run_dir, 2))
    with pytest.raises(SystemExit, match="no config.json"):
        main(["--resume", str(tmp_path / "nowhere")])
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "job": "sft"}))
    with pytest.raises(SystemExit, match="python -m train.sft --resume"):
        main(["--resume", str(run_dir)])
    with pytest.raises(SystemExit):
        main(flags(dataset, tmp_path / "bad", 2, 4, "--kernels", "rms_norm=cuda"))
    assert "valid backends are auto, triton, torch" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile on the CPU needs a C++ compiler (g++, or $CXX)")
def test_compiled_run_trains_on_after_sampling(dataset, tmp_path):
    """torch.compile'd training continues after an evaluation whose sample decoded with the bare
    module (which stores the weights in the decoding order), with the uncompiled run's losses."""
    main(flags(dataset, tmp_path / "eager", 8, 2, "--eval-interval", "4"))
    main(flags(dataset, tmp_path / "compiled", 8, 2, "--eval-interval", "4", "--compile"))
    assert (tmp_path / "compiled" / "samples.txt").read_text().count("step 4") == 1
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4, abs=1e-5)


def test_kernel_parity_torch_vs_triton(dataset, tmp_path):
    """With Muon (its updates amplify small gradient differences more than AdamW's)."""
    before = kernels.backends.chosen()
    main(flags(dataset, tmp_path / "torch", 4, 2, "--kernels", "torch", "--eval-interval", "0", "--optimizer", "muon"))
    assert kernels.backends.chosen() == before            # a run's --kernels ends with the run
    main(flags(dataset, tmp_path / "triton", 4, 2, "--kernels", "triton", "--eval-interval", "0", "--optimizer", "muon"))
    config = json.loads((tmp_path / "triton" / "config.json").read_text())
    assert set(config["kernels"].values()) == {"triton"}
    assert losses(tmp_path / "triton") == pytest.approx(losses(tmp_path / "torch"), rel=1e-4, abs=1e-5)


def torchrun(argv, world_size=2):
    paths = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
           "-m", "train.pretrain", *argv]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sharding, optimizer", [("ddp", "adamw"), ("fsdp", "adamw"), ("ddp", "muon"), ("fsdp", "muon")])
def test_two_ranks_match_one_rank(dataset, tmp_path, sharding, optimizer):
    one = tmp_path / "one"
    main(flags(dataset, one, 8, 4, "--eval-interval", "0", "--optimizer", optimizer))
    two = tmp_path / "two"
    printed = torchrun(flags(dataset, two, 8, 2, "--eval-interval", "0", "--stop-after", "6", "--optimizer", optimizer,
                             *(["--fsdp"] if sharding == "fsdp" else [])))
    assert printed.count("world_size=2") == 1, "only rank 0 prints"
    assert losses(two) == pytest.approx(losses(one)[:6], abs=1e-5)
    # The 2-rank checkpoint continues in a single process with the same global batch.
    main(["--resume", str(two), "--batch-size", "4", "--no-fsdp"])
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)


def test_a_run_directory_in_use_or_left_half_done_is_refused(dataset, tmp_path):
    busy = tmp_path / "busy"
    lock = RunLock(busy)
    lock.acquire()
    with pytest.raises(SystemExit, match="is in use by a running job"):
        main(flags(dataset, busy, 2))
    lock.release()
    assert not busy.exists()
    leftover = tmp_path / "leftover"
    leftover.mkdir()
    (leftover / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(SystemExit, match="holds files of an earlier run that saved no checkpoint"):
        main(flags(dataset, leftover, 2))
    assert (leftover / "metrics.jsonl").read_text() == '{"step": 0}\n'
    (leftover / "config.json").write_text(json.dumps({"job": "pretrain", "args": {}}))
    with pytest.raises(SystemExit, match="has no checkpoint yet .*start over with a new --out"):
        main(["--resume", str(leftover)])


def interrupt_at_step(monkeypatch, step):
    """Make the job's loss raise KeyboardInterrupt (a Ctrl-C) in optimizer step `step` (1-based)."""
    calls, loss = [0], PretrainJob.loss

    def interrupted(self, model, batch):
        calls[0] += 1
        if calls[0] == step:
            raise KeyboardInterrupt
        return loss(self, model, batch)
    monkeypatch.setattr(PretrainJob, "loss", interrupted)


def test_a_run_that_fails_before_its_first_checkpoint_takes_back_what_it_wrote(dataset, tmp_path, monkeypatch):
    """Its retry then runs; a directory the user made keeps what was in it; a run that fails after a
    checkpoint keeps everything, and --resume finishes it."""
    run_dir, mine = tmp_path / "runs" / "run", tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for out in (run_dir, mine):
        interrupt_at_step(monkeypatch, 3)                     # the first checkpoint comes at step 5
        with pytest.raises(KeyboardInterrupt):
            main(flags(dataset, out, 12))
        monkeypatch.undo()
    assert not (tmp_path / "runs").exists()
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    assert main(flags(dataset, run_dir, 12))["step"] == 12    # the same command again

    later = tmp_path / "later"
    interrupt_at_step(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        main(flags(dataset, later, 12))
    monkeypatch.undo()
    assert {"config.json", "metrics.jsonl", "tokenizer.json", "checkpoints"} <= set(os.listdir(later))
    assert main(["--resume", str(later)])["step"] == 12


def test_a_corpus_too_small_for_the_block_size_is_one_line_before_the_bar(dataset, tmp_path, capsys):
    val_tokens = json.loads((dataset / "manifest.json").read_text())["val"]["tokens"]
    argv = flags(dataset, tmp_path / "run", 2, 4, "--block-size", str(val_tokens))      # train fits, val does not
    with pytest.raises(SystemExit) as e:
        run_command(lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.endswith(
        f"error: the val split of {dataset} has {val_tokens:,} tokens, fewer than one window of block_size + 1 = "
        f"{val_tokens + 1}; use a larger corpus or a smaller --block-size\n")
    assert "pretrain:" not in err and not (tmp_path / "run").exists()


def test_resume_falls_back_to_the_older_checkpoint_when_the_latest_is_damaged(dataset, tmp_path, capsys):
    straight = tmp_path / "straight"
    main(flags(dataset, straight, 12))
    split = tmp_path / "split"
    main(flags(dataset, split, 12, 4, "--stop-after", "6"))       # checkpoints at steps 5 and 6
    (split / "checkpoints" / "step_000006" / "model.safetensors").write_bytes(b"torn")
    capsys.readouterr()
    main(["--resume", str(split), "--stop-after", "0"])
    assert "step_000006 skipped: corrupt checkpoint" in capsys.readouterr().out
    assert losses(split) == losses(straight)      # steps 6.. redone from step 5, identically


def tree(root):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def bad_data(root: Path, kind: str) -> Path:
    rng = random.Random(0)
    if kind == "missing":
        return root / "nowhere"
    (root / kind).mkdir()
    if kind == "no text files":
        (root / kind / "a.bin").write_bytes(b"\x00\x01")
        (root / kind / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    elif kind == "binary":
        (root / kind / "random.txt").write_bytes(bytes(rng.randrange(256) for _ in range(2000)))
        (root / kind / "utf16.md").write_bytes(("plain words in UTF-16 " * 20).encode("utf-16"))
    elif kind == "too short":
        (root / kind / "a.py").write_text("x = 1\n")
    return root / kind


@pytest.mark.parametrize("kind, message", [
    ("missing", "corpus source '.*nowhere': no such file or directory"),
    ("empty", "corpus directory .*empty holds no text files"),
    ("no text files", "corpus directory .*no text files holds no text files"),
    ("binary", r"the corpus .* all 2 documents were removed \(binary 2\); they are binary or not UTF-8"),
    ("too short", r"the corpus .* all 1 documents were removed \(too_short 1\); .*loosen the thresholds"),
])
def test_bad_data_ends_in_one_line_and_leaves_nothing(kind, message, tmp_path, capsys):
    data = bad_data(tmp_path, kind)
    before = tree(tmp_path)
    argv = flags(data, tmp_path / "run", 1, 4, "--data-dir", str(tmp_path / "data"))
    with pytest.raises(SystemExit) as e:
        run_command(lambda: main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and re.match("error: " + message, err[-1]), err
    assert tree(tmp_path) == before and not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_bad_data_exit_status_through_the_command(tmp_path):
    data = bad_data(tmp_path, "binary")
    done = subprocess.run([sys.executable, "-m", "train.pretrain", "--data", str(data), "--device", "cpu",
                           "--out", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: the corpus ")
    assert sorted(os.listdir(tmp_path)) == ["binary"]                 # no data/, no run directory


def test_data_dir_keeps_one_dataset_per_source_found_by_any_spelling(tmp_path, monkeypatch, capsys):
    class Built(Exception):
        pass

    def stop(cfg, job, model, rt, record):                  # the data and the model are built: enough here
        raise Built(job.data.path)

    monkeypatch.setattr("train.launch.fit", stop)
    corpus = write_corpus(tmp_path / "corpus", n_files=12)
    monkeypatch.chdir(tmp_path)
    common = ["--data-dir", "prepared", "--vocab-size", "300"]
    with pytest.raises(Built):
        main(flags(corpus, tmp_path / "one", 1, 4, *common))
    (dataset,) = (tmp_path / "prepared").iterdir()
    assert re.fullmatch(r"corpus-v300-[0-9a-f]{8}", dataset.name)
    kept = tree(dataset)
    capsys.readouterr()
    with pytest.raises(Built, match=f"prepared/{dataset.name}"):
        main(flags("./corpus/", tmp_path / "two", 1, 4, *common))
    assert f"data: reusing {tmp_path / 'prepared' / dataset.name}" in capsys.readouterr().out   # --data-dir made absolute
    assert tree(dataset) == kept and os.listdir(tmp_path / "prepared") == [dataset.name]


def test_vocab_size_below_the_byte_tokens_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--vocab-size", "100", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "--vocab-size: must be at least 260, got 100" in capsys.readouterr().err


class Ticking:
    """A fake clock for the loop: every reading is 0.1 s after the last, so a run's timings (and the
    length a --max-minutes budget fits) are the same on every machine and every run."""
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.1
        return self.now


def test_a_time_budget_fits_the_length_and_resume_keeps_it(dataset, tmp_path, monkeypatch, capsys):
    """--no-fixed-length keeps --max-steps 40 as the ceiling of a --max-minutes budget: the length is
    fitted at step 5 (--warmup-steps 2: a few timed steps), recorded in config.json, and a run
    stopped at step 10 and resumed with only --resume trains the same steps to the same losses."""
    budget = ["--max-minutes", "0.2", "--no-fixed-length"]
    monkeypatch.setattr("train.loop.clock", Ticking())
    straight = main(flags(dataset, tmp_path / "straight", 40, 4, *budget))
    fitted = json.loads((tmp_path / "straight" / "config.json").read_text())["args"]["fitted_steps"]
    assert 15 < fitted < 40 and straight["step"] == fitted and straight["stopped_early"] == ""
    assert re.search(rf"--max-minutes 0.2: {fitted} steps fit \([\d.]+ s/step measured over steps 3-5, \d+ evaluations",
                     capsys.readouterr().out)
    monkeypatch.setattr("train.loop.clock", Ticking())
    main(flags(dataset, tmp_path / "split", 40, 4, *budget, "--stop-after", "10"))
    assert json.loads((tmp_path / "split" / "config.json").read_text())["args"]["fitted_steps"] == fitted
    monkeypatch.setattr("train.loop.clock", Ticking())
    capsys.readouterr()
    resumed = main(["--resume", str(tmp_path / "split"), "--stop-after", "0"])
    assert "steps fit" not in capsys.readouterr().out                  # not timed again
    assert resumed["step"] == fitted and resumed["stopped_early"] == ""
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def stop_before_training(monkeypatch):
    """Make main() return the config and record the loop would get, without training."""
    def stop(cfg, job, model, rt, record):
        return {"cfg": cfg, "record": record, "stopped_early": "", "throughput": {"tokens_per_s": 0, "tokens": 0,
                                                                                   "seconds": 0}}
    monkeypatch.setattr("train.launch.fit", stop)


def without_length(argv):
    at = argv.index("--max-steps")
    return argv[:at] + argv[at + 2:]


def test_a_default_length_is_shortened_to_four_epochs(dataset, tmp_path, monkeypatch, capsys):
    """The CPU default of at most 2,000 steps of 4 x 32 tokens goes over the 26,795 training tokens
    9.6 times: the run takes 837 steps (4 epochs) and says so; config.json records that."""
    train_tokens = json.loads((dataset / "manifest.json").read_text())["train"]["tokens"]
    default = CPU_DEFAULTS.max_steps
    most = 4 * train_tokens // 128
    stop_before_training(monkeypatch)
    result = main(without_length(flags(dataset, tmp_path / "run", 0)))
    printed = capsys.readouterr().out
    assert (result["cfg"].max_steps, result["record"]["args"]["max_steps"]) == (most, most)
    assert (f"run length: the default {default:,} steps would go over the {train_tokens:,} training tokens "
            f"{default * 128 / train_tokens:.1f} times; shortened to {most:,} steps, --max-epochs 4") in printed
    assert f"epochs: at most {most * 128 / train_tokens:.1f} passes over the training tokens" in printed


def test_an_explicit_length_beyond_four_epochs_is_refused_unless_max_epochs_allows_it(dataset, tmp_path,
                                                                                      monkeypatch, capsys):
    train_tokens = json.loads((dataset / "manifest.json").read_text())["train"]["tokens"]
    steps = 5 * train_tokens // 128                                     # 5 epochs
    stop_before_training(monkeypatch)
    with pytest.raises(SystemExit) as refused:
        run_command(lambda: main(flags(dataset, tmp_path / "run", steps)))
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 1 and len(err) == 1 and err[0] == (
        f"error: --max-steps {steps:,} ({steps * 128:,} tokens) goes over the {train_tokens:,} training tokens "
        f"{steps * 128 / train_tokens:.1f} times, more than --max-epochs 4: pass --max-epochs 5 to train that long, "
        f"or a larger corpus (--data), or at most --max-steps {4 * train_tokens // 128:,}")
    assert not (tmp_path / "run").exists()
    result = main(flags(dataset, tmp_path / "run", steps, 4, "--max-epochs", "5"))
    assert result["cfg"].max_steps == steps
    assert f"epochs: {steps * 128 / train_tokens:.1f} passes over the training tokens ({steps:,} steps of 128 tokens)" \
        in capsys.readouterr().out
    # Within 4 epochs: no line about epochs at all; a single pass says nothing either.
    main(flags(dataset, tmp_path / "one", train_tokens // 128))
    assert "epochs:" not in capsys.readouterr().out
