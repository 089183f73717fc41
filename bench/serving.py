"""What continuous batching buys: aggregate tokens/s of python -m model.serve with 1, 4 and 16 concurrent
clients, batched (--max-batch 16) against one request at a time (--max-batch 1).

    python -m bench.serving [--presets tiny,small] [--clients 1,4,16] [--json FILE] [--md FILE]

Method. For each preset, a run directory with freshly initialised weights (the speed of a forward
does not depend on what the weights learned) and a byte-level BPE trained on a slice of the
standard library, served by `python -m model.serve` in its own process, once per --max-batch.
Each of C client threads sends --requests completions one after another over HTTP (distinct
prompts of about 20 tokens, sampled at temperature 1 with a seed, --max-tokens each); the
aggregate is the completion tokens of every reply (their usage counts) over the wall time from
the first request to the last reply. One warm-up request runs first. Results go to stdout as a
markdown table and, with --json / --md, to files, with the machine and its load average.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import httpx
import torch

from bench.ceilings import cpu_model
from model import GPT, ModelConfig
from model.io.checkpoint import write
from model.command import Parser, run_command
from model.io.files import atomic_write_text
from model.serve.api import listen
from model.tokenizer import Tokenizer

VOCAB = {"tiny": 4096, "small": 8192}          # as bench/test_vs_transformers.py
ROOT = Path(__file__).resolve().parents[1]


def make_run(preset: str, out: Path) -> Path:
    """A run directory with a fresh `preset` model and a BPE of VOCAB[preset] tokens."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    tok = Tokenizer.train([f.read_text(errors="replace") for f in files], VOCAB[preset])
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset(preset, vocab_size=tok.n_vocab))
    write(out, 0, model.state_dict(), {"tokens": 0, "job": "bench", "model_config": model.cfg.to_dict(),
                                       "tokenizer": tok.fingerprint})
    tok.save(out / "tokenizer.json")
    return out


@contextlib.contextmanager
def server(run: Path, max_batch: int) -> Iterator[str]:
    """`python -m model.serve run --max-batch max_batch` on a free loopback port -> its URL."""
    with listen("127.0.0.1", 0) as free:
        port = free.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "model.serve", str(run), "--port", str(port),
                             "--max-batch", str(max_batch), "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"model.serve {run} did not start (exit status {proc.poll()})")
            try:
                httpx.get(url + "/health", trust_env=False)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def measure(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """clients threads each sending `requests` completions in turn -> tokens, seconds, tokens/s."""
    http = httpx.Client(base_url=url, timeout=600, trust_env=False)

    def complete(i: int) -> int:
        body = {"prompt": f"def function_{i}(value, other):\n    # {i} times the value", "max_tokens": max_tokens,
                "temperature": 1.0, "seed": i}
        response = http.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    def client(c: int) -> int:
        return sum(complete(c * requests + r) for r in range(requests))

    complete(-1)                                             # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    seconds = time.perf_counter() - start
    http.close()
    return {"clients": clients, "requests": clients * requests, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1)}


def table(rows: list[dict]) -> str:
    """Markdown: per preset and client count, batched and one-at-a-time tokens/s and their ratio."""
    lines = ["| preset | clients | one at a time (tokens/s) | batched (tokens/s) | speedup |", "|---|---|---|---|---|"]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for clients in dict.fromkeys(r["clients"] for r in rows if r["preset"] == preset):
            by = {r["max_batch"] > 1: r["tokens_per_s"] for r in rows if (r["preset"], r["clients"]) == (preset, clients)}
            lines.append(f"| {preset} | {clients} | {by[False]:.0f} | {by[True]:.0f} | {by[True] / by[False]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small", help="comma-separated model presets")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    parser.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", default="tiny=64,small=32", help="completion length per preset")
    parser.add_argument("--json", help="write the results (and the machine) to this JSON file")
    parser.add_argument("--md", help="write the markdown table to this file")
    args = parser.parse_args(argv)
    lengths = dict(item.split("=") for item in args.max_tokens.split(","))
    rows, load_before = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            run = make_run(preset, Path(tmp) / preset)
            for max_batch in (1, args.max_batch):
                with server(run, max_batch) as url:
                    for clients in map(int, args.clients.split(",")):
                        row = {"preset": preset, "max_batch": max_batch,
                               **measure(url, clients, args.requests, int(lengths[preset]))}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
               # what else ran: the 1-minute load average before and after (2.0 is both cores busy)
               "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "md")} | {"vocab": VOCAB}
    print(table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps({"machine": machine, "settings": settings, "rows": rows}, indent=2) + "\n")
    if args.md:
        atomic_write_text(args.md, table(rows) + "\n")


if __name__ == "__main__":
    run_command(main)
