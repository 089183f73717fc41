"""Job configuration: dataclasses whose fields carry their own help and range check.

Every job's configuration derives from TrainConfig (what the shared loop reads) and adds its own
fields. Each field is declared with option(default, help, ...), so the command line (train/cli.py)
is generated from the dataclass and no flag can lose its help. A field's check runs when a flag is
parsed (a usage error naming the flag) and whenever a config is made (a resumed config.json too).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tritongpt import kernels
from model.command import DEBUG_HELP, Check, at_least, greater_than


def option(default: Any, help: str, check: Check | None = None, type: Callable | None = None,
           choices: tuple | None = None, group: str | None = None) -> Any:
    """A config field with its help text; type (default: that of default) parses the flag's text,
    check validates the value, group names the --help section it is listed in."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "type": type,
                                                        "choices": choices, "group": group})


positive, non_negative = at_least(1), at_least(0)


def fraction(value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1), got {value}")


momentum = fraction         # Muon's momentum: in [0, 1) too


def absolute_path(text: str) -> str:
    """A path flag kept absolute (empty stays empty), so --resume works from any directory."""
    return str(Path(text).resolve()) if text else text


@dataclass
class TrainConfig:
    """The shared loop's settings; the same flags on every training command."""
    out: str = option("", "run directory (default: runs/<job>-<date>-<time>)")
    resume: str = option("", "continue the run in this directory from its last checkpoint (its config is "
                             "reused; flags given on the command line override it)")
    device: str = option("auto", "auto (cuda when present, else cpu), cpu, cuda or cuda:N")
    dtype: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16 autocast",
                        choices=("auto", "fp32", "bf16", "fp16"))
    kernels: str = option("auto", "backends of the hot ops: auto, triton, torch, or per op like "
                                  f"'torch,rms_norm=triton' (ops: {', '.join(kernels.OPS)})", type=kernels.spec_type)
    compile: bool = option(False, "wrap the model in torch.compile")
    fsdp: bool = option(False, "shard with FSDP2 instead of DDP when launched with torchrun")
    batch_size: int = option(16, "sequences per micro-batch on each process", positive)
    grad_accum: int = option(1, "micro-batches per optimizer step", positive)
    max_steps: int = option(1000, "optimizer steps in the whole run (the length of the LR schedule; with a "
                                  "--max-minutes budget, the most it may fit)", positive)
    max_tokens: int = option(0, "if > 0, the run length in tokens instead of --max-steps", non_negative)
    max_minutes: float = option(0.0, "a time budget: minutes of training in this invocation, evaluations "
                                     "included (0: none). Unless the run length is fixed (--fixed-length, which "
                                     "typing --max-steps or --max-tokens turns on), it sets the run length: the "
                                     "first steps are timed and the run takes as many steps (at most --max-steps) "
                                     "as fit, warm-up and decay included, recorded as --fitted-steps. With a fixed "
                                     "length it is a hard stop: a checkpoint, the schedule unfinished, and "
                                     "--resume continues. Loading and preparing data and DPO's sampling of rejected "
                                     "replies (redone by each --resume) come before training and do not count",
                                non_negative)
    fixed_length: bool = option(False, "take --max-steps / --max-tokens as the run length as given: --max-minutes "
                                       "is then a hard stop, and pretraining refuses a length beyond --max-epochs "
                                       "instead of shortening it; on by itself when --max-steps or --max-tokens is "
                                       "typed on the command line (a resumed run keeps it)")
    fitted_steps: int = option(0, "the run length that timing the first steps fitted into --max-minutes (0: none "
                                  "yet); the run writes it into its config.json, so --resume keeps that schedule "
                                  "(not timing again) and passing it reruns it; ignored with --fixed-length",
                               non_negative, group="recorded by the run")
    stop_after: int = option(0, "if > 0, stop after this many steps in this invocation, keeping the "
                                "schedule; resume later", non_negative)
    optimizer: str = option("adamw", "adamw: AdamW on every parameter; muon: Muon on the matrices inside the "
                                     "transformer blocks (--muon-lr), AdamW on the embedding, head and norms (--lr); "
                                     "train/optim.py", choices=("adamw", "muon"))
    lr: float = option(1e-3, "peak learning rate (of AdamW's parameters: all of them, or with --optimizer muon "
                             "the embedding, head and norms)", greater_than(0))
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay (each group's is scaled as its "
                                 "peak is: --muon-lr / --lr)", non_negative)
    muon_lr: float = option(0.02, "peak learning rate of Muon's matrices (--optimizer muon)", greater_than(0))
    muon_momentum: float = option(0.95, "Muon's Nesterov momentum", momentum)
    muon_weight_decay: float = option(0.0, "Muon's decoupled weight decay (--optimizer muon)", non_negative)
    warmup_steps: int = option(50, "steps of linear warm-up from 0 to --lr", non_negative)
    weight_decay: float = option(0.1, "AdamW weight decay for matrices (never for norm weights)", non_negative)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)", non_negative)
    eval_interval: int = option(100, "evaluate every this many steps (0: only at the end)", non_negative)
    ckpt_interval: int = option(500, "save a checkpoint every this many steps (and always at the end)", positive)
    log_interval: int = option(10, "log metrics every this many steps (each log costs one host sync)", positive)
    seed: int = option(0, "seed for initialisation and data order")
    profile: bool = option(False, "trace a few steps with torch.profiler into the run directory and print "
                                  "the top operators")
    debug: bool = option(False, DEBUG_HELP)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, check = getattr(self, f.name), f.metadata.get("check")
            if check is not None and value is not None:
                try:
                    check(value)
                except ValueError as e:
                    raise ValueError(f"{f.name}: {e}") from None


def is_loop_field(name: str) -> bool:
    """Whether name is one of TrainConfig's own fields (the rest belong to a job)."""
    return name in {f.name for f in dataclasses.fields(TrainConfig)}
