"""The input checks of the public ops in kernels/__init__.py (helpers in kernels/checks.py): each
bad input raises the same one-line error on both backends, before any backend runs; the range
checks and their switches (check_targets, check_key_lengths).

The backend switch is tested in test_backends.py; NaN propagation through every op on both
backends in test_kernels_nan.py.
"""
from __future__ import annotations

import pytest
import torch

from tritongpt import kernels
from tritongpt.kernels import reference
from numerics import cpu_randn as randn


# ----------------------------------------------------------------------------- input checks

x8, w8 = randn(2, 8), randn(8)
q, kv = randn(1, 4, 5, 8), randn(1, 2, 5, 8)
q2 = randn(1, 4, 2, 8)
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
                           "q (1, 4, 5, 8) and k (1, 2, 5, 4) must share the head dim"),
    "attention batch": (lambda: kernels.causal_attention(q, randn(2, 2, 5, 8), randn(2, 2, 5, 8)), ValueError,
                        "must share the batch size"),
    "attention heads": (lambda: kernels.causal_attention(q, randn(1, 3, 5, 8), randn(1, 3, 5, 8)), ValueError,
                        "query heads (4) must be a multiple of key/value heads (3)"),
    "attention no kv heads": (lambda: kernels.causal_attention(q, randn(1, 0, 5, 8), randn(1, 0, 5, 8)), ValueError,
                              "query heads (4) must be a multiple of key/value heads (0)"),
    "attention Tq > Tk": (lambda: kernels.causal_attention(randn(1, 4, 6, 8), kv, kv), ValueError,
                          "more queries (6) than keys (5)"),
    "attention Tq == 0": (lambda: kernels.causal_attention(randn(1, 4, 0, 8), kv, kv), ValueError, "q has no queries (Tq == 0)"),
    # causal_attention key_lengths: q2 has 2 queries against 5 keys
    "attention key_lengths float": (lambda: kernels.causal_attention(q2, kv, kv, key_lengths=torch.tensor([5.0])),
                                    ValueError, "key_lengths must be an int32 or int64 tensor, got torch.float32"),
    "attention key_lengths list": (lambda: kernels.causal_attention(q2, kv, kv, key_lengths=[5]), ValueError,
                                   "key_lengths must be an int32 or int64 tensor, got <class 'list'>"),
    "attention key_lengths shape": (lambda: kernels.causal_attention(q2, kv, kv, key_lengths=torch.tensor([5, 5])),
                                    ValueError, "key_lengths has shape (2,); expected (1,), one length per row of q "
                                                "(1, 4, 2, 8)"),
    "attention key_lengths device": (lambda: kernels.causal_attention(q2, kv, kv, key_lengths=torch.tensor([5], device=META)),
                                     ValueError, "key_lengths is on meta but q on cpu; move key_lengths to q's device"),
    "attention key_lengths < Tq": (lambda: kernels.causal_attention(q2, kv, kv, key_lengths=torch.tensor([1])),
                                   ValueError, "key length 1 is outside [2, 5]: a row needs at least its Tq queries' "
                                               "keys and at most the cache's Tk; fix the lengths or the cache size"),
    "attention key_lengths > Tk": (lambda: kernels.causal_attention(q2, kv, kv, key_lengths=torch.tensor([6], dtype=torch.int32)),
                                   ValueError, "key length 6 is outside [2, 5]"),
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
    with kernels.use(backend), pytest.raises(error) as info:
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



def test_check_key_lengths_off_skips_the_range_check(monkeypatch):
    monkeypatch.setattr(kernels, "check_key_lengths", False)
    monkeypatch.setattr(reference, "causal_attention", lambda *a, **kw: "reached the backend")
    assert kernels.causal_attention(q2, kv, kv, key_lengths=torch.tensor([9])) == "reached the backend"


def test_in_range_key_lengths_pass():
    out = kernels.causal_attention(q2, kv, kv, key_lengths=torch.tensor([2], dtype=torch.int32))
    torch.testing.assert_close(out, reference.causal_attention(q2, kv[:, :, :2], kv[:, :, :2]))


def test_key_lengths_are_range_checked_once_per_tensor():
    """A model passes one lengths tensor to every layer: the host sync of the range check runs for
    its first call only, and any other tensor (or the same one with other Tq, Tk) is checked again."""
    lengths, checked = torch.tensor([4]), []
    lengths.numel = lambda: checked.append(1) or 1             # the range check's first call on lengths
    kernels.causal_attention(q2, kv, kv, key_lengths=lengths)
    assert checked == [1]
    kernels.causal_attention(q2, kv, kv, key_lengths=lengths)
    assert checked == [1]                                      # the same tensor: no second check
    with pytest.raises(ValueError, match=r"key length 1 is outside \[2, 5\]"):
        kernels.causal_attention(q2, kv, kv, key_lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"key length 4 is outside \[2, 3\]"):
        kernels.causal_attention(q2, kv[:, :, :3], kv[:, :, :3], key_lengths=lengths)
