"""The backend switch and the input checks of the public ops in kernels/__init__.py, and NaN
propagation through every op on both backends.

Which ops have a Triton version changes as kernels/triton_*.py files land, so every test of the
switch that depends on it replaces kernels._triton_impls with stand-ins (fake_triton / no_triton)
instead. The NaN tests run the real backends (triton in the interpreter on CPU).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

import kernels
from kernels import quantization, reference
from numerics import cpu_randn as randn

OPS = kernels.OPS
REPO = Path(__file__).resolve().parents[2]
OPS_LIST = "rms_norm, swiglu, causal_attention, cross_entropy, linear_cross_entropy, quantized_linear"
BACKENDS_LIST = "auto, triton, torch"


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

    monkeypatch.setattr(kernels, "_triton_impls", {op: stand_in(op) for op in OPS})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return calls


@pytest.fixture
def no_triton(monkeypatch) -> None:
    """No op has a Triton version."""
    monkeypatch.setattr(kernels, "_triton_impls", {op: None for op in OPS})


def every(backend: str) -> dict[str, str]:
    return {op: backend for op in OPS}


def valid_args(op: str) -> tuple:
    """Small valid CPU inputs for op."""
    return {
        "rms_norm": lambda: (torch.randn(3, 8), torch.randn(8)),
        "swiglu": lambda: (torch.randn(3, 8), torch.randn(3, 8)),
        "causal_attention": lambda: (torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)),
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
    kernels.use("torch,rms_norm=triton")
    assert kernels.active("cpu") == {**every("torch"), "rms_norm": "triton"}
    kernels.use(swiglu="triton", rms_norm="auto")
    assert kernels.active("cuda") == {**every("torch"), "rms_norm": "triton", "swiglu": "triton"}
    assert kernels.active("cpu") == {**every("torch"), "swiglu": "triton"}
    kernels.use("triton", cross_entropy="torch")  # keywords override the spec
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
        assert isinstance(public(*valid_args(op)), torch.Tensor)
    assert isinstance(public(*valid_args(op)), torch.Tensor)  # auto on CPU tensors: torch
    assert fake_triton == [op]


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
    kernels.use("torch")
    assert kernels.active("cuda") == every("torch")


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
    result = run_python("import json, kernels; print(json.dumps([kernels.active('cuda'), "
                        "kernels.triton_available('swiglu'), kernels.check_targets]))",
                        TRITONGPT_KERNELS="torch,swiglu=auto", TRITONGPT_CHECK_TARGETS="0")
    assert result.returncode == 0, result.stderr
    active, swiglu_has_triton, check_targets = json.loads(result.stdout)
    assert active == {**every("torch"), "swiglu": "triton" if swiglu_has_triton else "torch"}
    assert check_targets is False


def test_bad_env_var_fails_import_with_the_choices():
    result = run_python("import kernels", TRITONGPT_KERNELS="nope")
    assert result.returncode != 0
    assert "ValueError: unknown kernel spec entry 'nope'" in result.stderr
    assert BACKENDS_LIST in result.stderr and OPS_LIST in result.stderr


def test_import_does_not_import_triton():
    """`import kernels` and CPU calls under auto stay clear of triton (it is slow to import and
    absent on some platforms)."""
    result = run_python("import sys, torch, kernels; kernels.active('cpu'); "
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
    monkeypatch.setitem(kernels._triton_impls, "cross_entropy", None)
    with pytest.raises(ValueError, match="cannot force triton for cross_entropy: it has no Triton version"):
        kernels.use("triton")
    kernels.use("triton,cross_entropy=torch")
    assert kernels.active("cpu") == {**every("triton"), "cross_entropy": "torch"}


def test_forcing_triton_when_triton_is_not_installed(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    monkeypatch.setattr(kernels, "_triton_impls", {})
    with pytest.raises(ValueError, match=r"cannot force triton for swiglu: triton is not installed \(pip install triton"):
        kernels.use(swiglu="triton")


def test_forcing_triton_on_cpu_without_interpreter(fake_triton, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    kernels.use(rms_norm="triton")  # allowed: the device is only known at call time
    message = r"rms_norm: the triton backend needs CUDA tensors \(got cpu\).*use rms_norm=torch or auto.*TRITON_INTERPRET=1"
    with pytest.raises(ValueError, match=message):
        kernels.rms_norm(*valid_args("rms_norm"))
    with pytest.raises(ValueError, match=message):
        kernels.active("cpu")
    assert kernels.active("cuda")["rms_norm"] == "triton"


def test_forcing_triton_on_other_devices(fake_triton):
    kernels.use(swiglu="triton")
    with pytest.raises(ValueError, match=r"swiglu: the triton backend needs CUDA tensors \(got meta\)"):
        kernels.active("meta")


# ----------------------------------------------------------------------------- input checks

x8, w8 = randn(2, 8), randn(8)
q, kv = randn(1, 4, 5, 8), randn(1, 2, 5, 8)
logits, targets = randn(4, 7), torch.tensor([0, 6, 3, -100])
hidden, head = randn(4, 8), randn(7, 8)
META = "meta"

BAD_INPUTS = {  # name: (call, exception type, message fragment)
    # rms_norm
    "rms_norm weight shape": (lambda: kernels.rms_norm(x8, randn(5)), ValueError,
                              "weight has shape (5,); expected (8,) to match the last dim of x (2, 8)"),
    "rms_norm weight 2d": (lambda: kernels.rms_norm(x8, randn(1, 8)), ValueError, "weight has shape (1, 8); expected (8,)"),
    "rms_norm scalar x": (lambda: kernels.rms_norm(torch.tensor(1.0), w8), ValueError, "expected (?,)"),
    "rms_norm int x": (lambda: kernels.rms_norm(x8.long(), w8), ValueError,
                       "x has dtype torch.int64; expected one of float32, float16, bfloat16"),
    "rms_norm float64 x": (lambda: kernels.rms_norm(x8.double(), w8), ValueError, "x has dtype torch.float64"),
    "rms_norm int weight": (lambda: kernels.rms_norm(x8, w8.int()), ValueError, "weight has dtype torch.int32"),
    "rms_norm not a tensor": (lambda: kernels.rms_norm([1.0] * 8, w8), TypeError, "x must be a torch.Tensor, got list"),
    "rms_norm residual shape": (lambda: kernels.rms_norm(x8, w8, residual=randn(1, 8)), ValueError,
                                "residual has shape (1, 8); expected x's shape (2, 8)"),
    "rms_norm residual dtype": (lambda: kernels.rms_norm(x8, w8, residual=x8.half()), ValueError,
                                "mismatched dtypes: x torch.float32, residual torch.float16; convert them to one dtype"),
    "rms_norm weight device": (lambda: kernels.rms_norm(x8, randn(8, device=META)), ValueError,
                               "mismatched devices: x cpu, weight meta; convert them to one device"),
    "rms_norm residual device": (lambda: kernels.rms_norm(x8, w8, residual=randn(2, 8, device=META)), ValueError,
                                 "mismatched devices: x cpu, weight cpu, residual meta"),
    "rms_norm eps negative": (lambda: kernels.rms_norm(x8, w8, eps=-1e-6), ValueError,
                              "eps must be a finite number > 0, got -1e-06; pass a small positive value such as 1e-6"),
    "rms_norm eps zero": (lambda: kernels.rms_norm(x8, w8, eps=0.0), ValueError, "eps must be a finite number > 0, got 0.0;"),
    "rms_norm eps nan": (lambda: kernels.rms_norm(x8, w8, eps=float("nan")), ValueError, "eps must be a finite number > 0, got nan;"),
    "rms_norm eps inf": (lambda: kernels.rms_norm(x8, w8, eps=float("inf")), ValueError, "eps must be a finite number > 0, got inf;"),
    "rms_norm eps str": (lambda: kernels.rms_norm(x8, w8, eps="1e-6"), ValueError, "eps must be a finite number > 0, got '1e-6';"),
    "rms_norm eps bool": (lambda: kernels.rms_norm(x8, w8, eps=True), ValueError, "eps must be a finite number > 0, got True;"),
    "rms_norm residual eps": (lambda: kernels.rms_norm(x8, w8, eps=-1.0, residual=x8), ValueError,
                              "eps must be a finite number > 0, got -1.0;"),
    # swiglu
    "swiglu shapes": (lambda: kernels.swiglu(x8, randn(2, 7)), ValueError,
                      "gate has shape (2, 8) but up has (2, 7); they must match"),
    "swiglu dtypes": (lambda: kernels.swiglu(x8, x8.bfloat16()), ValueError,
                      "mismatched dtypes: gate torch.float32, up torch.bfloat16"),
    "swiglu devices": (lambda: kernels.swiglu(x8, randn(2, 8, device=META)), ValueError,
                       "mismatched devices: gate cpu, up meta"),
    "swiglu int": (lambda: kernels.swiglu(x8.long(), x8), ValueError, "gate has dtype torch.int64"),
    # causal_attention
    "attention 3d q": (lambda: kernels.causal_attention(randn(4, 5, 8), kv, kv), ValueError,
                       "q has shape (4, 5, 8); expected 4 dims (batch, heads, time, head_dim)"),
    "attention 5d v": (lambda: kernels.causal_attention(q, kv, kv[None]), ValueError, "v has shape (1, 1, 2, 5, 8); expected 4 dims"),
    "attention int k": (lambda: kernels.causal_attention(q, kv.long(), kv), ValueError, "k has dtype torch.int64"),
    "attention dtypes": (lambda: kernels.causal_attention(q, kv, kv.half()), ValueError,
                         "mismatched dtypes: q torch.float32, k torch.float32, v torch.float16"),
    "attention devices": (lambda: kernels.causal_attention(q, kv, randn(1, 2, 5, 8, device=META)), ValueError,
                          "mismatched devices: q cpu, k cpu, v meta"),
    "attention k v shapes": (lambda: kernels.causal_attention(q, kv, randn(1, 2, 6, 8)), ValueError,
                             "k has shape (1, 2, 5, 8) but v has (1, 2, 6, 8); they must match"),
    "attention head dim": (lambda: kernels.causal_attention(q, randn(1, 2, 5, 4), randn(1, 2, 5, 4)), ValueError,
                           "q (1, 4, 5, 8) and k (1, 2, 5, 4) must share batch size and head dim"),
    "attention batch": (lambda: kernels.causal_attention(q, randn(2, 2, 5, 8), randn(2, 2, 5, 8)), ValueError,
                        "must share batch size and head dim"),
    "attention heads": (lambda: kernels.causal_attention(q, randn(1, 3, 5, 8), randn(1, 3, 5, 8)), ValueError,
                        "query heads (4) must be a multiple of key/value heads (3)"),
    "attention no kv heads": (lambda: kernels.causal_attention(q, randn(1, 0, 5, 8), randn(1, 0, 5, 8)), ValueError,
                              "query heads (4) must be a multiple of key/value heads (0)"),
    "attention Tq > Tk": (lambda: kernels.causal_attention(randn(1, 4, 6, 8), kv, kv), ValueError,
                          "more queries (6) than keys (5)"),
    "attention Tq == 0": (lambda: kernels.causal_attention(randn(1, 4, 0, 8), kv, kv), ValueError, "q has no queries (Tq == 0)"),
    # cross_entropy
    "ce 3d logits": (lambda: kernels.cross_entropy(logits[None], targets), ValueError,
                     "logits has shape (1, 4, 7); expected (N, V): flatten leading dims first"),
    "ce int logits": (lambda: kernels.cross_entropy(logits.long(), targets), ValueError, "logits has dtype torch.int64"),
    "ce int32 targets": (lambda: kernels.cross_entropy(logits, targets.int()), ValueError,
                         "targets must be an int64 tensor, got torch.int32"),
    "ce float targets": (lambda: kernels.cross_entropy(logits, targets.float()), ValueError,
                         "targets must be an int64 tensor, got torch.float32"),
    "ce list targets": (lambda: kernels.cross_entropy(logits, [0, 1, 2, 3]), ValueError, "targets must be an int64 tensor"),
    "ce targets 2d": (lambda: kernels.cross_entropy(logits, targets[:, None]), ValueError,
                      "targets has shape (4, 1); expected (4,) to match logits"),
    "ce targets length": (lambda: kernels.cross_entropy(logits, targets[:3]), ValueError, "targets has shape (3,); expected (4,)"),
    "ce target too big": (lambda: kernels.cross_entropy(logits, torch.tensor([0, 7, 3, 1])), ValueError,
                          "target id 7 is outside [0, 7) and is not ignore_index (-100)"),
    "ce target negative": (lambda: kernels.cross_entropy(logits, torch.tensor([0, 1, -5, 2])), ValueError,
                           "target id -5 is outside [0, 7)"),
    "ce -100 not ignored": (lambda: kernels.cross_entropy(logits, targets, ignore_index=-1), ValueError,
                            "target id -100 is outside [0, 7) and is not ignore_index (-1)"),
    "ce devices": (lambda: kernels.cross_entropy(randn(4, 7, device=META), targets), ValueError,
                   "mismatched devices: logits meta, targets cpu"),
    "ce reduction": (lambda: kernels.cross_entropy(logits, targets, reduction="avg"), ValueError,
                     "reduction must be 'mean', 'sum' or 'none', got 'avg'"),
    "ce smoothing high": (lambda: kernels.cross_entropy(logits, targets, label_smoothing=1.5), ValueError,
                          "label_smoothing must be in [0, 1], got 1.5"),
    "ce smoothing negative": (lambda: kernels.cross_entropy(logits, targets, label_smoothing=-0.1), ValueError,
                              "label_smoothing must be in [0, 1], got -0.1"),
    "ce z_loss": (lambda: kernels.cross_entropy(logits, targets, z_loss=-1e-3), ValueError, "z_loss must be >= 0, got -0.001"),
    # linear_cross_entropy
    "lce 3d hidden": (lambda: kernels.linear_cross_entropy(hidden[None], head, targets), ValueError,
                      "hidden (1, 4, 8) and weight (7, 8) must be (N, D) and (V, D)"),
    "lce hidden dim": (lambda: kernels.linear_cross_entropy(hidden, randn(7, 6), targets), ValueError,
                       "hidden (4, 8) and weight (7, 6) must be (N, D) and (V, D)"),
    "lce int weight": (lambda: kernels.linear_cross_entropy(hidden, head.long(), targets), ValueError,
                       "weight has dtype torch.int64"),
    "lce targets dtype": (lambda: kernels.linear_cross_entropy(hidden, head, targets.int()), ValueError,
                          "targets must be an int64 tensor, got torch.int32"),
    "lce targets length": (lambda: kernels.linear_cross_entropy(hidden, head, targets[:2]), ValueError,
                           "targets has shape (2,); expected (4,) to match hidden"),
    "lce target too big": (lambda: kernels.linear_cross_entropy(hidden, head, torch.tensor([9, 0, 1, 2])), ValueError,
                           "target id 9 is outside [0, 7)"),
    "lce devices": (lambda: kernels.linear_cross_entropy(hidden, randn(7, 8, device=META), targets), ValueError,
                    "mismatched devices: hidden cpu, weight meta, targets cpu"),
    "lce reduction": (lambda: kernels.linear_cross_entropy(hidden, head, targets, reduction="mean "), ValueError,
                      "got 'mean '"),
    "lce smoothing": (lambda: kernels.linear_cross_entropy(hidden, head, targets, label_smoothing=2), ValueError,
                      "label_smoothing must be in [0, 1], got 2"),
    "lce z_loss": (lambda: kernels.linear_cross_entropy(hidden, head, targets, z_loss=-1), ValueError, "z_loss must be >= 0"),
    "lce chunk 0": (lambda: kernels.linear_cross_entropy(hidden, head, targets, chunk_size=0), ValueError,
                    "chunk_size must be a positive number of rows, got 0"),
    "lce chunk negative": (lambda: kernels.linear_cross_entropy(hidden, head, targets, chunk_size=-3), ValueError,
                           "got -3"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs(case, backend, fake_triton):
    """Each bad input raises the same error on both backends, before any backend runs."""
    call, error, message = BAD_INPUTS[case]
    kernels.use(backend)
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)
    assert fake_triton == []


@pytest.mark.parametrize("eps", [1, 1e-12, 0.5])
def test_rms_norm_accepts_any_positive_finite_eps(eps):
    y = kernels.rms_norm(x8, w8, eps=eps)
    assert torch.equal(y, reference.rms_norm(x8, w8, float(eps)))


def test_ignored_and_in_range_targets_pass():
    kernels.cross_entropy(logits, torch.tensor([-100, 0, 6, -100]))
    kernels.cross_entropy(logits, torch.tensor([7, 0, 6, 7]), ignore_index=7)  # ignore_index == V
    kernels.linear_cross_entropy(hidden, head, torch.full((4,), -100))


@pytest.mark.parametrize("op, args", [
    ("cross_entropy", (logits, torch.tensor([0, 99, 3, -7]))),
    ("linear_cross_entropy", (hidden, head, torch.tensor([0, 99, 3, -7]))),
])
def test_check_targets_off_skips_the_range_check(op, args, monkeypatch):
    monkeypatch.setattr(kernels, "check_targets", False)
    monkeypatch.setattr(reference, op, lambda *a: "reached the backend")
    assert getattr(kernels, op)(*args) == "reached the backend"


@pytest.mark.parametrize("op, args", [
    ("cross_entropy", (logits, torch.zeros(4, dtype=torch.int64, device=META))),
    ("linear_cross_entropy", (hidden, head, torch.zeros(4, dtype=torch.int64, device=META))),
])
def test_targets_on_another_device(op, args):
    with pytest.raises(ValueError, match="mismatched devices"):
        getattr(kernels, op)(*args)
