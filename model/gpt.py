"""A LLaMA-style decoder-only transformer whose hot ops all go through `kernels.*`.

Token embedding -> n_layer pre-norm blocks (RMSNorm, grouped-query causal attention with rotary
position embeddings, RMSNorm, SwiGLU MLP) -> final RMSNorm -> LM head, tied to the embedding
unless cfg.tie_embeddings is False (imported checkpoints often have their own head).
The blocks work on the residual stream as a (B * T, C) matrix of rows (a linear layer on 2-D input
is one matmul; on 3-D input it adds reshapes, which a decoding step, all per-op overhead, pays for),
and only attention views it as (B, T, heads, head_dim).
Every residual add is fused into the RMSNorm that follows it (kernels.rms_norm(..., residual=)),
and the loss goes through kernels.linear_cross_entropy, so training never holds (B*T, V) logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tritongpt import kernels
from model.cache import Cache
from model.config import ModelConfig
from model.documents import Documents


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x), or with residual: (rms_norm(x + residual), x + residual)."""
        return kernels.rms_norm(x, self.weight, self.eps, residual=residual)


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables kernels.rotary takes, each (block_size, 1, head_dim) in fp32: cos of position * frequency
    for both halves of a head vector, and sin of it signed -, + for the first and second half, so
    that RoPE is x * cos + roll(x, D/2) * sin (three ops on the torch backend)."""
    inv_freq = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    if cfg.rope_scaling is not None:
        inv_freq = llama3_scaled(inv_freq, cfg.rope_scaling)
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float64), inv_freq)   # (block_size, D/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), -1)[:, None].float(), torch.cat((-sin, sin), -1)[:, None].float()


def llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3's RoPE frequencies: wavelengths longer than the original context / low_freq_factor
    are stretched by factor, those shorter than it / high_freq_factor kept, and the band between
    interpolated linearly in context / wavelength."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)   # 0: stretched, 1: kept
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.options = cfg.attention_options                  # window_size and softcap of kernels.attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Cache | None, layer: int, documents: Documents | None = None) -> torch.Tensor:
        """x (B * T, C), the rows of B sequences of T positions; cos, sin (T, 1, D), or (B, T, 1, D)
        when each sequence has its own positions -> (B * T, C). With documents, each token attends
        only within its own document of its row."""
        BT, C = x.shape
        T = cos.shape[-3]
        B = BT // T
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)       # (B, T, H*, D) views
        # RoPE writes new tensors and v is copied out, so what attention saves for its backward
        # does not keep the whole fused projection alive. All three stay in (B, T, H, D) memory
        # order, so the attention output comes back in it too and its transpose below is free.
        q, k = kernels.rotary(q, k, cos, sin)                            # new (B, T, H*, D) tensors
        v = v.contiguous()
        if documents is not None and cache is None:
            y = kernels.varlen_attention(q.view(BT, self.n_head, -1), k.view(BT, self.n_kv_head, -1),
                                         v.view(BT, self.n_kv_head, -1), documents.cu_seqlens, documents.cu_seqlens,
                                         documents.max_seqlen, documents.max_seqlen, **self.options)   # (B * T, H, D)
            return self.out(y.reshape(BT, C))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)              # (B, H*, T, D)
        if cache is None:
            y = kernels.attention(q, k, v, **self.options)                 # (B, H, T, D)
        else:
            y = cache.attend(layer, q, k, v, self.options)                 # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(BT, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.out = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate(x), self.up(x)                                  # (B * T, mlp_hidden)
        if torch.is_grad_enabled() and gate.requires_grad and isinstance(self.out, nn.Linear):   # not quantized
            return _SwiGLUDown.apply(gate, up, self.out.weight)
        return self.out(kernels.swiglu(gate, up))


class _SwiGLUDown(torch.autograd.Function):
    """out(swiglu(gate, up)) without keeping swiglu(gate, up) for the backward.

    The activation is as wide as the MLP, and the backward of swiglu keeps gate and up anyway, so
    the backward recomputes it from them (one elementwise pass) instead of holding it from the
    forward until then: one (B * T, mlp_hidden) tensor less per block at the peak of a training
    step. Under autocast the forward's matmul runs in the activation's dtype, and so does the
    backward's.
    """

    @staticmethod
    def forward(ctx, gate, up, weight):
        ctx.save_for_backward(gate, up, weight)
        with torch.no_grad():
            return F.linear(kernels.swiglu(gate, up), weight)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        with torch.enable_grad():
            gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
            act = kernels.swiglu(gate, up)                                   # (B * T, mlp_hidden)
        grad_out = grad_out.to(act.dtype)
        grad_gate, grad_up = torch.autograd.grad(act, (gate, up), grad_out @ weight.to(act.dtype))
        grad_weight = (grad_out.T @ act.detach()).to(weight.dtype)           # (C, mlp_hidden), after the
        return grad_gate, grad_up, grad_weight                               # swiglu backward's temporaries


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, delta: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                cache: Cache | None, layer: int, documents: Documents | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the residual stream as (residual, pending delta), each (B * T, C), and returns it the
        same way, so each add runs inside the next norm. residual is None only before the first block."""
        if residual is None:
            a, residual = self.attn_norm(delta), delta
        else:
            a, residual = self.attn_norm(delta, residual)
        delta = self.attn(a, cos, sin, cache, layer, documents)
        a, residual = self.mlp_norm(delta, residual)
        return self.mlp(a), residual


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; the projections that write into the residual stream are
        scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=residual_std if name.endswith("out.weight") else self.cfg.init_std)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's (V, C) matrix: the embedding's when tied."""
        return self.embed.weight if self.head is None else self.head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None,
                reduction: str = "mean", last_only: bool = False, documents: Documents | None = None) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, V) (or (B, 1, V) with last_only), or with targets the
        loss: a scalar, or (B, T) per-token losses with reduction="none". Targets equal to -100
        are ignored. With a cache, idx continues the cached positions. With documents (several
        per row, model/documents.py), each attends only to itself, from position 0, and last_only
        gives each document's last position instead of each row's: (n_docs, 1, V), in document order,
        a padding document included. A cache takes documents only for a packed prefill, those that
        SlotCache.select_packed returned: idx (1, T) then holds prompts back to back, each filling
        its own row of the cache, and only the longest of them must fit in block_size."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        new = documents.max_seqlen if documents is not None and cache is not None else T   # positions per sequence
        if start + new > self.cfg.block_size:
            raise ValueError(f"sequence of {start + new} positions exceeds block_size {self.cfg.block_size}; "
                             f"crop the input or use a model with a larger block_size")
        if documents is not None and cache is not None and cache.packed is not documents:
            raise ValueError("documents and a cache combine only in a packed prefill: pass the Documents that "
                             "SlotCache.select_packed returned, or prefill each document into its own row")
        where = cache.positions(T) if cache is not None else documents.positions if documents is not None \
            else slice(0, T)
        cos, sin = self.rope_cos[where], self.rope_sin[where]          # (T, 1, D), or (B, T, 1, D) per row
        try:
            delta, residual = self.embed(idx.reshape(B * T)), None                  # (B * T, C)
        except IndexError:      # CPU; on CUDA an id out of range is a device-side assert
            raise ValueError(f"token ids {idx.min().item()}..{idx.max().item()} do not fit the vocabulary "
                             f"0..{self.cfg.vocab_size - 1}; encode with the tokenizer this model was "
                             f"trained with") from None
        for layer, block in enumerate(self.blocks):
            delta, residual = block(delta, residual, cos, sin, cache, layer, documents)
        h, _ = self.norm(delta, residual)                                            # (B * T, C)
        if cache is not None:
            cache.advance(T)
        if targets is None:
            if last_only and documents is not None:                  # each document's last position
                h, B, T = h[documents.cu_seqlens[1:].long() - 1], documents.cu_seqlens.numel() - 1, 1   # (n_docs, C)
            elif last_only:
                h, T = h.view(B, T, -1)[:, -1], 1                                     # (B, C)
            logits = F.linear(h, self.embed.weight) if self.head is None else self.head(h)
            return logits.view(B, T, -1)                                             # (B, T, V)
        loss = kernels.linear_cross_entropy(h, self.head_weight, targets.reshape(B * T), reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss

    def num_params(self) -> int:
        """Parameters, counting a tied embedding / LM head matrix once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N for the matmuls with the N parameters
        (a tied LM head is one matmul with the embedding matrix; the lookup itself is free, so an
        untied embedding does not count) plus 12 * n_layer * n_head * head_dim * T for attention
        (the PaLM appendix B formula)."""
        T = seq_len or self.cfg.block_size
        free = [p for n, p in self.named_parameters()
                if n.endswith("norm.weight") or (n == "embed.weight" and self.head is not None)]
        return 6 * (self.num_params() - sum(p.numel() for p in free)) + 12 * self.cfg.n_layer * self.cfg.n_head * self.cfg.head_dim * T
