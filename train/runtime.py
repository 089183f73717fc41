"""Where a job runs: device, precision and the process group (single process, DDP or FSDP2).

`torchrun --nproc_per_node=N -m train.<job>` sets RANK / WORLD_SIZE / LOCAL_RANK; we then join a
process group (NCCL on CUDA, gloo on CPU). Only rank 0 logs and saves.

On a CPU that other processes keep busy, a job trains on the cores they leave free (use_free_cores):
OpenMP threads that wait on one another run far slower on oversubscribed cores than fewer threads
do. Resuming the zero-argument pretraining run beside three busy jobs on the 2-vCPU Xeon: 673
tokens/s at torch's default 2 threads, 7,034 at 1 (2026-12-07).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.command import pick_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None      # autocast dtype, None for plain fp32
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of t over ranks (t itself in a single process)."""
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t)  # SUM: gloo has no AVG
            t /= self.world_size
        return t

    def all_sum(self, value: int) -> int:
        """The sum of value over ranks (value itself in a single process)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def all_max(self, values: list[float]) -> list[float]:
        """The elementwise max of values over ranks (values itself in a single process), in one all-reduce."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when flag is true on any rank, so ranks stop together."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def busy_cores(seconds: float = 0.2) -> float:
    """How many cores other processes kept busy over the next `seconds`, while this one sleeps (from
    /proc/stat); 0 where that cannot be read."""
    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]                   # all, idle + iowait
    try:
        total0, idle0 = snapshot()
        time.sleep(seconds)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = total1 - total0
    return 0.0 if total <= 0 else (total - (idle1 - idle0)) / total * (os.cpu_count() or 1)


def free_threads(threads: int, busy: float) -> int:
    """Of `threads` (torch's default: the cores), those that `busy` cores' worth of other work leaves
    free, at least one."""
    return max(1, min(threads, round(threads - busy)))


def use_free_cores(rt: Runtime) -> int:
    """A single CPU process trains on the cores other processes leave free, saying so when that is
    fewer than torch's default (OMP_NUM_THREADS, when set, decides instead); -> the threads."""
    threads = torch.get_num_threads()
    if rt.device.type != "cpu" or rt.distributed or "OMP_NUM_THREADS" in os.environ:
        return threads
    busy = busy_cores()
    free = free_threads(threads, busy)
    if free < threads:
        torch.set_num_threads(free)
        print(f"cpu: other processes keep {busy:.1f} of {os.cpu_count()} cores busy: training on {free} of "
              f"{threads} threads, which runs faster than threads waiting on each other for busy cores "
              f"(OMP_NUM_THREADS=N chooses)")
    return free


def setup(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Pick the device and precision and, under torchrun, join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device(pick_device(device))
    if dev.type == "cuda":
        if world_size > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, None if dtype == "fp32" else DTYPES[dtype], rank, world_size)


def wrap(model: torch.nn.Module, rt: Runtime, fsdp: bool = False, compile: bool = False) -> torch.nn.Module:
    """The module to train: compiled and/or wrapped for DDP or FSDP2. `model` stays the bare module."""
    if fsdp:
        if not rt.distributed:
            raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node=N")
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    trained = torch.compile(model) if compile else model
    if rt.distributed and not fsdp:
        trained = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return trained


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
