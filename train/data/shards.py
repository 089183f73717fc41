"""Token shards: a small header (magic, format version, bytes per token, token count), then the
tokens as uint16 (vocabularies up to 65536) or uint32, read back as a memory map.

The format, for writers of other engines (little-endian): 8 bytes b"TGPTTOKS", u32 version (1),
u32 bytes per token (2 or 4), u64 token count, then the tokens; each document is preceded by the
tokenizer's <|endoftext|> id. write_documents writes one from documents tokenized anywhere
(train/data/prepare.py write_dataset makes a whole dataset directory of them).
"""
from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

MAGIC, HEADER = b"TGPTTOKS", struct.Struct("<8sIIQ")
VERSION = 1


def shard_dtype(n_vocab: int) -> type:
    return np.uint16 if n_vocab <= 1 << 16 else np.uint32


def write_shard(path: Path, chunks: Iterator[np.ndarray], dtype: type) -> int:
    """Write the token chunks after a header (count patched in at the end); the number of tokens."""
    itemsize = np.dtype(dtype).itemsize
    count = 0
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, itemsize, 0))
        for chunk in chunks:
            f.write(chunk.astype(dtype).tobytes())
            count += len(chunk)
        f.seek(0)
        f.write(HEADER.pack(MAGIC, VERSION, itemsize, count))
    return count


def write_documents(path: str | Path, documents: Iterable[Sequence[int] | np.ndarray], n_vocab: int,
                    eot_id: int) -> tuple[int, int]:
    """Write tokenized documents (one sequence of token ids each) as a shard, each preceded by eot_id,
    atomically (a temporary file renamed into place; nothing is left if the documents fail midway);
    (documents, tokens) written. Every id must lie in [0, n_vocab)."""
    path = Path(path)
    if not 0 <= eot_id < n_vocab:
        raise ValueError(f"eot_id {eot_id} is outside the vocabulary 0..{n_vocab - 1}")
    written = 0

    def chunks() -> Iterator[np.ndarray]:
        nonlocal written
        for i, doc in enumerate(documents):
            ids = np.asarray(doc)
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise ValueError(f"document {i} of {path.name}: expected a flat sequence of integer token ids, "
                                 f"got shape {ids.shape} of {ids.dtype}")
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_vocab):
                bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                raise ValueError(f"document {i} of {path.name}: token id {bad} is outside the vocabulary "
                                 f"0..{n_vocab - 1}; encode the documents with the dataset's tokenizer")
            written += 1
            yield np.concatenate(([eot_id], ids))

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tokens = write_shard(tmp, chunks(), shard_dtype(n_vocab))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return written, tokens


def read_shard(path: str | Path) -> np.ndarray:
    """Memory map of a shard's tokens after checking its header against the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise ValueError(f"{path}: bad shard header: file of {size} bytes is shorter than the "
                         f"{HEADER.size}-byte header")
    magic, version, itemsize, count = HEADER.unpack(head)
    if magic != MAGIC:
        raise ValueError(f"{path}: bad shard header: magic {magic!r}, expected {MAGIC!r} (not a token shard)")
    if version != VERSION:
        raise ValueError(f"{path}: bad shard header: version {version}, this code reads {VERSION}")
    if itemsize not in (2, 4):
        raise ValueError(f"{path}: bad shard header: {itemsize} bytes per token, expected 2 or 4")
    if size != HEADER.size + count * itemsize:
        raise ValueError(f"{path}: bad shard header: it promises {count:,} tokens of {itemsize} bytes but the file "
                         f"holds {size - HEADER.size:,} bytes after the header (truncated or overwritten?)")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))
