"""Supervised fine-tuning: `python -m train.sft --init RUN_OR_CKPT --data tasks|PATH.jsonl`.

Starts from a pretrained run (or checkpoint) and its tokenizer, renders every conversation with the
chat template (model/chat_format.py), and trains next-token cross-entropy on the assistant tokens
only (the rest are targets of -100, which the loss ignores) through the shared loop. Exact match on
the held-out built-in tasks is measured before training and at every evaluation, and a before/after
table is printed at the end. Writes a run directory like pretraining, tokenizer.json included, so
`python -m train.dpo --init` and `python -m model.chat` take it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model import GPT
from model.command import run_command
from train.data import tasks
from train.config import TrainConfig
from train.launch import Stage, run
from train.data.prepare import PreparedData
from train.posttrain import PostConfig, PostJob, held_out_tasks, holdout, load_init, report
from train.runtime import Runtime
from train.data.sft_data import IGNORE, Example, collate, encode, load_sft, to_device


@dataclass
class SFTConfig(PostConfig):
    """SFT's flags: those of every post-training stage (train/posttrain.py)."""


# On the CPU, from the zero-argument pretrain run (its pretraining val loss 3.475), on the 2-core Xeon
# under load: without pretraining text, 1,500 steps gave exact match 0.64 and a pretraining val loss
# of 11.05; mixing in 0.2 of the positions, 0.600 and 3.985; 0.5 at lr 5e-4, 0.600 and 3.572; 0.5 at
# 1e-3, 0.603 and 3.639. 3,000 steps with 0.5 at 1e-3: 0.689 and 3.682 (1.23x the perplexity).
CPU_DEFAULTS = SFTConfig(n_train=20000, batch_size=32, max_steps=3000, lr=1e-3, min_lr=1e-4, warmup_steps=20,
                         weight_decay=0.0, eval_interval=500, eval_examples=350, ckpt_interval=500, log_interval=10)
CUDA_DEFAULTS = SFTConfig(n_train=20000, batch_size=64, max_steps=3000, lr=3e-4, min_lr=3e-5, warmup_steps=50,
                          weight_decay=0.0, eval_interval=500, eval_examples=700, ckpt_interval=1000, log_interval=10)


class SFTJob(PostJob):
    """Masked next-token prediction on rendered conversations; exact match on the test tasks."""
    name = "sft"

    def __init__(self, train: list[Example], val: list[Example], test_tasks: list[tasks.Task], tok,
                 cfg: TrainConfig, rt: Runtime, pack_to: int = 0, corpus: PreparedData | None = None,
                 block_size: int = 0):
        super().__init__(test_tasks, tok, cfg, rt, corpus, block_size)
        self.train, self.val, self.pack_to = train, val, pack_to

    def batch(self, step: int, micro: int) -> dict:
        rows = [self.train[i] for i in self.indices(len(self.train), step, micro)]
        return self.with_pretraining(self.on_device(collate(rows, self.pad_id, self.pack_to)), step, micro)

    def loss(self, model, batch):
        return self.plus_pretraining(model, batch, model(batch["x"], targets=batch["y"],
                                                         documents=batch.get("documents")), {})

    def validate(self, model: GPT) -> dict[str, float]:
        metrics = self.held_out_metrics(model)
        if self.val:
            metrics["val_loss"] = masked_loss(model, self.val, self.pad_id, self.cfg.batch_size, self.rt.device,
                                              self.pack_to)
        return metrics


@torch.no_grad()
def masked_loss(model: GPT, examples: list[Example], pad_id: int, batch_size: int, device: torch.device,
                pack_to: int = 0) -> float:
    """Mean cross-entropy over the masked-in (assistant) tokens of examples, batch_size examples at a
    time (packed into rows of at most pack_to positions when pack_to > 0)."""
    total, count = torch.zeros((), device=device), 0
    for i in range(0, len(examples), batch_size):
        b = to_device(collate(examples[i:i + batch_size], pad_id, pack_to), device)
        total += model(b["x"], targets=b["y"], reduction="sum", documents=b.get("documents")).float()
        count += int((b["y"] != IGNORE).sum())
    return total.item() / max(count, 1)


def build(cfg: SFTConfig, rt: Runtime) -> tuple[SFTJob, GPT]:
    model, tok, corpus = load_init(cfg, rt)
    test_tasks = held_out_tasks(cfg)
    if cfg.data == "tasks":
        conversations = [t.messages() for t in tasks.make_tasks("train", cfg.n_train, cfg.task_seed)]
        held_out = [t.messages() for t in test_tasks]
    else:
        conversations, held_out = holdout(load_sft(cfg.data), cfg.eval_examples)
    block = model.cfg.block_size
    train, dropped = encode(conversations, tok, block)
    val, _ = encode(held_out, tok, block)
    if not train:
        raise SystemExit(f"no training conversation of {cfg.data} fits in block_size {block} tokens")
    if rt.is_main:
        print(f"data: {cfg.data}  {len(train)} train conversations ({dropped} longer than block_size dropped), "
              f"{len(val)} held out, {len(test_tasks)} test tasks")
    return SFTJob(train, val, test_tasks, tok, cfg, rt, block if cfg.packing else 0, corpus,
                  block), model


STAGE = Stage("sft", __doc__, CPU_DEFAULTS, CUDA_DEFAULTS, build, finish=report)


def main(argv: list[str] | None = None) -> dict:
    return run(STAGE, argv)


if __name__ == "__main__":
    run_command(main)
