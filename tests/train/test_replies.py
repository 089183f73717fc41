"""train/replies.py: batched greedy replies equal one-at-a-time generation, exact match counts per kind,
restores train mode and shows its progress on stderr, and sampled rejections are never the answer."""
import torch

from model.chat_format import ChatTokens, render_prompt, reply_text
from model.generate import generate
from posttrain_fixtures import tiny_model, tokenizer
from train import replies
from train.data import tasks


def test_batched_replies_equal_one_at_a_time_greedy_generation():
    tok, model = tokenizer(), tiny_model(seed=3).eval()
    prompts = [t.prompt for t in tasks.make_tasks("test", 14)]
    batched = replies.replies(model, tok, prompts, max_new_tokens=6, batch_size=3)
    for prompt, reply in zip(prompts, batched):
        idx = torch.tensor([render_prompt([{"role": "user", "content": prompt}], tok)])
        out = generate(model, idx, 6, temperature=0, stop_tokens=ChatTokens.of(tok).stop)
        assert reply == reply_text(out[0, idx.shape[1]:].tolist(), tok).strip()


def test_exact_match_counts_per_kind(monkeypatch):
    test = tasks.make_tasks("test", 28)
    # A stand-in model that answers the first two tasks of each kind right and the others wrong.
    answers = {t.prompt: (t.answer if i < 14 else t.wrong) for i, t in enumerate(test)}
    monkeypatch.setattr(replies, "replies", lambda model, tok, prompts, *a, **k: [answers[p] for p in prompts])
    metrics = replies.exact_match(tiny_model(), tokenizer(), test)
    assert metrics == {"exact_match": 0.5, **{f"em_{kind}": 0.5 for kind in tasks.KINDS}}


def test_exact_match_of_an_untrained_model_runs_and_restores_train_mode():
    model = tiny_model()
    metrics = replies.exact_match(model, tokenizer(), tasks.make_tasks("test", 7))
    assert set(metrics) == {"exact_match", *(f"em_{k}" for k in tasks.KINDS)}
    assert 0.0 <= metrics["exact_match"] <= 1.0 and model.training


def test_sampled_rejections_are_never_the_answer():
    test = tasks.make_tasks("test", 14)
    rejected = replies.sampled_rejections(tiny_model(), tokenizer(), test, seed=0)
    assert all(r != t.answer for r, t in zip(rejected, test))


def test_exact_match_shows_its_progress_on_stderr_unless_told_not_to(capsys):
    test = tasks.make_tasks("test", 7)
    replies.exact_match(tiny_model(), tokenizer(), test, batch_size=3)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and lines[0].startswith("exact match") and "0/7" in lines[0] and "7/7" in lines[-1]
    replies.exact_match(tiny_model(), tokenizer(), test, show=False)        # another process than the main one
    assert capsys.readouterr().err == ""
