"""Data preparation on every core: throughput at 1 and 2 workers, and peak memory as the corpus grows.

    python -m bench.data_prep [--workers 1,2] [--repeats 2] [--scales 1,4,16] [--json FILE]

Method. Every measurement is one `python -m train.data --quiet --workers W` in its own process,
into a fresh directory, while a thread reads /proc every POLL seconds: the resident memory (VmRSS)
and the proportional set size (Pss, shared pages split between the processes that share them) of
the command and every process under it (the forkserver and the workers), summed; the peak of each
sum is reported, with the command's own peak RSS. The manifest gives the phases' seconds.
- throughput: the built-in corpus (--source), once per worker count, --repeats times, alternating;
  filter MB/s is the corpus's UTF-8 bytes over the filter phase (cleaning, quality filters,
  hashing, MinHash, dedup), encode MB/s the kept bytes over the encode phase (both splits), and
  the tokenizer's training (bounded by --tokenizer-sample-bytes, not by the corpus) is reported
  apart. Filter and encode MB per CPU second (the tree's user + system time in the phase, read
  from /proc) give the rate per core whatever else the machine runs;
- memory: corpora of 1x, 4x and 16x the built-in one (--scales), written into a directory of
  UTF-8 files: copy 0 is the corpus, copy k > 0 joins the first half (to a line break) of each
  document i with the second half of document i + k, so the copies share the corpus's words and
  sizes but are neither exact nor near duplicates of it or of each other (a third or less of
  their word 5-grams in common). The dedup index grows with the kept documents, as it must;
  everything else should not. Each phase's peak is given apart (the phases end one after the
  other at the process's exit, by the manifest's seconds).
Results go to stdout as markdown tables and, with --json, to a file, with the machine, its load
average before and after each run (2.0 is both cores of this 2-core machine busy) and the date.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.ceilings import cpu_model
from model.command import Parser, at_least, flag_type, run_command
from model.io.files import atomic_write_text
from train.data.sources import iter_documents

ROOT = Path(__file__).resolve().parents[1]
POLL = 0.05                 # seconds between two readings of /proc
MB = 1e6


def _proc_kb(path: str, field: str) -> int:
    """A "Field:  N kB" value of a /proc file, 0 when the process is gone or the field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(root: int) -> list[int]:
    """root and every process under it (children of children too), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TreeMonitor:
    """Polls a process tree's memory and CPU time in a thread until stopped."""

    def __init__(self, pid: int):
        self.pid, self.rss, self.pss, self.top_rss, self.processes = pid, 0, 0, 0, 0
        self.cpu: dict[int, float] = {}                     # each process's CPU seconds when last seen
        self.timeline: list[tuple[float, int, float]] = []  # (seconds since the start, tree RSS kB, tree CPU s)
        self._began = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(POLL):
            tree = process_tree(self.pid)
            self.processes = max(self.processes, len(tree))
            rss = sum(_proc_kb(f"/proc/{p}/status", "VmRSS") for p in tree)
            for p in tree:
                self.cpu[p] = _cpu_seconds(p) or self.cpu.get(p, 0.0)
            self.timeline.append((time.perf_counter() - self._began, rss, sum(self.cpu.values())))
            self.rss = max(self.rss, rss)
            self.pss = max(self.pss, sum(_proc_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in tree))
            self.top_rss = max(self.top_rss, _proc_kb(f"/proc/{self.pid}/status", "VmRSS"))

    def stop(self, phases: dict[str, float]) -> dict:
        """The peaks, and each phase's peak tree RSS and CPU seconds, given the phases' seconds: they run
        one after the other and the last ends at the process's exit (its startup falls before the first)."""
        self._stop.set()
        self._thread.join()
        end, rss, cpu = self.timeline[-1][0] if self.timeline else 0.0, {}, {}
        for name, seconds in reversed(phases.items()):
            window = [(kb, used) for t, kb, used in self.timeline if end - seconds <= t <= end]
            rss[name] = round(max((kb for kb, _ in window), default=0) / 1e3, 1)
            cpu[name] = round(window[-1][1] - window[0][1], 2) if window else 0.0
            end -= seconds
        return {"peak_rss_mb": round(self.rss / 1e3, 1), "peak_pss_mb": round(self.pss / 1e3, 1),
                "peak_rss_main_mb": round(self.top_rss / 1e3, 1), "processes": self.processes,
                "peak_rss_mb_by_phase": dict(reversed(rss.items())), "cpu_s_by_phase": dict(reversed(cpu.items()))}


def rate(nbytes: int, seconds: float) -> float | None:
    """MB per second, None for a phase too short to time (a tiny corpus)."""
    return round(nbytes / MB / seconds, 2) if seconds > 0 else None


def run_prepare(source: str, out: Path, workers: int, extra: list[str] = ()) -> dict:
    """One `python -m train.data` run -> its wall-clock, memory peaks, load average and manifest figures."""
    cmd = [sys.executable, "-m", "train.data", "--source", source, "--out", str(out), "--workers", str(workers),
           "--quiet", *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    monitor = TreeMonitor(proc.pid)
    _, err = proc.communicate()
    wall = time.perf_counter() - began
    if proc.returncode:
        monitor.stop({})
        raise RuntimeError(f"python -m train.data failed (exit status {proc.returncode}): {err.strip()[-500:]}")
    m = json.loads((out / "manifest.json").read_text())
    measured = monitor.stop(m["seconds"])
    kept = m["train"]["bytes"] + m["val"]["bytes"]
    seconds = m["seconds"]
    row = {"workers": workers, "wall_s": round(wall, 2), **{f"{k}_s": v for k, v in seconds.items()},
           "bytes_in": m["filters"]["bytes_in"], "docs_in": m["filters"]["docs_in"], "docs_kept": m["filters"]["kept"]["docs"],
           "bytes_kept": kept, "tokens": m["train"]["tokens"] + m["val"]["tokens"],
           "bytes_per_token": round(kept / (m["train"]["tokens"] + m["val"]["tokens"]), 3),
           "filter_mb_s": rate(m["filters"]["bytes_in"], seconds["filter"]),
           "encode_mb_s": rate(kept, seconds["encode"]),
           "filter_mb_per_cpu_s": rate(m["filters"]["bytes_in"], measured["cpu_s_by_phase"]["filter"]),
           "encode_mb_per_cpu_s": rate(kept, measured["cpu_s_by_phase"]["encode"]),
           "dedup_index_mb": round(m["dedup_index_bytes"] / MB, 2), **measured,
           "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(row), flush=True)
    return row


def halves(text: str) -> tuple[str, str]:
    """The text cut at the line break nearest its middle (at the middle when it has none)."""
    middle = len(text) // 2
    cut = text.rfind("\n", 0, middle) + 1 or middle
    return text[:cut], text[cut:]


def write_scaled_corpus(source: str, scale: int, root: Path) -> Path:
    """scale copies of the source's documents as UTF-8 .txt files: copy 0 as they are, copy k the
    first half of document i joined to the second half of document i + k."""
    split = [halves(text) for _, text in iter_documents(source)]
    for k in range(scale):
        for i, (first, _) in enumerate(split):
            path = root / f"copy{k:02d}" / f"{i // 1000:03d}" / f"doc{i:06d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(first + split[(i + k) % len(split)][1], encoding="utf-8", errors="surrogatepass")
    return root


def throughput_table(rows: list[dict]) -> str:
    lines = ["| workers | filter MB/s | encode MB/s | filter MB/CPU-s | encode MB/CPU-s | tokenizer s | wall s "
             "| load before, after |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['filter_mb_s']} | {r['encode_mb_s']} | {r['filter_mb_per_cpu_s']} | "
                     f"{r['encode_mb_per_cpu_s']} | {r['tokenizer_s']} | {r['wall_s']} | "
                     f"{r['load_average'][0]}, {r['load_average'][1]} |")
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    lines = ["| scale | MB in | docs kept | dedup index MB | peak RSS MB (all) | peak PSS MB (all) | peak RSS MB (main) "
             "| peak RSS MB: filter, tokenizer, encode |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        phases = ", ".join(str(v) for v in r["peak_rss_mb_by_phase"].values())
        lines.append(f"| {r['scale']}x | {r['bytes_in'] / MB:.0f} | {r['docs_kept']:,} | {r['dedup_index_mb']} | "
                     f"{r['peak_rss_mb']} | {r['peak_pss_mb']} | {r['peak_rss_main_mb']} | {phases} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = Parser(prog="python -m bench.data_prep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="stdlib", help="corpus of the throughput runs and of the scaled "
                                                           "copies (default: stdlib)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts of the throughput runs; "
                                                         "empty for none")
    parser.add_argument("--repeats", type=flag_type(int, at_least(1)), default=2,
                        help="throughput runs per worker count, alternating (default: 2)")
    parser.add_argument("--scales", default="1,4,16", help="comma-separated corpus scales of the memory runs; "
                                                           "empty for none")
    parser.add_argument("--memory-workers", type=flag_type(int, at_least(1)), default=2,
                        help="workers of the memory runs (default: 2)")
    parser.add_argument("--vocab-size", type=flag_type(int, at_least(260)), default=4096,
                        help="tokenizer vocabulary of every run (default: 4096, train.data's)")
    parser.add_argument("--work-dir", default=None, help="where the corpora and datasets are written (default: a "
                                                         "temporary directory, removed at the end)")
    parser.add_argument("--json", help="write the results (and the machine) to this JSON file")
    parser.add_argument("--note", default="", help="a remark kept in the JSON, e.g. what else ran on the machine")
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="data-prep-"))
    extra = ["--vocab-size", str(args.vocab_size)]
    try:
        throughput = []
        for repeat in range(args.repeats):
            for workers in [int(w) for w in args.workers.split(",") if w]:
                out = work / f"throughput-w{workers}-r{repeat}"
                throughput.append({"repeat": repeat, **run_prepare(args.source, out, workers, extra)})
                shutil.rmtree(out)
        memory = []
        for scale in [int(s) for s in args.scales.split(",") if s]:
            corpus = write_scaled_corpus(args.source, scale, work / f"corpus-{scale}x")
            out = work / f"memory-{scale}x"
            memory.append({"scale": scale, **run_prepare(str(corpus), out, args.memory_workers, extra)})
            shutil.rmtree(out)
            shutil.rmtree(corpus)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "note": args.note}
    print(throughput_table(throughput))
    if memory:
        print(memory_table(memory))
    results = {"machine": machine,
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "work_dir", "note")},
               "throughput": throughput, "memory": memory}
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    run_command(main)
