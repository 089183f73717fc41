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

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed_and_backends():
    """Every test starts from seed 0 and the default (auto) backends, whatever the last one did."""
    import kernels

    torch.manual_seed(0)
    with kernels.use("auto"):
        yield
