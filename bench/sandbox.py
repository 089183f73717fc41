"""What the code sandbox costs: programs per second through train/eval/sandbox.py, contained
(bubblewrap) against uncontained (--unsafe-exec), the programs `train.evaluate --humaneval` runs.

    python -m bench.sandbox [--problems 64] [--workers 1,2] [--rounds 3] [--json FILE]

Method. The programs are the canonical solutions of the first --problems HumanEval problems with
their tests (all of them pass). humaneval.execute runs them all, W at a time from its thread pool
as the evaluation does, once per mode and worker count in a round; programs per second is their
count over the wall time, the median of --rounds rounds. The modes alternate within each round, so
that other load on the machine falls on both alike; a warm-up run of one program per mode comes
first (bwrap's probe is done once per process). The table goes to stdout with the machine and its
load average, and with --json to a file.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from bench.ceilings import cpu_model
from model.command import Parser, at_least, flag_type, run_command
from model.io.files import atomic_write_text
from train.eval import humaneval
from train.eval.evaluate import positive_ints

MODES = {"contained": False, "unsafe-exec": True}        # mode: the unsafe_exec it passes


def programs_per_second(problems: list[dict], workers: int, unsafe_exec: bool) -> float:
    """Every problem's canonical solution run once against its tests; all must pass."""
    start = time.perf_counter()
    outcomes = humaneval.execute(problems, [[p["canonical_solution"]] for p in problems], timeout_s=10.0,
                                 memory_mb=1024, workers=workers, show=False, unsafe_exec=unsafe_exec)
    seconds = time.perf_counter() - start
    failed = [o.result for row in outcomes for o in row if not o.passed]
    if failed:
        raise RuntimeError(f"{len(failed)} canonical solutions failed, e.g. {failed[0]}: the timing means nothing")
    return len(problems) / seconds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = Parser(prog="python -m bench.sandbox", description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=flag_type(int, at_least(1)), default=64,
                        help="run the canonical solutions of the first N HumanEval problems")
    parser.add_argument("--workers", type=positive_ints, default=[1, os.cpu_count() or 1],
                        help="comma-separated numbers of programs run at a time (default: 1 and the CPU count)")
    parser.add_argument("--rounds", type=flag_type(int, at_least(1)), default=3, help="rounds; the median is reported")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows and the machine here")
    args = parser.parse_args(argv)
    problems = humaneval.load_problems(args.problems)
    load_before = os.getloadavg()[0]
    for unsafe_exec in MODES.values():
        programs_per_second(problems[:1], 1, unsafe_exec)
    rates: dict[tuple[str, int], list[float]] = {(m, w): [] for w in args.workers for m in MODES}
    for _ in range(args.rounds):
        for mode, workers in rates:
            rates[mode, workers].append(programs_per_second(problems, workers, MODES[mode]))
    rows = [{"mode": mode, "workers": workers, "programs": len(problems), "programs_per_s": statistics.median(r),
             "rounds": r} for (mode, workers), r in rates.items()]
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": [round(load_before, 2),
                                                                           round(os.getloadavg()[0], 2)]}
    print("| mode | workers | programs/s |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['workers']} | {row['programs_per_s']:.1f} |")
    print(f"{len(problems)} HumanEval programs, median of {args.rounds} rounds; {machine}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"rows": rows, "machine": machine}, indent=2))
    return rows


if __name__ == "__main__":
    run_command(main)
