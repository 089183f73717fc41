"""Markdown table of a pytest-benchmark JSON file written by the bench/ suites.

    python -m bench.report RESULTS.json [--output FILE.md]

Rows are grouped by (op, pass, shape, dtype), the labels bench/conftest.measure stores in each
benchmark's extra_info. Each group becomes one table row with, per backend, the median time and
the derived figures (GB/s, TFLOP/s, tokens/s, MFU; peak MiB in its own column when measured), then
the speed-up of triton over torch eager and over torch.compile. Standard library only, so the
report runs anywhere the JSON is, without torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from model.files import atomic_write_text

# Backends in column order; any other backend name found in a file follows, alphabetically.
BACKEND_ORDER = ("triton", "torch", "compile", "sdpa")
# Derived figures the benchmarks put in extra_info, in display order.
FIGURES = ("TFLOP/s", "GB/s", "tokens/s", "MFU")
# Speed-up columns: triton against these backends.
BASELINES = {"torch": "torch eager", "compile": "torch.compile"}
LABELS = ("op", "pass_", "shape", "dtype", "backend")


class ReportError(ValueError):
    """The input is not a pytest-benchmark JSON file this report can read."""


@dataclass(frozen=True)
class Measurement:
    """One benchmark: its labels, median time and derived figures."""
    op: str
    pass_: str
    shape: str
    dtype: str
    backend: str
    device: str
    median_ms: float
    figures: dict[str, float] = field(default_factory=dict)
    peak_mib: float | None = None

    @property
    def group(self) -> tuple[str, str, str, str]:
        return self.op, self.pass_, self.shape, self.dtype


@dataclass
class Results:
    """A loaded file: the measurements, the names of benchmarks without measure() labels, and the
    run's metadata (pytest-benchmark version, date, commit)."""
    measurements: list[Measurement]
    unlabelled: list[str]
    meta: dict


def load(path: str | Path) -> Results:
    """Read a pytest-benchmark JSON file; ReportError says why when it is not one."""
    def not_benchmark_json(reason: str) -> ReportError:
        return ReportError(f"{path} is not a pytest-benchmark JSON file ({reason}); write one with "
                           "`pytest bench --benchmark-only --benchmark-json RESULTS.json`")

    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise not_benchmark_json(f"not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise not_benchmark_json("no 'benchmarks' list at the top level")

    measurements, unlabelled = [], []
    for i, bench in enumerate(doc["benchmarks"]):
        if not isinstance(bench, dict) or not isinstance(bench.get("stats"), dict) or "median" not in bench["stats"]:
            raise not_benchmark_json(f"benchmark {i} has no stats.median")
        name = bench.get("fullname") or bench.get("name") or f"benchmark {i}"
        info = bench.get("extra_info") or {}
        if not all(isinstance(info.get(key), str) for key in LABELS):
            unlabelled.append(name)
            continue
        measurements.append(Measurement(
            *(info[key] for key in LABELS), device=str(info.get("device", "unknown")),
            median_ms=float(bench["stats"]["median"]) * 1e3,
            figures={key: float(info[key]) for key in FIGURES if info.get(key) is not None},
            peak_mib=None if info.get("peak_MiB") is None else float(info["peak_MiB"])))
    meta = {"version": doc.get("version"), "datetime": doc.get("datetime"), "commit": doc.get("commit_info") or {}}
    return Results(measurements, unlabelled, meta)


def _number(x: float) -> str:
    """Three significant digits (trailing zeros kept so columns read alike), whole numbers from 100."""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:#.3g}"


def _figures(m: Measurement) -> str:
    return ", ".join(f"{value:.1%} MFU" if name == "MFU" else f"{_number(value)} {name}"
                     for name, value in m.figures.items())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(results: Results, source: str = "") -> str:
    """The markdown report: a header naming the device(s), then one table row per group."""
    groups: dict[tuple[str, str, str, str], dict[str, Measurement]] = {}
    duplicates = 0
    for m in results.measurements:  # file order, which is the suites' collection order
        duplicates += m.backend in groups.setdefault(m.group, {})
        groups[m.group][m.backend] = m

    found = {m.backend for m in results.measurements}
    backends = [b for b in BACKEND_ORDER if b in found] + sorted(found - set(BACKEND_ORDER))
    # A backend gets a rate or peak column only when some measurement of it has one.
    with_rate = {m.backend for m in results.measurements if m.figures}
    with_peak = {m.backend for m in results.measurements if m.peak_mib is not None}

    devices = sorted({m.device for m in results.measurements}) or ["none"]
    meta, commit = results.meta, results.meta["commit"]
    facts = [f"Device{'s' if len(devices) > 1 else ''}: {', '.join(devices)}"]
    if meta.get("datetime"):
        facts.append(f"run {meta['datetime']}")
    if commit.get("id"):
        facts.append(f"commit {commit['id'][:10]}{' (dirty)' if commit.get('dirty') else ''}")
    if meta.get("version"):
        facts.append(f"pytest-benchmark {meta['version']}")
    lines = [f"# Benchmark report{f' ({source})' if source else ''}", "", " · ".join(facts), ""]

    if not groups:
        lines.append("No labelled benchmarks in this file.")
    else:
        header = ["op", "pass", "shape", "dtype"]
        for b in backends:
            header += [f"{b} ms"] + [f"{b} rate"] * (b in with_rate) + [f"{b} peak MiB"] * (b in with_peak)
        header += [f"triton vs {label}" for label in BASELINES.values()]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (op, pass_, shape, dtype), by_backend in groups.items():
            row = [op, pass_, shape, dtype]
            for b in backends:
                m = by_backend.get(b)
                row.append(_number(m.median_ms) if m else "")
                if b in with_rate:
                    row.append(_figures(m) if m else "")
                if b in with_peak:
                    row.append(_number(m.peak_mib) if m and m.peak_mib is not None else "")
            triton = by_backend.get("triton")
            for baseline in BASELINES:
                other = by_backend.get(baseline)
                row.append(f"{other.median_ms / triton.median_ms:.2f}x" if triton and other else "")
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        lines += ["", "Times are medians in ms. 'triton vs X' is X's time / triton's time: above 1 means triton is faster."]
    if duplicates:
        lines.append(f"Note: {duplicates} measurement(s) repeated a group and backend; the last one is shown.")
    if results.unlabelled:
        lines.append(f"Skipped {len(results.unlabelled)} benchmark(s) without bench/conftest.measure labels: "
                     + ", ".join(results.unlabelled))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="JSON file from pytest --benchmark-json")
    parser.add_argument("--output", "-o", help="also write the markdown to this file")
    args = parser.parse_args(argv)
    try:
        report = render(load(args.results), source=Path(args.results).name)
    except ReportError as e:
        parser.error(str(e))
    sys.stdout.write(report)
    if args.output:
        atomic_write_text(args.output, report)


if __name__ == "__main__":
    main()
