"""Quantizing a run: `python -m model.quantize RUN --format int8|fp4 --out QRUN`.

Loads the full-precision run (or checkpoint), quantizes its attention and MLP projections (and,
with --quantize-head, the LM head) in memory (model/quantized.py) and writes the result as a new
run directory (checkpoints/, tokenizer.json) through model/io/checkpoint.py, which records the
format in state.json and loads the run quantized again; so chat, evaluation, serving and
generation take it as they take any run, and training --init refuses it (inference-only).
Also here: the --quantize flag's help and argparse type of the commands that quantize on loading.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tritongpt.kernels.quantization import FORMATS, check_format
from model.command import DEBUG_HELP, Parser, run_command
from model.io.checkpoint import load_model, load_tokenizer, quantized_as, resolve, write_derived
from model.io.files import atomic_write_dir, check_new_dir
from model.quantized import projection_bytes, quantize

QUANTIZE_HELP = ("quantize the attention and MLP projections on loading: int8 or fp4 (a run written by "
                 "python -m model.quantize is quantized already)")


def format_list(text: str) -> list[str | None]:
    """argparse type= of a comma-separated list of formats, "none" meaning full precision."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*FORMATS, "none")]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected formats among none, {', '.join(FORMATS)} (comma-separated), "
                                         f"got {text!r}")
    return [None if n == "none" else n for n in dict.fromkeys(names)]


def quantize_run(path: str | Path, fmt: str, out: str | Path, head: bool = False) -> tuple[Path, int, int]:
    """Write the run (or checkpoint) at path, quantized to fmt, as the run directory out; returns out
    and the quantized weights' bytes as stored and at bf16."""
    check_new_dir(out, "--out")
    check_format(fmt)
    ckpt = resolve(path)
    model, state = load_model(ckpt)
    already = quantized_as(state)
    if already:
        raise ValueError(f"{ckpt} is already quantized ({already}); quantize the full-precision run it was made from")
    tok = load_tokenizer(ckpt)
    quantize(model, fmt, head)
    written = atomic_write_dir(out, lambda staging: write_derived(staging, model, tok, "quantize", ckpt, state), "--out")
    return (written, *projection_bytes(model))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m model.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="run directory (its latest checkpoint) or checkpoint directory, full precision")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="int8: per-channel int8 weights (0.5x of bf16); fp4: E2M1 with an fp16 scale per 32 "
                             "inputs (0.28x)")
    parser.add_argument("--out", required=True, help="run directory to create (must not exist, or be empty)")
    parser.add_argument("--quantize-head", action="store_true",
                        help="quantize the LM head too (a tied head gets its own quantized copy of the embedding)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out, stored, bf16 = quantize_run(args.path, args.format, args.out, args.quantize_head)
    print(f"quantized {args.path} to {args.format} in {out}: weights {bf16 / 2**20:.2f} MiB at bf16 -> "
          f"{stored / 2**20:.2f} MiB ({stored / bf16:.3f}x); chat with it: python -m model.chat {out}")


if __name__ == "__main__":
    run_command(main)
