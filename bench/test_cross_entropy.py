"""Cross-entropy (mean reduction): forward, backward and both, in GB/s, with peak memory.

GPU: N = 16384 rows, V in {32000 (LLaMA-2), 128256 (LLaMA-3)}, bf16 logits, plus Liger-Kernel's
cross-entropy where it imports (like our triton op, it writes the logits' gradient during the
forward, in place of the logits). CPU: the torch reference on one small shape. GB/s counts each input read once and each output written once:
the forward reads the logits, the backward reads them and writes their gradient, and forward +
backward together read the logits once and write the gradient once (the (N,) targets and
per-row results are negligible). Peak memory (GPU) includes the logits themselves.
"""
import pytest
import torch

from bench.conftest import BACKENDS, DEVICE, DTYPE, ON_GPU, PASSES, implementation, measure, timed_pass

N = 16384 if ON_GPU else 512
VOCABS = (32000, 128256) if ON_GPU else (8192,)
LOGIT_PASSES = {"fwd": 1, "bwd": 2, "fwdbwd": 2}


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("backend", [*BACKENDS, "liger"])
def test_cross_entropy(benchmark, backend, pass_, vocab):
    fn = implementation("cross_entropy", backend)
    logits = torch.randn(N, vocab, device=DEVICE, dtype=DTYPE, requires_grad=True)
    targets = torch.randint(0, vocab, (N,), device=DEVICE)
    run = timed_pass(lambda: fn(logits, targets), [logits], pass_)
    measure(benchmark, run, op="cross_entropy", pass_=pass_, backend=backend, shape=f"N={N} V={vocab}",
            nbytes=LOGIT_PASSES[pass_] * logits.numel() * DTYPE.itemsize, memory=True)
