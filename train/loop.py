"""The one training loop that pretraining, SFT and DPO share.

A job (train/pretrain.py, train/sft.py, train/dpo.py) supplies data and a loss through the `Job`
interface; everything else lives here: the optimizer (train/optim.py: AdamW, or Muon), the
schedule (train/schedule.py: warm-up, cosine decay, a run length fitted to --max-minutes),
gradient accumulation, clipping, autocast, DDP / FSDP2, torch.compile,
periodic evaluation, samples and checkpoints, exact resume, torch.profiler, and the run directory.
Batches are a pure function of the step, so resuming needs only the step, the weights, the
optimizer and the RNG states.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm.auto import tqdm

from model import GPT
from model.io import checkpoint as saved
from model.tokenizer import Tokenizer
from train import checkpoint
from train.config import TrainConfig
from train.optim import Optimizer, make_optimizer
from train.runlog import RunLog
from train.schedule import SKIPPED_STEPS, fit_step, fitted, lr_at, shortest_fit, steps_that_fit, total_steps
from train.runtime import Runtime, wrap

# Dense bf16 tensor-core peak per GPU, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}

clock = time.perf_counter        # the loop's clock (tests put a fake one here)


class Job(Protocol):
    """What a training job gives the loop. Batches are dicts of tensors on the device (and of what
    else the job's loss and tokens read: a model.documents.Documents for packed rows, counts)."""
    name: str
    tokenizer: Tokenizer | None  # saved into the run directory; its fingerprint into each checkpoint

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This rank's micro-batch `micro` of optimizer step `step` (a pure function of both)."""

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss to minimise and extra scalar metrics (tensors; averaged for the log)."""

    def tokens(self, batch: dict) -> int:
        """Tokens the batch trains on, padding not counted (for tokens/s, the run's token count, and
        --max-tokens, which takes the first micro-batch's count as every one's)."""

    def validate(self, model: GPT) -> dict[str, float]:
        """Validation metrics of the bare model (called on every rank, in eval mode, without grad)."""

    def sample(self, model: GPT) -> str | None:
        """A short generated text for the log, or None."""


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


class Profiler:
    """torch.profiler over steps 1-5 (wait 1, warm-up 1, record 3), then a trace and a table."""

    def __init__(self, enabled: bool, run_dir: Path, is_main: bool):
        self.prof = None
        if enabled:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.trace = run_dir / "profile_trace.json"

            def on_ready(prof):
                if is_main:
                    prof.export_chrome_trace(str(self.trace))
                    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
                    print(prof.key_averages().table(sort_by=sort, row_limit=15))
                    print(f"profiler trace: {self.trace}")

            self.prof = torch.profiler.profile(activities=activities, on_trace_ready=on_ready,
                                               schedule=torch.profiler.schedule(wait=1, warmup=1, active=3))
            self.prof.start()

    def step(self, steps_this_run: int) -> None:
        if self.prof is not None:
            self.prof.step()
            if steps_this_run == 5:
                self.stop()

    def stop(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None


@dataclass
class Window:
    """What the optimizer steps since the last log line measured (a fresh one after each log)."""
    losses: list[torch.Tensor] = field(default_factory=list)
    metrics: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    grad_norms: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0              # this rank's
    started: float = field(default_factory=lambda: clock())
    paused: float = 0.0          # seconds spent validating inside the window: not training time

    def summary(self, rt: Runtime) -> dict[str, float]:
        """Mean loss (over ranks too), grad norm and job metrics, and the tokens/s of the window (all
        ranks' tokens)."""
        record = {"train_loss": rt.all_mean(torch.stack(self.losses).mean()).item(),
                  "grad_norm": torch.stack(self.grad_norms).mean().item(),
                  "tokens_per_s": rt.all_sum(self.tokens) / (clock() - self.started - self.paused)}
        record.update({k: rt.all_mean(torch.stack(v).mean()).item() for k, v in self.metrics.items()})
        return record


def eta(step: int, n_steps: int, seconds_per_step: float, cap_left: float | None) -> str:
    """The progress bar's time to go after `step`: to the last step, or, when the --max-minutes cap
    (cap_left seconds away; None: no cap) comes first, to the cap and the step the run stops near."""
    to_end = (n_steps - step) * seconds_per_step
    if cap_left is None or to_end <= cap_left:
        return f"eta {tqdm.format_interval(to_end)}"
    # The loop stops after the first step that ends past the cap.
    stop_near = min(n_steps, step + math.floor(cap_left / seconds_per_step) + 1) if cap_left > 0 else step
    return f"eta {tqdm.format_interval(max(cap_left, 0))}: stops at the --max-minutes cap near step {stop_near}"


class SlowdownWatch:
    """Says once when a logged window's tokens/s falls below 1/FACTOR of the best window before it.
    On a CPU the usual cause is another process competing for the cores, whose OpenMP threads and
    ours then wait on each other; the line names it and the knobs."""
    FACTOR = 4

    def __init__(self, device: torch.device):
        self.device, self.best, self.said = device, 0.0, False

    def observe(self, tokens_per_s: float) -> str | None:
        if not self.said and tokens_per_s * self.FACTOR < self.best:
            self.said = True
            cause = ("another process is probably competing for the CPU cores: free them, or run with "
                     "OMP_WAIT_POLICY=PASSIVE (threads that never spin) or OMP_NUM_THREADS=1"
                     if self.device.type == "cpu" else
                     "another process is probably using this GPU, or the CPU that feeds it")
            return f"throughput fell from {self.best:,.0f} to {tokens_per_s:,.0f} tokens/s: {cause}"
        self.best = max(self.best, tokens_per_s)
        return None


def resume(run_dir: str, model: GPT, optimizer: Optimizer, tokenizer) -> tuple[int, int, list[str]]:
    """Load weights, optimizer and RNG states from the run's newest intact checkpoint, falling back
    to an older one when the newest is damaged; -> (step, tokens, what was skipped and why)."""
    skipped = []
    for ckpt in saved.checkpoints(run_dir):
        try:
            state, resumed = saved.load_state(ckpt), checkpoint.load_optimizer(ckpt)
            weights = saved.read_weights(ckpt, model.state_dict())
        except ValueError as e:
            skipped.append(f"{ckpt.name} skipped: {e}")
            continue
        saved.check_tokenizer(state, tokenizer, ckpt)
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=resumed["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        checkpoint.set_rng_state(resumed["rng"])
        return state["step"], state["tokens"], skipped
    raise ValueError(f"--resume {run_dir}: no intact checkpoint to resume from"
                     + (f" ({'; '.join(skipped)})" if skipped else "")
                     + "; start over with a new --out")


def train_step(cfg: TrainConfig, job: Job, trained: torch.nn.Module, model: GPT, optimizer: Optimizer,
               rt: Runtime, step: int, lr: float, window: Window) -> int:
    """One optimizer step at learning rate lr: grad_accum micro-batches, clipping, the update;
    -> the tokens this rank trained on (job.tokens)."""
    tokens = 0
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)     # Muon's matrices: their own peak (train/optim.py)
    for micro in range(cfg.grad_accum):
        batch = job.batch(step, micro)
        skip_sync = micro < cfg.grad_accum - 1 and hasattr(trained, "no_sync")  # DDP: reduce once per step
        with trained.no_sync() if skip_sync else contextlib.nullcontext(), rt.autocast():
            loss, metrics = job.loss(trained, batch)
            (loss / cfg.grad_accum).backward()
        window.losses.append(loss.detach())
        for k, v in metrics.items():
            window.metrics.setdefault(k, []).append(v.detach().float())
        tokens += job.tokens(batch)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    window.grad_norms.append(norm.detach())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    window.tokens += tokens
    return tokens


def validate(job: Job, model: GPT, rt: Runtime, log: RunLog | None, step: int) -> tuple[dict[str, float], str | None]:
    """The job's validation metrics and a sample (written to samples.txt), in eval mode without
    gradients; -> (metrics, sample)."""
    model.eval()
    with torch.no_grad(), rt.autocast():
        metrics = job.validate(model)
        sample = job.sample(model)     # on every rank: FSDP's forward gathers from all of them
    model.train()
    if log:
        log.sample(step, sample)
    return metrics, sample


def save(run_dir: Path, step: int, tokens: int, job: Job, model: GPT, optimizer: Optimizer,
         rt: Runtime) -> None:
    """A checkpoint of the full (unsharded) weights and optimizer state, written by rank 0."""
    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rt.is_main:
        checkpoint.save(run_dir, step, model_state, optim_state,
                        {"tokens": tokens, "job": job.name, "model_config": model.cfg.to_dict(),
                         "tokenizer": job.tokenizer.fingerprint if job.tokenizer else None})


def fit(cfg: TrainConfig, job: Job, model: GPT, rt: Runtime, config_record: dict) -> dict:
    """Train model (the bare module, already on rt.device) on job into the run directory cfg.out;
    returns the last logged metrics (without the last window's tokens_per_s and mfu), the last sample
    under "sample", this invocation's average throughput under "throughput" (its tokens, the
    seconds of its training loop not spent validating, tokens_per_s, and mfu on a known GPU; tokens
    are job.tokens, padding not counted, so mfu is that of the useful work), and
    under "stopped_early" why the run ended before its last step ("" when it did not)."""
    run_dir = Path(cfg.out)
    log = RunLog(run_dir) if rt.is_main else None
    trained = wrap(model, rt, cfg.fsdp, cfg.compile)
    optimizer = make_optimizer(model, cfg, rt.device)
    step, tokens_seen, skipped = resume(cfg.resume, model, optimizer, job.tokenizer) if cfg.resume else (0, 0, [])
    if log:
        for note in skipped:
            print(f"resume: {note}; taking the next older checkpoint")
        if cfg.resume:
            log.truncate_after(step)     # records a killed run logged after its last checkpoint
        log.write_config(config_record)
    tokens_per_step = job.tokens(job.batch(step, 0)) * cfg.grad_accum * rt.world_size   # for --max-tokens
    unsynced, trained_tokens = 0, 0      # this rank's tokens not yet in tokens_seen; all ranks' of this invocation
    n_steps, fixed_at = total_steps(cfg, tokens_per_step), fit_step(cfg)
    # What --max-minutes does in this invocation: a hard stop, fit the length at step fixed_at, or
    # nothing (a length fitted before, or one too short to shorten).
    hard_stop, fitting = cfg.max_minutes > 0, False
    if not cfg.fixed_length and cfg.fitted_steps:
        n_steps, hard_stop = cfg.fitted_steps, False
    elif hard_stop and not cfg.fixed_length:
        fitting = step < fixed_at and n_steps > shortest_fit(cfg)
        hard_stop = step >= fixed_at and n_steps > shortest_fit(cfg)
        if hard_stop and rt.is_main:    # resumed past the fitting with no length fitted (a run from before it)
            print(f"--max-minutes {cfg.max_minutes:g}: a hard stop for this run, resumed at step {step} "
                  f"without a fitted length; it keeps its {n_steps:,} steps")
    peak, flops_per_token = peak_flops(rt.device), model.flops_per_token()
    profiler = Profiler(cfg.profile, run_dir, rt.is_main)
    started, steps_this_run, record, sample = clock(), 0, {}, None    # started: --max-minutes' clock
    eval_s, save_s = 0.0, 0.0            # the last evaluation and checkpoint this invocation timed

    if step == 0:       # before the bar, so that what it prints (or a mistake it finds) has lines of its own
        metrics, sample = validate(job, model, rt, log, step)
        eval_s = clock() - started
        if log:
            log.log({"step": 0, "tokens": 0, **metrics})
            print(" ".join(f"{k}={v:.4g}" for k, v in {"step": 0, "tokens": 0, **metrics}.items()))
    window, shown, slowdown = Window(), "", SlowdownWatch(rt.device)
    loop_started, validating, saving = clock(), 0.0, 0.0
    # Steps are timed from the end of step timed_from (where the pauses so far were `paused`), the
    # invocation's first steps skipped when there are steps enough before fixed_at.
    timed_from = max(step, min(step + SKIPPED_STEPS, fixed_at - 1))
    timing_started, paused = loop_started, 0.0
    # Our own eta replaces tqdm's, which knows neither the cap nor the validations to come.
    with tqdm(total=n_steps, initial=step, disable=not rt.is_main, dynamic_ncols=True, desc=job.name,
              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]") as bar:
        while step < n_steps:
            lr = lr_at(step, cfg, n_steps)
            unsynced += train_step(cfg, job, trained, model, optimizer, rt, step, lr, window)
            step, steps_this_run = step + 1, steps_this_run + 1
            profiler.step(steps_this_run)

            now = clock()
            if fitting and step == timed_from:
                timing_started, paused = now, validating + saving
            if fitting and step == fixed_at:
                step_s = (now - timing_started - (validating + saving - paused)) / (step - timed_from)
                step_s, eval_s, save_s, elapsed = rt.all_max([step_s, eval_s, save_s, now - started])  # the slowest rank
                ceiling = n_steps
                n_steps = steps_that_fit(cfg, fixed_at, ceiling, 60 * cfg.max_minutes - elapsed, step_s, eval_s, save_s)
                fitting, bar.total = False, n_steps
                if log:
                    config_record = {**config_record, "args": {**config_record.get("args", {}), "fitted_steps": n_steps}}
                    log.write_config(config_record)
                    bar.write(fitted(cfg, n_steps, ceiling, timed_from, fixed_at, step_s, eval_s, save_s, elapsed))
            cap_left = 60 * cfg.max_minutes - (now - started) if hard_stop else None
            stop = rt.any(cap_left is not None and cap_left < 0 or 0 < cfg.stop_after <= steps_this_run)
            bar.set_postfix_str(shown + eta(step, n_steps, (now - loop_started) / steps_this_run, cap_left),
                                refresh=False)
            bar.update(1)
            last = step == n_steps or stop
            log_now = step % cfg.log_interval == 0 or last
            validate_now = bool(cfg.eval_interval) and step % cfg.eval_interval == 0 or last
            save_now = step % cfg.ckpt_interval == 0 or last
            if log_now or validate_now or save_now:    # every rank at the same steps: one all-reduce
                added, unsynced = rt.all_sum(unsynced), 0
                tokens_seen, trained_tokens = tokens_seen + added, trained_tokens + added
            if log_now or validate_now:       # each on its own interval: neither waits for the other
                record = {"step": step, "tokens": tokens_seen, "lr": lr}
                if log_now:
                    record.update(window.summary(rt))
                    if peak:
                        record["mfu"] = flops_per_token * record["tokens_per_s"] / (peak * rt.world_size)
                if validate_now:
                    began = clock()
                    metrics, sample = validate(job, model, rt, log, step)
                    record.update(metrics)
                    eval_s = clock() - began
                    window.paused, validating = window.paused + eval_s, validating + eval_s
                record["elapsed"] = clock() - started     # this invocation's --max-minutes clock, evaluations included
                if log:
                    log.log(record)
                if log_now:
                    shown = f"loss={record['train_loss']:.3f}, tok_s={record['tokens_per_s']:.0f}, " + (
                        f"mfu={record['mfu']:.1%}, " if peak else "")
                    if (warning := slowdown.observe(record["tokens_per_s"])) and rt.is_main:
                        bar.write(warning)
                    window = Window()
            if save_now:
                began = clock()
                save(run_dir, step, tokens_seen, job, model, optimizer, rt)
                save_s = clock() - began
                saving += save_s
            if stop:
                break

    seconds = clock() - loop_started - validating
    throughput = {"tokens": trained_tokens, "seconds": seconds, "tokens_per_s": trained_tokens / max(seconds, 1e-9)}
    if peak:
        throughput["mfu"] = flops_per_token * throughput["tokens_per_s"] / (peak * rt.world_size)
    profiler.stop()
    if log:
        log.plot()
    last_metrics = {k: v for k, v in record.items() if k not in ("tokens_per_s", "mfu")}
    return {**last_metrics, "sample": sample, "throughput": throughput,
            "stopped_early": stopped_early(cfg, step, n_steps, steps_this_run)}


def stopped_early(cfg: TrainConfig, step: int, n_steps: int, steps_this_run: int) -> str:
    """"step S of N (why)" for a run that ended before its last step, else ""."""
    if step >= n_steps:
        return ""
    why = (f"--stop-after {cfg.stop_after}" if 0 < cfg.stop_after <= steps_this_run
           else f"--max-minutes {cfg.max_minutes:g} reached")
    return f"step {step} of {n_steps} ({why})"
