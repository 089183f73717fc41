"""What every training entry point does around the loop: arguments (and resumed configs), the
runtime, the kernel backends, the run directory, the opening and closing summary."""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import kernels
from model import GPT
from train import runtime
from train.loop import Job, config_from, explicit_args, fit
from train.runtime import Runtime

Build = Callable[[argparse.Namespace, Runtime], tuple[Job, GPT]]


def resolve_args(name: str, parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parsed flags; with --resume, the run's saved flags overridden by the ones typed now."""
    args = parser.parse_args(argv)
    if not args.resume:
        return args
    config_path = Path(args.resume) / "config.json"
    if not config_path.exists():
        raise SystemExit(f"--resume {args.resume}: no config.json there; pass the run directory a job created")
    saved = json.loads(config_path.read_text())
    if saved.get("job") != name:
        raise SystemExit(f"--resume {args.resume}: that is a {saved.get('job')} run, not {name}; "
                         f"use python -m train.{saved.get('job')} --resume {args.resume}")
    return argparse.Namespace(**{**saved["args"], **explicit_args(parser, argv), "out": args.resume})


def run_dir_for(name: str, out: str, rt: Runtime) -> Path:
    """--out, or runs/<job>-<date>-<time> chosen by rank 0 and shared with the other ranks."""
    names = [out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if rt.distributed:
        dist.broadcast_object_list(names, src=0)
    return Path(names[0])


def run(name: str, parser: argparse.ArgumentParser, build: Build, argv: list[str] | None = None) -> dict:
    """Parse, set up, build the job and model, train, and print the summary; returns fit()'s result."""
    args = resolve_args(name, parser, argv)
    cfg = config_from(args)
    rt = runtime.setup(cfg.device, cfg.dtype)
    try:
        kernels.use(cfg.kernels)
        torch.manual_seed(cfg.seed)
        run_dir = run_dir_for(name, cfg.out, rt)
        if not cfg.resume and (run_dir / "checkpoints").exists():
            raise SystemExit(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                             f"or choose another --out")
        args.out = cfg.out = str(run_dir)
        job, model = build(args, rt)
        active = kernels.active(rt.device)
        if rt.is_main:
            print(f"{name}: {run_dir}  device={rt.device}  world_size={rt.world_size}  "
                  f"autocast={rt.amp_dtype or 'off'}  compile={cfg.compile}")
            print(f"model: {model.num_params() / 1e6:.2f}M parameters  "
                  + "  ".join(f"{k}={v}" for k, v in model.cfg.to_dict().items() if k != "extra"))
            print("kernels: " + "  ".join(f"{op}={backend}" for op, backend in active.items()))
            print("training: " + "  ".join(f"{k}={v}" for k, v in vars(cfg).items()))
        record = {"job": name, "args": vars(args), "model_config": model.cfg.to_dict(), "kernels": active}
        result = fit(cfg, job, model, rt, run_dir, record)
        if rt.is_main:
            print(f"done at step {result.get('step')}: " + "  ".join(
                f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
            if result.get("sample"):
                print(f"sample:\n{result['sample']}")
            print(f"run directory: {run_dir}")
            if result["stopped_early"]:
                print(f"stopped early at {result['stopped_early']}; the learning-rate schedule is not finished. "
                      f"Continue with: python -m train.{name} --resume {run_dir}")
        # Free the model (FSDP keeps collective handles in it) while the process group is alive,
        # and let no rank take the group down while rank 0 still writes.
        del job, model
        gc.collect()
        rt.barrier()
        return result
    finally:
        runtime.teardown()
