"""The backend switch of the ops in kernels/__init__.py: which backend runs each op.

The ops register themselves with ``@backends.op`` (their order of definition is the order of
OPS). Each op has a ``torch`` backend, the function of the same name in kernels/reference.py, and
a ``triton`` backend where kernels/triton_<op>.py exists: the function of the same name there.
(Not kernels/<op>.py: a submodule named like the public function would replace kernels.<op>
with the module the moment anything imported it.) The Triton modules are imported on the first
call that needs them, so ``import tritongpt.kernels`` never imports triton itself.

A choice per op, "auto", "triton" or "torch", is resolved per call from the inputs' device:
auto is triton for CUDA tensors when the op has a Triton version, else torch; triton on CPU
tensors needs the Triton interpreter (TRITON_INTERPRET=1, for tests). ``use`` sets choices from a
spec (``"auto"``, ``"triton"``, ``"torch"`` or a comma-separated list such as
``"torch,rms_norm=triton"``; an entry without ``=`` sets every op) and restores them when used as
a context manager; ``use_environment`` applies the ``TRITONGPT_KERNELS`` spec once every op is
registered (kernels/__init__.py calls it last).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
from typing import Callable

import torch

from tritongpt.kernels import launching, reference

OPS: list[str] = []                   # filled by @op, in the order kernels/__init__.py defines them
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
ENV_VAR = "TRITONGPT_KERNELS"

_triton_impls: dict[str, Callable | None] = {}   # op -> its Triton function, None without one; filled lazily
_choice: dict[str, str] = {}


def op(public: Callable) -> Callable:
    """Register the public function of an op under its name (the one registry entry of an op)."""
    OPS.append(public.__name__)
    _choice[public.__name__] = "auto"
    return public


# ----------------------------------------------------------------------------- specs

def parse_spec(spec: str) -> dict[str, str]:
    """Turn a spec like ``"torch,rms_norm=triton"`` into {op: backend} for every op it names."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"kernel spec must be a non-empty string, got {spec!r}; use one of {BACKENDS} or "
                         f"'op=backend,...' with ops {tuple(OPS)}")
    choice: dict[str, str] = {}
    for entry in spec.split(","):
        entry = entry.strip()
        if "=" in entry:
            name, backend = (s.strip() for s in entry.split("=", 1))
            _check_op(name)
            _check_backend(backend, name)
            choice[name] = backend
        elif entry in BACKENDS:
            choice.update({name: entry for name in OPS})
        else:
            raise ValueError(f"unknown kernel spec entry {entry!r}: expected a backend ({', '.join(BACKENDS)}) "
                             f"or op=backend with op in ({', '.join(OPS)}), e.g. 'torch,rms_norm=triton'")
    return choice


def spec_type(text: str) -> str:
    """The argparse ``type=`` for a ``--kernels SPEC`` flag: text unchanged when parse_spec accepts
    it, else argparse.ArgumentTypeError with parse_spec's message (which lists the choices)."""
    try:
        parse_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _check_op(name: str) -> None:
    if name not in OPS:
        raise ValueError(f"unknown kernel op {name!r}; valid ops are {', '.join(OPS)}")


def _check_backend(backend: str, name: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r} for {name}; valid backends are {', '.join(BACKENDS)} "
            f"(spec example: 'auto' or 'torch,rms_norm=triton')")


# ----------------------------------------------------------------------------- implementations

def triton_available(name: str) -> bool:
    """True when op `name` has a Triton version and triton can be imported."""
    return _load_triton(name) is not None


def _load_triton(name: str) -> Callable | None:
    if name not in _triton_impls:
        module_name = f"tritongpt.kernels.triton_{name}"
        if importlib.util.find_spec("triton") is None or importlib.util.find_spec(module_name) is None:
            _triton_impls[name] = None
        else:
            _triton_impls[name] = getattr(importlib.import_module(module_name), name)
    return _triton_impls[name]


def implementation(name: str, backend: str) -> Callable:
    """The raw function of one backend ("torch" or "triton"), bypassing checks; for benchmarks."""
    _check_op(name)
    if backend == "torch":
        return getattr(reference, name)
    if backend == "triton" and triton_available(name):
        return _load_triton(name)
    raise ValueError(f"no {backend!r} implementation of {name}; available: torch"
                     + (", triton" if triton_available(name) else ""))


# ----------------------------------------------------------------------------- choosing

class _Restore:
    """Returned by use(): ignore it to keep the setting, or use it in `with` to restore on exit."""

    def __init__(self, previous: dict[str, str]):
        self._previous = previous

    def __enter__(self) -> _Restore:
        return self

    def __exit__(self, *exc) -> None:
        _choice.update(self._previous)


def use(spec: str | None = None, **per_op: str) -> _Restore:
    """Set the backend of every op (``spec``) and/or of single ops (keywords).

    ``kernels.use("triton")``, ``kernels.use(rms_norm="torch")``, or as a context manager:
    ``with kernels.use("torch"): ...`` restores the previous choice on exit. Forcing ``triton``
    for an op that has no Triton version, or where triton is not installed, raises ValueError.
    """
    choice = parse_spec(spec) if spec is not None else {}
    for name, backend in per_op.items():
        _check_op(name)
        _check_backend(backend, name)
        choice[name] = backend
    for name, backend in choice.items():
        if backend == "triton" and not triton_available(name):
            raise ValueError(
                f"cannot force triton for {name}: " + ("triton is not installed (pip install triton, Linux only)"
                if importlib.util.find_spec("triton") is None else "it has no Triton version yet")
                + f"; use {name}=torch or {name}=auto")
    previous = dict(_choice)
    _choice.update(choice)
    return _Restore(previous)


def use_environment() -> None:
    """Apply the TRITONGPT_KERNELS spec, if set (once, at import, after every op registered)."""
    if os.environ.get(ENV_VAR):
        use(os.environ[ENV_VAR])


def _resolve(name: str, device: torch.device) -> str:
    backend = _choice[name]
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(name) else "torch"
    if (backend == "triton" and device.type != "cuda"
            and not (device.type == "cpu" and launching.interpreting())):
        raise ValueError(
            f"{name}: the triton backend needs CUDA tensors (got {device.type}); move the inputs to a GPU, "
            f"use {name}=torch or auto, or for tests set TRITON_INTERPRET=1 before triton is imported")
    return backend


def chosen() -> dict[str, str]:
    """{op: the choice as set, "auto", "triton" or "torch"} (a copy; active() resolves auto)."""
    return dict(_choice)


def active(device: str | torch.device | None = None) -> dict[str, str]:
    """{op: backend a call on `device` uses now} (device defaults to cuda when present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: _resolve(name, device) for name in OPS}


def dispatch(name: str, device: torch.device) -> Callable:
    """The function that runs op `name` on inputs on `device` under the current choice."""
    return _load_triton(name) if _resolve(name, device) == "triton" else getattr(reference, name)
