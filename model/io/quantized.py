"""Weight-only quantization of a trained GPT for inference: `python -m model.quantize RUN --format int8|fp4 --out QRUN`.

quantize(model, fmt) swaps every attention and MLP projection (and, with head=True, the LM head)
for a QuantizedLinear that holds the weight in int8 or fp4 (kernels/quantization.py) and runs
kernels.quantized_linear, which dequantizes inside the GEMM. The embedding and the norms stay in
full precision: a lookup reads one row per token and the norms are a few vectors. Decoding reads
every projection weight once per token, so its bytes fall to 0.5x (int8) or 0.28x (fp4) of bf16.

A quantized run directory is a run like any other (checkpoints/, tokenizer.json) whose
state.json names the format ({"quantization": {"format", "head"}}) and whose model.safetensors
holds `<layer>.qweight` and `<layer>.scales` in place of `<layer>.weight`. model.checkpoint.load_model
loads it directly, so chat, evaluation, serving and generation take it as they take any run.
A quantized model is inference-only: putting it in training mode (every training loop does) is
refused, and so is training --init from a quantized run.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.nn as nn

import kernels
from kernels import quantization
from model.command import DEBUG_HELP, run_command
from model.gpt import GPT

FORMATS = quantization.FORMATS
QUANTIZE_HELP = ("quantize the attention and MLP projections on loading: int8 or fp4 (a run written by "
                 "python -m model.quantize is quantized already)")


class QuantizedLinear(nn.Module):
    """A bias-free linear layer y = x @ W.T whose W (out_features, in_features) is stored quantized.

    qweight and scales are buffers (not parameters): nothing here trains.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, device=None):
        super().__init__()
        quantization.check_format(fmt)
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        (qshape, sshape), (qdtype, sdtype) = quantization.shapes(fmt, out_features, in_features), \
            quantization.storage_dtypes(fmt)
        self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.ones(sshape, dtype=sdtype, device=device))

    @classmethod
    def of(cls, weight: torch.Tensor, fmt: str) -> "QuantizedLinear":
        """The quantized layer of a (out_features, in_features) float weight."""
        layer = cls(weight.shape[1], weight.shape[0], fmt, device=weight.device)
        layer.qweight, layer.scales = quantization.quantize(weight, fmt)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.quantized_linear(x, self.qweight, self.scales, self.fmt)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out_features, in_features) weight in fp32, made on each access, for what
        needs the matrix itself (the loss of a quantized head fuses it with the cross-entropy)."""
        return quantization.dequantize(self.qweight, self.scales, self.fmt, self.in_features)

    def train(self, mode: bool = True) -> "QuantizedLinear":
        if mode:
            raise ValueError(f"this model is quantized ({self.fmt}), which is inference-only; train the "
                             f"full-precision run it was quantized from")
        return super().train(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def projections(model: GPT, head: bool) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every projection quantize() replaces, in model order."""
    found = [(module, name) for block in model.blocks for module, names in
             ((block.attn, ("qkv", "out")), (block.mlp, ("gate", "up", "out"))) for name in names]
    return found + [(model, "head")] if head else found


def quantized_format(model: nn.Module) -> dict | None:
    """{"format", "head"} of a quantized GPT, None for a full-precision one."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        return None
    return {"format": layers[0].fmt, "head": isinstance(getattr(model, "head", None), QuantizedLinear)}


def quantize(model: GPT, fmt: str, head: bool = False) -> GPT:
    """Replace model's projections (and the LM head when head) by QuantizedLinear in fmt, in place;
    returns the model, in eval mode. A tied head gets its own quantized copy of the embedding
    (the lookup keeps the full-precision rows)."""
    quantization.check_format(fmt)
    already = quantized_format(model)
    if already is not None:
        raise ValueError(f"the model is already quantized ({already['format']}); quantize the full-precision "
                         f"run instead")
    return _replace_projections(model, head, lambda weight: QuantizedLinear.of(weight.detach(), fmt))


def prepare(model: GPT, fmt: str, head: bool) -> GPT:
    """Give model the structure of a quantized one (layers of the right shapes, unfilled), ready for
    load_state_dict of a quantized checkpoint."""
    return _replace_projections(model, head, lambda weight: QuantizedLinear(weight.shape[1], weight.shape[0], fmt))


def _replace_projections(model: GPT, head: bool, make) -> GPT:
    """Each projection (and the head when head) replaced by make(its weight); a tied head's weight
    is the embedding's. Returns model, in eval mode."""
    model.eval()
    for parent, name in projections(model, head):
        layer = getattr(parent, name)
        setattr(parent, name, make(model.head_weight if layer is None else layer.weight))
    return model


def format_list(text: str) -> list[str | None]:
    """argparse type= of a comma-separated list of formats, "none" meaning full precision."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*FORMATS, "none")]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected formats among none, {', '.join(FORMATS)} (comma-separated), "
                                         f"got {text!r}")
    return [None if n == "none" else n for n in dict.fromkeys(names)]


def projection_bytes(model: GPT) -> tuple[int, int]:
    """(bytes as stored, bytes at bf16) of the projection weights, the LM head's too when it is
    quantized: qweight and scales of a quantized layer, 2 bytes a weight (bf16, the width decoding
    reads on a GPU) of a full-precision one."""
    stored = bf16 = 0
    for parent, name in projections(model, head=isinstance(model.head, QuantizedLinear)):
        layer = getattr(parent, name)
        weights = layer.in_features * layer.out_features
        bf16 += 2 * weights
        stored += (layer.qweight.numel() * layer.qweight.element_size() + layer.scales.numel()
                   * layer.scales.element_size()) if isinstance(layer, QuantizedLinear) else 2 * weights
    return stored, bf16


def quantize_run(path: str | Path, fmt: str, out: str | Path, head: bool = False) -> tuple[Path, int, int]:
    """Write the run (or checkpoint) at path, quantized to fmt, as the run directory out; returns out
    and the quantized weights' bytes as stored and at bf16."""
    from model.io.checkpoint import load_model, resolve, run_dir_of, write   # it loads quantized runs through us
    from model.io.files import atomic_write_dir, check_new_dir

    check_new_dir(out, "--out")
    quantization.check_format(fmt)
    ckpt = resolve(path)
    model, state = load_model(ckpt)
    if "quantization" in state:
        raise ValueError(f"{ckpt} is already quantized ({state['quantization']['format']}); quantize the "
                         f"full-precision run it was made from")
    tokenizer = run_dir_of(ckpt) / "tokenizer.json"
    if not tokenizer.is_file():
        raise ValueError(f"no tokenizer.json in {tokenizer.parent}; a quantized run needs the tokenizer of its source")
    quantize(model, fmt, head)

    def fill(staging: Path) -> None:
        write(staging, state.get("step", 0), model.state_dict(),
              {"tokens": state.get("tokens", 0), "job": "quantize", "source": str(ckpt.resolve()),
               "model_config": state["model_config"], "tokenizer": state.get("tokenizer"),
               "quantization": {"format": fmt, "head": head}})
        shutil.copyfile(tokenizer, staging / "tokenizer.json")

    return (atomic_write_dir(out, fill, "--out"), *projection_bytes(model))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.quantize", description=__doc__.split("\n\n")[0])
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
