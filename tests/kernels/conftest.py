"""Fixtures of the backend-switch tests: stand-in Triton versions, and a switch of their own.

Which ops have a Triton version changes as kernels/triton_*.py files land, so every test of the
switch that depends on it replaces backends._triton_impls with stand-ins (fake_triton /
no_triton) instead. Both start the test from every op on auto, in a choice of its own that
pytest puts back afterwards, so a test never depends on, nor leaks into, another's choice.
"""
from __future__ import annotations

from typing import Callable

import pytest

from tritongpt.kernels import backends


@pytest.fixture
def fake_triton(monkeypatch) -> list[str]:
    """Every op has a 'Triton version' that records its calls and returns the op's name.
    TRITON_INTERPRET=1 so forcing triton on CPU tensors is allowed. Returns the call log."""
    calls: list[str] = []

    def stand_in(op: str) -> Callable:
        def impl(*args, **kwargs) -> str:
            calls.append(op)
            return op
        return impl

    monkeypatch.setattr(backends, "_triton_impls", {op: stand_in(op) for op in backends.OPS})
    monkeypatch.setattr(backends, "_choice", {op: "auto" for op in backends.OPS})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return calls


@pytest.fixture
def no_triton(monkeypatch) -> None:
    """No op has a Triton version."""
    monkeypatch.setattr(backends, "_triton_impls", {op: None for op in backends.OPS})
    monkeypatch.setattr(backends, "_choice", {op: "auto" for op in backends.OPS})
