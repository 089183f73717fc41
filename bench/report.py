"""Markdown table of pytest-benchmark JSON files written by the bench/ suites.

    python -m bench.report RESULTS.json [MORE.json ...] [--ceilings ENV.json] [--json MERGED.json] [-o FILE.md]

Rows are grouped by (op, pass, shape, dtype), the labels bench/conftest.measure stores in each
benchmark's extra_info. Each group becomes one table row with, per backend, the median time and
the derived figures (GB/s, TFLOP/s, tokens/s, MFU; peak MiB in its own column when measured), then
the speed-up of triton over torch eager and over torch.compile, and, when the files hold such rows,
over the fastest SDPA row (sdpa_flash, sdpa_cudnn: SDPA pinned to a backend; sdpa_mask: SDPA with an
explicit mask), over FlexAttention (flex) and over Liger-Kernel. Several
files are read as one (the first one's metadata heads the report; --json writes them merged).
With --ceilings (bench/ceilings.py's JSON) each GB/s figure also shows its fraction of the
measured copy bandwidth and each TFLOP/s figure its fraction of the measured bf16 matmul rate.
Standard library only, so the report runs anywhere the JSON is, without torch.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from model.command import Parser
from model.io.files import atomic_write_text

# Backends in column order; any other backend name found in a file follows, alphabetically.
BACKEND_ORDER = ("triton", "torch", "compile", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_mask", "flex", "liger")
# Derived figures the benchmarks put in extra_info, in display order.
FIGURES = ("TFLOP/s", "GB/s", "tokens/s", "MFU")
# Speed-up columns: triton against these backends; the optional ones only when a file has them.
BASELINES = {"torch": "torch eager", "compile": "torch.compile"}
OPTIONAL_BASELINES = {"sdpa*": "best SDPA", "flex": "FlexAttention", "liger": "Liger"}
LABELS = ("op", "pass_", "shape", "dtype", "backend")
# The ceilings bench/ceilings.py measures, by their keys in its JSON.
COPY_KEY, MATMUL_KEY = "copy_GB/s", "matmul_bf16_TFLOP/s"


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
    mfu_peak: str | None = None     # "measured" or "nominal": the peak the MFU figure is against

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


def _not_benchmark_json(path: str | Path, reason: str) -> ReportError:
    return ReportError(f"{path} is not a pytest-benchmark JSON file ({reason}); write one with "
                       "`pytest bench --benchmark-only --benchmark-json RESULTS.json`")


def _read_json(path: str | Path) -> object:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _not_benchmark_json(path, f"not JSON: {e}") from e


def load(path: str | Path) -> Results:
    """Read a pytest-benchmark JSON file; ReportError says why when it is not one."""
    return _parse(_read_json(path), path)


def merge(paths: list[str | Path]) -> dict:
    """One pytest-benchmark document with the benchmarks of every file in order and the first
    file's metadata; each file is checked first, so an error names the file at fault."""
    docs = [_read_json(path) for path in paths]
    for doc, path in zip(docs, paths):
        _parse(doc, path)
    return {**docs[0], "benchmarks": [bench for doc in docs for bench in doc["benchmarks"]]}


def load_ceilings(path: str | Path) -> dict:
    """The measured ceilings (and the GPU's name) from bench/ceilings.py's JSON file."""
    doc = _read_json(path)
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), (int, float)) for k in (COPY_KEY, MATMUL_KEY)):
        raise ReportError(f"{path} holds no {COPY_KEY} and {MATMUL_KEY}; "
                          f"write it with `python -m bench.ceilings {path}`")
    return doc


def _parse(doc: object, path: str | Path) -> Results:
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise _not_benchmark_json(path, "no 'benchmarks' list at the top level")

    measurements, unlabelled = [], []
    for i, bench in enumerate(doc["benchmarks"]):
        if not isinstance(bench, dict) or not isinstance(bench.get("stats"), dict) or "median" not in bench["stats"]:
            raise _not_benchmark_json(path, f"benchmark {i} has no stats.median")
        name = bench.get("fullname") or bench.get("name") or f"benchmark {i}"
        info = bench.get("extra_info") or {}
        if not all(isinstance(info.get(key), str) for key in LABELS):
            unlabelled.append(name)
            continue
        measurements.append(Measurement(
            *(info[key] for key in LABELS), device=str(info.get("device", "unknown")),
            median_ms=float(bench["stats"]["median"]) * 1e3,
            figures={key: float(info[key]) for key in FIGURES if info.get(key) is not None},
            peak_mib=None if info.get("peak_MiB") is None else float(info["peak_MiB"]),
            mfu_peak=info.get("MFU_peak") if isinstance(info.get("MFU_peak"), str) else None))
    meta = {"version": doc.get("version"), "datetime": doc.get("datetime"), "commit": doc.get("commit_info") or {}}
    return Results(measurements, unlabelled, meta)


def _number(x: float) -> str:
    """Three significant digits (trailing zeros kept so columns read alike), whole numbers from 100."""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:#.3g}"


def _figures(m: Measurement, ceilings: dict | None = None) -> str:
    """The derived figures; with ceilings, rates as fractions of the measured copy and matmul."""
    ceiling = {"GB/s": ("copy", COPY_KEY), "TFLOP/s": ("matmul", MATMUL_KEY)}
    parts = []
    for name, value in m.figures.items():
        if name == "MFU":
            parts.append(f"{value:.1%} MFU" + (f" ({m.mfu_peak} peak)" if m.mfu_peak else ""))
            continue
        text = f"{_number(value)} {name}"
        if ceilings and name in ceiling:
            label, key = ceiling[name]
            text += f" ({value / ceilings[key]:.0%} of {label})"
        parts.append(text)
    return ", ".join(parts)


def _speedups(by_backend: dict[str, Measurement], baselines: list[str]) -> list[str]:
    """Cells 'X / triton' (times) per baseline; "sdpa*" is the fastest backend named sdpa*."""
    triton = by_backend.get("triton")
    cells = []
    for baseline in baselines:
        if baseline.endswith("*"):
            times = [m.median_ms for b, m in by_backend.items() if b.startswith(baseline[:-1])]
            other = min(times) if times else None
        else:
            other = by_backend[baseline].median_ms if baseline in by_backend else None
        cells.append(f"{other / triton.median_ms:.2f}x" if triton and other else "")
    return cells


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(results: Results, source: str = "", ceilings: dict | None = None) -> str:
    """The markdown report: a header naming the device(s) (and the ceilings), then one table row per group."""
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
    if ceilings:
        gpu = f" ({ceilings['gpu']})" if ceilings.get("gpu") else ""
        lines += [f"Measured ceilings{gpu}: copy {_number(ceilings[COPY_KEY])} GB/s, "
                  f"bf16 matmul {_number(ceilings[MATMUL_KEY])} TFLOP/s", ""]
    baselines = list(BASELINES) + [b for b in OPTIONAL_BASELINES
                                   if any(f == b or (b.endswith("*") and f.startswith(b[:-1])) for f in found)]
    labels = {**BASELINES, **OPTIONAL_BASELINES}

    if not groups:
        lines.append("No labelled benchmarks in this file.")
    else:
        header = ["op", "pass", "shape", "dtype"]
        for b in backends:
            header += [f"{b} ms"] + [f"{b} rate"] * (b in with_rate) + [f"{b} peak MiB"] * (b in with_peak)
        header += [f"triton vs {labels[b]}" for b in baselines]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (op, pass_, shape, dtype), by_backend in groups.items():
            row = [op, pass_, shape, dtype]
            for b in backends:
                m = by_backend.get(b)
                row.append(_number(m.median_ms) if m else "")
                if b in with_rate:
                    row.append(_figures(m, ceilings) if m else "")
                if b in with_peak:
                    row.append(_number(m.peak_mib) if m and m.peak_mib is not None else "")
            row += _speedups(by_backend, baselines)
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        lines += ["", "Times are medians in ms. 'triton vs X' is X's time / triton's time: above 1 means triton is faster."]
    if duplicates:
        lines.append(f"Note: {duplicates} measurement(s) repeated a group and backend; the last one is shown.")
    if results.unlabelled:
        lines.append(f"Skipped {len(results.unlabelled)} benchmark(s) without bench/conftest.measure labels: "
                     + ", ".join(results.unlabelled))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON file(s) from pytest --benchmark-json, read as one")
    parser.add_argument("--ceilings", help="bench/ceilings.py's JSON: show rates as fractions of the measured ceilings")
    parser.add_argument("--json", help="also write the merged pytest-benchmark JSON of all inputs to this file")
    parser.add_argument("--output", "-o", help="also write the markdown to this file")
    args = parser.parse_args(argv)
    try:
        doc = merge(args.results)
        ceilings = load_ceilings(args.ceilings) if args.ceilings else None
        report = render(_parse(doc, args.results[0]), source=", ".join(Path(p).name for p in args.results),
                        ceilings=ceilings)
    except ReportError as e:
        parser.error(str(e))
    sys.stdout.write(report)
    if args.json:
        atomic_write_text(args.json, json.dumps(doc, indent=2) + "\n")
    if args.output:
        atomic_write_text(args.output, report)


if __name__ == "__main__":
    main()
