"""RoPE of q and k (kernels.rotary): forward, backward and both, in GB/s.

GPU: 16384 tokens (B=4, T=4096) at head dim 128 with the heads of LLaMA-3-8B (32 query, 8 key
heads; only this one with TRITONGPT_BENCH_QUICK=1) and LLaMA-2-7B (32 and 32), bf16, q and k
being views of a fused qkv projection as in the model, with the model's (T, 1, D) fp32 tables.
CPU: the torch reference on one small shape. GB/s counts each input read once and each output
written once: forward q, k, cos, sin; q_rot, k_rot, backward dq_rot, dk_rot, cos, sin; dq, dk
(the tables are T * D fp32 each).
"""
import pytest
import torch

from bench.conftest import BACKENDS, DEVICE, DTYPE, ON_GPU, PASSES, QUICK, implementation, measure, timed_pass
from model import ModelConfig
from model.gpt import rope_tables

B, T, D = (4, 4096, 128) if ON_GPU else (2, 256, 64)
HEADS = (((32, 8),) if QUICK else ((32, 8), (32, 32))) if ON_GPU else ((8, 4),)
PASS_TENSORS = {"fwd": 1, "bwd": 1, "fwdbwd": 2}     # q/k-sized reads and writes, per direction


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H={h[0]}/{h[1]}")
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary(benchmark, backend, pass_, heads):
    fn = implementation("rotary", backend)
    Hq, Hkv = heads
    qkv = torch.randn(B, T, Hq + 2 * Hkv, D, device=DEVICE, dtype=DTYPE)
    # Leaves that keep the fused projection's strides (detach does), so the backward is the op's own.
    q, k = (t.detach().requires_grad_() for t in qkv.split([Hq, Hkv, Hkv], dim=2)[:2])
    cfg = ModelConfig(vocab_size=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=D, block_size=T)
    cos, sin = (t.to(DEVICE) for t in rope_tables(cfg))
    run = timed_pass(lambda: fn(q, k, cos, sin), [q, k], pass_)
    qk_bytes = 2 * B * T * (Hq + Hkv) * D * DTYPE.itemsize                # read once, written once
    table_bytes = 2 * T * D * 4
    measure(benchmark, run, op="rotary", pass_=pass_, backend=backend, shape=f"B={B} T={T} H={Hq}/{Hkv} D={D}",
            nbytes=PASS_TENSORS[pass_] * (qk_bytes + table_bytes))
