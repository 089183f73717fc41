"""What the post-training stages (train/sft.py, train/dpo.py) share: their config fields (--packing
among them), the --init model and tokenizer, the held-out split of a JSONL file, the batch order,
the count of non-pad tokens, exact match on the test tasks, and the before/after table printed
when a run ends."""
from __future__ import annotations

from dataclasses import dataclass

from model import GPT
from model.chat_format import ChatTokens
from model.io.checkpoint import load_model, load_tokenizer
from model.tokenizer import Tokenizer
from train.data import tasks
from train.config import TrainConfig, absolute_path, option, positive
from train.replies import exact_match, task_sample
from train.runlog import RunLog
from train.runtime import Runtime
from train.data.sft_data import stream_indices, to_device


@dataclass
class PostConfig(TrainConfig):
    init: str = option("", "run directory or checkpoint to start from (required; kept as an absolute path, "
                           "so --resume works from any directory)", type=absolute_path)
    data: str = option("tasks", "'tasks' (the built-in verifiable tasks) or a JSONL file")
    n_train: int = option(20000, "built-in training tasks (with --data tasks)", positive)
    task_seed: int = option(0, "seed of the built-in task sets; keep it equal across SFT and DPO so the test "
                               "tasks (the first --eval-examples of the test split) match")
    eval_examples: int = option(350, "held-out examples per evaluation: test tasks for exact match, and at "
                                     "most this many held-out records of a --data file", positive)
    packing: bool = option(True, "pack each micro-batch's --batch-size examples whole into as few rows of at most "
                                 "block_size tokens as they fit (each attends only to itself, from position 0: "
                                 "the losses of padding one per row, with less padding); --no-packing pads one "
                                 "example per row")


def load_init(cfg: PostConfig, rt: Runtime) -> tuple[GPT, Tokenizer]:
    """The --init model on the device and its tokenizer."""
    if not cfg.init:
        raise SystemExit("--init RUN_OR_CKPT is required: the run directory (or checkpoint) to start from")
    model, _ = load_model(cfg.init, rt.device, trainable=True)
    tok = load_tokenizer(cfg.init)
    ChatTokens.of(tok)
    if tok.n_vocab > model.cfg.vocab_size:
        raise SystemExit(f"the tokenizer of {cfg.init} has {tok.n_vocab} tokens but the model only "
                         f"{model.cfg.vocab_size}; they do not belong together")
    return model, tok


def held_out_tasks(cfg: PostConfig) -> list[tasks.Task]:
    """The held-out tasks every evaluation measures exact match on."""
    return tasks.make_tasks("test", cfg.eval_examples, cfg.task_seed)


def holdout(items: list, limit: int) -> tuple[list, list]:
    """(train, held out): the last 5% (at most limit) of items, none when there are fewer than 20."""
    n = min(limit, len(items) // 20)
    return items[:len(items) - n], items[len(items) - n:]


class PostJob:
    """The parts of an SFT or DPO job that do not depend on its loss."""

    def __init__(self, test_tasks: list[tasks.Task], tok: Tokenizer, cfg: TrainConfig, rt: Runtime):
        self.test_tasks, self.tokenizer, self.cfg, self.rt = test_tasks, tok, cfg, rt
        self.pad_id = ChatTokens.of(tok).bos

    def indices(self, n: int, step: int, micro: int) -> list[int]:
        """This rank's records of micro-batch `micro` of step `step`: the global batch is
        batch_size * world_size records of a seeded endless shuffle of range(n); each rank takes its own."""
        B, W = self.cfg.batch_size, self.rt.world_size
        start = ((step * self.cfg.grad_accum + micro) * W + self.rt.rank) * B
        return stream_indices(n, start, B, self.cfg.seed)

    def on_device(self, batch: dict) -> dict:
        return to_device(batch, self.rt.device)

    def tokens(self, batch: dict) -> int:
        """The batch's input tokens that are not padding: what tokens/s counts, packed or not."""
        return batch["tokens"]

    def exact_match(self, model: GPT) -> dict[str, float]:
        """Exact match on the test tasks, its progress shown by the main process only."""
        return exact_match(model, self.tokenizer, self.test_tasks, self.cfg.batch_size, show=self.rt.is_main)

    def sample(self, model: GPT) -> str:
        return task_sample(model, self.tokenizer, self.test_tasks[0])


def report(cfg: TrainConfig, result: dict, rt: Runtime) -> dict:
    """Print the before/after table of the evaluation metrics (rank 0); the result gains "before",
    the metrics measured at step 0."""
    records = RunLog(cfg.out).records()
    before = records[0] if records and records[0]["step"] == 0 else {}
    keys = [k for k in before if k not in ("step", "tokens") and isinstance(result.get(k), float)]
    if keys and rt.is_main:
        print(f"\n{'metric':<22}{'before':>10}{'after':>10}")
        for k in keys:
            print(f"{k:<22}{before[k]:>10.4f}{result[k]:>10.4f}")
    return {**result, "before": before}
