"""Weight-only quantization of a GPT in memory, for inference.

quantize(model, fmt) swaps every attention and MLP projection (and, with head=True, the LM head)
for a QuantizedLinear that holds the weight in int8 or fp4 (kernels/quantization.py) and runs
kernels.quantized_linear, which dequantizes inside the GEMM. The embedding and the norms stay in
full precision: a lookup reads one row per token and the norms are a few vectors. Decoding reads
every projection weight once per token, so its bytes fall to 0.5x (int8) or 0.28x (fp4) of bf16.

A quantized model is inference-only: putting it in training mode (every training loop does) is
refused. Saving and loading quantized runs is model/io/checkpoint.py's; the command that writes
one is model/io/quantized.py.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from tritongpt import kernels
from tritongpt.kernels import quantization
from model.gpt import GPT


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


def _replace_projections(model: GPT, head: bool, make: Callable[[torch.Tensor], QuantizedLinear]) -> GPT:
    """Each projection (and the head when head) replaced by make(its weight); a tied head's weight
    is the embedding's. Returns model, in eval mode."""
    model.eval()
    for parent, name in projections(model, head):
        layer = getattr(parent, name)
        setattr(parent, name, make(model.head_weight if layer is None else layer.weight))
    return model


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
