"""What the post-training stages (train/sft.py, train/dpo.py, train/grpo.py) share: their config
fields (--packing among them), the --init model and tokenizer, the held-out split of a JSONL file,
the batch order, the count of non-pad tokens, exact match on the test tasks, the pretraining text
mixed into every batch, and the before/after table printed when a run ends.

Pretraining text. Post-training on the built-in tasks alone makes the model forget its corpus: after
SFT of the zero-argument pretrain run, the pretraining perplexity went from about 70 to 62,658
(worse than a uniform guess). So every micro-batch also carries windows of the --init run's own
pretraining corpus, --pretrain-mix of the batch's positions, and the loss adds their mean next-token
NLL (weight 1, the pretraining loss itself), as nanochat's later stages mix in pretraining data.
The corpus is found through the runs' config.json (each stage records the one it used, so a DPO run
from SFT finds it too); pretrain_val_loss, at every evaluation, is the loss on its validation split.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from model import GPT
from model.chat_format import ChatTokens
from model.io.checkpoint import load_model, load_tokenizer, resolve
from model.tokenizer import Tokenizer
from train.data import tasks
from train.data.prepare import PreparedData, prepare
from train.data.windows import eval_batches, sample_batch
from train.config import TrainConfig, absolute_path, fraction, option, positive
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
    pretrain_mix: float = option(0.5, "fraction of each micro-batch's positions that are windows of the --init run's "
                                      "pretraining corpus; their mean next-token loss is added to the stage's loss, "
                                      "so the model keeps its language modelling (0: none)", fraction)
    pretrain_data: str = option("", "the prepared dataset to mix in (a directory made by python -m train.data or by "
                                    "pretraining); default: the one the --init run's pretraining used, found through "
                                    "the runs' config.json", type=absolute_path)
    pretrain_eval_tokens: int = option(32768, "tokens of the pretraining corpus's validation split in each "
                                              "evaluation's pretrain_val_loss", positive)


def load_init(cfg: PostConfig, rt: Runtime) -> tuple[GPT, Tokenizer, PreparedData | None]:
    """The --init model on the device, its tokenizer and the pretraining corpus to mix in
    (pretraining_corpus)."""
    if not cfg.init:
        raise SystemExit("--init RUN_OR_CKPT is required: the run directory (or checkpoint) to start from")
    model, _ = load_model(cfg.init, rt.device, trainable=True)
    tok = load_tokenizer(cfg.init)
    ChatTokens.of(tok)
    if tok.n_vocab > model.cfg.vocab_size:
        raise SystemExit(f"the tokenizer of {cfg.init} has {tok.n_vocab} tokens but the model only "
                         f"{model.cfg.vocab_size}; they do not belong together")
    return model, tok, pretraining_corpus(cfg, tok, rt.is_main)


def pretraining_corpus(cfg: PostConfig, tok: Tokenizer, show: bool = True) -> PreparedData | None:
    """The prepared dataset mixed into training (None with --pretrain-mix 0): --pretrain-data, else the
    --init run's own. Its absolute path is written into cfg.pretrain_data, which config.json records,
    so that a later stage started from this run finds it as well."""
    if not cfg.pretrain_mix:
        return None
    path = cfg.pretrain_data or corpus_of(cfg.init, tok)
    if path is None:
        if show:
            print(f"pretraining text: none mixed in: neither {cfg.init} nor a run it came from names a pretraining "
                  f"corpus (a model imported from transformers has none); pass --pretrain-data DIR (a dataset made "
                  f"by python -m train.data with its tokenizer) to keep its language modelling")
        cfg.pretrain_mix = 0.0          # what config.json records
        return None
    data = PreparedData(path)
    if data.tokenizer.fingerprint != tok.fingerprint:
        raise ValueError(f"{data.path} was tokenized with another tokenizer than {cfg.init}'s; pass --pretrain-data "
                         f"a dataset prepared with it, or --pretrain-mix 0")
    cfg.pretrain_data = str(data.path.resolve())
    return data


def corpus_of(init: str, tok: Tokenizer) -> Path | None:
    """The pretraining corpus of the run (or checkpoint) init: the --pretrain-data a post-training run
    recorded, or the dataset its pretraining run prepared (reused from its --data-dir), following
    --init from run to run; None when no run of the chain names one."""
    run, seen = _run_dir(init), []
    while run is not None and run not in seen:
        seen.append(run)
        saved = json.loads((run / "config.json").read_text())
        args = saved.get("args", {})
        if args.get("pretrain_data"):
            return Path(args["pretrain_data"])
        if saved.get("job") == "pretrain":
            return prepare(args["data"], vocab_size=args["vocab_size"], data_dir=args["data_dir"],
                           tokenizer=tok if args.get("init") else None)
        run = _run_dir(args["init"]) if args.get("init") else None
    return None


def _run_dir(path: str) -> Path | None:
    """The run directory (the one holding config.json) of a run or checkpoint path; None when there is
    none (a run deleted since, a directory imported from transformers)."""
    if (Path(path) / "config.json").is_file():
        return Path(path)
    try:
        run = resolve(path).parent.parent           # run/checkpoints/step_N
    except ValueError:
        return None
    return run if (run / "config.json").is_file() else None


def held_out_tasks(cfg: PostConfig) -> list[tasks.Task]:
    """The held-out tasks every evaluation measures exact match on."""
    return tasks.make_tasks("test", cfg.eval_examples, cfg.task_seed)


def holdout(items: list, limit: int) -> tuple[list, list]:
    """(train, held out): the last 5% (at most limit) of items, none when there are fewer than 20."""
    n = min(limit, len(items) // 20)
    return items[:len(items) - n], items[len(items) - n:]


class PostJob:
    """The parts of an SFT or DPO job that do not depend on its loss."""

    def __init__(self, test_tasks: list[tasks.Task], tok: Tokenizer, cfg: PostConfig, rt: Runtime,
                 corpus: PreparedData | None = None, block_size: int = 0):
        self.test_tasks, self.tokenizer, self.cfg, self.rt = test_tasks, tok, cfg, rt
        self.pad_id = ChatTokens.of(tok).bos
        self.corpus, self.block_size = corpus, block_size       # pretraining text to mix in (None: none)

    def indices(self, n: int, step: int, micro: int) -> list[int]:
        """This rank's records of micro-batch `micro` of step `step`: the global batch is
        batch_size * world_size records of a seeded endless shuffle of range(n); each rank takes its own."""
        B, W = self.cfg.batch_size, self.rt.world_size
        start = ((step * self.cfg.grad_accum + micro) * W + self.rt.rank) * B
        return stream_indices(n, start, B, self.cfg.seed)

    def on_device(self, batch: dict) -> dict:
        return to_device(batch, self.rt.device)

    def tokens(self, batch: dict) -> int:
        """The batch's input tokens that are not padding, pretraining text included: what tokens/s
        counts, packed or not."""
        return batch["tokens"] + (batch["pretrain"]["x"].numel() if "pretrain" in batch else 0)

    def with_pretraining(self, batch: dict, step: int, micro: int) -> dict:
        """The batch plus "pretrain": {"x", "y"} windows of the corpus, --pretrain-mix of all its
        positions (at least one token), in rows of at most block_size; a pure function of the step and
        the rank (each rank draws its own, as many as its own batch's positions call for)."""
        if self.corpus is None:
            return batch
        mix = self.cfg.pretrain_mix
        wanted = max(1, round(batch["tokens"] * mix / (1 - mix)))
        rows = math.ceil(wanted / self.block_size)
        x, y = sample_batch(self.corpus.train, rows, math.ceil(wanted / rows), self.cfg.seed + 1,
                            step * self.cfg.grad_accum + micro, rank=self.rt.rank)
        return {**batch, "pretrain": self.on_device({"x": x, "y": y})}

    def plus_pretraining(self, model: torch.nn.Module, batch: dict, loss: torch.Tensor,
                         metrics: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stage's loss plus the mean next-token loss of the batch's pretraining windows, and that
        loss among the metrics (pretrain_loss)."""
        if "pretrain" not in batch:
            return loss, metrics
        text = model(batch["pretrain"]["x"], targets=batch["pretrain"]["y"])
        return loss + text, {**metrics, "pretrain_loss": text.detach()}

    def held_out_metrics(self, model: GPT) -> dict[str, float]:
        """Exact match on the test tasks, its progress shown by the main process only; and the loss on
        the pretraining corpus's validation split (pretrain_val_loss) when one is mixed in."""
        metrics = exact_match(model, self.tokenizer, self.test_tasks, self.cfg.batch_size, show=self.rt.is_main)
        if self.corpus is not None:
            total, count = torch.zeros((), device=self.rt.device), 0
            for x, y in eval_batches(self.corpus.val, self.cfg.batch_size, self.block_size,
                                     self.cfg.pretrain_eval_tokens):
                batch = self.on_device({"x": x, "y": y})
                total, count = total + model(batch["x"], targets=batch["y"]).float(), count + 1
            metrics["pretrain_val_loss"] = total.item() / count
        return metrics

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
