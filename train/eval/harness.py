"""lm-evaluation-harness on our models: the `tritongpt` model class, and lm-eval's CLI that knows it.

    python -m train.harness --model tritongpt --model_args path=RUN --tasks hellaswag,...
    python -m train.harness --model hf --model_args pretrained=EXPORTED_DIR --tasks ...

lm-eval finds a model class only in its own registry and has no plugin hook, so its command line
runs here, after this module registered `tritongpt` (every lm-eval flag works as in `lm_eval`).
From Python, `import train.eval.harness` is enough: `lm_eval.simple_evaluate(model="tritongpt",
model_args="path=RUN", ...)`. model_args: path (a run or checkpoint directory), device (auto; the
CPU when CUDA is asked for but absent, as lm-eval's CLI asks for cuda:0 by default),
batch_size (rows per forward, default 16), max_gen_toks (default 256).

The requests follow the conventions of lm-eval's `hf` model so that an exported directory scores
the same under `--model hf`: an empty context is <|endoftext|> (the export's bos), the context
keeps its last tokens when context + continuation exceed block_size, rolling loglikelihoods score
disjoint block_size windows each predicted from its start (the first token from <|endoftext|>),
generate_until continues the context as it is (<|endoftext|> when empty), decodes without special
tokens and cuts at the first stop string. Loglikelihood
rows of different lengths share a batch: right padding never reaches a causal model's earlier
positions. Generation goes through model.generate (KV cache) in batches of equal context length
(generate needs no attention mask then); it stops at <|endoftext|> and <|end|>. Each request type
shows its progress on stderr (train/progress.py) unless lm-eval passes disable_tqdm.

Offline (HF_HUB_OFFLINE, or the hub's host taking no connection within 2 seconds), tasks whose data
sets would be downloaded (a hub data set not in the Hugging Face caches) are refused at once, in
one line naming them, instead of after lm-eval's retries.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import threading
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

import torch

from model.io.checkpoint import load_model, load_tokenizer, resolve
from model.command import pick_device, run_command
from model.generate import generate
from train.progress import Progress, progress

try:
    import datasets
    import huggingface_hub
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise SystemExit("lm-eval is not installed; pip install -e '.[eval]'") from None

END_TOKENS = ("<|endoftext|>", "<|end|>")
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")   # datasets' builders of data_files on disk


@register_model("tritongpt")
class TritonGPTLM(TemplateLM):
    """A tritongpt run or checkpoint as an lm-eval language model."""

    def __init__(self, path: str, device: str | None = "auto", batch_size: int | str = 16,
                 max_gen_toks: int | str = 256, max_batch_size: int | None = None, quantize: str | None = None,
                 **unknown):
        """max_batch_size is lm-eval's bound for batch_size="auto", which here means 16."""
        super().__init__()
        if unknown:
            raise ValueError(f"unknown tritongpt model_args {sorted(unknown)}: it takes path, max_gen_toks and "
                             f"quantize (int8 or fp4) "
                             f"(batch_size and device come from lm-eval's --batch_size and --device)")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless told otherwise, as its hf model does
            print(f"tritongpt: no CUDA device here, evaluating on the CPU instead of {device}", file=sys.stderr)
            device = "cpu"
        device = pick_device(device)
        checkpoint = resolve(path)
        self.model, _ = load_model(checkpoint, device, quantize=quantize)
        self.model.eval()
        self.tok = load_tokenizer(checkpoint)
        self._device = torch.device(device)
        self.batch_size = min(16, max_batch_size or 16) if str(batch_size).startswith("auto") else _count(
            "batch_size", batch_size)
        self.max_gen_toks = _count("max_gen_toks", max_gen_toks)
        self.stop_ids = [self.tok.special_tokens[s] for s in END_TOKENS if s in self.tok.special_tokens]

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        """Text of ids without the special tokens (as the hf model decodes)."""
        ordinary = len(self.tok.token_bytes)
        return self.tok.decode([i for i in ids if i < ordinary])

    def _progress(self, total: int, desc: str, disable_tqdm: bool) -> Progress:
        """The bar of one lm-eval request type: shown unless lm-eval says not to, on its rank 0 only."""
        return progress(total, f"lm-eval {desc}", " requests", show=not disable_tqdm and self.rank == 0)

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], int]], bar: Progress | None = None) -> list[tuple[float, bool]]:
        """For each (ids, n) the summed log-probability of the last n ids given those before them,
        and whether each of them was the argmax; ids hold at most block_size + 1 tokens. bar, when
        given, advances by one per row."""
        out: list[tuple[float, bool]] = []
        scored = [r for r in rows if r[1] > 0]                      # nothing to score: log 1 = 0, greedy
        for start in range(0, len(scored), self.batch_size):
            batch = scored[start:start + self.batch_size]
            width = max(len(ids) for ids, _ in batch) - 1
            x = torch.zeros(len(batch), width, dtype=torch.long)
            for r, (ids, _) in enumerate(batch):
                x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            logprobs = self.model(x.to(self.device)).float().log_softmax(-1).cpu()     # (b, width, V)
            for r, (ids, n) in enumerate(batch):
                target = torch.tensor(ids[-n:])                                      # (n,)
                rows_lp = logprobs[r, len(ids) - 1 - n:len(ids) - 1]                  # (n, V)
                picked = rows_lp.gather(1, target[:, None]).squeeze(1)
                out.append((picked.double().sum().item(), bool((rows_lp.argmax(-1) == target).all())))
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.update(len(rows) - len(scored))       # the rows with nothing to score
        results = iter(out)
        return [next(results) if n > 0 else (0.0, True) for _, n in rows]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-(self.max_length + 1):]     # keep the continuation, crop the context
            # (a continuation longer than the window: its last block_size tokens)
            rows.append((ids, min(len(continuation), len(ids) - 1)))
        with self._progress(len(rows), "loglikelihood", disable_tqdm) as bar:
            scores = self._score(rows, bar)
        for (key, _, _), score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        with self._progress(len(requests), "loglikelihood_rolling", disable_tqdm) as bar:
            for (text,) in (r.args for r in requests):
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                total = sum(lp for lp, _ in self._score([(ctx + pred, len(pred)) for ctx, pred in windows]))
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
                out.append(total)
                bar.update(1)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)       # same generation settings and context length
        encoded = []
        for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
            settings = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            budget = settings["max_gen_toks"]
            if budget >= self.max_length:
                raise ValueError(f"max_gen_toks {budget} leaves no room for a context in block_size "
                                 f"{self.max_length}; lower it")
            ids = (self.tok_encode(context) or [self.eot_token_id])[-(self.max_length - budget):]
            encoded.append((ids, settings))
            temperature = settings["temperature"] if settings["do_sample"] else 0.0
            groups[(len(ids), budget, temperature, tuple(settings["until"]))].append(i)
        with self._progress(len(requests), "generate_until", disable_tqdm) as bar:
            for (length, budget, temperature, until), members in groups.items():
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start:start + self.batch_size]
                    idx = torch.tensor([encoded[i][0] for i in chunk], device=self.device)        # (b, length)
                    gen = generate(self.model, idx, budget, temperature=temperature, stop_tokens=self.stop_ids)
                    for i, row in zip(chunk, gen[:, length:].tolist()):
                        row = row[:next((j for j, t in enumerate(row) if t in self.stop_ids), len(row))]
                        text = postprocess_generated_text(self.tok_decode(row), list(until), None)
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                        out[i] = text
                    bar.update(len(chunk))
        return out


def _count(name: str, value: int | str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return count


def task_manager(tasks: list[str], include_path: str | None) -> TaskManager:
    """lm-eval's task index: of include_path alone when it holds every task (the built-in index
    takes seconds to build), else with the built-in tasks."""
    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(manager.all_tasks):
            return manager
    return TaskManager(include_path=include_path)


def needs_download(config: dict) -> bool:
    """Whether lm-eval would download the data set of a task's config: a hub data set not in the
    Hugging Face caches, or data_files given as URLs. A Python task loads its own data: not known."""
    path = config.get("dataset_path")
    if not isinstance(path, str):
        return False
    if path in LOCAL_BUILDERS or Path(path).expanduser().exists():
        return "://" in str((config.get("dataset_kwargs") or {}).get("data_files", ""))
    hub_copy = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}"
    built_copy = Path(datasets.config.HF_DATASETS_CACHE) / path.replace("/", "___")
    return not (hub_copy.is_dir() or built_copy.is_dir())


def downloads(manager: TaskManager, names: list[str]) -> dict[str, str]:
    """{task: data set} of the tasks under names (groups and tags opened) whose data sets lm-eval
    would download; names that are not in the index are lm-eval's to report."""
    needed: dict[str, str] = {}

    def visit(name: str, overrides: dict) -> None:
        entry = manager.task_index.get(name)
        if entry is None:
            return
        if entry.kind is Kind.TAG:
            for task in sorted(entry.tags):
                visit(task, {})
        elif entry.kind is Kind.GROUP:
            for child in entry.cfg.get("task", []):
                if isinstance(child, str):
                    visit(child, {})
                elif isinstance(child, dict) and isinstance(child.get("task"), str):
                    visit(child["task"], child)            # a member with settings of its own
        elif needs_download(config := {**(entry.cfg or {}), **overrides}):
            needed[name] = config["dataset_path"]

    for name in names:
        visit(name, {})
    return needed


def hub_reachable(timeout: float = 2.0) -> bool:
    """False under HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE), or when the hub's host (or the HTTPS
    proxy) takes no TCP connection within timeout seconds, name lookup included."""
    flags = [os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    if datasets.config.HF_HUB_OFFLINE or any(flag in ("1", "ON", "YES", "TRUE") for flag in flags):
        return False
    url = urllib.parse.urlsplit(urllib.request.getproxies().get("https") or huggingface_hub.constants.ENDPOINT)
    connected = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                     timeout=timeout).close()
            connected.append(True)
        except OSError:
            pass

    # getaddrinfo ignores the socket's timeout: the thread bounds the lookup too
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(connected)


def offline_refusal(needed: dict[str, str], include_flag: str) -> str:
    """The one line that refuses tasks whose data sets cannot be downloaded."""
    listed = ", ".join(f"{task} ({data})" for task, data in needed.items())
    return (f"the Hugging Face hub cannot be reached (no network, or HF_HUB_OFFLINE is set) and lm-eval would "
            f"download the data sets of {listed}: run them once with a network to cache them, or pass "
            f"{include_flag} DIR with task YAML files whose dataset_path is json and whose "
            f"dataset_kwargs.data_files name a local copy")


def main() -> None:
    """lm-eval's own command line, with `tritongpt` registered."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv[0] = "python -m train.harness"
    task_flags = argparse.ArgumentParser(add_help=False)
    task_flags.add_argument("--tasks", "-t", nargs="+", default=[])
    task_flags.add_argument("--include_path", default=None)
    given, _ = task_flags.parse_known_args(sys.argv[1:])
    tasks = [t for group in given.tasks for t in group.split(",") if t]
    if tasks and not hub_reachable():
        needed = downloads(task_manager(tasks, given.include_path), tasks)
        if needed:
            raise SystemExit(offline_refusal(needed, "--include_path"))
    try:
        cli_evaluate()
    except TypeError as e:     # lm-eval passes its --batch_size/--device as keywords next to model_args
        twice = re.search(r"multiple values for keyword argument '(\w+)'", str(e))
        if twice is None:
            raise
        raise SystemExit(f"--model_args sets {twice[1]}, which lm-eval's --{twice[1]} flag sets too; "
                         f"use the flag") from None


if __name__ == "__main__":
    run_command(main)
