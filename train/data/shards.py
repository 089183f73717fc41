"""Token shards: a small header (magic, format version, bytes per token, token count), then the
tokens as uint16 (vocabularies up to 65536) or uint32, read back as a memory map."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

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
