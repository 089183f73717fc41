"""A small corpus on disk (text, code, JSONL, a duplicate, a binary and a too-short file), for the
data pipeline's tests and the training commands' tests."""
from __future__ import annotations

import json
import random

WORDS = ("def class return import self value token model layer batch data kernel triton python while "
         "for range print list dict string number error"
         " caf\u00e9 \u4e2d\u6587").split()


def document(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(8, 30)):
        lines.append(" " * rng.choice([0, 4, 8]) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
                     + f" {rng.randint(0, 10**6)}")
    return "\n".join(lines) + "\n"


def write_corpus(root, n_files: int = 40, seed: int = 0):
    rng = random.Random(seed)
    (root / "sub").mkdir(parents=True)
    for i in range(n_files):
        (root / ("sub" if i % 3 else ".") / f"doc{i}.{'py' if i % 2 else 'txt'}").write_text(document(rng))
    rows = [json.dumps({"text": document(rng)}) for _ in range(5)]
    (root / "more.jsonl").write_text("\n".join(rows) + "\n\n")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    (root / "dup.txt").write_text((root / "doc0.txt").read_text())            # an exact duplicate
    (root / "short.txt").write_text("x = 1\n")
    return root
