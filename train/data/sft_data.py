"""SFT and DPO data: the JSONL formats below, encoding through the chat template,
and batches (padded, or whole examples packed into rows with Documents that keep them apart) that
are a pure function of the step.

SFT lines, any of:   {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
                     {"prompt": ..., "response": ...}
                     {"instruction": ..., "input": ... (optional), "output": ...}     (Alpaca)
DPO lines:           {"prompt": ..., "chosen": ..., "rejected": ...}
KTO lines:           {"prompt": ..., "completion": ..., "label": true or false}   (unpaired: --loss kto)
Every malformed line raises ValueError naming the file, the line number and the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

from model.chat_format import check_messages, render
from model.documents import Documents

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


def load_kto(path: str | Path) -> list[dict]:
    """Every {"prompt", "completion", "label"} record of a KTO JSONL file; label is true for a
    desirable completion, false for an undesirable one."""
    records = []
    for where, record in read_jsonl(path):
        if "label" not in record:
            raise ValueError(f"{where}: missing field 'label' (true for a desirable completion, false for an "
                             f"undesirable one)")
        if not isinstance(record["label"], bool):
            raise ValueError(f"{where}: field 'label' must be true or false, got {json.dumps(record['label'])}")
        records.append({"prompt": _text(record, "prompt", where), "completion": _text(record, "completion", where),
                        "label": record["label"]})
    return records


def _exchange(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def encode(conversations: list[list[dict]], tok, block_size: int) -> tuple[list[Example], int]:
    """Render each conversation; drop those longer than block_size + 1 tokens (the model sees at most
    block_size inputs), since a truncated one would train on a reply that never ends. -> (kept, dropped)."""
    examples = [Example(*render(c, tok)) for c in conversations]
    kept = [e for e in examples if len(e) <= block_size + 1]
    return kept, len(examples) - len(kept)


def encode_pairs(pairs: list[dict[str, str]], tok, block_size: int) -> tuple[list[tuple[Example, Example]], int]:
    """Each DPO pair as (chosen, rejected) examples whose masks cover the response and its <|end|>."""
    encoded = [(Example(*render(_exchange(p["prompt"], p["chosen"]), tok)),
                Example(*render(_exchange(p["prompt"], p["rejected"]), tok))) for p in pairs]
    kept = [(c, r) for c, r in encoded if max(len(c), len(r)) <= block_size + 1]
    return kept, len(encoded) - len(kept)


def encode_unpaired(records: list[dict], tok, block_size: int) -> tuple[list[tuple[Example, bool]], int]:
    """Each KTO record as (example, label), the mask covering the completion and its <|end|>;
    those longer than block_size + 1 tokens dropped. -> (kept, dropped)."""
    encoded = [(Example(*render(_exchange(r["prompt"], r["completion"]), tok)), r["label"]) for r in records]
    kept = [(e, label) for e, label in encoded if len(e) <= block_size + 1]
    return kept, len(encoded) - len(kept)


def pack_rows(lengths: list[int], capacity: int) -> tuple[list[list[int]], int]:
    """Whole items of the given lengths (each at most capacity) packed into rows: -> (the item indices
    of each row, the row width). Best fit decreasing into the fewest rows that take them at width
    capacity, then the narrowest width at which that many rows still take them, so that the rows
    are about equally full and a batch carries its items' tokens with as few pad positions as their
    lengths allow (no item is split)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    total = sum(lengths)
    rows = max(1, math.ceil(total / capacity))
    while (bins := _best_fit(order, lengths, rows, capacity)) is None:
        rows += 1
    lo, hi = max(max(lengths), math.ceil(total / rows)), capacity       # bins fit width hi
    while lo < hi:                                                        # best fit is (nearly) monotone in width
        mid = (lo + hi) // 2
        if (narrower := _best_fit(order, lengths, rows, mid)) is not None:
            hi, bins = mid, narrower
        else:
            lo = mid + 1
    return bins, max(sum(lengths[i] for i in row) for row in bins)


def _best_fit(order: list[int], lengths: list[int], rows: int, width: int) -> list[list[int]] | None:
    """Each item in turn into the row it leaves least room in, or None when one fits no row."""
    free, bins = [width] * rows, [[] for _ in range(rows)]
    for i in order:
        fits = [r for r in range(rows) if free[r] >= lengths[i]]
        if not fits:
            return None
        r = min(fits, key=free.__getitem__)
        bins[r].append(i)
        free[r] -= lengths[i]
    return bins


def collate(examples: list[Example], pad_id: int, pack_to: int = 0) -> dict:
    """Examples -> {"x": inputs (R, L), "y": targets (R, L), "segment": (R, L) the index of the
    example each position belongs to (len(examples) on padding), "tokens": the number of input
    positions that are not padding (an int)}. Example e gives inputs e.ids[:-1] and targets e.ids[1:],
    IGNORE where its mask is off, so no target crosses from one example into the next.

    pack_to = 0: one example per row, padded to the longest (pad_id inputs, IGNORE targets).
    pack_to > 0: whole examples packed back to back into rows of at most pack_to positions
    (pack_rows), plus "documents": the Documents of the rows, so that each example attends only to
    itself from position 0, as in its own row; the padding at a row's end is split into documents no
    longer than the longest example, which would otherwise set the varlen attention's max_seqlen."""
    lengths = [len(e) - 1 for e in examples]
    if pack_to:
        rows, L = pack_rows(lengths, pack_to)
    else:
        rows, L = [[i] for i in range(len(examples))], max(lengths)
    x = torch.full((len(rows), L), pad_id, dtype=torch.int64)
    y = torch.full((len(rows), L), IGNORE, dtype=torch.int64)
    segment = torch.full((len(rows), L), len(examples), dtype=torch.int64)
    documents = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e, n = examples[i], lengths[i]
            ids = torch.tensor(e.ids)
            x[r, at:at + n] = ids[:-1]
            y[r, at:at + n] = ids[1:].masked_fill(~torch.tensor(e.mask[1:], dtype=torch.bool), IGNORE)
            segment[r, at:at + n] = i
            at += n
        pad, longest = L - at, max(lengths)
        documents.append([lengths[i] for i in row] + [min(longest, pad - k) for k in range(0, pad, longest)])
    batch = {"x": x, "y": y, "segment": segment, "tokens": sum(lengths)}
    if pack_to:
        batch["documents"] = Documents.from_lengths(documents, L)
    return batch


def to_device(batch: dict, device: torch.device | str) -> dict:
    """The batch with its tensors, and those of its Documents, on device (other values as they are)."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, Documents):
            return dataclasses.replace(value, cu_seqlens=move(value.cu_seqlens), positions=move(value.positions))
        return value
    return {k: move(v) for k, v in batch.items()}


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def stream_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Positions start .. start + count - 1 of an endless stream of per-epoch shuffles of range(n)."""
    return [_permutation(n, seed, p // n)[p % n] for p in range(start, start + count)]
