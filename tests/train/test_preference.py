"""The preference losses of train/preference.py against direct float64 implementations of the
papers' equations (written here, scalar by scalar, with math), their gradients against central
differences of those, KTO's data and its bad inputs, and a short `train.dpo --loss X` run per loss."""
import json
import math

import pytest
import torch

from posttrain_fixtures import make_run, tokenizer
from train import dpo, preference
from train.data import tasks
from train.data.sft_data import encode_unpaired, load_kto
from train.runtime import setup

TINY = ["--device", "cpu", "--batch-size", "4", "--n-train", "24", "--eval-examples", "7", "--lr", "1e-3",
        "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0", "--rejected", "rule",
        "--pretrain-mix", "0"]


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# The papers' losses for one example, in their own notation (w: chosen / winner, l: rejected / loser).

def dpo_paper(pi_w, pi_l, ref_w, ref_l, beta):                  # Rafailov et al. 2023, eq. 7
    return -math.log(sigmoid(beta * math.log(math.exp(pi_w) / math.exp(ref_w))
                             - beta * math.log(math.exp(pi_l) / math.exp(ref_l))))


def ipo_paper(pi_w, pi_l, ref_w, ref_l, tau):                   # Azar et al. 2023, eq. 17
    h = math.log(math.exp(pi_w) * math.exp(ref_l) / (math.exp(pi_l) * math.exp(ref_w)))
    return (h - 1 / (2 * tau)) ** 2


def simpo_paper(pi_w, pi_l, n_w, n_l, beta, gamma):             # Meng et al. 2024, eq. 6
    return -math.log(sigmoid(beta / n_w * pi_w - beta / n_l * pi_l - gamma))


def orpo_paper(pi_w, pi_l, n_w, n_l, lam):                      # Hong et al. 2024, eqs. 2-7
    p_w, p_l = math.exp(pi_w / n_w), math.exp(pi_l / n_l)       # P(y|x): the per-token likelihood
    odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
    l_sft = -pi_w / n_w
    return l_sft + lam * -math.log(sigmoid(math.log(odds_w / odds_l)))


def kto_paper(pi, ref, kl_pi, kl_ref, desirable, beta, lam_d, lam_u):    # Ethayarajh et al. 2024, eq. 8
    z0 = max(0.0, sum(a - b for a, b in zip(kl_pi, kl_ref)) / len(kl_pi))
    losses = []
    for p, q, good in zip(pi, ref, desirable):
        r = p - q
        v = lam_d * sigmoid(beta * (r - z0)) if good else lam_u * sigmoid(beta * (z0 - r))
        losses.append((lam_d if good else lam_u) - v)
    return losses


def inputs(seed=0, B=6):
    """Random (B,) float64 summed log-probs (< 0) and token counts, a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    n_c, n_r = torch.randint(1, 7, (B,), generator=g).double(), torch.randint(1, 7, (B,), generator=g).double()
    pi_c, pi_r = -torch.rand(B, generator=g, dtype=torch.float64) * 3 * n_c, \
        -torch.rand(B, generator=g, dtype=torch.float64) * 3 * n_r
    ref_c, ref_r = pi_c - torch.randn(B, generator=g, dtype=torch.float64), pi_r - torch.randn(B, generator=g,
                                                                                          dtype=torch.float64)
    return pi_c, pi_r, ref_c, ref_r, n_c, n_r


PAIRED = {   # name: (our loss on the (B,) tensors, the paper's on one pair's floats)
    "dpo": (lambda pc, pr, rc, rr, nc, nr: preference.dpo(pc, pr, rc, rr, 0.3),
            lambda pc, pr, rc, rr, nc, nr: dpo_paper(pc, pr, rc, rr, 0.3)),
    "ipo": (lambda pc, pr, rc, rr, nc, nr: preference.ipo(pc, pr, rc, rr, 0.4),
            lambda pc, pr, rc, rr, nc, nr: ipo_paper(pc, pr, rc, rr, 0.4)),
    "simpo": (lambda pc, pr, rc, rr, nc, nr: preference.simpo(pc, pr, nc, nr, 2.5, 1.2),
              lambda pc, pr, rc, rr, nc, nr: simpo_paper(pc, pr, nc, nr, 2.5, 1.2)),
    "orpo": (lambda pc, pr, rc, rr, nc, nr: preference.orpo(pc, pr, nc, nr, 0.7),
             lambda pc, pr, rc, rr, nc, nr: orpo_paper(pc, pr, nc, nr, 0.7)),
}


@pytest.mark.parametrize("name", PAIRED)
def test_paired_loss_equals_the_papers_formula(name):
    ours, paper = PAIRED[name]
    args = inputs()
    losses, chosen, rejected = ours(*args)
    assert losses.dtype == torch.float64 and losses.shape == (6,)
    want = torch.tensor([paper(*map(float, row)) for row in zip(*args)], dtype=torch.float64)
    assert torch.allclose(losses, want, rtol=1e-10, atol=1e-12)
    assert chosen.shape == rejected.shape == (6,)


@pytest.mark.parametrize("name", PAIRED)
def test_paired_loss_gradients_equal_central_differences_of_the_paper(name):
    ours, paper = PAIRED[name]
    args = [a.clone().requires_grad_(i < 4) for i, a in enumerate(inputs(seed=1))]
    ours(*args)[0].sum().backward()
    h = 1e-6
    for i in range(4):                     # pi_c, pi_r, ref_c, ref_r
        for b in range(6):
            row = [a[b].item() for a in args]
            up, down = row.copy(), row.copy()
            up[i] += h
            down[i] -= h
            numeric = (paper(*up) - paper(*down)) / (2 * h)
            got = 0.0 if args[i].grad is None else args[i].grad[b].item()     # simpo, orpo: no reference
            assert got == pytest.approx(numeric, rel=1e-6, abs=1e-8), (i, b)


def test_rewards_and_what_reward_accuracy_compares():
    pi_c, pi_r, ref_c, ref_r, n_c, n_r = inputs()
    _, chosen, rejected = preference.dpo(pi_c, pi_r, ref_c, ref_r, 0.3)
    assert torch.allclose(chosen, 0.3 * (pi_c - ref_c)) and torch.allclose(rejected, 0.3 * (pi_r - ref_r))
    _, chosen, rejected = preference.simpo(pi_c, pi_r, n_c, n_r, 2.5, 1.2)
    assert torch.allclose(chosen, 2.5 * pi_c / n_c)
    _, chosen, _ = preference.orpo(pi_c, pi_r, n_c, n_r, 0.7)
    p = torch.exp(pi_c / n_c)
    assert torch.allclose(chosen, torch.log(p / (1 - p)))


def test_ipo_is_zero_at_its_target_margin():
    ref = torch.zeros(2, dtype=torch.float64)
    losses, _, _ = preference.ipo(torch.tensor([1.25, -1.0], dtype=torch.float64),
                                  torch.tensor([0.0, -2.25], dtype=torch.float64), ref, ref, tau=0.4)
    assert torch.allclose(losses, torch.zeros(2, dtype=torch.float64))       # margin 1.25 = 1 / (2 * 0.4)


def test_orpo_of_a_reply_the_model_is_sure_of_stays_finite():
    pi = torch.tensor([0.0, -1e-9], dtype=torch.float32, requires_grad=True)   # fp32 rounds log-probs to 0
    losses, chosen, _ = preference.orpo(pi, torch.tensor([-3.0, -0.0]), torch.tensor([2.0, 2.0]),
                                        torch.tensor([2.0, 2.0]), 0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pi.grad).all() and torch.isfinite(chosen).all()


def kto_inputs(seed=0, B=8):
    g = torch.Generator().manual_seed(seed)
    pi = -torch.rand(B, generator=g, dtype=torch.float64) * 10
    ref = pi - torch.randn(B, generator=g, dtype=torch.float64)
    kl_pi = -torch.rand(B, generator=g, dtype=torch.float64) * 20
    kl_ref = kl_pi - torch.randn(B, generator=g, dtype=torch.float64) - 0.5      # a positive KL estimate
    desirable = torch.tensor([True, False, True, True, False, False, True, False][:B])
    return pi, ref, kl_pi, kl_ref, desirable


@pytest.mark.parametrize("shift", [0.0, -5.0])           # a negative KL estimate is clamped to z0 = 0
def test_kto_equals_the_papers_formula(shift):
    pi, ref, kl_pi, kl_ref, desirable = kto_inputs()
    kl_ref = kl_ref - shift if shift else kl_ref
    kl_pi = kl_pi + shift
    losses, rewards, z0 = preference.kto(pi, ref, kl_pi, kl_ref, desirable, 0.2, 1.0, 1.33)
    want = kto_paper(pi.tolist(), ref.tolist(), kl_pi.tolist(), kl_ref.tolist(), desirable.tolist(), 0.2, 1.0, 1.33)
    assert torch.allclose(losses, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert torch.allclose(rewards, 0.2 * (pi - ref))
    assert (z0.item() == 0) == (shift < 0) and z0.item() >= 0


def test_kto_gradients_equal_the_papers_and_none_reaches_the_reference_point():
    pi, ref, kl_pi, kl_ref, desirable = kto_inputs(seed=3)
    pi, kl_pi = pi.clone().requires_grad_(), kl_pi.clone().requires_grad_()
    preference.kto(pi, ref, kl_pi, kl_ref, desirable, 0.2, 1.0, 1.33)[0].sum().backward()
    assert kl_pi.grad is None or not kl_pi.grad.any()          # z0 is detached
    h = 1e-6
    for b in range(len(pi)):
        up, down = pi.detach().clone(), pi.detach().clone()
        up[b] += h
        down[b] -= h
        args = (ref.tolist(), kl_pi.tolist(), kl_ref.tolist(), desirable.tolist(), 0.2, 1.0, 1.33)
        numeric = (sum(kto_paper(up.tolist(), *args)) - sum(kto_paper(down.tolist(), *args))) / (2 * h)
        assert pi.grad[b].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9)


# KTO's data.

def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_kto_records_load(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", ['{"prompt": "p", "completion": "c", "label": true}', "",
                                                '{"prompt": "q", "completion": "d", "label": false}'])
    assert load_kto(path) == [{"prompt": "p", "completion": "c", "label": True},
                              {"prompt": "q", "completion": "d", "label": False}]


@pytest.mark.parametrize("lines, message", [
    ([], "kto.jsonl: no examples (the file is empty)"),
    (['{"prompt": "p", "completion": "c"}'], "kto.jsonl:1: missing field 'label' (true for a desirable completion, "
                                             "false for an undesirable one)"),
    (['{"prompt": "p", "completion": "c", "label": "yes"}'], "kto.jsonl:1: field 'label' must be true or false, "
                                                             "got \"yes\""),
    (['{"prompt": "p", "completion": "c", "label": 1}'], "kto.jsonl:1: field 'label' must be true or false, got 1"),
    (['{"prompt": "p", "chosen": "c", "rejected": "d", "label": true}'], "kto.jsonl:1: missing field 'completion'"),
])
def test_bad_kto_records_are_one_line(tmp_path, lines, message):
    with pytest.raises(ValueError) as e:
        load_kto(write_jsonl(tmp_path / "kto.jsonl", lines))
    assert str(e.value).endswith(message) and "\n" not in str(e.value)


def test_a_bad_kto_file_is_one_line_from_the_command(tmp_path, capsys):
    init = make_run(tmp_path / "sft")
    path = write_jsonl(tmp_path / "kto.jsonl", ['{"prompt": "p", "completion": "c", "label": "no"}'])
    with pytest.raises(SystemExit) as e:
        dpo.run_command(lambda: dpo.main(["--init", str(init), "--out", str(tmp_path / "x"), "--loss", "kto",
                                          "--data", str(path), *TINY]))
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {path}:1: field 'label' must be true or false, got \"no\""


def test_ipo_without_beta_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dpo.run_command(lambda: dpo.main(["--init", str(make_run(tmp_path / "sft")), "--loss", "ipo",
                                          "--beta", "0", *TINY]))
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == \
        "error: --loss ipo needs --beta > 0: it pulls the log-ratio margin to 1 / (2 beta)"


def test_mismatched_pairs_take_the_next_examples_completion():
    records = [{"prompt": f"What is {i} + 1?", "completion": str(i + 1), "label": i % 2 == 0} for i in range(3)]
    examples = [e for e, _ in encode_unpaired(records, tokenizer(), 128)[0]]
    swapped = [{**records[i], "completion": records[(i + 1) % 3]["completion"]} for i in range(3)]
    assert dpo.mismatched(examples, 128) == [e for e, _ in encode_unpaired(swapped, tokenizer(), 128)[0]]
    cut = dpo.mismatched(examples, 5)
    assert [len(e) for e in cut] == [6] * 3 and cut[0].ids == examples[0].ids[:6]


# `python -m train.dpo --loss X` end to end on the tiny model.

FIRST_LOSS = {"dpo": math.log(2), "ipo": 1 / (4 * 0.1 ** 2), "kto": 0.5}   # policy == reference at step 1


@pytest.mark.parametrize("loss", dpo.LOSSES)
def test_each_loss_trains_end_to_end(loss, tmp_path, monkeypatch):
    if loss in dpo.REFERENCE_FREE:      # reference-free: no reference model, no reference log-probs
        monkeypatch.setattr(dpo.DPOJob, "reference_logps", lambda *a: pytest.fail("reference computed"))
    out = tmp_path / loss
    result = dpo.main(["--init", str(make_run(tmp_path / "sft")), "--out", str(out), "--loss", loss,
                       "--max-steps", "6", *TINY])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r[f"{loss}_loss"] if loss != "orpo" else r["train_loss"] for r in logged if "train_loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    if loss in FIRST_LOSS:
        assert losses[0] == pytest.approx(FIRST_LOSS[loss], rel=1e-5)
        assert logged[0]["val_loss"] == pytest.approx(FIRST_LOSS[loss], rel=1e-5)
        assert logged[0]["val_reward_acc"] == 0                          # every implicit reward is 0
    assert result["val_loss"] < logged[0]["val_loss"]                     # the held-out pairs' loss fell
    by_kind = [result[f"val_reward_acc_{kind}"] for kind in tasks.KINDS]   # held-out pairs, one per kind
    assert sum(by_kind) / len(by_kind) == pytest.approx(result["val_reward_acc"])
    assert {"exact_match", "val_margin", "reward_acc", "chosen_reward"} <= set(result)
    assert ("kl" in result) == (loss == "kto") and ("chosen_nll" in result) == (loss != "orpo")


def test_kto_trains_on_an_unpaired_file(tmp_path):
    records = [{"prompt": t.prompt, "completion": t.answer if i % 3 else t.wrong, "label": bool(i % 3)}
               for i, t in enumerate(tasks.make_tasks("train", 40))]
    path = write_jsonl(tmp_path / "kto.jsonl", [json.dumps(r) for r in records])
    cfg = dpo.STAGE.parse(["--init", str(make_run(tmp_path / "sft")), "--out", str(tmp_path / "kto"), "--loss",
                           "kto", "--data", str(path), "--max-steps", "3", *TINY])
    job, _ = dpo.build(cfg, setup("cpu", "fp32"))
    assert len(job.train) == 38 and len(job.val) == 2 and job.val_kinds is None    # the last 5% held out
    assert [d for _, d in job.train] == [r["label"] for r in records[:38]]
    batch = job.batch(0, 0)
    assert batch["desirable"].shape == batch["ref"].shape == batch["kl_ref"].shape == (4,)
    result = dpo.main(["--init", str(make_run(tmp_path / "sft2")), "--out", str(tmp_path / "kto2"), "--loss",
                       "kto", "--data", str(path), "--max-steps", "3", *TINY])
    assert math.isfinite(result["val_loss"]) and "val_reward_acc" in result and "val_margin" not in result
