"""SwiGLU, out = silu(gate) * up, in Triton: forward and backward, one elementwise pass each.

With s = sigmoid(g), silu(g) = g * s and silu'(g) = s * (1 + g * (1 - s)):

    forward:   out = g * s * u
    backward:  dg  = dout * u * s * (1 + g * (1 - s)),   du = dout * g * s

Everything is computed in fp32 and rounded once to the input dtype. The backward recomputes s from
the saved gate instead of storing silu(g), so the forward moves 3 * N elements (read g and u,
write out) and the backward 5 * N (read dout, g, u; write dg and du), each exactly once: the ops
are purely bandwidth-bound, so the kernels are flat 1-D sweeps over the contiguous inputs with
16-byte vector accesses, one BLOCK of elements per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritongpt.kernels.launching import Gpu, Launch, gpu_of, run

# Elements per program; with NUM_WARPS warps each thread handles 8 (16 bytes of bf16).
BLOCK = 1024
NUM_WARPS = 4


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _swiglu_fwd_kernel(G, U, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)         # (BLOCK,)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (g * tl.sigmoid(g) * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, G, U, DG, DU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)         # (BLOCK,)
    mask = offs < N
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DG + offs, (dout * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dout * g * s).to(DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def plan_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, gpu: Gpu) -> list[Launch]:
    """The launch writing out = silu(gate) * up; all three contiguous, non-empty."""
    return [Launch.fixed(_swiglu_fwd_kernel, _grid(gate.numel()), dict(G=gate, U=up, OUT=out, N=gate.numel()),
                         NUM_WARPS, BLOCK=BLOCK)]


def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """out = silu(gate) * up, contiguous, in gate's dtype."""
    # Flat indexing needs dense inputs; contiguous() is free when they already are.
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    if gate.numel():
        run(plan_forward(gate, up, out, gpu_of(gate.device)))
    return out


def plan_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor,
                  dup: torch.Tensor, gpu: Gpu) -> list[Launch]:
    """The launch writing dgate and dup; all five contiguous, non-empty."""
    args = dict(DOUT=dout, G=gate, U=up, DG=dgate, DU=dup, N=gate.numel())
    return [Launch.fixed(_swiglu_bwd_kernel, _grid(gate.numel()), args, NUM_WARPS, BLOCK=BLOCK)]


def backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup), contiguous, from the upstream gradient and the forward's inputs."""
    dout, gate, up = dout.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    if gate.numel():
        run(plan_backward(dout, gate, up, dgate, dup, gpu_of(gate.device)))
    return dgate, dup


# ----------------------------------------------------------------------------- torch custom ops

@torch.library.custom_op("tritongpt::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return forward(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("tritongpt::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dout: torch.Tensor, gate: torch.Tensor,
                        up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return backward(dout, gate, up)


@_swiglu_backward_op.register_fake
def _(dout, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(dout, gate, up)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry

def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise, in gate's dtype."""
    return _swiglu_op(gate, up)
