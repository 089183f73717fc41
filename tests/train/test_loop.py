"""The shared training loop, driven by a synthetic job so it is tested apart from any data pipeline."""
import json
import os
import stat

import pytest
import torch

from model import GPT, ModelConfig
from model.io import checkpoint as model_checkpoint
from model.io.checkpoint import load_model, load_weights, resolve
from train import checkpoint, loop
from train.config import TrainConfig
from train.loop import SlowdownWatch, eta, fit
from train.schedule import lr_at
from train.runtime import setup

V, T = 64, 16


class CountingJob:
    """Learn to continue a fixed arithmetic pattern; batches are a pure function of the step."""
    name = "synthetic"
    tokenizer = None

    def __init__(self, batch_size=4):
        self.batch_size = batch_size

    def batch(self, step, micro):
        g = torch.Generator().manual_seed(step * 131 + micro)
        start = torch.randint(0, V, (self.batch_size, 1), generator=g)
        seq = (start + 3 * torch.arange(T + 1)) % V
        return {"x": seq[:, :-1], "y": seq[:, 1:]}

    def loss(self, model, batch):
        loss = model(batch["x"], targets=batch["y"])
        return loss, {"double_loss": 2 * loss.detach()}

    def tokens(self, batch):
        return batch["x"].numel()

    def validate(self, model):
        batch = self.batch(10**6, 0)
        return {"val_loss": model(batch["x"], targets=batch["y"]).item()}

    def sample(self, model):
        return "sample text"


def tiny_model():
    torch.manual_seed(0)
    return GPT(ModelConfig.preset("tiny", vocab_size=V, n_layer=2, n_embd=64, block_size=T))


def train(tmp_path, name, job=None, **overrides):
    run_dir = tmp_path / name
    cfg = TrainConfig(**{"out": str(run_dir), "batch_size": 4, "max_steps": 20, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3,
                         "eval_interval": 10, "ckpt_interval": 5, "log_interval": 1, **overrides})
    result = fit(cfg, job or CountingJob(), tiny_model(), setup("cpu", "fp32"), {"job": "synthetic"})
    return result, [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["step"] > 0]


def test_run_directory_and_learning(tmp_path):
    result, records = train(tmp_path, "run")
    run_dir = tmp_path / "run"
    assert [r["step"] for r in records] == list(range(1, 21))
    assert records[-1]["train_loss"] < 0.7 * records[0]["train_loss"]
    assert {"lr", "grad_norm", "tokens_per_s", "tokens", "double_loss", "val_loss"} <= set(records[-1])
    assert records[-1]["double_loss"] == pytest.approx(2 * records[-1]["train_loss"], rel=1e-5)
    assert json.loads((run_dir / "config.json").read_text()) == {"job": "synthetic"}
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000020"
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_000015", "step_000020"]
    assert "sample text" in (run_dir / "samples.txt").read_text()
    assert (run_dir / "loss.png").stat().st_size > 0
    assert result["sample"] == "sample text" and result["step"] == 20 and result["stopped_early"] == ""


def test_validation_and_logging_keep_their_own_intervals(tmp_path):
    """--eval-interval 4 with --log-interval 6 validates at steps 4, 8, 12, 16 and 20 (and logs at
    6, 12, 18 and the last): validation does not wait for a logging step, nor logging for it."""
    _, records = train(tmp_path, "intervals", eval_interval=4, log_interval=6)
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12, 16, 20]
    assert [r["step"] for r in records if "train_loss" in r] == [6, 12, 18, 20]
    assert [r["step"] for r in records] == [4, 6, 8, 12, 16, 18, 20]
    assert all(r["tokens_per_s"] > 0 for r in records if "tokens_per_s" in r)


def test_slowdown_watch_says_once_when_throughput_collapses():
    watch = SlowdownWatch(torch.device("cpu"))
    assert [watch.observe(t) for t in (1000, 1200, 900, 400)] == [None] * 4        # noise, not a collapse
    warning = watch.observe(250)
    assert warning.startswith("throughput fell from 1,200 to 250 tokens/s: another process is probably competing")
    assert "OMP_NUM_THREADS=1" in warning and "OMP_WAIT_POLICY=PASSIVE" in warning
    assert watch.observe(100) is None                                               # once per run
    gpu = SlowdownWatch(torch.device("cuda"))
    gpu.observe(100.0)
    assert "another process is probably using this GPU" in gpu.observe(10.0)


class SlowingJob(CountingJob):
    """A step takes 1 s of the loop's (fake) clock, from step 13 on 10 s: what another process taking
    the cores looks like, on any machine however busy."""
    def __init__(self, clock):
        super().__init__()
        self.clock, self.calls = clock, 0

    def loss(self, model, batch):
        self.calls += 1
        self.clock.now += 10.0 if self.calls > 12 else 1.0
        return super().loss(model, batch)


def test_a_run_says_when_its_throughput_collapses(tmp_path, capsys, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(loop, "clock", clock)
    cfg = TrainConfig(out=str(tmp_path / "slow"), batch_size=4, max_steps=16, eval_interval=0, ckpt_interval=100,
                      log_interval=4, warmup_steps=2)
    fit(cfg, SlowingJob(clock), tiny_model(), setup("cpu", "fp32"), {"job": "synthetic"})
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "throughput fell" in line]
    assert len(lines) == 1 and "competing for the CPU cores" in lines[0]


def test_exact_resume(tmp_path):
    _, straight = train(tmp_path, "straight")
    stopped, _ = train(tmp_path, "split", stop_after=10)
    assert stopped["stopped_early"] == "step 10 of 20 (--stop-after 10)"
    _, resumed = train(tmp_path, "split", resume=str(tmp_path / "split"))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]


def test_grad_accum_counts_every_micro_batch(tmp_path):
    _, records = train(tmp_path, "accum", grad_accum=2, max_steps=3)
    assert [r["tokens"] for r in records] == [2 * 4 * T * s for s in (1, 2, 3)]


def test_checkpoint_survives_a_crash_during_save(tmp_path, monkeypatch):
    train(tmp_path, "run", max_steps=5)
    ckpt = tmp_path / "run"
    good = resolve(ckpt)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(model_checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(ckpt, 99, tiny_model().state_dict(), None, {"tokens": 0, "model_config": {}})
    assert resolve(ckpt) == good
    model, state = load_model(ckpt)
    assert state["step"] == 5 and isinstance(model, GPT)


def test_checkpoints_are_readable_like_plain_files(tmp_path):
    old = os.umask(0o022)
    try:
        path = checkpoint.save(tmp_path, 1, tiny_model().state_dict(), None, {"tokens": 0, "model_config": {}})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [path, *path.iterdir(), tmp_path / "checkpoints" / "latest"]}
    assert modes == {"step_000001": 0o755, "model.safetensors": 0o644, "state.json": 0o644, "latest": 0o644}


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    train(tmp_path, "run", max_steps=5)
    ckpt = resolve(tmp_path / "run")
    other = GPT(ModelConfig.preset("tiny", vocab_size=V + 1, n_layer=2, n_embd=64, block_size=T))
    with pytest.raises(ValueError, match=r"does not match the model.*embed.weight"):
        load_weights(ckpt, other)
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt checkpoint.*model.safetensors"):
        load_model(ckpt)
    with pytest.raises(ValueError, match="no checkpoint at"):
        resolve(tmp_path / "nowhere")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000777")
    with pytest.raises(ValueError, match="missing or incomplete"):
        resolve(tmp_path / "run")


def test_profiler_writes_trace_and_table(tmp_path, capsys):
    train(tmp_path, "prof", max_steps=6, profile=True)
    trace = tmp_path / "prof" / "profile_trace.json"
    assert trace.exists() and "traceEvents" in trace.read_text()[:2000]
    assert "Self CPU" in capsys.readouterr().out


def test_max_minutes_with_a_fixed_length_stops_with_a_checkpoint_and_the_bar_says_so(tmp_path, capsys):
    """--max-steps and --max-minutes both given (--fixed-length): the budget is the old hard stop."""
    result, records = train(tmp_path, "timed", max_minutes=1e-9, fixed_length=True)
    assert result["step"] == 1 and resolve(tmp_path / "timed").name == "step_000001"
    assert result["stopped_early"] == "step 1 of 20 (--max-minutes 1e-09 reached)"
    assert "eta 00:00: stops at the --max-minutes cap near step 1" in capsys.readouterr().err


def test_eta_counts_down_to_the_max_minutes_cap_when_it_comes_first():
    assert eta(10, 100, 2.0, None) == "eta 03:00"                   # 90 steps of 2 s, no cap
    assert eta(10, 100, 2.0, 600.0) == "eta 03:00"                  # the last step comes before the cap
    # 60 s to the cap at 2 s a step: steps 11..40 end by the cap, step 41 ends past it and is the last.
    assert eta(10, 1200, 2.0, 60.0) == "eta 01:00: stops at the --max-minutes cap near step 41"
    assert eta(10, 1200, 2.0, -0.5) == "eta 00:00: stops at the --max-minutes cap near step 10"


def test_the_result_reports_the_invocations_average_throughput(tmp_path):
    """Not the last window's tokens/s (here one step): every token this invocation trained on over
    the seconds it trained; a resumed invocation counts only its own steps."""
    first, _ = train(tmp_path, "split", stop_after=10, log_interval=3)
    resumed, _ = train(tmp_path, "split", resume=str(tmp_path / "split"), log_interval=3)
    for result in (first, resumed):
        pace = result["throughput"]
        assert pace["tokens"] == 10 * 4 * T and pace["seconds"] > 0
        assert pace["tokens_per_s"] == pytest.approx(pace["tokens"] / pace["seconds"])
        assert "tokens_per_s" not in result          # the last window's figure is no longer passed off as the run's


class FakeClock:
    """The loop's clock, moved only by the job: no test sleeps."""
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class TimedJob(CountingJob):
    """On the fake clock, a micro-batch takes 1 s (the first two of an invocation 3 s: the slower
    first steps) and an evaluation 5 s."""
    def __init__(self, clock, step_s=1.0):
        super().__init__()
        self.clock, self.step_s, self.calls = clock, step_s, 0

    def loss(self, model, batch):
        self.calls += 1
        self.clock.now += 3.0 if self.calls <= 2 else self.step_s
        return super().loss(model, batch)

    def validate(self, model):
        self.clock.now += 5.0
        return super().validate(model)


def timed(tmp_path, monkeypatch, name, step_s=1.0, **overrides):
    """A run of at most 40 steps with a 1-minute budget on a fake clock; -> (result, records, config.json, clock)."""
    clock = FakeClock()
    monkeypatch.setattr(loop, "clock", clock)
    result, records = train(tmp_path, name, TimedJob(clock, step_s), **{"max_steps": 40, "max_minutes": 1.0, **overrides})
    return result, records, json.loads((tmp_path / name / "config.json").read_text()), clock


def test_max_minutes_fits_the_schedule_to_the_budget(tmp_path, monkeypatch, capsys):
    """Steps 3-5 time 1 s/step (steps 1 and 2 are skipped); at step 5 (the warm-up is 3 steps, the
    fitting waits for a few timed ones) 14 s are spent: the step-0 evaluation 5 s, steps 1-2 6 s,
    steps 3-5 3 s. Of the 46 s left, 31 steps fit: 26 more steps and evaluations at 10, 20, 30
    and 31 of 5 s each. The run ends at step 31 within the minute, its schedule finished."""
    result, records, config, clock = timed(tmp_path, monkeypatch, "fitted")
    printed = capsys.readouterr()
    assert ("--max-minutes 1: 31 steps fit (1 s/step measured over steps 3-5, 4 evaluations of 5 s); "
            "the schedule ends at step 31") in printed.out + printed.err
    assert result["step"] == 31 and result["stopped_early"] == "" and clock.now == 60.0
    assert config["args"]["fitted_steps"] == 31
    assert resolve(tmp_path / "fitted").name == "step_000031"
    cfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=3)
    lrs = {r["step"]: r["lr"] for r in records}
    # Before the fitting the schedule runs toward --max-steps (only steps 3 and 4 are past the warm-up),
    # from step 5 on toward 31, reaching --min-lr there.
    assert lrs[4] == pytest.approx(lr_at(3, cfg, 40)) and lrs[5] == pytest.approx(lr_at(4, cfg, 40))
    assert [lrs[s] for s in range(6, 32)] == pytest.approx([lr_at(s - 1, cfg, 31) for s in range(6, 32)])
    assert lr_at(31, cfg, 31) == pytest.approx(3e-4) and lrs[31] < 3e-4 + 0.02 * (3e-3 - 3e-4)


def test_a_budget_too_short_keeps_the_warm_up_and_some_decay(tmp_path, monkeypatch, capsys):
    result, _, config, _ = timed(tmp_path, monkeypatch, "short", max_minutes=1e-9)
    printed = capsys.readouterr()
    assert "--max-minutes 1e-09: not even 15 steps (the warm-up and 10 more) fit" in printed.out + printed.err
    assert result["step"] == 15 and result["stopped_early"] == "" and config["args"]["fitted_steps"] == 15


def test_a_budget_with_room_for_every_step_keeps_max_steps_as_the_ceiling(tmp_path, monkeypatch, capsys):
    result, _, config, _ = timed(tmp_path, monkeypatch, "roomy", max_minutes=60.0)
    printed = capsys.readouterr()
    assert "--max-minutes 60: all 40 steps fit" in printed.out + printed.err
    assert result["step"] == 40 and config["args"]["fitted_steps"] == 40


def test_resume_keeps_the_fitted_length_exactly(tmp_path, monkeypatch, capsys):
    """Stopped at step 10 and resumed (with the recorded length, as --resume reads it from config.json)
    on a machine 5 times slower: not timed again, the same 31 steps and the same weights."""
    straight, straight_records, _, _ = timed(tmp_path, monkeypatch, "straight")
    stopped, _, config, _ = timed(tmp_path, monkeypatch, "split", stop_after=10)
    assert stopped["stopped_early"] == "step 10 of 31 (--stop-after 10)" and config["args"]["fitted_steps"] == 31
    capsys.readouterr()
    resumed, resumed_records, _, _ = timed(tmp_path, monkeypatch, "split", step_s=5.0, resume=str(tmp_path / "split"),
                                           fitted_steps=config["args"]["fitted_steps"])
    printed = capsys.readouterr()
    assert "steps fit" not in printed.out + printed.err
    assert resumed["step"] == 31 and resumed["stopped_early"] == ""
    assert [r["train_loss"] for r in resumed_records] == [r["train_loss"] for r in straight_records]
    ours, theirs = load_model(tmp_path / "split")[0], load_model(tmp_path / "straight")[0]
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
