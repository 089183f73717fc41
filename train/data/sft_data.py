"""SFT and DPO data: the JSONL formats below, encoding through the chat template,
and batches (padded, or packed into rows) that are a pure function of the step.

SFT lines, any of:   {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
                     {"prompt": ..., "response": ...}
                     {"instruction": ..., "input": ... (optional), "output": ...}     (Alpaca)
DPO lines:           {"prompt": ..., "chosen": ..., "rejected": ...}
Every malformed line raises ValueError naming the file, the line number and the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

from model.chat_format import check_messages, render

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """A rendered conversation: token ids and the loss mask (True where the token is trained on)."""
    ids: list[int]
    mask: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every non-blank line; where is 'path:line' for error messages."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass a JSONL file, or 'tasks' for the built-in tasks")
    found = False
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            found = True
            yield where, record
    if not found:
        raise ValueError(f"{path}: no examples (the file is empty)")


def _text(record: dict, field: str, where: str, required: bool = True) -> str:
    if field not in record:
        if required:
            raise ValueError(f"{where}: missing field '{field}'")
        return ""
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def sft_messages(record: dict, where: str) -> list[dict]:
    """One SFT record in any of the three formats -> the conversation it stands for."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ValueError(f"{where}: field 'messages' must be a list, got {type(messages).__name__}")
        try:
            check_messages(messages, ends_with="assistant")
        except ValueError as e:
            raise ValueError(f"{where}: field 'messages': {e}") from None
        return messages
    if "instruction" in record or "output" in record:
        prompt = _text(record, "instruction", where)
        extra = _text(record, "input", where, required=False)
        # Alpaca's convention: the optional input follows the instruction after a blank line.
        user = f"{prompt}\n\n{extra}" if extra else prompt
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output", where)}]
    if "prompt" in record or "response" in record:
        return [{"role": "user", "content": _text(record, "prompt", where)},
                {"role": "assistant", "content": _text(record, "response", where)}]
    raise ValueError(f"{where}: unrecognised SFT record with fields {sorted(record)}; expected 'messages', "
                     f"'prompt' + 'response', or 'instruction' (+ 'input') + 'output'")


def load_sft(path: str | Path) -> list[list[dict]]:
    """Every conversation of an SFT JSONL file."""
    return [sft_messages(record, where) for where, record in read_jsonl(path)]


def load_dpo(path: str | Path) -> list[dict[str, str]]:
    """Every {"prompt", "chosen", "rejected"} record of a DPO JSONL file."""
    pairs = []
    for where, record in read_jsonl(path):
        pair = {field: _text(record, field, where) for field in ("prompt", "chosen", "rejected")}
        if pair["chosen"] == pair["rejected"]:
            raise ValueError(f"{where}: field 'rejected' equals 'chosen'; a preference pair needs two different responses")
        pairs.append(pair)
    return pairs


def encode(conversations: list[list[dict]], tok, block_size: int) -> tuple[list[Example], int]:
    """Render each conversation; drop those longer than block_size + 1 tokens (the model sees at most
    block_size inputs), since a truncated one would train on a reply that never ends. -> (kept, dropped)."""
    examples = [Example(*render(c, tok)) for c in conversations]
    kept = [e for e in examples if len(e) <= block_size + 1]
    return kept, len(examples) - len(kept)


def encode_pairs(pairs: list[dict[str, str]], tok, block_size: int) -> tuple[list[tuple[Example, Example]], int]:
    """Each DPO pair as (chosen, rejected) examples whose masks cover the response and its <|end|>."""
    def conversation(prompt, reply):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]

    encoded = [(Example(*render(conversation(p["prompt"], p["chosen"]), tok)),
                Example(*render(conversation(p["prompt"], p["rejected"]), tok))) for p in pairs]
    kept = [(c, r) for c, r in encoded if max(len(c), len(r)) <= block_size + 1]
    return kept, len(encoded) - len(kept)


def pack_rows(examples: list[Example], capacity: int) -> list[Example]:
    """Pack whole examples into rows of at most capacity tokens, first fit, longest first."""
    rows: list[Example] = []
    for e in sorted(examples, key=len, reverse=True):
        for i, row in enumerate(rows):
            if len(row) + len(e) <= capacity:
                rows[i] = Example(row.ids + e.ids, row.mask + e.mask)
                break
        else:
            rows.append(e)
    return rows


def collate(examples: list[Example], pad_id: int, pack_to: int = 0) -> dict[str, torch.Tensor]:
    """Examples -> {"x": inputs (R, L), "y": targets (R, L)} with IGNORE where the mask is off and
    on padding. pack_to > 0 packs several examples per row (rows of up to pack_to + 1 tokens);
    each starts with <|endoftext|>, so a packed example begins the way a document does."""
    rows = pack_rows(examples, pack_to + 1) if pack_to else examples
    L = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), L), pad_id, dtype=torch.int64)
    y = torch.full((len(rows), L), IGNORE, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids = torch.tensor(r.ids)
        x[i, :len(r) - 1] = ids[:-1]
        y[i, :len(r) - 1] = ids[1:].masked_fill(~torch.tensor(r.mask[1:], dtype=torch.bool), IGNORE)
    return {"x": x, "y": y}


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def stream_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Positions start .. start + count - 1 of an endless stream of per-epoch shuffles of range(n)."""
    return [_permutation(n, seed, p // n)[p % n] for p in range(start, start + count)]
