"""Peak memory of a post-training step, chunked against unfused, on the CPU.

    python -m bench.posttrain_memory [--vocab 32768 131072] [--out FILE]

Two steps, each a forward, its loss and the backward of a GPT (--layers, --hidden; every position
of every row a target, so the chunked path's CPU shortcut for ignored rows never applies):
- dpo: --rows sequences of --seq tokens, the first half chosen responses and the second half
  rejected ones; each sequence's summed log-prob -> the DPO loss (train/preference.py) against
  fixed reference log-probs (the stage caches them, so they are no part of its step);
- grpo: --rows sampled completions, groups of --group, with seeded 0/1 rewards -> group-relative
  advantages and the clipped policy-gradient loss with its KL penalty (train/grpo.py) on every
  token's log-prob.
Each has two paths to its log-probs: chunked, the stages' own (model(x, targets=y,
reduction="none"), kernels.linear_cross_entropy, so the (tokens x vocabulary) logits never exist),
and unfused (the full logits -> log_softmax -> gather). Every (step, path, vocabulary) runs in a
fresh subprocess, which reports the step's peak memory: its peak resident set size (getrusage's
ru_maxrss) at the end of the step minus that peak just before it, when the model, its inputs and
the rest already exist, so the figure is what the step adds (activations, logits, gradients), and
its seconds and loss (the two paths' losses agree, which the test checks). The report gives the
chunked/unfused ratio of each step and vocabulary, written as JSON (--out) and a markdown table.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from bench.ceilings import cpu_model
from model import GPT, ModelConfig
from model.command import Parser, at_least, flag_type
from model.io.files import atomic_write_text
from train import preference
from train.dpo import sequence_logps
from train.grpo import group_advantages, policy_loss, reply_logps

ROOT = Path(__file__).resolve().parents[1]
STEPS, PATHS = ("dpo", "grpo"), ("chunked", "unfused")
SHAPE = ("rows", "seq", "hidden", "layers", "heads", "kv_heads", "group")
BAR = 0.5                  # the chunked step's peak at the largest vocabulary, at most this times the unfused one's


def token_logps(model: GPT, x: torch.Tensor, y: torch.Tensor, path: str, step: str) -> torch.Tensor:
    """The log-prob of every target: per sequence summed (dpo, (R,)), or per token (grpo, (R * T,))."""
    if path == "chunked":
        batch = {"x": x, "y": y, "segment": torch.arange(len(x))[:, None].expand_as(x)}
        return sequence_logps(model, batch, len(x)) if step == "dpo" else reply_logps(model, batch)
    logps = model(x).float().log_softmax(-1).gather(-1, y[..., None])[..., 0]        # (R, T): the full logits
    return logps.sum(-1) if step == "dpo" else logps.flatten()


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(step: str, path: str, vocab: int, shape: dict) -> dict:
    """One step in this process: -> peak bytes the step added, seconds, loss."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab, block_size=shape["seq"], n_layer=shape["layers"], n_head=shape["heads"],
                            n_kv_head=shape["kv_heads"], n_embd=shape["hidden"]))
    g = torch.Generator().manual_seed(1)
    R, T = shape["rows"], shape["seq"]
    x, y = torch.randint(0, vocab, (R, T), generator=g), torch.randint(0, vocab, (R, T), generator=g)
    ref = -T * torch.rand(R, generator=g) * 10                                    # dpo: cached reference log-probs
    rewards = torch.randint(0, 2, (R // shape["group"], shape["group"]), generator=g).float()     # grpo: (P, G)
    kl_noise = 0.01 * torch.randn(R * T, generator=g)
    gc.collect()
    before, began = peak_rss(), time.perf_counter()
    logps = token_logps(model, x, y, path, step)
    if step == "dpo":
        chosen, rejected = logps.view(2, R // 2)
        loss = preference.dpo(chosen, rejected, *ref.view(2, R // 2), beta=0.1)[0].mean()
    else:
        advantages = group_advantages(rewards).flatten().repeat_interleave(T)       # (R * T,): each token's reply's
        loss = policy_loss(logps, logps.detach(), logps.detach() + kl_noise, advantages, clip=0.2, beta=0.04)[0]
    loss.backward()
    seconds = time.perf_counter() - began
    return {"step": step, "path": path, "vocab": vocab, "peak_mib": (peak_rss() - before) / 2**20,
            "baseline_mib": before / 2**20, "seconds": round(seconds, 2), "loss": loss.item()}


def in_subprocess(step: str, path: str, vocab: int, shape: dict) -> dict:
    """measure() in a fresh Python process, so no earlier step's peak hides this one's."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
    cmd = [sys.executable, "-m", "bench.posttrain_memory", "--worker", f"{step}:{path}:{vocab}", *flags]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                          capture_output=True)
    if done.returncode:
        raise RuntimeError(f"{step} {path} at V={vocab} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def table(report: dict) -> str:
    rows = ["| step | vocab | chunked peak MiB | unfused peak MiB | chunked / unfused | chunked s | unfused s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["ratios"]:
        c, u = (next(x for x in report["results"] if (x["step"], x["path"], x["vocab"]) == (r["step"], p, r["vocab"]))
                for p in PATHS)
        rows.append(f"| {r['step']} | {r['vocab']:,} | {c['peak_mib']:.0f} | {u['peak_mib']:.0f} | "
                    f"{'-' if r['ratio'] is None else format(r['ratio'], '.3f')} | {c['seconds']:.1f} | "
                    f"{u['seconds']:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    positive = flag_type(int, at_least(1))
    parser = Parser(prog="python -m bench.posttrain_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=positive, nargs="+", default=[32768, 131072], help="vocabulary sizes")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="which steps to measure")
    parser.add_argument("--rows", type=positive, default=8, help="sequences per step (dpo: half chosen, half "
                                                                 "rejected; grpo: completions)")
    parser.add_argument("--seq", type=positive, default=512, help="tokens per sequence")
    parser.add_argument("--hidden", type=positive, default=768, help="the model's width")
    parser.add_argument("--layers", type=positive, default=4, help="the model's transformer blocks")
    parser.add_argument("--heads", type=positive, default=12, help="query heads")
    parser.add_argument("--kv-heads", type=positive, default=4, help="key/value heads")
    parser.add_argument("--group", type=positive, default=4, help="grpo: completions per prompt (divides --rows)")
    parser.add_argument("--out", default="", help="write the report as JSON to this file")
    parser.add_argument("--worker", default="", help="internal: run one STEP:PATH:VOCAB measurement in this "
                                                     "process and print it as JSON")
    args = parser.parse_args(argv)
    shape = {k: getattr(args, k) for k in SHAPE}
    if args.rows % 2 or args.rows % args.group:
        parser.error(f"--rows {args.rows} must be even (dpo's pairs) and a multiple of --group {args.group}")
    if args.worker:
        step, path, vocab = args.worker.split(":")
        print(json.dumps(measure(step, path, int(vocab), shape)))
        return {}
    load_before = os.getloadavg()[0]
    results = [in_subprocess(step, path, vocab, shape) for step in args.steps for vocab in args.vocab
               for path in PATHS]
    peaks = {(r["step"], r["path"], r["vocab"]): r["peak_mib"] for r in results}
    # A step too small to raise the peak that importing torch left gives 0: no ratio then.
    ratios = [{"step": s, "vocab": v, "ratio": peaks[s, "chunked", v] / peaks[s, "unfused", v]
               if peaks[s, "unfused", v] > 0 else None} for s in args.steps for v in args.vocab]
    largest = max(args.vocab)
    report = {
        "command": "python -m bench.posttrain_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "shape": shape, "results": results, "ratios": ratios,
        "bar": {"vocab": largest, "at_most": BAR,
                "met": all(r["ratio"] is not None and r["ratio"] <= BAR for r in ratios if r["vocab"] == largest)},
    }
    print(table(report))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
