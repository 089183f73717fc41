"""RMSNorm, plain and with the fused residual add: forward, backward and both, in GB/s.

GPU: M = 16384 rows, hidden 1024 to 8192 (4096 and 8192 with TRITONGPT_BENCH_QUICK=1), bf16,
plus Liger-Kernel's RMSNorm (plain only: it has no fused residual add) where it imports. CPU: the
torch reference on one small shape.
GB/s counts each input read once and each output written once (the fp32 rstd the Triton forward
keeps for its backward is not counted): forward x (and r), weight; y (and h). timed_pass feeds
the gradient of the first output only, so the backward of both variants reads dy, the normalised
input and the weight and writes dx and dweight.
"""
import pytest
import torch

from bench.conftest import BACKENDS, DEVICE, DTYPE, ON_GPU, PASSES, QUICK, implementation, measure, timed_pass

M = 16384 if ON_GPU else 512
HIDDEN = ((4096, 8192) if QUICK else (1024, 2048, 4096, 8192)) if ON_GPU else (768,)
EPS = 1e-6


def traffic(pass_: str, D: int, residual: bool) -> float:
    """Bytes moved by one pass."""
    forward = (2 + 2 * residual) * M * D + D
    backward = (3 + residual) * M * D + 2 * D      # reads dy (and dh), h, weight; writes dx and dweight
    elements = {"fwd": forward, "bwd": backward, "fwdbwd": forward + backward}[pass_]
    return elements * DTYPE.itemsize


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("D", HIDDEN)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("backend", [*BACKENDS, "liger"])
def test_rms_norm(benchmark, backend, pass_, D, residual):
    if backend == "liger" and residual:
        pytest.skip("Liger-Kernel's RMSNorm has no fused residual add")
    fn = implementation("rms_norm", backend)
    x = torch.randn(M, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (1.0 + 0.1 * torch.randn(D, device=DEVICE)).to(DTYPE).requires_grad_()
    r = torch.randn(M, D, device=DEVICE, dtype=DTYPE, requires_grad=True) if residual else None
    run = timed_pass(lambda: fn(x, weight, EPS, residual=r), [x, weight] + ([r] if residual else []), pass_)
    measure(benchmark, run, op="rms_norm" + ("+residual" if residual else ""), pass_=pass_, backend=backend,
            shape=f"M={M} D={D}", nbytes=traffic(pass_, D, residual))
