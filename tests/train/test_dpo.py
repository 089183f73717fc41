"""DPO: the loss against hand-computed values, log-probs per backend, the frozen reference, the
sampling of rejected replies (capped by the run's length, the same on --resume, with progress on
stderr), and end-to-end runs of `python -m train.dpo` through main(argv)."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tritongpt import kernels
from posttrain_fixtures import make_run, tiny_model, tokenizer
from train import dpo, preference
from train.data import tasks
from train.loop import fit
from train.runtime import Runtime, setup
from train.data.sft_data import collate, encode_pairs

TINY = ["--device", "cpu", "--batch-size", "4", "--n-train", "24", "--eval-examples", "7", "--lr", "1e-3",
        "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "0", "--rejected", "rule"]
SAMPLED = TINY[:-2] + ["--rejected", "sampled", "--samples", "1"]


def test_loss_and_metrics_by_hand():
    pi_c, pi_r = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    ref_c, ref_r = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -2.5])
    losses, chosen, rejected = preference.dpo(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    loss, m = losses.mean(), dpo.reward_metrics(torch.stack([chosen, rejected], dim=1))
    # pair 0: chosen reward 0.5 * (-1 + 2) = 0.5, rejected 0.5 * (-3 + 2) = -0.5, margin 1
    # pair 1: chosen reward 0.5 * (-4 + 3) = -0.5, rejected 0.5 * (-2 + 2.5) = 0.25, margin -0.75
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.75))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["reward_acc"].item() == 0.5
    assert m["margin"].item() == pytest.approx(0.125)
    assert m["chosen_reward"].item() == pytest.approx(0.0)
    assert m["rejected_reward"].item() == pytest.approx(-0.125)


def pairs(n=3):
    records = [tasks.dpo_record(t) for t in tasks.make_tasks("test", n)]
    return encode_pairs(records, tokenizer(), 128)[0]


def pair_batch(pairs, pad_id, pack_to=0):
    """The chosen responses (examples 0 .. B - 1) then the rejected ones as one batch."""
    return collate(dpo.examples_of(pairs)[0], pad_id, pack_to)


def pair_logps(model, pairs, pad_id, pack_to=0):
    """(log p(chosen), log p(rejected)) of each pair's response under model: (2, B)."""
    return dpo.sequence_logps(model, pair_batch(pairs, pad_id, pack_to), 2 * len(pairs)).view(2, len(pairs))


def test_sequence_logps_sum_reply_token_log_probs():
    tok, model = tokenizer(), tiny_model()
    b = pair_batch(pairs(), pad_id=tok.eot_id)
    got = dpo.sequence_logps(model, b, 6)                                       # (6,)
    logp = model(b["x"]).log_softmax(-1)                                        # (6, T, V)
    keep = b["y"] != -100
    expected = (logp.gather(-1, b["y"].clamp(min=0)[..., None])[..., 0] * keep).sum(-1)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nll_weight", [0.0, 1.0])
def test_packed_pairs_give_the_logps_and_loss_of_padded_ones(nll_weight):
    tok, model, batch = tokenizer(), tiny_model(), pairs(8)
    reference = tiny_model(seed=1).eval()
    rt, cfg = setup("cpu", "fp32"), dpo.DPOConfig(batch_size=8)
    padded_job, packed_job = (dpo.DPOJob(batch, [], [], tok, reference, 0.1, cfg, rt, nll_weight, pack_to=pack_to)
                              for pack_to in (0, 128))
    padded, packed = padded_job.batch(0, 0), packed_job.batch(0, 0)
    assert packed["x"].shape[0] < padded["x"].shape[0] == 16 and "documents" in packed
    assert packed_job.tokens(packed) == padded_job.tokens(padded) < padded["x"].numel()
    assert torch.allclose(packed["ref"], padded["ref"], rtol=1e-5, atol=1e-4)         # the reference's, packed too
    assert torch.allclose(pair_logps(model, batch, tok.eot_id, pack_to=128),
                          pair_logps(model, batch, tok.eot_id), rtol=1e-5, atol=1e-4)
    (loss, metrics), (want, expected) = packed_job.loss(model, packed), padded_job.loss(model, padded)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for k, v in expected.items():
        assert metrics[k].item() == pytest.approx(v.item(), rel=1e-4, abs=1e-5), k
    assert loss.item() != pytest.approx(math.log(2) + (nll_weight and expected["chosen_nll"].item()), abs=1e-3)


def test_logps_through_triton_equal_torch():
    tok, model, batch = tokenizer(), tiny_model(), pairs(2)
    with kernels.use("torch"):
        want = pair_logps(model, batch, tok.eot_id)
    with kernels.use(linear_cross_entropy="triton", cross_entropy="triton"):
        got = pair_logps(model, batch, tok.eot_id)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("nll_weight", [0.0, 0.5])
def test_policy_equal_to_reference_gives_ln2_plus_the_nll_term(nll_weight):
    tok, model = tokenizer(), tiny_model()
    job = dpo.DPOJob(pairs(4), [], [], tok, copy.deepcopy(model).eval(), 0.1, dpo.DPOConfig(batch_size=4),
                     setup("cpu", "fp32"), nll_weight)
    batch = job.batch(0, 0)
    loss, metrics = job.loss(model, batch)
    chosen = batch["y"][:4]
    logits = model(batch["x"][:4])                                               # (4, T, V)
    nll = F.cross_entropy(logits[chosen != -100], chosen[chosen != -100])        # mean per chosen token
    assert loss.item() == pytest.approx(math.log(2) + nll_weight * nll.item(), rel=1e-5)
    assert ("chosen_nll" in metrics) == bool(nll_weight)


def test_reference_is_frozen_and_unchanged(tmp_path):
    init = make_run(tmp_path / "base")
    cfg = dpo.STAGE.parse(["--init", str(init), "--out", str(tmp_path / "dpo"), "--max-steps", "3", *TINY])
    rt = setup("cpu", "fp32")
    job, policy = dpo.build(cfg, rt)
    before = copy.deepcopy(job.reference.state_dict())
    fit(cfg, job, policy, rt, {"job": "dpo"})
    assert not job.reference.training
    assert all(not p.requires_grad and p.grad is None for p in job.reference.parameters())
    assert all(torch.equal(v, before[k]) for k, v in job.reference.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in policy.state_dict().items())


def test_cli_run_starts_at_ln2_and_prefers_chosen(tmp_path, capsys):
    init = make_run(tmp_path / "sft")
    out = tmp_path / "dpo"
    # No pretraining text: on a random tiny model its loss would outweigh DPO's in 8 steps.
    result = dpo.main(["--init", str(init), "--out", str(out), "--max-steps", "8", *TINY, "--pretrain-mix", "0"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Policy == reference at the start: every implicit reward is 0 and the loss is ln 2.
    assert logged[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logged[1]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logged[1]["train_loss"] == pytest.approx(math.log(2) + logged[1]["chosen_nll"], rel=1e-5)
    assert logged[1]["margin"] == 0 and logged[1]["reward_acc"] == 0
    assert {"reward_acc", "margin", "chosen_reward", "rejected_reward", "exact_match",
            "val_reward_acc"} <= set(result)
    assert result["dpo_loss"] < math.log(2) and result["margin"] > 0
    by_kind = [result[f"val_reward_acc_{kind}"] for kind in tasks.KINDS]      # one held-out pair per kind
    assert sum(by_kind) / len(by_kind) == pytest.approx(result["val_reward_acc"])
    assert (out / "tokenizer.json").exists() and (out / "checkpoints" / "latest").exists()
    captured = capsys.readouterr()
    assert "val_reward_acc" in captured.out and "exact match" not in captured.out
    assert any(line.startswith("exact match") and "7/7" in line for line in captured.err.splitlines())


def test_accuracy_by_kind():
    assert dpo.accuracy_by_kind([True, False, True, True], ["add", "add", "sort", "add"]) == \
        {"val_reward_acc_add": 2 / 3, "val_reward_acc_sort": 1.0}
    with pytest.raises(ValueError):
        dpo.accuracy_by_kind([True], ["add", "sort"])


def test_sampled_rejections_come_from_the_init_model(tmp_path):
    task_list = tasks.make_tasks("train", 7)
    records = dpo.task_pairs(task_list, tiny_model(), tokenizer(), "sampled", seed=0, rt=setup("cpu", "fp32"))
    assert [r["chosen"] for r in records] == [t.answer for t in task_list]
    assert all(r["rejected"] != r["chosen"] for r in records)
    assert any(r["rejected"] != t.wrong for r, t in zip(records, task_list))


def test_more_samples_give_distinct_wrong_pairs_for_every_prompt():
    task_list, rt = tasks.make_tasks("train", 7), setup("cpu", "fp32")
    one = dpo.task_pairs(task_list, tiny_model(), tokenizer(), "sampled", seed=0, rt=rt)
    three = dpo.task_pairs(task_list, tiny_model(), tokenizer(), "sampled", seed=0, rt=rt, samples=3)
    keys = [(r["prompt"], r["rejected"]) for r in three]
    assert len(keys) == len(set(keys)) and len(three) > len(one)
    assert all(r in three for r in one)          # the first round is the one-sample set
    assert {r["prompt"] for r in three} == {t.prompt for t in task_list}
    assert all(r["rejected"] != r["chosen"] for r in three)


def test_samples_flag_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        dpo.main(TINY + ["--samples", "0"])
    assert "--samples: must be at least 1, got 0" in capsys.readouterr().err


def fake_sampling(monkeypatch) -> list[list[str]]:
    """dpo's sampling of rejected replies made instant (the built-in wrong answers, each a pair); -> the
    prompts of each call, appended as they come."""
    calls = []

    def sampled_rejections(model, tok, task_list, seed, temperature=1.0, bar=None):
        calls.append([t.prompt for t in task_list])
        if bar is not None:
            bar.update(len(task_list))
        return [t.wrong for t in task_list]

    monkeypatch.setattr(dpo, "sampled_rejections", sampled_rejections)
    return calls


@pytest.mark.parametrize("flags, world_size, sampled", [
    (["--max-steps", "2"], 1, 8),                         # 2 steps x batch 4
    (["--max-steps", "2", "--grad-accum", "2"], 1, 16),   # x 2 micro-batches
    (["--max-steps", "2"], 2, 16),                        # x 2 processes
    (["--max-steps", "100"], 1, 24),                      # more than there are: all of them
])
def test_sampling_takes_only_the_prompts_the_run_can_use(flags, world_size, sampled, tmp_path, monkeypatch, capsys):
    calls = fake_sampling(monkeypatch)
    init = make_run(tmp_path / "base")
    cfg = dpo.STAGE.parse(["--init", str(init), "--out", str(tmp_path / "dpo"), *SAMPLED, *flags])
    job, _ = dpo.build(cfg, Runtime(torch.device("cpu"), None, rank=0, world_size=world_size))
    train_prompts, held_out = calls
    assert train_prompts == [t.prompt for t in tasks.make_tasks("train", 24)][:sampled]     # the first ones
    assert len(held_out) == 7 and len(job.train) == sampled
    out = capsys.readouterr().out
    assert (f"sampling replies to {sampled} of the 24 training prompts" in out) == (sampled < 24)


def test_with_max_tokens_the_sampled_prompts_still_cover_every_step(tmp_path, monkeypatch):
    calls = fake_sampling(monkeypatch)
    init = make_run(tmp_path / "base")
    cfg = dpo.STAGE.parse(["--init", str(init), "--out", str(tmp_path / "dpo"), *SAMPLED, "--n-train", "400",
                           "--max-tokens", "4000"])
    rt = setup("cpu", "fp32")
    job, _ = dpo.build(cfg, rt)
    steps = max(1, cfg.max_tokens // job.tokens(job.batch(0, 0)))            # the loop's run length
    assert steps * cfg.batch_size <= len(calls[0]) < 400


def test_a_resumed_run_samples_the_same_pairs_and_trains_the_same(tmp_path):
    init = make_run(tmp_path / "base")
    common = ["--init", str(init), *SAMPLED, "--n-train", "40", "--max-steps", "3", "--ckpt-interval", "1"]
    dpo.main([*common, "--out", str(tmp_path / "straight")])
    dpo.main([*common, "--out", str(tmp_path / "split"), "--stop-after", "1"])
    dpo.main(["--resume", str(tmp_path / "split"), "--stop-after", "0"])

    def losses(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]

    assert len(losses(tmp_path / "straight")) == 3
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def test_sampling_shows_its_progress_on_the_main_process_only(capsys):
    task_list = tasks.make_tasks("train", 3)
    dpo.task_pairs(task_list, tiny_model(), tokenizer(), "sampled", seed=0, rt=setup("cpu", "fp32"), samples=2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("sampling training replies") and "0/6" in lines[0] and "6/6" in lines[-1]
    other_rank = Runtime(torch.device("cpu"), None, rank=1, world_size=2)
    dpo.task_pairs(task_list, tiny_model(), tokenizer(), "sampled", seed=0, rt=other_rank, samples=2)
    assert capsys.readouterr().err == ""
