"""End-to-end: one optimizer step (forward, backward, AdamW) of the whole model, in tokens/s and MFU.

CPU: the tiny preset on the torch backend. CUDA: the small preset at block 1024 in bf16 autocast
with our Triton kernels, the torch backend in eager mode, and torch.compile of the torch backend.
"""
import pytest
import torch

import kernels
from bench.conftest import DEVICE, ON_GPU, measure
from model import GPT, ModelConfig
from train.config import TrainConfig
from train.loop import make_optimizer, peak_flops

PRESET, VOCAB, BATCH = ("small", 32768, 8) if ON_GPU else ("tiny", 4096, 4)


@pytest.mark.parametrize("backend", ["triton", "torch", "compile"])
def test_train_step(benchmark, backend):
    if backend != "torch" and not ON_GPU:
        pytest.skip(f"{backend} timings need a CUDA GPU")
    model = GPT(ModelConfig.preset(PRESET, vocab_size=VOCAB)).to(DEVICE)
    T = model.cfg.block_size
    step_model = torch.compile(model) if backend == "compile" else model
    optimizer = make_optimizer(model, TrainConfig(), torch.device(DEVICE))
    x = torch.randint(0, VOCAB, (BATCH, T), device=DEVICE)
    y = torch.randint(0, VOCAB, (BATCH, T), device=DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=ON_GPU):
            loss = step_model(x, targets=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with kernels.use("triton" if backend == "triton" else "torch"):
        measure(benchmark, step, op="train_step", pass_="fwdbwd", backend=backend,
                shape=f"{PRESET} B={BATCH} T={T}")
    tokens_per_s = BATCH * T / benchmark.stats.stats.median
    benchmark.extra_info["tokens/s"] = tokens_per_s
    peak = peak_flops(torch.device(DEVICE))
    if peak:
        benchmark.extra_info["MFU"] = model.flops_per_token(T) * tokens_per_s / peak
