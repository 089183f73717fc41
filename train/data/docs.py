"""The kept documents of a build: their cleaned text end to end in docs.tmp, and a table of their
sizes and splits (train/data/prepare.py trains the tokenizer on a sample of them, then encodes them).

filter_corpus streams the source through the workers (train/data/workers.py), makes the dedup
decisions and the train/val split in corpus order, and writes each kept document as it is decided,
so what it holds in memory is the dedup index and 9 bytes a kept document. The split is by
document: a document goes to val when a hash of (seed, doc_id) falls below val_fraction (at least
one document goes to each split); a corpus of one document is cut at a line break instead.
"""
from __future__ import annotations

import hashlib
import math
from array import array
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from train.data.filters import DocumentFilter, FilterConfig
from train.data.sources import document_count, iter_documents
from train.data.workers import inspect_corpus
from train.progress import progress


class Docs:
    """The kept documents in corpus order, as they lie end to end in the build's docs.tmp: each one's
    UTF-8 size and split, 9 bytes a document."""

    def __init__(self):
        self.nbytes, self.val = array("q"), bytearray()

    def append(self, nbytes: int, val: bool) -> None:
        self.nbytes.append(nbytes)
        self.val.append(val)

    def __len__(self) -> int:
        return len(self.nbytes)

    def spans(self, val: bool) -> Iterator[tuple[int, int]]:
        """(offset, size) in docs.tmp of each document of one split, in order."""
        offset = 0
        for nbytes, is_val in zip(self.nbytes, self.val):
            if is_val == val:
                yield offset, nbytes
            offset += nbytes

    def split(self, val: bool) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, sizes) in docs.tmp of the documents of one split, as int64 arrays."""
        nbytes = np.frombuffer(self.nbytes, dtype=np.int64)
        in_split = np.frombuffer(self.val, dtype=np.bool_) == val
        return (np.cumsum(nbytes) - nbytes)[in_split], nbytes[in_split]


def filter_corpus(source: str, docs_path: Path, filters: FilterConfig, seed: int, val_fraction: float,
                  verbose: bool, workers: int) -> tuple[Docs, DocumentFilter]:
    """Stream, clean and filter the documents into docs_path on `workers` processes, deciding
    duplicates and splits here in corpus order; the kept documents and the filter (its report and
    dedup index)."""
    keep = DocumentFilter(filters, seed)
    docs = Docs()
    lowest, highest = (math.inf, -1), (-math.inf, -1)     # (rank, index) of the first lowest and highest ranked
    with open(docs_path, "wb") as f, progress(document_count(source), "filter", " docs", show=verbose) as bar:
        for doc_id, verdict in inspect_corpus(iter_documents(source), filters, seed, workers):
            bar.update(1)
            if not keep.admit(verdict):
                continue
            f.write(verdict.text)
            rank = int.from_bytes(hashlib.blake2b(f"{seed}\0{doc_id}".encode("utf-8", "surrogatepass"),
                                                  digest_size=8).digest(), "little") / 2**64
            if rank < lowest[0]:
                lowest = (rank, len(docs))
            if rank > highest[0]:
                highest = (rank, len(docs))
            docs.append(len(verdict.text), rank < val_fraction)
    if verbose:
        print(keep.report.table())
    if not len(docs):
        raise ValueError(keep.report.why_empty(source))
    if len(docs) == 1:
        return _split_single(docs_path, docs.nbytes[0], val_fraction), keep
    if not any(docs.val):                                        # val gets at least the lowest-ranked doc
        docs.val[lowest[1]] = True
    if all(docs.val):
        docs.val[highest[1]] = False
    return docs, keep


def _split_single(docs_path: Path, nbytes: int, val_fraction: float) -> Docs:
    """One document: its last lines (about val_fraction of it) become the val document."""
    data = docs_path.read_bytes()[:nbytes]
    cut = data.rfind(b"\n", 0, int(len(data) * (1 - val_fraction))) + 1
    if cut <= 0:
        raise ValueError("the corpus is a single document without line breaks; it cannot be split into "
                         "train and val: add documents")
    docs = Docs()
    docs.append(cut, False)
    docs.append(nbytes - cut, True)
    return docs


def tokenizer_sample(docs: Docs, budget: int, seed: int) -> list[tuple[int, int]]:
    """(offset, size) of training documents taken in a seeded random order until their bytes reach
    the budget, in corpus order."""
    offsets, sizes = docs.split(False)
    chosen, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(sizes)).tolist():
        if total >= budget:
            break
        chosen.append(i)
        total += int(sizes[i])
    return [(int(offsets[i]), int(sizes[i])) for i in sorted(chosen)]


def read_docs(f: BinaryIO, spans: Iterable[tuple[int, int]]) -> list[str]:
    texts = []
    for offset, nbytes in spans:
        f.seek(offset)
        texts.append(f.read(nbytes).decode("utf-8"))
    return texts
