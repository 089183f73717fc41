"""The model's replies to the built-in tasks (train/data/tasks.py): batched greedy or sampled
generation of single-turn chat replies, exact match against the answers, and the model's own wrong
answers as DPO's rejected responses. SFT and DPO measure exact match with these during training,
DPO samples its rejections with them, and python -m train.evaluate reports the same exact match.
Each of these shows its progress on stderr (train/progress.py): a generation batch can take seconds."""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

import torch

from model import GPT
from model.chat_format import ChatTokens, render_prompt, reply_text
from model.generate import generate
from model.tokenizer import Tokenizer
from train.data.tasks import Task
from train.progress import Progress, progress


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def replies(model: GPT, tok: Tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
            seed: int | None = None, batch_size: int = 64, bar: Progress | None = None) -> list[str]:
    """The model's reply to each single-turn prompt, through generate() with the KV cache; bar, when
    given, advances by one per reply.

    Prompts are batched by token length, so no row needs padding (generate has no attention mask).
    """
    stop = ChatTokens.of(tok).stop
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = defaultdict(list)
    encoded = [render_prompt([{"role": "user", "content": p}], tok) for p in prompts]
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    out: list[str] = [""] * len(prompts)
    for length, rows in sorted(by_length.items()):
        new = min(max_new_tokens, model.cfg.block_size - length)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            idx = torch.tensor([encoded[i] for i in chunk], device=device)          # (b, length)
            gen = generate(model, idx, new, temperature=temperature, stop_tokens=stop,
                           seed=None if seed is None else seed + length * 1000 + start)
            for i, row in zip(chunk, gen[:, length:].tolist()):
                out[i] = reply_text(row, tok).strip()
            if bar is not None:
                bar.update(len(chunk))
    return out


def answer_budget(tok: Tokenizer, tasks: list[Task]) -> int:
    """Generation budget: twice the longest answer in tokens plus the end token and some slack."""
    return 2 * max(len(tok.encode(t.answer)) for t in tasks) + 4


def exact_match(model: GPT, tok: Tokenizer, tasks: list[Task], batch_size: int = 64,
                show: bool = True) -> dict[str, float]:
    """Fraction of tasks whose greedy reply equals the answer exactly: overall and per kind. Its progress
    is shown on stderr unless show is False (a process other than the main one); a terminal's bar is
    cleared at the end, since training evaluates again and again."""
    with eval_mode(model), progress(len(tasks), "exact match", " tasks", show=show, leave=False) as bar:
        got = replies(model, tok, [t.prompt for t in tasks], answer_budget(tok, tasks), batch_size=batch_size,
                      bar=bar)
    hits: dict[str, list[bool]] = defaultdict(list)
    for task, reply in zip(tasks, got):
        hits[task.kind].append(reply == task.answer)
    metrics = {"exact_match": sum(map(sum, hits.values())) / max(1, len(tasks))}
    metrics.update({f"em_{kind}": sum(h) / len(h) for kind, h in hits.items()})
    return metrics


def sampled_rejections(model: GPT, tok: Tokenizer, tasks: list[Task], seed: int,
                       temperature: float = 1.0, bar: Progress | None = None) -> list[str]:
    """For each task, the model's own sampled reply when it is wrong (the mistakes DPO should push
    down), else the built-in plausible wrong answer; bar, when given, advances by one per reply."""
    with eval_mode(model):
        got = replies(model, tok, [t.prompt for t in tasks], answer_budget(tok, tasks), temperature=temperature,
                      seed=seed, bar=bar)
    return [reply if reply != task.answer else task.wrong for task, reply in zip(tasks, got)]


def task_sample(model: GPT, tok: Tokenizer, task: Task) -> str:
    """The model's greedy reply to a task, shown with the expected answer (for samples.txt)."""
    reply = replies(model, tok, [task.prompt], answer_budget(tok, [task]))[0]
    return f"user: {task.prompt}\nassistant: {reply}\n(expected: {task.answer})"
