"""The one training loop that pretraining, SFT and DPO share.

A job (train/pretrain.py, train/sft.py, train/dpo.py) supplies data and a loss through the `Job`
interface; everything else lives here: AdamW with decoupled weight decay on matrices only, linear
warm-up then cosine decay, gradient accumulation, clipping, autocast, DDP / FSDP2, torch.compile,
periodic evaluation, samples and checkpoints, exact resume, torch.profiler, and the run directory.
Batches are a pure function of the step, so resuming needs only the step, the weights, the
optimizer and the RNG states.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm.auto import tqdm

import kernels
from model import GPT
from train import checkpoint
from train.runlog import RunLog
from train.runtime import Runtime, wrap

# Dense bf16 tensor-core peak per GPU, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


@dataclass
class TrainConfig:
    out: str = ""
    resume: str = ""
    device: str = "auto"
    dtype: str = "auto"
    kernels: str = "auto"
    compile: bool = False
    fsdp: bool = False
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    max_tokens: int = 0
    max_minutes: float = 0.0
    stop_after: int = 0
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_tokens: int = 65536
    ckpt_interval: int = 500
    log_interval: int = 10
    seed: int = 0
    profile: bool = False


HELP = {
    "out": "run directory (default: runs/<job>-<date>-<time>)",
    "resume": "continue the run in this directory from its last checkpoint (its config is reused; "
              "flags given on the command line override it)",
    "device": "auto (cuda when present, else cpu), cpu, cuda or cuda:N",
    "dtype": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16 autocast",
    "kernels": "backends of the hot ops: auto, triton, torch, or per op like 'torch,rms_norm=triton' "
               f"(ops: {', '.join(kernels.OPS)})",
    "compile": "wrap the model in torch.compile",
    "fsdp": "shard with FSDP2 instead of DDP when launched with torchrun",
    "batch_size": "sequences per micro-batch on each process",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps in the whole run (the length of the LR schedule)",
    "max_tokens": "if > 0, the run length in tokens instead of --max-steps",
    "max_minutes": "if > 0, stop (with a checkpoint) after this many minutes of training",
    "stop_after": "if > 0, stop after this many steps in this invocation, keeping the schedule; resume later",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "steps of linear warm-up from 0 to --lr",
    "weight_decay": "AdamW weight decay for matrices (never for norm weights)",
    "grad_clip": "clip the global gradient norm to this (0 disables)",
    "eval_interval": "evaluate every this many steps (0: only at the end)",
    "eval_tokens": "tokens (or examples, for SFT/DPO) per evaluation",
    "ckpt_interval": "save a checkpoint every this many steps (and always at the end)",
    "log_interval": "log metrics every this many steps (each log costs one host sync)",
    "seed": "seed for initialisation and data order",
    "profile": "trace a few steps with torch.profiler into the run directory and print the top operators",
}


def add_args(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """One --flag per TrainConfig field, with the job's defaults and help on each."""
    group = parser.add_argument_group("training")
    for f in dataclasses.fields(TrainConfig):
        default, flag = getattr(defaults, f.name), "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP[f.name])
        elif f.name == "kernels":
            group.add_argument(flag, type=kernel_spec, default=default, help=HELP[f.name])
        else:
            group.add_argument(flag, type=type(default), default=default, help=HELP[f.name])


def kernel_spec(text: str) -> str:
    """argparse type of --kernels: the spec unchanged, or a usage error naming the valid choices."""
    try:
        kernels.parse_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def explicit_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """Only the flags the user actually typed (used to override a resumed run's saved config)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(argv))


def config_from(args: argparse.Namespace | dict) -> TrainConfig:
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    return TrainConfig(**{f.name: values[f.name] for f in dataclasses.fields(TrainConfig) if f.name in values})


class Job(Protocol):
    """What a training job gives the loop. Batches are dicts of tensors on the device."""
    name: str

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This rank's micro-batch `micro` of optimizer step `step` (a pure function of both)."""

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss to minimise and extra scalar metrics (tensors; averaged for the log)."""

    def tokens(self, batch: dict) -> int:
        """Tokens the batch trains on (for tokens/s and --max-tokens)."""

    def evaluate(self, model: GPT) -> dict[str, float]:
        """Validation metrics of the bare model (called on every rank, in eval mode, without grad)."""

    def sample(self, model: GPT) -> str | None:
        """A short generated text for the log, or None."""


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (projections, embedding), none on norm weights or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


class _Profiler:
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

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def stop(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None


def total_steps(cfg: TrainConfig, tokens_per_step: int) -> int:
    return max(1, cfg.max_tokens // tokens_per_step) if cfg.max_tokens else cfg.max_steps


def fit(cfg: TrainConfig, job: Job, model: GPT, rt: Runtime, run_dir: Path, config_record: dict) -> dict:
    """Train model (the bare module, already on rt.device) on job; returns the last logged metrics
    and, under "sample", the last generated sample."""
    log = RunLog(run_dir) if rt.is_main else None
    trained = wrap(model, rt, cfg.fsdp, cfg.compile)
    optimizer = make_optimizer(model, cfg, rt.device)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    step, tokens_seen = 0, 0
    if cfg.resume:
        ckpt = checkpoint.resolve(cfg.resume)
        state, saved = checkpoint.load_state(ckpt), checkpoint.load_optimizer(ckpt)
        weights = checkpoint.read_weights(ckpt, model.state_dict())
        set_state_dict(model, optimizer, model_state_dict=weights,
                       optim_state_dict=saved["optimizer"], options=StateDictOptions(full_state_dict=True))
        checkpoint.set_rng_state(saved["rng"])
        step, tokens_seen = state["step"], state["tokens"]
        if log:
            log.truncate_after(step)
    if log:
        log.write_config(config_record)

    def save() -> None:
        model_state, optim_state = get_state_dict(model, optimizer, options=full)
        if rt.is_main:
            checkpoint.save(run_dir, step, model_state, optim_state,
                            {"tokens": tokens_seen, "job": job.name, "model_config": model.cfg.to_dict()})

    last_sample = None

    def evaluate() -> dict[str, float]:
        nonlocal last_sample
        model.eval()
        with torch.no_grad(), rt.autocast():
            metrics = job.evaluate(model)
            last_sample = job.sample(model)   # on every rank: FSDP's forward gathers from all of them
        model.train()
        if log:
            log.sample(step, last_sample)
        return metrics

    tokens_per_step = job.tokens(job.batch(step, 0)) * cfg.grad_accum * rt.world_size
    n_steps = total_steps(cfg, tokens_per_step)
    peak = peak_flops(rt.device)
    flops_per_token = model.flops_per_token()
    profiler = _Profiler(cfg.profile, run_dir, rt.is_main)
    bar = tqdm(total=n_steps, initial=step, disable=not rt.is_main, dynamic_ncols=True, desc=job.name)
    window_loss, window_metrics, window_norm, window_start, window_tokens = [], {}, [], time.perf_counter(), 0
    started, steps_this_run, final = time.perf_counter(), 0, {}
    if step == 0:
        initial = {"step": 0, "tokens": 0, **evaluate()}
        if log:
            log.log(initial)
            print(" ".join(f"{k}={v:.4g}" for k, v in initial.items()))
    model.train()
    while step < n_steps:
        lr = lr_at(step, cfg, n_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            batch = job.batch(step, micro)
            skip_sync = micro < cfg.grad_accum - 1 and hasattr(trained, "no_sync")  # DDP: reduce once per step
            with trained.no_sync() if skip_sync else contextlib.nullcontext(), rt.autocast():
                loss, metrics = job.loss(trained, batch)
                (loss / cfg.grad_accum).backward()
            window_loss.append(loss.detach())
            for k, v in metrics.items():
                window_metrics.setdefault(k, []).append(v.detach().float())
            window_tokens += job.tokens(batch) * rt.world_size
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        window_norm.append(norm.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_this_run += 1
        tokens_seen += tokens_per_step
        profiler.step()
        if steps_this_run == 5:
            profiler.stop()
        bar.update(1)

        out_of_time = cfg.max_minutes > 0 and time.perf_counter() - started > 60 * cfg.max_minutes
        stop = rt.any(out_of_time or (cfg.stop_after > 0 and steps_this_run >= cfg.stop_after))
        last = step == n_steps or stop
        if step % cfg.log_interval == 0 or last:
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "tokens": tokens_seen, "lr": lr,
                      "train_loss": rt.all_mean(torch.stack(window_loss).mean()).item(),
                      "grad_norm": torch.stack(window_norm).mean().item(),
                      "tokens_per_s": window_tokens / elapsed}
            record.update({k: rt.all_mean(torch.stack(v).mean()).item() for k, v in window_metrics.items()})
            if peak:
                record["mfu"] = flops_per_token * record["tokens_per_s"] / (peak * rt.world_size)
            if cfg.eval_interval and step % cfg.eval_interval == 0 or last:
                record.update(evaluate())
            final = record
            if log:
                log.log(record)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"mfu": f"{record['mfu']:.1%}"} if peak else {}))
            window_loss, window_metrics, window_norm, window_start, window_tokens = [], {}, [], time.perf_counter(), 0
        if step % cfg.ckpt_interval == 0 or last:
            save()
        if stop:
            break
    bar.close()
    profiler.stop()
    if log:
        log.plot()
    stopped_early = ""
    if step < n_steps:
        why = (f"--stop-after {cfg.stop_after}" if cfg.stop_after > 0 and steps_this_run >= cfg.stop_after
               else f"--max-minutes {cfg.max_minutes:g} reached")
        stopped_early = f"step {step} of {n_steps} ({why})"
    return {**final, "sample": last_sample, "stopped_early": stopped_early}
