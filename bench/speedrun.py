"""Time to quality: how long a pretraining recipe takes to reach a validation loss, the old recipe
against today's, in one run on the same data with the same seed.

    python -m bench.speedrun [--out FILE] [--keep DIR]

Runs `python -m train.pretrain` on the built-in corpus three times:
- old: the zero-argument run before the time-to-quality work (AdamW at 2e-3, cosine to 2e-4 over
  1,200 steps of 16 x 256 tokens, stopped by its 12-minute cap), as explicit flags;
- new: today's zero-argument run, given the wall-clock the old one took (--max-minutes), so its
  schedule fits that time;
- new-short: the same with FRACTION (0.6) of that time;
- old-cut and new-cut: both given CUT_MINUTES (3), a machine 4x slower simulated: the old recipe's
  fixed length stops at the cap with its schedule unfinished, the new one fits its schedule to it.
Each run's metrics.jsonl holds the validation loss (nats per token, on the same held-out tokens)
against the run's clock (elapsed: wall-clock seconds of training, evaluations included, as
--max-minutes counts them). The report gives each run's final loss, bits per byte (the loss over
the bytes the validation tokens stand for, so that tokenizers compare), steps, tokens and
seconds; when the new runs first reach the old run's final loss (interpolated between
evaluations) as a fraction of the old run's time; and how much lower they end (the cut runs:
new-cut against old-cut). Written as JSON (--out) and printed as a markdown table. On the 2-core
dev machine the whole bench takes about 35 minutes.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from model.command import Parser, at_most, flag_type, greater_than
from model.io.files import atomic_write_text
from train.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
# The zero-argument CPU run before the time-to-quality recipe (train/pretrain.py's CPU_DEFAULTS then).
OLD_RECIPE = ["--preset", "tiny", "--vocab-size", "4096", "--optimizer", "adamw", "--batch-size", "16",
              "--max-steps", "1200", "--lr", "2e-3", "--min-lr", "2e-4", "--warmup-steps", "30",
              "--weight-decay", "0.1", "--no-document-mask"]
OLD_MINUTES = 12.0          # its cap: a hard stop, since the length is typed
EVAL = ["--eval-interval", "50", "--eval-tokens", "32768"]     # the same held-out tokens and cadence for every run
FRACTION, CUT_MINUTES = 0.6, 3.0


def pretrain(run_dir: Path, flags: list[str]) -> dict:
    """One `python -m train.pretrain` run; -> its flags, its evaluations [(elapsed, step, tokens,
    val_loss)], the wall-clock of the whole command and the run's config (config.json's args)."""
    cmd = [sys.executable, "-m", "train.pretrain", "--out", str(run_dir), "--device", "cpu", *EVAL, *flags]
    print("$", " ".join(cmd[1:]), flush=True)
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                          stdout=subprocess.PIPE, stderr=sys.stderr)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[1:3])} failed (exit {done.returncode}):\n{done.stdout[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [(r.get("elapsed", 0.0), r["step"], r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    config = json.loads((run_dir / "config.json").read_text())
    return {"flags": flags, "evaluations": evaluations, "command_seconds": time.perf_counter() - began,
            "config": config["args"]}


def first_reach(evaluations: list[tuple], target: float) -> dict | None:
    """Elapsed seconds and tokens at which the validation loss first reaches target, interpolated
    linearly between the two evaluations around it; None if it never does."""
    for before, after in zip(evaluations, evaluations[1:]):
        if after[3] <= target:
            t = (before[3] - target) / (before[3] - after[3]) if before[3] > target else 0.0
            return {"elapsed": before[0] + t * (after[0] - before[0]), "tokens": before[2] + t * (after[2] - before[2])}
    return None


def bits_per_byte(loss: float, data_dir: Path) -> float | None:
    """Nats per token over the validation split's bytes per token (its manifest's counts) in bits."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    val = manifest.get("val", {})
    return loss * val["tokens"] / val["bytes"] / math.log(2) if val.get("bytes") else None


def summary(run: dict) -> dict:
    """The run's last evaluation, with its loss in bits per byte of the prepared data it trained on
    (found again as train.pretrain found it: prepared once, then reused)."""
    last = run["evaluations"][-1]
    args = run["config"]
    return {"steps": last[1], "tokens": last[2], "elapsed": last[0], "val_loss": last[3],
            "bits_per_byte": bits_per_byte(last[3], prepared(args["data"], args["vocab_size"], args["data_dir"]))}


@functools.lru_cache
def prepared(source: str, vocab_size: int, data_dir: str) -> Path:
    """The prepared data set's directory (every run of the bench trains on the same one: found once)."""
    return Path(prepare(source, vocab_size=vocab_size, data_dir=str(ROOT / data_dir), verbose=False))


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.machine())


def table(report: dict) -> str:
    lines = ["| run | steps | tokens | seconds | val loss | bits/byte | reaches old's final loss at | ends lower by |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run in report["runs"].items():
        s, reach = run["summary"], run.get("reaches_old_final")
        at = f"{reach['elapsed']:.0f} s ({reach['fraction_of_old']:.2f}x)" if reach else \
            "never" if name in ("new", "new-short") else "-"
        baseline = {"new": "old", "new-short": "old", "new-cut": "old-cut"}.get(name)
        below = f"{report['runs'][baseline]['summary']['val_loss'] - s['val_loss']:.3f} nats (vs {baseline})" \
            if baseline else "-"
        bpb = f"{s['bits_per_byte']:.3f}" if s["bits_per_byte"] is not None else "-"
        lines.append(f"| {name} | {s['steps']:,} | {s['tokens']:,} | {s['elapsed']:.0f} | {s['val_loss']:.3f} | {bpb} "
                     f"| {at} | {below} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = Parser(prog="python -m bench.speedrun", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="", help="write the report as JSON to this file")
    parser.add_argument("--keep", default="", help="keep the run directories under this directory")
    parser.add_argument("--fraction", type=flag_type(float, greater_than(0), at_most(1)), default=FRACTION,
                        help="the short new run's share of the old run's wall-clock")
    parser.add_argument("--cut-minutes", type=flag_type(float, greater_than(0)), default=CUT_MINUTES,
                        help="the budget of the cut runs (a slower machine simulated)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(args.keep or tmp)
        where.mkdir(parents=True, exist_ok=True)
        runs = {"old": pretrain(where / "old", [*OLD_RECIPE, "--max-minutes", f"{OLD_MINUTES:g}"])}
        minutes = runs["old"]["evaluations"][-1][0] / 60             # its elapsed at its last evaluation
        runs["new"] = pretrain(where / "new", ["--max-minutes", f"{minutes:.3f}"])
        runs["new-short"] = pretrain(where / "new-short", ["--max-minutes", f"{minutes * args.fraction:.3f}"])
        runs["old-cut"] = pretrain(where / "old-cut", [*OLD_RECIPE, "--max-minutes", f"{args.cut_minutes:g}"])
        runs["new-cut"] = pretrain(where / "new-cut", ["--max-minutes", f"{args.cut_minutes:g}"])
    for run in runs.values():
        run["summary"] = summary(run)
    old = runs["old"]["summary"]
    for name, run in runs.items():
        if name in ("new", "new-short") and (reach := first_reach(run["evaluations"], old["val_loss"])):
            run["reaches_old_final"] = {**reach, "fraction_of_old": reach["elapsed"] / old["elapsed"]}
    report = {"what": "python -m bench.speedrun: validation loss against wall-clock, old recipe vs new, built-in corpus",
              "date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "device": "cpu", "runs": runs}
    print(table(report))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
