"""Supervised fine-tuning: `python -m train.sft --init RUN_OR_CKPT --data tasks|PATH.jsonl`.

Starts from a pretrained run (or checkpoint) and its tokenizer, renders every conversation with the
chat template (train/chat_format.py), and trains next-token cross-entropy on the assistant tokens
only (the rest are targets of -100, which the loss ignores) through the shared loop. Exact match on
the held-out built-in tasks is measured before training and at every evaluation, and a before/after
table is printed at the end. Writes a run directory like pretraining, tokenizer.json included, so
`python -m train.dpo --init` and `python -m model.chat` take it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from model import GPT
from train import checkpoint, tasks
from train.chat_format import ChatTokens
from train.launch import Build, run
from train.loop import TrainConfig, add_args, config_from, positive_int
from train.runlog import RunLog
from train.runtime import Runtime
from train.sft_data import IGNORE, Example, collate, encode, load_sft, stream_indices

# eval_tokens counts held-out examples here: exact match runs on that many test tasks.
CPU_DEFAULTS = TrainConfig(batch_size=32, max_steps=1500, lr=1e-3, min_lr=1e-4, warmup_steps=20, weight_decay=0.0,
                           eval_interval=500, eval_tokens=350, ckpt_interval=500, log_interval=10)
CUDA_DEFAULTS = TrainConfig(batch_size=64, max_steps=3000, lr=3e-4, min_lr=3e-5, warmup_steps=50, weight_decay=0.0,
                            eval_interval=500, eval_tokens=700, ckpt_interval=1000, log_interval=10)


class SFTJob:
    """Masked next-token prediction on rendered conversations; exact match on the test tasks."""
    name = "sft"

    def __init__(self, train: list[Example], val: list[Example], test_tasks: list[tasks.Task], tok,
                 cfg: TrainConfig, rt: Runtime, pack_to: int = 0):
        self.train, self.val, self.test_tasks, self.tok = train, val, test_tasks, tok
        self.cfg, self.rt, self.pack_to = cfg, rt, pack_to
        self.pad_id = ChatTokens.of(tok).bos

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        # The global batch is B * world_size examples of a seeded endless shuffle; this rank takes its B.
        B, W = self.cfg.batch_size, self.rt.world_size
        start = ((step * self.cfg.grad_accum + micro) * W + self.rt.rank) * B
        rows = [self.train[i] for i in stream_indices(len(self.train), start, B, self.cfg.seed)]
        return {k: v.to(self.rt.device, non_blocking=True) for k, v in collate(rows, self.pad_id, self.pack_to).items()}

    def loss(self, model, batch):
        return model(batch["x"], targets=batch["y"]), {}

    def tokens(self, batch) -> int:
        return batch["x"].numel()

    def evaluate(self, model: GPT) -> dict[str, float]:
        metrics = tasks.exact_match(model, self.tok, self.test_tasks, self.cfg.batch_size)
        if self.val:
            metrics["val_loss"] = masked_loss(model, self.val, self.pad_id, self.cfg.batch_size, self.rt.device)
        return metrics

    def sample(self, model: GPT) -> str:
        return task_sample(model, self.tok, self.test_tasks[0])


def task_sample(model: GPT, tok, task: tasks.Task) -> str:
    """The model's greedy reply to a test task, shown with the expected answer (for samples.txt)."""
    reply = tasks.replies(model, tok, [task.prompt], tasks.answer_budget(tok, [task]))[0]
    return f"user: {task.prompt}\nassistant: {reply}\n(expected: {task.answer})"


@torch.no_grad()
def masked_loss(model: GPT, examples: list[Example], pad_id: int, batch_size: int, device: torch.device) -> float:
    """Mean cross-entropy over the masked-in (assistant) tokens of examples."""
    total, count = torch.zeros((), device=device), 0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], pad_id)
        total += model(b["x"].to(device), targets=b["y"].to(device), reduction="sum").float()
        count += int((b["y"] != IGNORE).sum())
    return total.item() / max(count, 1)


def add_post_args(parser: argparse.ArgumentParser, n_train: int) -> None:
    """The flags SFT and DPO share: where to start, what data, which built-in tasks."""
    parser.add_argument("--init", default="", help="run directory or checkpoint to start from (required)")
    parser.add_argument("--data", default="tasks", help="'tasks' (the built-in verifiable tasks) or a JSONL file")
    parser.add_argument("--n-train", type=positive_int, default=n_train,
                        help="built-in training tasks (with --data tasks)")
    parser.add_argument("--task-seed", type=int, default=0,
                        help="seed of the built-in task sets; keep it equal across SFT and DPO so the "
                             "test tasks (the first --eval-tokens of the test split) match")


def load_init(args: argparse.Namespace, rt: Runtime) -> tuple[GPT, object]:
    """The --init model on the device and its tokenizer, which is also saved into this run directory."""
    if not args.init:
        raise SystemExit("--init RUN_OR_CKPT is required: the run directory (or checkpoint) to start from")
    model, _ = checkpoint.load_model(args.init, rt.device)
    tok = checkpoint.load_tokenizer(args.init)
    ChatTokens.of(tok)
    if tok.n_vocab > model.cfg.vocab_size:
        raise SystemExit(f"the tokenizer of {args.init} has {tok.n_vocab} tokens but the model only "
                         f"{model.cfg.vocab_size}; they do not belong together")
    if rt.is_main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        tok.save(Path(args.out) / "tokenizer.json")
    return model, tok


def holdout(items: list, limit: int) -> tuple[list, list]:
    """(train, held out): the last 5% (at most limit) of items, none when there are fewer than 20."""
    n = min(limit, len(items) // 20)
    return items[:len(items) - n], items[len(items) - n:]


def build(args: argparse.Namespace, rt: Runtime) -> tuple[SFTJob, GPT]:
    model, tok = load_init(args, rt)
    cfg = config_from(args)
    test_tasks = tasks.make_tasks("test", cfg.eval_tokens, args.task_seed)
    if args.data == "tasks":
        conversations = [t.messages() for t in tasks.make_tasks("train", args.n_train, args.task_seed)]
        held_out = [t.messages() for t in test_tasks]
    else:
        conversations, held_out = holdout(load_sft(args.data), cfg.eval_tokens)
    block = model.cfg.block_size
    train, dropped = encode(conversations, tok, block)
    val, _ = encode(held_out, tok, block)
    if not train:
        raise SystemExit(f"no training conversation of {args.data} fits in block_size {block} tokens")
    if rt.is_main:
        print(f"data: {args.data}  {len(train)} train conversations ({dropped} longer than block_size dropped), "
              f"{len(val)} held out, {len(test_tasks)} test tasks")
    return SFTJob(train, val, test_tasks, tok, cfg, rt, block if args.pack else 0), model


def build_parser(cuda: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.sft", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_post_args(parser, n_train=20000)
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=False,
                        help="pack several conversations into each row of up to block_size tokens instead of "
                             "padding one per row (less padding; conversations then see earlier ones)")
    add_args(parser, CUDA_DEFAULTS if cuda else CPU_DEFAULTS)
    return parser


def cuda_requested(argv: list[str]) -> bool:
    """Whether this invocation will run on CUDA (picks the defaults before the full parse)."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--device", default="auto")
    device = probe.parse_known_args(argv)[0].device
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def report(run_dir: Path, result: dict) -> dict:
    """Print the before/after table of the evaluation metrics (rank 0); returns the step-0 metrics."""
    records = RunLog(run_dir).records()
    before = records[0] if records and records[0]["step"] == 0 else {}
    keys = [k for k in before if k not in ("step", "tokens") and isinstance(result.get(k), float)]
    if keys and os.environ.get("RANK", "0") == "0":
        print(f"\n{'metric':<22}{'before':>10}{'after':>10}")
        for k in keys:
            print(f"{k:<22}{before[k]:>10.4f}{result[k]:>10.4f}")
    return before


def run_post(name: str, build_parser, build: Build, argv: list[str] | None) -> dict:
    """run() for a post-training job, then the before/after table; the result gains "before"."""
    argv = sys.argv[1:] if argv is None else argv
    run_dirs = []

    def build_noting_run_dir(args, rt):
        run_dirs.append(Path(args.out))
        return build(args, rt)

    result = run(name, build_parser(cuda_requested(argv)), build_noting_run_dir, argv)
    return {**result, "before": report(run_dirs[0], result)}


def main(argv: list[str] | None = None) -> dict:
    return run_post("sft", build_parser, build, argv)


if __name__ == "__main__":
    main()
