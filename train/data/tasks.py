"""Built-in verifiable tasks: short instructions whose answers can be checked exactly.

Seven kinds (add, sub, reverse, sort, count, upper, copy), drawn from a seeded generator. The split
of an example is a hash of its prompt, so train and test are disjoint whatever the seeds and sizes.
Each example carries a plausible wrong answer (off by one, unreversed, one swap, ...) that DPO uses
as the rejected response when no model samples are at hand.

    python -m train.tasks --out data/tasks       # writes {sft,dpo}_{train,test}.jsonl there
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from model.command import DEBUG_HELP, Parser, at_least, flag_type, run_command
from model.io.files import atomic_write_text

KINDS = ("add", "sub", "reverse", "sort", "count", "upper", "copy")
TEST_PERCENT = 10
WORDS = ("the cat dog sun red blue green big small fast slow hot cold old new good bad day night tree "
         "fish bird book door road rain snow wind star moon ship king game song milk bread water fire "
         "stone house river light dark happy quiet early late open close high low warm soft hard little "
         "long short black white gold silver apple lemon music paper glass garden market window table "
         "chair cloud storm field forest island mountain ocean valley summer winter spring autumn").split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Task:
    kind: str
    prompt: str
    answer: str
    wrong: str          # a plausible wrong answer, never equal to answer

    def messages(self, reply: str | None = None) -> list[dict]:
        """The conversation: the prompt, and the given reply (default: the correct answer)."""
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.answer if reply is None else reply}]


def _nudge(n: int, rng: random.Random) -> int:
    """n moved by a small nonzero amount (the typical arithmetic slip), kept >= 0."""
    return n + 1 if n == 0 else n + rng.choice((-1, 1, -10, 10) if n >= 10 else (-1, 1))


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _phrase(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def _make(kind: str, rng: random.Random) -> Task:
    if kind == "add":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return Task(kind, f"What is {a} + {b}?", str(a + b), str(_nudge(a + b, rng)))
    if kind == "sub":
        a = rng.randint(0, 50)
        b = rng.randint(0, a)
        return Task(kind, f"What is {a} - {b}?", str(a - b), str(_nudge(a - b, rng)))
    if kind == "reverse":
        word = _pseudo_word(rng)
        while word == word[::-1]:
            word = _pseudo_word(rng)
        return Task(kind, f"Reverse the word {word}.", word[::-1], word)
    if kind == "sort":
        digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
        while len(set(digits)) < 2:
            digits[0] = rng.randint(0, 9)
        ordered = sorted(digits)
        i = rng.choice([i for i in range(len(ordered) - 1) if ordered[i] != ordered[i + 1]])
        swapped = ordered[:i] + [ordered[i + 1], ordered[i]] + ordered[i + 2:]
        spaced = " ".join
        return Task(kind, f"Sort the digits {spaced(map(str, digits))}.", spaced(map(str, ordered)),
                    spaced(map(str, swapped)))
    if kind == "count":
        word = _pseudo_word(rng)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(LETTERS)
        n = word.count(letter)
        return Task(kind, f"How many times does the letter {letter} appear in {word}?", str(n), str(_nudge(n, rng)))
    if kind == "upper":
        phrase = " ".join(_phrase(rng, 1, 3))
        return Task(kind, f"Uppercase: {phrase}", phrase.upper(), phrase)
    if kind == "copy":
        words = _phrase(rng, 2, 4)
        # One word replaced, not dropped: a shorter wrong answer would teach DPO that stopping is bad.
        changed = words[:]
        i = rng.randrange(len(words))
        changed[i] = rng.choice([w for w in WORDS if w != words[i]])
        return Task(kind, f"Repeat after me: {' '.join(words)}", " ".join(words), " ".join(changed))
    raise ValueError(f"unknown task kind {kind!r}; kinds are {', '.join(KINDS)}")


def split_of(prompt: str) -> str:
    """'test' for a fixed TEST_PERCENT of all possible prompts, else 'train' (a hash, not a draw)."""
    return "test" if int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 100 < TEST_PERCENT else "train"


def make_tasks(split: str, n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> list[Task]:
    """n distinct tasks of the split ('train' or 'test'), kinds in turn, reproducible from seed.

    A kind whose prompts run out (the arithmetic ones have a few thousand) drops out of the rotation.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    # Separate streams per split so the train set does not change when --n-test does.
    rng = random.Random(f"{seed}-{split}")
    tasks, seen, active, misses = [], set(), list(kinds), 0
    while len(tasks) < n:
        kind = active[len(tasks) % len(active)]
        task = _make(kind, rng)
        if split_of(task.prompt) == split and task.prompt not in seen:
            seen.add(task.prompt)
            tasks.append(task)
            misses = 0
        elif (misses := misses + 1) == 2000:
            active.remove(kind)
            misses = 0
            if not active:
                raise ValueError(f"only {len(tasks)} distinct {split} tasks of kinds {kinds} exist; ask for fewer")
    return tasks


def sft_record(task: Task) -> dict:
    return {"messages": task.messages()}


def dpo_record(task: Task, rejected: str | None = None) -> dict:
    return {"prompt": task.prompt, "chosen": task.answer, "rejected": task.wrong if rejected is None else rejected}


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m train.tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/tasks", help="directory for the JSONL files")
    parser.add_argument("--n-train", type=flag_type(int, at_least(1)), default=20000, help="training examples")
    parser.add_argument("--n-test", type=flag_type(int, at_least(1)), default=700, help="held-out examples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task generator")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        tasks = make_tasks(split, n, args.seed)
        for fmt, record in (("sft", sft_record), ("dpo", dpo_record)):
            path = write_jsonl(Path(args.out) / f"{fmt}_{split}.jsonl", [record(t) for t in tasks])
            print(f"wrote {len(tasks)} examples to {path}")


if __name__ == "__main__":
    run_command(main)
