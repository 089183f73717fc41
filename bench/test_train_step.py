"""End-to-end: one optimizer step (forward, backward, AdamW) of the whole model, in tokens/s and MFU.

CPU: the tiny preset on the torch backend. CUDA: the small preset at block 1024 in bf16 autocast
with our Triton kernels, the torch backend in eager mode, and torch.compile of the torch backend.
tokens/s is B * T over the median step time. MFU (CUDA) is model.flops_per_token(T) (6 FLOPs per
parameter and token, the norm weights left out, plus the attention's 12 * n_layer * n_head *
head_dim * T) times tokens/s, over the bf16 peak: the matmul ceiling measured by bench/ceilings.py
when the environment variable TRITONGPT_CEILINGS names its JSON file (bench/gpu.sh sets it), else
the GPU's nominal dense bf16 peak (989 TFLOP/s for H100 and H200); extra_info["MFU_peak"] says which.
"""
import os

import pytest
import torch

from tritongpt import kernels
from bench.ceilings import mfu_peak
from bench.conftest import DEVICE, ON_GPU, measure
from model import GPT, ModelConfig
from train.config import TrainConfig
from train.optim import make_optimizer

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
    if ON_GPU:
        peak, source = mfu_peak(torch.cuda.get_device_name(), os.environ.get("TRITONGPT_CEILINGS"))
        if peak:
            benchmark.extra_info.update({"MFU": model.flops_per_token(T) * tokens_per_s / peak,
                                         "MFU_peak": source, "peak_TFLOP/s": peak / 1e12})
