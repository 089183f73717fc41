"""Test setup: the Triton interpreter runs every kernel on the CPU when there is no CUDA device.

TRITON_INTERPRET must be set before triton is first imported, so this happens at conftest
import time, before any test module (or kernels.triton_*) can import triton.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from numerics import DEVICE, nan_filled  # noqa: E402

# The property tests draw the same examples on every run and machine, so a suite that passed
# here passes in CI; HYPOTHESIS_PROFILE=explore draws fresh ones (and keeps failures to replay).
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed_and_no_backend_leak(request):
    """Every test starts from seed 0, and fails if it leaves the kernel backends changed: whatever
    sets them (a command, a test) restores them itself, as `with kernels.use(...)` does."""
    from tritongpt.kernels import backends

    torch.manual_seed(0)
    before = backends.chosen()
    yield
    after = backends.chosen()
    if after != before:
        backends.use(**before)          # so that the tests after this one still start clean
        pytest.fail(f"{request.node.nodeid} left the kernel backends changed: {before} -> {after}; "
                    f"set them with `with kernels.use(...)`", pytrace=False)


@pytest.fixture
def nan_outputs(monkeypatch):
    """Float buffers from torch.empty / torch.empty_like start full of NaN, so unwritten output fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*size, dtype=None, device=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            return empty(*size, dtype=dtype, device=device, **kwargs)
        return nan_filled(*shape, dtype=dtype, device=device)

    def nan_empty_like(t, *, dtype=None, device=None, **kwargs):
        dtype = dtype or t.dtype
        if not dtype.is_floating_point:
            return empty_like(t, dtype=dtype, device=device, **kwargs)
        return nan_filled(*t.shape, dtype=dtype, device=device or t.device)

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
