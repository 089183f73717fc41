"""Evaluation: the model's replies on the built-in tasks, exact match and its own wrong answers (DPO's
rejected responses), and the language-model metrics of held-out text. The tasks themselves are
made in train/tasks.py.

    python -m train.evaluate RUN [--data PATH] [--tasks N]

prints and writes RUN/eval.json: on --data (text files, a directory or glob, as for pretraining)
the validation loss in nats per token, perplexity, and bits per byte (the summed loss in bits over
the UTF-8 bytes of the text: comparable across tokenizers); exact match on N held-out tasks when
the tokenizer has the chat tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import torch

from model import GPT
from model.chat_format import SPECIALS, ChatTokens, render_prompt, reply_text
from model.checkpoint import load_model, load_tokenizer, resolve, run_dir_of
from model.command import DEBUG_HELP, at_least, flag_type, run_command
from model.files import atomic_write_text
from model.generate import generate
from train.sources import iter_documents
from train.tasks import Task, make_tasks


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
def replies(model: GPT, tok, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
            seed: int | None = None, batch_size: int = 64) -> list[str]:
    """The model's reply to each single-turn prompt, through generate() with the KV cache.

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
    return out


def answer_budget(tok, tasks: list[Task]) -> int:
    """Generation budget: twice the longest answer in tokens plus the end token and some slack."""
    return 2 * max(len(tok.encode(t.answer)) for t in tasks) + 4


def exact_match(model: GPT, tok, tasks: list[Task], batch_size: int = 64) -> dict[str, float]:
    """Fraction of tasks whose greedy reply equals the answer exactly: overall and per kind."""
    with eval_mode(model):
        got = replies(model, tok, [t.prompt for t in tasks], answer_budget(tok, tasks), batch_size=batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for task, reply in zip(tasks, got):
        hits[task.kind].append(reply == task.answer)
    metrics = {"exact_match": sum(map(sum, hits.values())) / max(1, len(tasks))}
    metrics.update({f"em_{kind}": sum(h) / len(h) for kind, h in hits.items()})
    return metrics


def sampled_rejections(model: GPT, tok, tasks: list[Task], seed: int, temperature: float = 1.0) -> list[str]:
    """For each task, the model's own sampled reply when it is wrong (the mistakes DPO should push
    down), else the built-in plausible wrong answer."""
    with eval_mode(model):
        got = replies(model, tok, [t.prompt for t in tasks], answer_budget(tok, tasks), temperature=temperature,
                      seed=seed)
    return [reply if reply != task.answer else task.wrong for task, reply in zip(tasks, got)]


def task_sample(model: GPT, tok, task: Task) -> str:
    """The model's greedy reply to a task, shown with the expected answer (for samples.txt)."""
    reply = replies(model, tok, [task.prompt], answer_budget(tok, [task]))[0]
    return f"user: {task.prompt}\nassistant: {reply}\n(expected: {task.answer})"


@torch.no_grad()
def text_metrics(model: GPT, tok, texts: Iterable[str], max_tokens: int, batch_size: int = 8) -> dict[str, float]:
    """Loss (nats per predicted token), perplexity and bits per byte on whole documents, each after
    <|endoftext|> as in pretraining, until at least max_tokens; the stream is cut into windows of
    block_size, every token predicted once from the start of its window."""
    ids, n_bytes = [], 0
    for text in texts:
        if len(ids) >= max_tokens + 1:
            break
        ids += [tok.eot_id, *tok.encode(text)]
        n_bytes += len(text.encode("utf-8"))
    if len(ids) < 2 or n_bytes == 0:
        raise ValueError("the evaluation text is empty; pass --data with some text")
    T = model.cfg.block_size
    device = next(model.parameters()).device
    windows = [ids[i:i + T + 1] for i in range(0, len(ids) - 1, T)]
    total = 0.0
    with eval_mode(model):
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            x = torch.zeros(len(batch), T, dtype=torch.long)
            y = torch.full((len(batch), T), -100, dtype=torch.long)
            for row, w in enumerate(batch):
                x[row, :len(w) - 1] = torch.tensor(w[:-1])
                y[row, :len(w) - 1] = torch.tensor(w[1:])
            losses = model(x.to(device), targets=y.to(device), reduction="none")             # (B, T)
            total += losses.double().sum().item()
    loss = total / (len(ids) - 1)
    return {"val_loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total / math.log(2) / n_bytes,
            "eval_tokens": len(ids) - 1, "eval_bytes": n_bytes}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="run directory (its latest checkpoint) or checkpoint directory")
    parser.add_argument("--data", default=None, help="held-out text: a file, directory or glob of text, Markdown, "
                                                     "code or JSONL with a 'text' field (not the training corpus)")
    parser.add_argument("--max-tokens", type=flag_type(int, at_least(2)), default=65536,
                        help="evaluate whole documents of --data until at least this many tokens")
    parser.add_argument("--tasks", type=flag_type(int, at_least(0)), default=350,
                        help="held-out built-in tasks for exact match (0: none; needs the chat tokens)")
    parser.add_argument("--task-seed", type=int, default=0, help="seed of the task sets (as in SFT and DPO)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    ckpt = resolve(args.path)
    model, state = load_model(ckpt, device)
    tok = load_tokenizer(ckpt)
    results: dict = {"checkpoint": str(ckpt), "step": state.get("step")}
    if args.data is not None:
        results.update(text_metrics(model, tok, (text for _, text in iter_documents(args.data)), args.max_tokens))
        results["data"] = args.data
    has_chat = all(s in tok.special_tokens for s in SPECIALS)
    if args.tasks and has_chat:
        results.update(exact_match(model, tok, make_tasks("test", args.tasks, args.task_seed)))
    if args.data is None and not (args.tasks and has_chat):
        fix = "--data or --tasks N" if has_chat else "--data (this tokenizer has no chat tokens for the tasks)"
        raise SystemExit(f"nothing to evaluate: pass {fix}")
    out = run_dir_of(ckpt) / "eval.json"
    atomic_write_text(out, json.dumps(results, indent=2))
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    print(f"written to {out}")
    return results


if __name__ == "__main__":
    run_command(main)
