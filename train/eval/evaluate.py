"""The evaluate command: a run's language-model metrics on held-out text, exact match on the built-in
tasks (train/replies.py, made in train/data/tasks.py), HumanEval and lm-eval, in full precision
or quantized on loading, side by side.

    python -m train.evaluate RUN [--data PATH] [--tasks N] [--humaneval] [--lm-eval TASKS]

prints, and appends to RUN/eval.json (a list, one record per evaluation with its time and
arguments, oldest first): on --data (text files, a directory or glob, as for pretraining, or a
dataset directory made by python -m train.data: its val split; a pretrain run's own dataset when
--data is not given) the validation loss in nats per token, perplexity, and bits per byte (the
summed loss in bits over the UTF-8 bytes of the text: comparable across tokenizers), each token
attending only within its document when the run was pretrained with --document-mask (or when told
--document-mask); exact match on
N held-out tasks when the tokenizer has the chat tokens (by default not for a pretrain run, whose
base model has not learned the chat format); with --humaneval, HumanEval's pass@k (train/eval/humaneval.py; every
completion with its outcome in RUN/humaneval_samples.jsonl); with --lm-eval, lm-evaluation-harness
tasks through our model class (train/eval/harness.py; lm-eval's full results in RUN/lm_eval.json).
Each of these shows its progress on stderr (train/progress.py); stdout holds the results alone.
"""
from __future__ import annotations

import argparse
import json
import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from model import GPT
from model.documents import Documents
from model.chat_format import SPECIALS
from model.io.checkpoint import load_model, load_tokenizer, quantized_as, resolve, run_dir_of
from model.command import DEBUG_HELP, Parser, at_least, at_most, flag_type, greater_than, pick_device, run_command
from model.io.files import atomic_write_text
from model.io.quantized import format_list
from model.quantized import projection_bytes
from model.tokenizer import Tokenizer
from train.eval import humaneval
from train.eval.sandbox import require_containment
from train.data.prepare import PreparedData
from train.data.sft_data import to_device
from train.data.sources import iter_documents, resolve_source
from train.data.tasks import make_tasks
from train.progress import progress
from train.replies import eval_mode, exact_match

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


def text_metrics(model: GPT, tok: Tokenizer, texts: Iterable[str], max_tokens: int, batch_size: int = 8,
                 document_mask: bool = False) -> dict[str, float]:
    """Loss (nats per predicted token), perplexity and bits per byte on whole documents, each after
    <|endoftext|> as in pretraining, until at least max_tokens; the stream is cut into windows of
    block_size, every token predicted once from the start of its window (with document_mask: from
    the start of its document or window, whichever is later, as --document-mask trains)."""
    ids, n_bytes = [], 0
    for text in texts:
        if len(ids) >= max_tokens + 1:
            break
        ids += [tok.eot_id, *tok.encode(text)]
        n_bytes += len(text.encode("utf-8"))
    if len(ids) < 2 or n_bytes == 0:
        raise ValueError("the evaluation text is empty; pass --data with some text")
    return token_metrics(model, ids, n_bytes, batch_size, tok.eot_id if document_mask else None)


def split_metrics(model: GPT, tok: Tokenizer, dataset: Path, max_tokens: int,
                  document_mask: bool = False) -> dict[str, float]:
    """text_metrics of a prepared dataset's val split: its first max_tokens + 1 tokens (documents
    already follow <|endoftext|> there), the bytes being those of the predicted tokens."""
    data = PreparedData(dataset)
    if data.tokenizer.fingerprint != tok.fingerprint:
        raise ValueError(f"{dataset} was tokenized with tokenizer {data.tokenizer.fingerprint}, not this run's "
                         f"({tok.fingerprint}); pass its raw text as --data instead")
    ids = data.val[:max_tokens + 1].tolist()
    n_ordinary = len(tok.token_bytes)
    n_bytes = sum(len(tok.token_bytes[i]) for i in ids[1:] if i < n_ordinary)     # special tokens are no text
    if len(ids) < 2 or n_bytes == 0:
        raise ValueError(f"the val split of {dataset} is empty; pass --data with some text")
    return token_metrics(model, ids, n_bytes, document_start=tok.eot_id if document_mask else None)


@torch.no_grad()
def token_metrics(model: GPT, ids: list[int], n_bytes: int, batch_size: int = 8,
                  document_start: int | None = None) -> dict[str, float]:
    """Loss, perplexity and bits per byte of predicting ids[1:] (whose text is n_bytes long), in
    windows of block_size, every token predicted once from the start of its window, or with
    document_start (the <|endoftext|> id) attending only within its document of the window."""
    T = model.cfg.block_size
    device = next(model.parameters()).device
    windows = [ids[i:i + T + 1] for i in range(0, len(ids) - 1, T)]
    total = 0.0
    with eval_mode(model), progress(len(ids) - 1, "held-out loss", " tokens", unit_scale=True) as bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            x = torch.zeros(len(batch), T, dtype=torch.long)
            y = torch.full((len(batch), T), -100, dtype=torch.long)
            for row, w in enumerate(batch):
                x[row, :len(w) - 1] = torch.tensor(w[:-1])
                y[row, :len(w) - 1] = torch.tensor(w[1:])
            documents = None if document_start is None else Documents.starting_at(x, document_start)
            batch = to_device({"x": x, "y": y, "documents": documents}, device)
            losses = model(batch["x"], targets=batch["y"], reduction="none", documents=batch["documents"])  # (B, T)
            total += losses.double().sum().item()
            bar.update(int((y != -100).sum()))                         # the tokens predicted
    loss = total / (len(ids) - 1)
    return {"val_loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total / math.log(2) / n_bytes,
            "eval_tokens": len(ids) - 1, "eval_bytes": n_bytes}


def positive_ints(text: str) -> list[int]:
    """argparse type= of a comma-separated list of positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,10, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="run directory (its latest checkpoint) or checkpoint directory")
    parser.add_argument("--data", default=None, help="held-out text: a file, directory or glob of text, Markdown, "
                                                     "code or JSONL with a 'text' field (not the training corpus), "
                                                     "or a dataset directory made by python -m train.data (its val "
                                                     "split) (default: a pretrain run's own dataset)")
    parser.add_argument("--max-tokens", type=flag_type(int, at_least(2)), default=65536,
                        help="evaluate whole documents of --data until at least this many tokens (of a "
                             "prepared dataset's val split: this many)")
    parser.add_argument("--document-mask", action=argparse.BooleanOptionalAction, default=None,
                        help="with --data: each token attends only within its document, as pretraining with "
                             "--document-mask trains (default: as the run was pretrained, from its config.json)")
    parser.add_argument("--tasks", type=flag_type(int, at_least(0)), default=None,
                        help="held-out built-in tasks for exact match (0: none; needs the chat tokens) (default: 350, "
                             "none for a pretrain run, whose base model has not learned the chat format)")
    parser.add_argument("--task-seed", type=int, default=0, help="seed of the task sets (as in SFT and DPO)")
    parser.add_argument("--humaneval", action="store_true", help="run HumanEval (needs the eval extra)")
    parser.add_argument("--humaneval-problems", type=flag_type(int, at_least(1)), default=None,
                        help="only the first N of the 164 problems (default: all)")
    parser.add_argument("--humaneval-samples", type=flag_type(int, at_least(1)), default=1,
                        help="completions per problem; more than 1 needs --humaneval-temperature > 0")
    parser.add_argument("--humaneval-temperature", type=flag_type(float, at_least(0)), default=0.0,
                        help="sampling temperature (0: greedy)")
    parser.add_argument("--humaneval-top-p", type=flag_type(float, greater_than(0), at_most(1)), default=0.95,
                        help="nucleus sampling mass when sampling")
    parser.add_argument("--humaneval-k", type=positive_ints, default=[1, 10, 100],
                        help="comma-separated k of pass@k; those above --humaneval-samples are left out")
    parser.add_argument("--humaneval-max-tokens", type=flag_type(int, at_least(1)), default=None,
                        help="longest completion in tokens (default: 256, at most half the model's block_size)")
    parser.add_argument("--humaneval-timeout", type=flag_type(float, greater_than(0)), default=10.0,
                        help="seconds each completion's tests may run")
    parser.add_argument("--unsafe-exec", action="store_true",
                        help="run HumanEval's model-written code without the bubblewrap sandbox, where bwrap cannot "
                             "run: the code can then read, change and delete your files and signal your processes")
    parser.add_argument("--lm-eval", default=None, metavar="TASKS",
                        help="comma-separated lm-evaluation-harness tasks (needs the eval extra)")
    parser.add_argument("--lm-eval-include", default=None, metavar="DIR",
                        help="a directory of your own lm-eval task YAML files")
    parser.add_argument("--lm-eval-limit", type=flag_type(int, at_least(1)), default=None,
                        help="at most this many documents per lm-eval task")
    parser.add_argument("--quantize", type=format_list, default=None, metavar="FORMATS",
                        help="evaluate the model quantized on loading: int8 or fp4, or a comma-separated list "
                             "that may include none (full precision) to compare them side by side, e.g. "
                             "none,int8,fp4")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def run_humaneval(model: GPT, tok: Tokenizer, args: argparse.Namespace, run_dir: Path, suffix: str = "") -> dict:
    """pass@k of HumanEval; every completion and its outcome go to run_dir/humaneval_samples<suffix>.jsonl."""
    if args.humaneval_samples > 1 and args.humaneval_temperature == 0:
        raise ValueError("--humaneval-samples > 1 with greedy decoding gives the same completion each time; "
                         "pass --humaneval-temperature (0.8 is usual for pass@10)")
    problems = humaneval.load_problems(args.humaneval_problems)
    with eval_mode(model):
        completions = humaneval.complete(model, tok, problems, args.humaneval_samples, args.humaneval_temperature,
                                         args.humaneval_top_p if args.humaneval_temperature else None,
                                         args.humaneval_max_tokens or min(256, model.cfg.block_size // 2))
    outcomes = humaneval.execute(problems, completions, args.humaneval_timeout, memory_mb=1024,
                                 unsafe_exec=args.unsafe_exec)
    lines = [json.dumps({"task_id": p["task_id"], "completion": c, "passed": o.passed, "result": o.result})
             for p, row, results in zip(problems, completions, outcomes) for c, o in zip(row, results)]
    atomic_write_text(run_dir / f"humaneval_samples{suffix}.jsonl", "\n".join(lines) + "\n")
    return {**humaneval.scores(outcomes, args.humaneval_k), "humaneval_problems": len(problems),
            "humaneval_samples_per_problem": args.humaneval_samples}


def lm_eval_tasks(args: argparse.Namespace) -> tuple[list[str], TaskManager]:
    """The --lm-eval tasks and lm-eval's TaskManager of them, checked before any model loads: every
    task known, and the data sets to download reachable (else one line at once, not the hub's retries)."""
    from train.eval import harness   # imports lm-eval, registers tritongpt

    if args.lm_eval_include is not None and not Path(args.lm_eval_include).is_dir():
        raise ValueError(f"--lm-eval-include {args.lm_eval_include} is not a directory of lm-eval task YAML files")
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    manager = harness.task_manager(tasks, args.lm_eval_include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown}; list them with `python -m train.harness ls tasks`"
                         + ("" if args.lm_eval_include else " or pass --lm-eval-include DIR for your own"))
    needed = harness.downloads(manager, tasks)
    if needed and not harness.hub_reachable():
        raise ValueError(harness.offline_refusal(needed, "--lm-eval-include"))
    return tasks, manager


def run_lm_eval(ckpt: Path, device: str, args: argparse.Namespace, run_dir: Path, plan: tuple[list[str], TaskManager],
                quantize: str | None = None, suffix: str = "") -> dict:
    """lm-eval's tasks on the checkpoint (quantized on loading when quantize names a format) through
    train.eval.harness; plan is lm_eval_tasks(args); its full results go to run_dir/lm_eval<suffix>.json."""
    import lm_eval
    from lm_eval.utils import make_table

    tasks, manager = plan
    model_args = {"path": str(ckpt), "device": device, **({"quantize": quantize} if quantize else {})}
    out = lm_eval.simple_evaluate(model="tritongpt", model_args=model_args, tasks=tasks,
                                  task_manager=manager, limit=args.lm_eval_limit)
    print(make_table(out))
    atomic_write_text(run_dir / f"lm_eval{suffix}.json", json.dumps({k: out[k] for k in ("results", "configs", "versions",
                                                                               "n-samples")}, indent=2, default=str))
    return {f"lm_eval/{task}/{metric.split(',')[0]}": value for task, metrics in out["results"].items()
            for metric, value in metrics.items() if isinstance(value, float) and "_stderr" not in metric}


def measure(model: GPT, tok: Tokenizer, ckpt: Path, device: str, args: argparse.Namespace, run_tasks: bool,
            quantize: str | None, lm_eval_plan: tuple[list[str], TaskManager] | None) -> dict:
    """Every metric the flags ask for, of one model (the run quantized to `quantize`, or not)."""
    run_dir, suffix = run_dir_of(ckpt), f"-{quantize}" if quantize else ""
    stored, bf16 = projection_bytes(model)
    results: dict = {"projection_bytes": stored, "projection_bytes_vs_bf16": stored / bf16}
    if args.data is not None and (Path(args.data) / "manifest.json").is_file():
        results.update(split_metrics(model, tok, Path(args.data), args.max_tokens, args.document_mask))
        results["data"] = str(Path(args.data) / "val.bin")
    elif args.data is not None:
        results.update(text_metrics(model, tok, (text for _, text in iter_documents(args.data)), args.max_tokens,
                                    document_mask=args.document_mask))
        results["data"] = args.data
    if run_tasks:
        results.update(exact_match(model, tok, make_tasks("test", args.tasks, args.task_seed)))
    if args.humaneval:
        results.update(run_humaneval(model, tok, args, run_dir, suffix))
    if lm_eval_plan is not None:
        results.update(run_lm_eval(ckpt, device, args, run_dir, lm_eval_plan, quantize, suffix))
    return results


def pretrain_config(run_dir: Path) -> dict | None:
    """The run's config.json when a pretraining job wrote it (its args name the data it trained on)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}); pass --data to evaluate without it") from None
    return config if isinstance(config, dict) and config.get("job") == "pretrain" else None


def training_dataset(config: dict, tok: Tokenizer) -> Path:
    """The prepared dataset directory a pretrain run trained on: its --data when that names one, else
    the one under its --data-dir tokenized with the run's tokenizer (the directory's name hashes
    arguments config.json does not all hold) and, should several be, prepared from its --data."""
    data, data_dir = config["args"]["data"], Path(config["args"]["data_dir"])
    named = Path(data).expanduser()
    candidates = [named] if (named / "manifest.json").is_file() else sorted(
        p.parent for p in data_dir.glob("*/manifest.json"))
    manifests = {}
    for directory in candidates:
        try:
            manifests[directory] = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue                                  # a damaged dataset is not the one
    fitting = [d for d, m in manifests.items() if m.get("tokenizer", {}).get("fingerprint") == tok.fingerprint]
    found = fitting if len(fitting) < 2 else [d for d in fitting
                                              if manifests[d].get("args", {}).get("source") == resolve_source(data)]
    if len(found) != 1:
        what = (f"is one of {', '.join(map(str, fitting))}" if fitting else
                f"is not in {data_dir.resolve()} (removed, or training ran in another working directory)")
        raise SystemExit(f"this run trained on --data {data}, whose prepared dataset {what}; pass --data with "
                         f"held-out text or a prepared dataset directory (python -m train.data --out DIR)")
    return found[0]


def read_history(path: Path) -> list[dict]:
    """eval.json's records, oldest first ([] when there is none); an older eval.json held one record."""
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}); move it away to keep it, then evaluate again") from None
    return saved if isinstance(saved, list) else [saved]


def show(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.humaneval and not args.unsafe_exec:
        require_containment()                    # refused at once, not after generating the completions
    device = pick_device(args.device)
    ckpt = resolve(args.path)
    history = run_dir_of(ckpt) / "eval.json"
    read_history(history)                        # a damaged eval.json stops us before the work, not after
    tok = load_tokenizer(ckpt)
    pretrain = pretrain_config(run_dir_of(ckpt))
    if args.data is None and pretrain is not None:
        args.data = str(training_dataset(pretrain, tok).resolve())
    if args.tasks is None:
        args.tasks = 0 if pretrain is not None else 350
    if args.document_mask is None:
        args.document_mask = bool(pretrain is not None and pretrain["args"].get("document_mask"))
    has_chat = all(s in tok.special_tokens for s in SPECIALS)
    run_tasks = bool(args.tasks) and has_chat
    if args.data is None and not (run_tasks or args.humaneval or args.lm_eval):
        fix = "--tasks N, " if has_chat else ""
        raise SystemExit(f"nothing to evaluate: pass --data, {fix}--humaneval or --lm-eval TASKS"
                         + ("" if has_chat else " (this tokenizer has no chat tokens for the built-in tasks)"))
    lm_eval_plan = lm_eval_tasks(args) if args.lm_eval else None
    by_format = {}
    for quantize in args.quantize or [None]:
        model, state = load_model(ckpt, device, quantize=quantize)
        # "none" loads a run as it is: a run written by python -m model.quantize is labelled with its format
        label = quantize or quantized_as(state) or "none"
        by_format[label] = measure(model, tok, ckpt, device, args, run_tasks, quantize, lm_eval_plan)
    results: dict = {"time": datetime.now().astimezone().isoformat(timespec="seconds"),
                     "args": {k: v for k, v in vars(args).items() if k != "debug"},
                     "checkpoint": str(ckpt), "step": state.get("step")}
    if args.quantize is None:
        results.update(*by_format.values())
        shown = {k: v for k, v in results.items() if k not in ("time", "args")}
        width = max(map(len, shown))
        lines = [f"{name:<{width}}  {show(value)}" for name, value in shown.items()]
    else:
        results["by_format"] = by_format
        names = [n for n in dict.fromkeys(n for metrics in by_format.values() for n in metrics) if n != "data"]
        width = max(map(len, names))
        lines = [f"checkpoint  {ckpt}"] + ([f"data        {args.data}"] if args.data is not None else [])
        lines += [f"{'':<{width}}  " + "  ".join(f"{f:>12}" for f in by_format)]
        lines += [f"{name:<{width}}  " + "  ".join(f"{show(m.get(name, '-')):>12}" for m in by_format.values())
                  for name in names]
    atomic_write_text(history, json.dumps(read_history(history) + [results], indent=2))
    print("\n".join(lines))
    print(f"added to {history}")
    return results


if __name__ == "__main__":
    run_command(main)
