"""A transformers LlamaForCausalLM's train step with and without apply_tritongpt_kernels (issue 30).

Rows: "unpatched" (attn_implementation="sdpa", transformers' RMSNorm, MLP and loss over the full
logits) and "patched" (the same weights after model.hf_patch.apply_tritongpt_kernels: our
RMSNorm with the residual add fused, SwiGLU, attention and the chunked linear cross-entropy), each a
forward + backward + AdamW step, in tokens/s and peak memory measured as bench/test_vs_transformers.py
measures it (static tensors plus the step's allocator peak: torch.profiler's allocation events on
the CPU, torch.cuda.max_memory_allocated on CUDA). The patched row carries vs_unpatched_paired:
the median over paired rounds of unpatched seconds / patched seconds, the two run back to back in
alternating order, and peak_vs_unpatched.

Shapes: on the CPU a small Llama (hidden 256, 4 layers, 8 query and 2 key/value heads, vocabulary
32,000, untied head) on B=4 x T=256 tokens in fp32, on the torch backend of our kernels; on CUDA
Llama 3.2 1B's shape (hidden 2048, 16 layers, vocabulary 128,256) on B=4 x T=2048 tokens under
bf16 autocast, on our Triton kernels. Liger-Kernel's headline is the bar there: a fused linear
cross-entropy whose logits never exist, and the memory that saves at a large vocabulary. On the
CPU a row's rounds are cut to fit bench/test_vs_transformers.py's ROW_BUDGET_S unless
TRITONGPT_BENCH_FULL=1 (5 timed rounds and 5 pairs; about 4 minutes on 2 cores).
"""
from __future__ import annotations

import copy
import functools
import time

import pytest
import torch

from tritongpt import kernels
from bench.conftest import DEVICE, DTYPE, ON_GPU
from bench.test_vs_transformers import (FULL, _init_optimizer_state, _label, _paired_ratio, _peak_bytes, _time,
                                        _within_budget)
from train.config import TrainConfig
from train.optim import make_optimizer

transformers = pytest.importorskip("transformers")
from model.hf_patch import apply_tritongpt_kernels  # noqa: E402

if ON_GPU:
    SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
    BATCH, SEQ, WARMUP, TIMED = 4, 2048, 2, 10
else:
    SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000)
    BATCH, SEQ, WARMUP, TIMED = 4, 256, 1, 5
BACKEND = "triton" if ON_GPU else "torch"
_ROWS: dict[str, dict] = {}


@functools.cache
def _base_model():
    config = transformers.LlamaConfig(**SHAPE, max_position_embeddings=SEQ, tie_word_embeddings=False,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(DEVICE)


def _train_step(impl: str):
    """(model, step(), optimizer, batch) of one train step, the optimizer's state already created."""
    model = copy.deepcopy(_base_model()).train()
    if impl == "patched":
        apply_tritongpt_kernels(model)
    torch.manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), device=DEVICE)
    optimizer = make_optimizer(model, TrainConfig(), torch.device(DEVICE))

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=ON_GPU):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with kernels.use(BACKEND):
        _init_optimizer_state(model, optimizer)
    return model, step, optimizer, (ids,)


@pytest.mark.parametrize("impl", ["unpatched", "patched"])
def test_train_step(benchmark, impl):
    model, step, optimizer, batch = _train_step(impl)
    with kernels.use(BACKEND):
        start = time.perf_counter()
        peak = _peak_bytes(step, model, optimizer, batch)                # also the first warm-up step
        median = _time(benchmark, step, WARMUP, TIMED, estimate=time.perf_counter() - start)
    shape = (f"Llama hidden={SHAPE['hidden_size']} layers={SHAPE['num_hidden_layers']} V={SHAPE['vocab_size']} "
             f"B={BATCH} T={SEQ}")
    _label(benchmark, op="hf_train_step", pass_="fwdbwd", backend=impl, shape=shape, dtype=DTYPE, threads="all")
    info = benchmark.extra_info
    info.update({"tokens/s": BATCH * SEQ / median, "peak_MiB": peak / 2**20, "kernels": BACKEND,
                 "transformers": transformers.__version__})
    _ROWS[impl] = info
    if impl == "patched":
        unpatched, their_step, their_optimizer, _ = _train_step("unpatched")
        their_step()                                                     # its warm-up
        with kernels.use(BACKEND):
            pairs = TIMED if ON_GPU or FULL else _within_budget(TIMED, 2 * median)
            info["vs_unpatched_paired"] = _paired_ratio(step, their_step, pairs)
        if "unpatched" in _ROWS:
            info["peak_vs_unpatched"] = info["peak_MiB"] / _ROWS["unpatched"]["peak_MiB"]
        del their_optimizer, unpatched
    del optimizer, model
