"""The optimizers (train/optim.py): which parameters each updates, their learning rates under the
loop's schedule, and exact resume with Muon (driven by the loop tests' synthetic job)."""
import pytest
import torch

from train.config import TrainConfig
from train.schedule import lr_at
from train.optim import Muon, Optimizers, hidden_matrices, make_optimizer, orthogonalize
from tests.train.test_loop import tiny_model, train

CPU = torch.device("cpu")


def test_adamw_decays_only_matrices():
    model = tiny_model()
    decay, no_decay = make_optimizer(model, TrainConfig(weight_decay=0.1), CPU).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 2 * 2 + 1   # the norm weights


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model()
    cfg = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02, muon_weight_decay=0.01, weight_decay=0.1)
    optimizer = make_optimizer(model, cfg, CPU)
    assert isinstance(optimizer, Optimizers)
    adamw, muon = optimizer
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    on_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    on_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert {names[i] for i in on_muon} == matrices and len(matrices) == 2 * 5     # qkv, out, gate, up, down
    assert {names[i] for i in on_adamw} == set(names.values()) - matrices      # embedding (tied head), norms
    fused, others = muon.param_groups
    assert {names[id(p)] for p in fused["params"]} == {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"}
    assert fused["sections"] == [64, 32, 32] and others["sections"] is None     # q, k, v rows: 4 and 2 * 2 heads of 16
    for group in fused, others:
        assert group["lr_scale"] == pytest.approx(0.02 / 3e-3) and group["weight_decay"] == 0.01
        assert group["momentum"] == 0.95
    assert adamw.param_groups[0]["weight_decay"] == 0.1 and len(optimizer.param_groups) == 4


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_orthogonalize_keeps_the_singular_vectors_and_evens_the_values(shape):
    torch.manual_seed(0)
    r = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], r, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], r, dtype=torch.float64))
    g = u @ torch.diag(torch.logspace(-1, 0, r, dtype=torch.float64)) @ v.T      # singular values 0.1 .. 1
    o = orthogonalize(g, torch.float32)
    assert o.dtype == g.dtype
    inner = u.T @ o @ v                                      # diagonal: the same singular vectors
    scale = max(1.0, shape[0] / shape[1]) ** 0.5
    values = inner.diagonal() / scale
    assert (inner - torch.diag(inner.diagonal())).abs().max() < 1e-4
    assert values.min() > 0.6 and values.max() < 1.25, values    # the iteration's band around 1


def test_a_fused_matrix_is_orthogonalized_by_sections():
    """q, k, v stacked in one parameter update as three matrices: each section's update is what
    that matrix alone would get (lr 1, no momentum: the update is the orthogonalized gradient)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(40, 16))
    p.grad = torch.randn(40, 16)
    Muon([{"params": [p], "sections": [16, 8, 16]}], lr=1.0, momentum=0.0).step()
    expected = torch.cat([-orthogonalize(m, torch.float32) for m in p.grad.split([16, 8, 16])])
    torch.testing.assert_close(p.data, expected)
    assert not torch.allclose(p.data, -orthogonalize(p.grad, torch.float32), atol=1e-2)


def test_frozen_matrices_are_left_out():
    model = tiny_model()
    model.blocks[0].mlp.up.weight.requires_grad_(False)
    assert len(hidden_matrices(model)) == 2 * 5 - 1
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    assert all(p.requires_grad for g in optimizer.param_groups for p in g["params"])


def test_each_group_follows_the_schedule_at_its_own_peak(tmp_path):
    result, records = train(tmp_path, "muon", optimizer="muon", max_steps=12, muon_lr=0.03, lr=3e-3, min_lr=3e-4)
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.5        # it learns
    checkpoint = torch.load(tmp_path / "muon" / "checkpoints" / "step_000012" / "optimizer.pt", weights_only=False)
    lrs = sorted(g["lr"] for g in checkpoint["optimizer"]["param_groups"])
    last = lr_at(11, TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=3), 12)
    assert lrs == pytest.approx([last, last, last * 10, last * 10])     # Muon's two scaled by 0.03 / 3e-3


def test_exact_resume_with_muon(tmp_path):
    _, straight = train(tmp_path, "straight", optimizer="muon")
    stopped, _ = train(tmp_path, "split", optimizer="muon", stop_after=10)
    assert stopped["stopped_early"] == "step 10 of 20 (--stop-after 10)"
    _, resumed = train(tmp_path, "split", optimizer="muon", resume=str(tmp_path / "split"))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]


def test_bad_momentum_is_refused():
    with pytest.raises(ValueError, match="muon_momentum: must be in \\[0, 1\\), got 1.0"):
        TrainConfig(muon_momentum=1.0)
