"""The backend switch of kernels/backends.py through its public names (kernels.use, active,
parse_spec, spec_type, implementation, triton_available, OPS): the spec grammar, use as a setter
and a context manager, resolution per device, the TRITONGPT_KERNELS variable and the errors.

The fixtures fake_triton and no_triton (tests/kernels/conftest.py) stand in for the Triton
versions and give each test a choice of its own.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritongpt import kernels
from tritongpt.kernels import backends, quantization, reference

OPS = kernels.OPS
REPO = Path(__file__).resolve().parents[2]
OPS_LIST = "rms_norm, swiglu, rotary, causal_attention, attention, varlen_attention, cross_entropy, linear_cross_entropy, quantized_linear"
BACKENDS_LIST = "auto, triton, torch"


def every(backend: str) -> dict[str, str]:
    return {op: backend for op in OPS}


def valid_args(op: str) -> tuple:
    """Small valid CPU inputs for op."""
    return {
        "rms_norm": lambda: (torch.randn(3, 8), torch.randn(8)),
        "swiglu": lambda: (torch.randn(3, 8), torch.randn(3, 8)),
        "rotary": lambda: (torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(5, 1, 8), torch.randn(5, 1, 8)),
        "causal_attention": lambda: (torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)),
        "attention": lambda: (torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)),
        "varlen_attention": lambda: (torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8),
                                     torch.tensor([0, 2, 5], dtype=torch.int32),
                                     torch.tensor([0, 2, 5], dtype=torch.int32), 3, 3),
        "cross_entropy": lambda: (torch.randn(4, 7), torch.randint(0, 7, (4,))),
        "linear_cross_entropy": lambda: (torch.randn(4, 8), torch.randn(7, 8), torch.randint(0, 7, (4,))),
        "quantized_linear": lambda: (torch.randn(4, 8), *quantization.quantize(torch.randn(7, 8), "int8"), "int8"),
    }[op]()


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run `python -c code` from the repo root in a fresh interpreter with extra env vars."""
    base = {k: v for k, v in os.environ.items() if k not in ("TRITONGPT_KERNELS", "TRITONGPT_CHECK_TARGETS")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**base, **env},
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- spec grammar, use, active

@pytest.mark.parametrize("spec, expected", [
    ("auto", every("auto")),
    ("torch", every("torch")),
    ("triton", every("triton")),
    ("torch,rms_norm=triton", {**every("torch"), "rms_norm": "triton"}),
    (" rms_norm = torch , swiglu=auto ", {"rms_norm": "torch", "swiglu": "auto"}),
])
def test_parse_spec(spec, expected):
    assert kernels.parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["auto", "torch,rms_norm=triton", " rms_norm = torch , swiglu=auto "])
def test_spec_type_returns_a_valid_spec_unchanged(spec):
    assert kernels.spec_type(spec) == spec


@pytest.mark.parametrize("spec, choices", [
    ("nope", f"expected a backend ({BACKENDS_LIST}) or op=backend with op in ({OPS_LIST})"),
    ("nope=torch", f"valid ops are {OPS_LIST}"),
    ("swiglu=cuda", f"valid backends are {BACKENDS_LIST}"),
])
def test_spec_type_rejects_a_bad_spec_with_the_choices(spec, choices):
    with pytest.raises(ValueError) as parsed:
        kernels.parse_spec(spec)
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        kernels.spec_type(spec)
    assert str(caught.value) == str(parsed.value)
    assert choices in str(caught.value)


def test_spec_type_as_an_argparse_type(capsys):
    parser = argparse.ArgumentParser(prog="pretrain")
    parser.add_argument("--kernels", type=kernels.spec_type)
    assert parser.parse_args(["--kernels", "torch,rms_norm=triton"]).kernels == "torch,rms_norm=triton"
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--kernels", "rms_norm=cuda"])
    assert exited.value.code == 2
    assert f"argument --kernels: unknown backend 'cuda' for rms_norm; valid backends are {BACKENDS_LIST}" \
        in capsys.readouterr().err


def test_use_spec_and_keywords(fake_triton):
    with kernels.use("torch,rms_norm=triton"):
        assert kernels.active("cpu") == {**every("torch"), "rms_norm": "triton"}
        with kernels.use(swiglu="triton", rms_norm="auto"):
            assert kernels.active("cuda") == {**every("torch"), "rms_norm": "triton", "swiglu": "triton"}
            assert kernels.active("cpu") == {**every("torch"), "swiglu": "triton"}
    with kernels.use("triton", cross_entropy="torch"):  # keywords override the spec
        assert kernels.active("cpu") == {**every("triton"), "cross_entropy": "torch"}


def test_auto_picks_triton_only_for_cuda(fake_triton):
    assert kernels.active("cuda") == every("triton")
    assert kernels.active("cpu") == kernels.active(torch.device("meta")) == every("torch")
    assert kernels.active() == kernels.active("cuda" if torch.cuda.is_available() else "cpu")


def test_auto_falls_back_without_triton_version(no_triton):
    assert kernels.active("cuda") == every("torch")


@pytest.mark.parametrize("op", OPS)
def test_calls_route_to_the_chosen_backend(op, fake_triton):
    public = getattr(kernels, op)
    with kernels.use(**{op: "triton"}):
        assert public(*valid_args(op)) == op
    with kernels.use(**{op: "torch"}):
        assert all(isinstance(t, torch.Tensor) for t in _outputs(public(*valid_args(op))))
    assert all(isinstance(t, torch.Tensor) for t in _outputs(public(*valid_args(op))))  # auto on CPU: torch
    assert fake_triton == [op]


def _outputs(out) -> tuple:
    """An op's outputs as a tuple (rotary returns two tensors)."""
    return out if isinstance(out, tuple) else (out,)


def test_context_manager_restores(fake_triton):
    with kernels.use("torch"):
        assert kernels.active("cuda") == every("torch")
        with kernels.use(rms_norm="triton"):
            assert kernels.active("cuda") == {**every("torch"), "rms_norm": "triton"}
        assert kernels.active("cuda") == every("torch")
    assert kernels.active("cuda") == every("triton")


def test_context_manager_restores_on_exception(fake_triton):
    with pytest.raises(RuntimeError, match="boom"):
        with kernels.use("torch,swiglu=triton"):
            raise RuntimeError("boom")
    assert kernels.active("cuda") == every("triton")
    assert kernels.active("cpu") == every("torch")


def test_setter_without_with_persists(fake_triton):
    restore = kernels.use("torch")
    try:
        assert kernels.active("cuda") == every("torch")
    finally:
        restore.__exit__()
    assert kernels.active("cuda") == every("triton")


def test_chosen_is_the_choice_as_set(fake_triton):
    with kernels.use("torch", swiglu="auto"):
        assert kernels.backends.chosen() == {**every("torch"), "swiglu": "auto"}
        kernels.backends.chosen()["rms_norm"] = "triton"          # a copy: changing it changes nothing
        assert kernels.backends.chosen()["rms_norm"] == "torch"
    assert kernels.backends.chosen() == every("auto")


@pytest.mark.parametrize("bad", [dict(spec="torch,rms_norm=nope"), dict(spec="torch", swiglu="cuda")])
def test_failed_use_changes_nothing(fake_triton, bad):
    with pytest.raises(ValueError):
        kernels.use(**bad)
    assert kernels.active("cuda") == every("triton")


def test_implementation(fake_triton):
    assert kernels.implementation("swiglu", "torch") is reference.swiglu
    assert kernels.implementation("swiglu", "triton")() == "swiglu"


def test_env_var_sets_backends():
    """TRITONGPT_KERNELS is read once, at import; TRITONGPT_CHECK_TARGETS=0 disables the range check."""
    result = run_python("import json; from tritongpt import kernels; print(json.dumps([kernels.active('cuda'), "
                        "kernels.triton_available('swiglu'), kernels.check_targets]))",
                        TRITONGPT_KERNELS="torch,swiglu=auto", TRITONGPT_CHECK_TARGETS="0")
    assert result.returncode == 0, result.stderr
    active, swiglu_has_triton, check_targets = json.loads(result.stdout)
    assert active == {**every("torch"), "swiglu": "triton" if swiglu_has_triton else "torch"}
    assert check_targets is False


def test_bad_env_var_fails_import_with_the_choices():
    result = run_python("import tritongpt.kernels", TRITONGPT_KERNELS="nope")
    assert result.returncode != 0
    assert "ValueError: unknown kernel spec entry 'nope'" in result.stderr
    assert BACKENDS_LIST in result.stderr and OPS_LIST in result.stderr


def test_import_does_not_import_triton():
    """`import tritongpt.kernels` and CPU calls under auto stay clear of triton (it is slow to import and
    absent on some platforms)."""
    result = run_python("import sys, torch; from tritongpt import kernels; kernels.active('cpu'); "
                        "kernels.rms_norm(torch.randn(2, 4), torch.ones(4)); print('triton' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ----------------------------------------------------------------------------- switch errors

@pytest.mark.parametrize("call, message", [
    (lambda: kernels.use(nope="torch"), f"unknown kernel op 'nope'; valid ops are {OPS_LIST}"),
    (lambda: kernels.use("nope=torch"), f"unknown kernel op 'nope'; valid ops are {OPS_LIST}"),
    (lambda: kernels.implementation("nope", "torch"), f"unknown kernel op 'nope'; valid ops are {OPS_LIST}"),
    (lambda: kernels.use("nope"), f"unknown kernel spec entry 'nope': expected a backend ({BACKENDS_LIST}) "
                                  f"or op=backend with op in ({OPS_LIST}), e.g. 'torch,rms_norm=triton'"),
    (lambda: kernels.use(rms_norm="cuda"), f"unknown backend 'cuda' for rms_norm; valid backends are {BACKENDS_LIST}"),
    (lambda: kernels.use("swiglu=cuda"), f"unknown backend 'cuda' for swiglu; valid backends are {BACKENDS_LIST}"),
    (lambda: kernels.use(""), "non-empty string, got ''"),
    (lambda: kernels.use("   "), "non-empty string, got '   '"),
    (lambda: kernels.use("torch,,swiglu=torch"), "unknown kernel spec entry ''"),
    (lambda: kernels.use("rms_norm:torch"), "unknown kernel spec entry 'rms_norm:torch'"),
    (lambda: kernels.use("rms_norm="), "unknown backend '' for rms_norm"),
    (lambda: kernels.use("=torch"), "unknown kernel op ''"),
    (lambda: kernels.use("rms_norm=torch=triton"), "unknown backend 'torch=triton' for rms_norm"),
    (lambda: kernels.use("Torch"), "unknown kernel spec entry 'Torch'"),
])
def test_switch_errors(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


def test_forcing_triton_without_triton_version(no_triton):
    fix = "use rms_norm=torch or rms_norm=auto"
    for call in (lambda: kernels.use(rms_norm="triton"), lambda: kernels.use("triton"),
                 lambda: kernels.use("torch,rms_norm=triton")):
        with pytest.raises(ValueError, match=f"cannot force triton for rms_norm: it has no Triton version yet; {fix}"):
            call()
    with pytest.raises(ValueError, match=r"no 'triton' implementation of rms_norm; available: torch$"):
        kernels.implementation("rms_norm", "triton")


def test_forcing_triton_for_the_one_op_without_it(fake_triton, monkeypatch):
    monkeypatch.setitem(backends._triton_impls, "cross_entropy", None)
    with pytest.raises(ValueError, match="cannot force triton for cross_entropy: it has no Triton version"):
        kernels.use("triton")
    with kernels.use("triton,cross_entropy=torch"):
        assert kernels.active("cpu") == {**every("triton"), "cross_entropy": "torch"}


def test_forcing_triton_when_triton_is_not_installed(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    monkeypatch.setattr(backends, "_triton_impls", {})
    with pytest.raises(ValueError, match=r"cannot force triton for swiglu: triton is not installed \(pip install triton"):
        kernels.use(swiglu="triton")


def test_forcing_triton_on_cpu_without_interpreter(fake_triton, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    message = r"rms_norm: the triton backend needs CUDA tensors \(got cpu\).*use rms_norm=torch or auto.*TRITON_INTERPRET=1"
    with kernels.use(rms_norm="triton"):  # allowed: the device is only known at call time
        with pytest.raises(ValueError, match=message):
            kernels.rms_norm(*valid_args("rms_norm"))
        with pytest.raises(ValueError, match=message):
            kernels.active("cpu")
        assert kernels.active("cuda")["rms_norm"] == "triton"


def test_forcing_triton_on_other_devices(fake_triton):
    with kernels.use(swiglu="triton"), pytest.raises(ValueError,
                                                    match=r"swiglu: the triton backend needs CUDA tensors \(got meta\)"):
        kernels.active("meta")


