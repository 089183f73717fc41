"""GRPO: the advantages and the clipped loss against float64 references, zero gradient from a group
whose rewards are all equal, the sampled groups, exact reproduction and resume, bad inputs as one
line, and end-to-end runs of `python -m train.grpo` through main(argv)."""
import json

import pytest
import torch

from posttrain_fixtures import make_run, tiny_model, tokenizer
from model.chat_format import ChatTokens
from model.io.checkpoint import load_model
from train import grpo
from train.data import tasks
from train.runtime import setup

TINY = ["--device", "cpu", "--batch-size", "2", "--group", "3", "--n-train", "24", "--eval-examples", "7",
        "--lr", "1e-3", "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0", "--max-minutes", "0"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_group_advantages_against_float64():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.1], [0.1, 0.1, 0.1, 0.1], [1.1, 0.0, 0.1, 0.1]])
    r = rewards.double()
    mean = r.sum(1, keepdim=True) / 4
    std = ((r - mean) ** 2).sum(1, keepdim=True).div(3).sqrt()
    assert torch.allclose(grpo.group_advantages(rewards, scale=False).double(), r - mean, atol=1e-6)
    assert torch.allclose(grpo.group_advantages(rewards).double(), (r - mean) / (std + 1e-4), atol=1e-5)
    assert (grpo.group_advantages(rewards)[1] == 0).all()               # all equal: no advantage


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_and_gradient_against_float64(beta):
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(50, generator=g) * 3).requires_grad_()
    old = (logp.detach() + torch.randn(50, generator=g) * 0.3)          # ratios well inside and outside the clip
    ref = logp.detach() + torch.randn(50, generator=g) * 0.5
    adv = torch.randn(50, generator=g)
    loss, metrics = grpo.policy_loss(logp, old, ref, adv, clip=0.2, beta=beta)
    loss.backward()

    lp = logp.detach().double().requires_grad_()
    ratio = torch.exp(lp - old.double())
    unclipped, clipped = ratio * adv.double(), torch.clamp(ratio, 0.8, 1.2) * adv.double()
    kl = torch.exp(ref.double() - lp) - (ref.double() - lp) - 1
    expected = (-torch.where(unclipped < clipped, unclipped, clipped) + beta * kl).mean()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(logp.grad.double(), lp.grad, rtol=1e-4, atol=1e-7)
    assert metrics["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-5)
    assert 0 < metrics["clipped"].item() < 1


def prompts(n=4):
    tok = tokenizer()
    return grpo.encode_prompts(tasks.make_tasks("train", n), tok, 128, "tasks")


def test_sampled_groups_are_seeded_and_cut_after_the_stop_token():
    model, stop = tiny_model().eval(), ChatTokens.of(tokenizer()).stop
    got = grpo.sample_replies(model, prompts(), 3, 12, 1.0, stop, seed=5)
    assert len(got) == 12 and got == grpo.sample_replies(model, prompts(), 3, 12, 1.0, stop, seed=5)
    assert got != grpo.sample_replies(model, prompts(), 3, 12, 1.0, stop, seed=6)
    for reply in got:
        assert 1 <= len(reply) <= 12
        assert not set(reply[:-1]) & set(stop)               # nothing after a stop token
    # Greedy: a prompt's group is its one reply, whatever the group's size.
    greedy = grpo.sample_replies(model, prompts(), 3, 12, 0.0, stop, seed=5)
    assert all(greedy[i] == greedy[i - i % 3] for i in range(12))


def job_for(rewarded, tmp_path, **flags):
    """A GRPO job on a tiny run whose verifier rewards the replies for which rewarded(reply) holds."""
    init = make_run(tmp_path / "init")
    cfg = grpo.STAGE.parse(["--init", str(init), *TINY, "--pretrain-mix", "0",
                            *[x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]])
    return grpo.build(cfg, setup("cpu", "fp32"), verifier=lambda reply, answer: float(rewarded(reply)))


def policy_gradient(job, model):
    model.zero_grad()
    loss, _ = job.loss(model, job.batch(0, 0))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_groups_whose_rewards_are_all_equal_give_zero_gradient(tmp_path):
    job, model = job_for(lambda reply: True, tmp_path, format_reward=0)
    batch = job.batch(0, 0)
    assert (batch["advantages"] == 0).all() and batch["stats"]["zero_var"].item() == 1
    grad = policy_gradient(job, model)
    assert grad.abs().max().item() == 0
    # Rewarded by a property of their text, a group's replies differ: a gradient.
    job2, model2 = job_for(lambda reply: sum(map(ord, reply)) % 2 == 0, tmp_path / "b", format_reward=0)
    assert policy_gradient(job2, model2).abs().max().item() > 0


def test_loss_uses_the_reply_tokens_of_each_group(tmp_path):
    job, model = job_for(lambda reply: "1" in reply, tmp_path)
    batch = job.batch(0, 0)
    assert batch["advantages"].shape == (6,)            # 2 prompts x 3 replies
    targets = batch["y"] != -100
    assert targets.sum() == len(batch["ref_logp"])
    # The policy is the reference at step 0: kl 0, the loss -mean(A) over tokens.
    loss, metrics = job.loss(model, batch)
    assert metrics["kl"].abs().item() < 1e-6
    per_token = batch["advantages"][batch["segment"][targets]]
    assert loss.item() == pytest.approx(-per_token.mean().item(), abs=1e-6)


def test_runs_learn_reproduce_and_resume_exactly(tmp_path, capsys):
    init = make_run(tmp_path / "init")
    argv = ["--init", str(init), *TINY, "--max-steps", "4"]
    full = grpo.main([*argv, "--out", str(tmp_path / "a")])
    again = grpo.main([*argv, "--out", str(tmp_path / "b")])
    grpo.main([*argv, "--out", str(tmp_path / "c"), "--stop-after", "2"])
    grpo.main(["--resume", str(tmp_path / "c")])
    weights = [load_model(tmp_path / run)[0].state_dict() for run in "abc"]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
        assert torch.equal(tensor, weights[2][name]), name
    assert [r["train_loss"] for r in records(tmp_path / "a")[1:]] == [r["train_loss"] for r in records(tmp_path / "c")[1:]]
    logged = records(tmp_path / "a")[-1]
    for key in ("reward", "reward_std", "zero_var", "correct", "kl", "reply_len", "pretrain_loss", "exact_match",
                "em_add", "pretrain_val_loss"):
        assert key in logged, key
    assert full["step"] == again["step"] == 4


def test_jsonl_prompts_with_a_custom_verifier(tmp_path):
    init = make_run(tmp_path / "init")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": t.prompt, "answer": t.answer}) + "\n"
                            for t in tasks.make_tasks("train", 40)))
    seen = []
    grpo.main(["--init", str(init), *TINY, "--data", str(data), "--max-steps", "2", "--out", str(tmp_path / "run")],
              verifier=lambda reply, answer: seen.append(answer) or 0.5)
    assert len(seen) == 2 * 2 * 3 and set(seen) <= {t.answer for t in tasks.make_tasks("train", 40)}
    assert "em_data" in records(tmp_path / "run")[-1]


@pytest.mark.parametrize("content, message", [
    ("", "no examples (the file is empty)"),
    ('{"prompt": "What is 1 + 1?"}\n', "missing field 'answer'"),
    ('{"prompt": "' + "x " * 300 + '", "answer": "2"}\n', "leave no room for a reply in block_size 128"),
])
def test_bad_data_is_one_line(tmp_path, content, message):
    init = make_run(tmp_path / "init")
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grpo.main(["--init", str(init), *TINY, "--data", str(data), "--max-steps", "1", "--out", str(tmp_path / "r")])


def test_group_of_one_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        grpo.main([*TINY, "--group", "1"])
    assert "--group: must be at least 2, got 1" in capsys.readouterr().err
