"""The command line of the training jobs, generated from their config dataclasses.

One --flag per field of the job's config (train/config.py), with the field's help, type, choices
and range check; the job's own fields come first, the loop's under "training". With --resume the
run's saved config is the starting point and only the flags typed now override it. Typing
--max-steps or --max-tokens turns on --fixed-length (unless that is typed too): the length the user
asked for is kept, where one from the defaults may be fitted to --max-minutes or the data.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

import torch

from model.command import Parser, flag_type
from train.config import TrainConfig, is_loop_field

Config = TypeVar("Config", bound=TrainConfig)


def build_parser(prog: str, description: str | None, defaults: TrainConfig) -> argparse.ArgumentParser:
    """A parser with one flag per field of type(defaults), each defaulting to the value in defaults."""
    parser = Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups: dict[str, Any] = {}
    fields = dataclasses.fields(defaults)
    for f in [f for f in fields if not is_loop_field(f.name)] + [f for f in fields if is_loop_field(f.name)]:
        meta, default = f.metadata, getattr(defaults, f.name)
        title = meta["group"] or ("training" if is_loop_field(f.name) else None)
        target = parser if title is None else groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
        else:
            parse = meta["type"] or type(default)
            target.add_argument(flag, type=flag_type(parse, *([meta["check"]] if meta["check"] else [])), default=default,
                                choices=meta["choices"], help=meta["help"])
    return parser


def saved_config(job: str, run_dir: str) -> dict:
    """The flags a run was started with (its config.json), after checking that it is a `job` run."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.exists():
        raise SystemExit(f"--resume {run_dir}: no config.json there; pass the run directory a job created")
    saved = json.loads(config_path.read_text())
    if saved.get("job") != job:
        raise SystemExit(f"--resume {run_dir}: that is a {saved.get('job')} run, not {job}; "
                         f"use python -m train.{saved.get('job')} --resume {run_dir}")
    return saved["args"]


def parse(job: str, description: str | None, defaults: Config, argv: list[str]) -> Config:
    """The job's config from argv; with --resume, the run's saved config overridden by argv."""
    parser = build_parser(f"python -m train.{job}", description, defaults)
    args = parser.parse_args(argv)
    if args.resume:
        # argparse fills in a default only for what the namespace lacks, so a namespace holding the
        # saved values keeps them wherever argv says nothing.
        names = {f.name for f in dataclasses.fields(defaults)}
        saved = {k: v for k, v in saved_config(job, args.resume).items() if k in names}
        args = parser.parse_args(argv, namespace=argparse.Namespace(**saved))
        args.out = args.resume
    given = typed(parser, argv, ("max_steps", "max_tokens", "fixed_length"))
    if given & {"max_steps", "max_tokens"} and "fixed_length" not in given:
        # A length typed on the command line is the length meant: neither a --max-minutes budget nor
        # pretraining's --max-epochs may shorten it (the job's defaults and a saved config may be).
        args.fixed_length = True
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(defaults)}
    try:
        return type(defaults)(**values)
    except ValueError as e:                 # a saved config that no longer passes the field checks
        parser.error(str(e))


def typed(parser: argparse.ArgumentParser, argv: list[str], names: tuple[str, ...]) -> set[str]:
    """Which of the fields `names` argv sets, under any spelling argparse accepts: a value already in
    the namespace stays unless its flag is given."""
    unset = object()
    args = parser.parse_args(argv, namespace=argparse.Namespace(**{name: unset for name in names}))
    return {name for name in names if getattr(args, name) is not unset}


def cuda_requested(argv: list[str] | None) -> bool:
    """Whether this invocation will run on CUDA (picks the job's defaults before the full parse)."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--device", default="auto")
    device = probe.parse_known_args(sys.argv[1:] if argv is None else argv)[0].device
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
