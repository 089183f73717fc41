"""What every training entry point does around the loop: the config (once, from the command line or a
resumed run), the runtime, the kernel backends, the run directory, the opening and closing summary.

A stage (train/pretrain.py, train/sft.py, train/dpo.py) is its name, its defaults per device, a
`build` that turns the config into a job and a model, and optionally a `finish` that reports on the
result while the runtime is still up.
"""
from __future__ import annotations

import dataclasses
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from tritongpt import kernels
from model import GPT
from model.io import checkpoint as saved
from train import cli, runtime
from train.config import TrainConfig
from train.loop import Job, fit
from train.runlock import RunLock
from train.runtime import Runtime


@dataclass(frozen=True)
class Stage:
    name: str                                                  # python -m train.<name>
    description: str                                           # the --help text
    cpu_defaults: TrainConfig                                  # a zero-argument run on CPU ...
    cuda_defaults: TrainConfig                                 # ... and on CUDA
    build: Callable[[TrainConfig, Runtime], tuple[Job, GPT]]
    finish: Callable[[TrainConfig, dict, Runtime], dict] | None = None   # the result -> the result, extended

    def parse(self, argv: list[str] | None = None) -> TrainConfig:
        """This stage's config from argv (default sys.argv[1:]), with the defaults of its device."""
        argv = sys.argv[1:] if argv is None else argv
        defaults = self.cuda_defaults if cli.cuda_requested(argv) else self.cpu_defaults
        return cli.parse(self.name, self.description, defaults, argv)


def run_dir_for(name: str, out: str, rt: Runtime) -> Path:
    """--out, or runs/<job>-<date>-<time> chosen by rank 0 and shared with the other ranks."""
    names = [out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if rt.distributed:
        dist.broadcast_object_list(names, src=0)
    return Path(names[0])


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A fresh run needs a directory no run has written to; a resumed one needs a checkpoint."""
    has_checkpoint = bool(saved.checkpoints(run_dir))
    if resume and not has_checkpoint:
        raise SystemExit(f"--resume {run_dir}: the run has no checkpoint yet (it stopped before its first save); "
                         f"start over with a new --out, or delete {run_dir}")
    if not resume and has_checkpoint:
        raise SystemExit(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                         f"or choose another --out")
    leftovers = [name for name in ("config.json", "metrics.jsonl", "samples.txt") if (run_dir / name).exists()]
    if not resume and leftovers:
        raise SystemExit(f"{run_dir} holds files of an earlier run that saved no checkpoint "
                         f"({', '.join(leftovers)}); delete {run_dir} or choose another --out")


def print_opening(name: str, cfg: TrainConfig, model: GPT, active: dict[str, str], rt: Runtime) -> None:
    print(f"{name}: {cfg.out}  device={rt.device}  world_size={rt.world_size}  "
          f"autocast={rt.amp_dtype or 'off'}  compile={cfg.compile}")
    print(f"model: {model.num_params() / 1e6:.2f}M parameters  "
          + "  ".join(f"{k}={v}" for k, v in model.cfg.to_dict().items() if k != "extra"))
    print("kernels: " + "  ".join(f"{op}={backend}" for op, backend in active.items()))
    print("training: " + "  ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))


def print_closing(name: str, cfg: TrainConfig, result: dict) -> None:
    print(f"done at step {result.get('step')}: " + "  ".join(
        f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
    pace = result["throughput"]
    print(f"throughput: {pace['tokens_per_s']:,.0f} tokens/s on average over this invocation "
          f"({pace['tokens']:,} tokens in {pace['seconds']:,.1f} s of training, validation not counted)"
          + (f"  mfu={pace['mfu']:.1%}" if "mfu" in pace else ""))
    if result.get("sample"):
        print(f"sample:\n{result['sample']}")
    print(f"run directory: {cfg.out}")
    if result["stopped_early"]:
        print(f"stopped early at {result['stopped_early']}; the learning-rate schedule is not finished. "
              f"Continue with: python -m train.{name} --resume {cfg.out}")


def run(stage: Stage, argv: list[str] | None = None) -> dict:
    """Parse, set up, build the job and model, train, print the summary and finish; returns fit()'s
    result (extended by the stage's finish). A run that fails before its first checkpoint removes
    what it wrote into its run directory."""
    cfg = stage.parse(argv)
    rt = runtime.setup(cfg.device, cfg.dtype)
    threads = torch.get_num_threads()
    runtime.use_free_cores(rt)
    lock = None
    try:
        with kernels.use(cfg.kernels):      # this run's backends, restored when it ends
            torch.manual_seed(cfg.seed)
            run_dir = run_dir_for(stage.name, cfg.out, rt)
            if rt.is_main:
                lock = RunLock(run_dir)
                if note := lock.acquire():
                    print(f"{run_dir}: {note}")
            check_run_dir(run_dir, bool(cfg.resume))
            cfg = dataclasses.replace(cfg, out=str(run_dir))
            job, model = stage.build(cfg, rt)
            active = kernels.active(rt.device)
            if rt.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                job.tokenizer.save(run_dir / "tokenizer.json")
                print_opening(stage.name, cfg, model, active, rt)
            record = {"job": stage.name, "args": dataclasses.asdict(cfg), "model_config": model.cfg.to_dict(),
                      "kernels": active}
            result = fit(cfg, job, model, rt, record)
            if rt.is_main:
                print_closing(stage.name, cfg, result)
            if stage.finish:
                result = stage.finish(cfg, result, rt)
            # Free the model (FSDP keeps collective handles in it) while the process group is alive,
            # and let no rank take the group down while rank 0 still writes.
            del job, model
            gc.collect()
            rt.barrier()
            return result
    except BaseException:
        # A run that ends before its first checkpoint cannot be resumed, and what it wrote would make
        # the same command refuse the directory: it takes that back, so the retry starts clean.
        if lock and not saved.checkpoints(run_dir):
            lock.discard_written()
        raise
    finally:
        if lock:
            lock.release()
        runtime.teardown()
        torch.set_num_threads(threads)      # as it was before this run chose its own
