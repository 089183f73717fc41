"""Batched autoregressive generation with a KV cache, greedy or sampled (temperature, top-k, top-p).

With the cache, the prompt is run once (prefill) and then one token per step attends to the cached
keys through kernels.attention with Tq < Tk. Once the cache holds block_size positions, each
step re-runs the last block_size tokens, exactly what the uncached path does, so both paths give
the same tokens for the same seed.

generate_ragged continues prompts of different lengths in one batch, without padding: one packed
prefill of the prompts back to back (each attending only to itself, through varlen attention),
then one decoding step for all rows at a time, each row at its own position (model/cache.py's
SlotCache). Nine prompt lengths in a batch cost one prefill and one decoding loop, not nine.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from model.cache import KVCache, SlotCache
from model.gpt import GPT


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of logits (B, V). temperature 0 (or top_k 1) is greedy; top_k keeps
    the k largest logits; top_p keeps the smallest set of most likely tokens whose mass reaches p."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)                                          # (B,)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                       # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)           # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs                            # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _check_args(idx, max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64 or idx.shape[1] == 0:
        raise ValueError(f"idx must be a (B, T) int64 tensor with T >= 1, got "
                         f"{getattr(idx, 'dtype', type(idx))} {tuple(getattr(idx, 'shape', ()))}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for sampling parameters sample_next cannot take."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens: Iterable[int] | None = None,
             use_cache: bool = True, seed: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Continue each row of idx (B, T) by up to max_new_tokens tokens -> (B, T + new) int64.

    A row that emits one of stop_tokens is finished: the stop token is kept and the row is padded
    with it while the others go on; generation ends early once every row has finished.
    on_token, if given, receives each step's new tokens (B,) as soon as they exist (streaming).

    The loop runs under torch.inference_mode (no autograd bookkeeping at all, which a decoding
    step of a small model, all per-op overhead, notices: about 14% on the CPU); what it returns
    is an ordinary tensor, usable in training. The tokens passed to on_token are inference
    tensors: read them (tolist(), decode), do not keep them for autograd.
    """
    _check_args(idx, max_new_tokens, temperature, top_k, top_p)
    with torch.inference_mode():
        out = _decode(model, idx, max_new_tokens, temperature, top_k, top_p, stop_tokens, use_cache, seed, on_token)
    return out.clone()


def _decode(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, stop_tokens: Iterable[int] | None, use_cache: bool, seed: int | None,
            on_token: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    """generate's loop, under inference mode."""
    block_size = model.cfg.block_size
    generator = None if seed is None else torch.Generator(device=idx.device).manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_tokens or ())), dtype=torch.int64, device=idx.device)
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache = None
    if use_cache:
        dtype = (torch.get_autocast_dtype(idx.device.type) if torch.is_autocast_enabled(idx.device.type)
                 else model.embed.weight.dtype)
        cache = KVCache(model.cfg, idx.shape[0], idx.device, dtype)
    T = idx.shape[1]
    out = torch.empty(idx.shape[0], T + max_new_tokens, dtype=idx.dtype, device=idx.device)   # (B, T + new)
    out[:, :T] = idx
    for step in range(max_new_tokens):
        end = T + step                                 # tokens so far
        if cache is None or step == 0 or cache.length == block_size:
            if cache is not None:
                cache.reset()                          # (re)fill the cache from the last block_size tokens
            context = out[:, max(0, end - block_size):end]
        else:
            context = out[:, end - 1:end]
        logits = model(context, cache=cache, last_only=True)[:, -1]          # (B, V)
        next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if stops.numel():
            next_token = torch.where(finished, out[:, end - 1], next_token)
            finished |= torch.isin(next_token, stops)
        out[:, end] = next_token
        if on_token is not None:
            on_token(next_token)
        if stops.numel() and bool(finished.all()):
            return out[:, :end + 1]
    return out


@torch.inference_mode()
def generate_ragged(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, stop_tokens: Iterable[int] = (),
                    seed: int | None = None) -> list[list[int]]:
    """The new tokens continuing each prompt (lists of token ids, of any lengths), through its first
    stop token, at most max_new_tokens and at most block_size minus the longest prompt's length (so
    every row stays in its cache row). The rows draw from one generator: a row's tokens depend on
    seed and on the other prompts of the batch."""
    if not prompts or min(map(len, prompts)) < 1:
        raise ValueError("generate_ragged needs at least one prompt, each of at least one token")
    check_sampling(temperature, top_k, top_p)
    n, device = len(prompts), model.embed.weight.device
    new = min(max_new_tokens, model.cfg.block_size - max(map(len, prompts)))
    if new < 1:
        return [[] for _ in prompts]
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else model.embed.weight.dtype
    cache = SlotCache(model.cfg, n, device, dtype)
    documents = cache.select_packed(slice(0, n), [len(p) for p in prompts])
    idx = torch.tensor([[t for p in prompts for t in p]], device=device)                 # (1, total)
    logits = model(idx, cache=cache, last_only=True, documents=documents)[:, -1]         # (n, V)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.int64, device=device)
    out = torch.empty(n, new, dtype=torch.int64, device=device)                          # (n, new)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    for step in range(new):
        out[:, step] = sample_next(logits, temperature, top_k, top_p, generator)        # (n,)
        finished |= torch.isin(out[:, step], stops)
        if step == new - 1 or bool(finished.all()):
            break
        cache.select(slice(0, n))
        logits = model(out[:, step:step + 1], cache=cache, last_only=True)[:, -1]       # (n, V)
    stop_set = set(stop_tokens)
    rows = out[:, :step + 1].tolist()
    return [row[:next((j + 1 for j, t in enumerate(row) if t in stop_set), len(row))] for row in rows]
