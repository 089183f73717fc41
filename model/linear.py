"""The model's matrix products with its weights, and how decoding on the CPU makes them fast.

A decoding step multiplies a few rows (one per sequence) by every weight matrix, so it runs at
the speed the weights are read from memory. Two things decide that speed on the CPU, both
measured on the 2-core dev machine (AMD EPYC, fp32; bench/test_vs_transformers.py):

- Memory order. With one row, MKL reads a weight whose output index is contiguous ((in, out) in
  memory) at 17-22 GB/s, against 12-13 GB/s for nn.Linear's (out, in), when out >= in; for
  out < in (the MLP's down projection) (out, in) is the faster one, 18 against 14 GB/s. From 4
  rows on, and in training's GEMMs, (out, in) is as fast or faster. So the decoding order is
  for caches of at most DECODING_LAYOUT_SEQUENCES sequences; `lay_out` moves between the two
  without changing shapes, values or state_dict keys (only strides; writers call .contiguous()).
- Threads. MKL runs a product with a handful of rows on one thread, however many torch has:
  about 20 GB/s here, while two cores read about 30. `linear` splits the weight's output
  features into one slice per thread and multiplies the slices as one batch, which torch.bmm
  spreads over the threads: 1.4-1.8x the bandwidth at 2 threads, the same result.
Neither applies where gradients are needed, nor to more than FEW_ROWS rows (prefill, training),
nor off the CPU; the split not to weights under SPLIT_MIN elements (the tiny preset's).
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = 16         # up to this many rows a product is a stream over the weight, not a GEMM
SPLIT_MIN = 2**18     # elements; a smaller weight is read in microseconds, less than waking threads costs
DECODING_LAYOUT_SEQUENCES = 2   # caches of up to this many sequences get the decoding order (see above)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T -> (M, N), split over the CPU's threads when M is small."""
    if (x.dim() != 2 or x.shape[0] > FEW_ROWS or weight.numel() < SPLIT_MIN or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight)
    threads = torch.get_num_threads()
    N = weight.shape[0]
    if threads == 1 or N % threads:
        return F.linear(x, weight)
    M, K = x.shape
    rows, cols = weight.stride()
    slices = weight.as_strided((threads, N // threads, K), (N // threads * rows, rows, cols))   # (P, N/P, K)
    out = torch.bmm(x.expand(threads, M, K), slices.transpose(1, 2))                           # (P, M, N/P)
    return out.transpose(0, 1).reshape(M, N)


class Linear(nn.Linear):
    """A bias-free nn.Linear (same parameter, same state_dict) whose forward is `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def lay_out(model: nn.Module, for_decoding: bool) -> None:
    """Store each 2-D CPU weight of model with out >= in transposed in memory (for_decoding), or
    every weight contiguous (not for_decoding), in place of its .data. A model sharded by FSDP
    keeps its layout: FSDP owns its weights' storage (it gathers them into it for each forward)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")     # not imported: nothing is sharded (importing costs 0.5 s)
    if fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in model.modules()):
        return
    with torch.inference_mode(False), torch.no_grad():      # ordinary tensors, even inside generate()
        for w in model.parameters():
            if w.dim() != 2:
                continue
            if not for_decoding:
                w.data = w.data.contiguous()
            elif w.device.type == "cpu" and w.shape[0] >= w.shape[1]:
                w.data = w.data.t().contiguous().t()
