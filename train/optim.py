"""The training loop's optimizer (--optimizer): AdamW on every parameter, or Muon on the hidden
matrices with AdamW on the rest.

AdamW: decoupled weight decay on matrices (projections, embedding), none on norm weights.

Muon (as in modded-nanogpt and nanochat): momentum SGD (Nesterov, 0.95) whose update of each weight
matrix is replaced by the nearest semi-orthogonal matrix, found by five Newton-Schulz iterations
X <- a X + (b A + c A^2) X with A = X X^T (coefficients (3.4445, -4.7750, 2.0315), which push every
singular value into [0.7, 1.2] rather than exactly to 1), and scaled by sqrt(max(1, rows / cols));
every direction of the matrix then moves by about the same amount, however lopsided its gradient.
It suits the 2-D weights inside the transformer blocks (attention and MLP projections), not the
embedding (a lookup table whose rows move alone; tied to the lm head here) or the norm weights,
which stay with AdamW. The two have their own peak learning rates (--lr, --muon-lr) under one
schedule: each param group carries lr_scale, its peak over --lr, and the loop sets lr * lr_scale.

Cost: each iteration is three products on the (rows, cols) matrix, about 2 * (2 r^2 c + r^3) FLOPs
with r = min(rows, cols), c = max(rows, cols): 3 GFLOP a step for the tiny preset's 20 matrices,
against 32 GFLOP for the forward and backward of its 4,096-token batch.

Ours rather than torch.optim.Muon, for what that one lacks here:
- the fused attention projection qkv is orthogonalized as its three matrices q, k and v (each
  its own linear map; modded-nanogpt and nanochat do the same), not as one;
- the iterations run in fp32 on the CPU (torch's always casts to bf16, which on the 2-core dev
  machine was 1.3x slower than fp32 and rounds the update to 8 bits, enough to break the 1-rank
  versus 2-rank parity of the tests); bf16 on CUDA, where tensor cores make it the fast one;
- under FSDP2 a sharded matrix is gathered whole for its update (the iteration needs all of it)
  and each rank keeps its own rows of the result; under DDP every rank already holds the whole
  all-reduced gradient and computes the same update.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from model import GPT
from train.config import TrainConfig

NS_COEFFICIENTS, NS_STEPS = (3.4445, -4.7750, 2.0315), 5


def orthogonalize(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The Newton-Schulz approximation of U V^T for g = U S V^T (rows, cols), in dtype, scaled by
    sqrt(max(1, rows / cols)); returned in g's dtype."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T                                          # (r, c) with r <= c: A is the small one
    x = x / (x.norm() + 1e-7)                                       # singular values <= 1
    for _ in range(NS_STEPS):
        A = x @ x.T                                                 # (r, r)
        x = a * x + (b * A + c * A @ A) @ x
    x = x if wide else x.T
    return (x * max(1.0, g.shape[0] / g.shape[1]) ** 0.5).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters (see the module docstring). A param group may carry "sections": the
    row counts of the matrices stacked in each of its parameters, orthogonalized one by one."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, sections=None))

    @torch.no_grad()
    def step(self, closure=None) -> torch.Tensor | None:
        loss = None
        if closure is not None:                 # torch.optim's convention: re-evaluate the loss first
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"].mul_(momentum).add_(p.grad)
                update = p.grad.add(buffer, alpha=momentum)         # Nesterov
                whole = update.full_tensor() if isinstance(update, DTensor) else update   # (rows, cols)
                dtype = torch.bfloat16 if whole.is_cuda else torch.float32
                sections = group["sections"] or [whole.shape[0]]
                whole = torch.cat([orthogonalize(m, dtype) for m in whole.split(sections)])
                if isinstance(p, DTensor):                          # this rank's shard of the whole update
                    whole = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)
                p.mul_(1 - lr * decay).add_(whole, alpha=-lr)
        return loss


class Optimizers:
    """Several optimizers stepped as one, each over its own parameters; what the loop calls (step,
    zero_grad, param_groups) and what torch.distributed.checkpoint's get/set_state_dict take (an
    iterable of optimizers)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = list(optimizers)

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


Optimizer = torch.optim.Optimizer | Optimizers      # what make_optimizer returns and the loop steps


def hidden_matrices(model: GPT) -> list[torch.nn.Parameter]:
    """The trainable 2-D weights inside the transformer blocks: what Muon updates."""
    return [p for p in model.blocks.parameters() if p.requires_grad and p.dim() == 2]


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> Optimizer:
    """cfg.optimizer over the model's trainable parameters (see the module docstring)."""
    fused = device.type in ("cuda", "cpu")      # one kernel for all parameters: 10-50x fewer launches on the CPU too
    muon = hidden_matrices(model) if cfg.optimizer == "muon" else []
    on_muon = {id(p) for p in muon}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in on_muon]
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    if not muon:
        return adamw
    c = model.cfg
    qkv = {id(block.attn.qkv.weight) for block in model.blocks}
    sections = [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]      # q, k, v rows
    groups = [{"params": [p for p in muon if id(p) in qkv], "sections": sections},
              {"params": [p for p in muon if id(p) not in qkv]}]
    for group in groups:
        group["lr_scale"] = cfg.muon_lr / cfg.lr
    return Optimizers(adamw, Muon([g for g in groups if g["params"]], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                                  weight_decay=cfg.muon_weight_decay))
