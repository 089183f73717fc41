"""The deduplication index: does a document repeat a kept one, exactly or nearly? In bounded memory.

One process asks, in corpus order (train/data/prepare.py), so the decisions do not depend on how
many workers computed the documents' digests and MinHash signatures (train/data/filters.py).

Exact duplicates: the 16-byte hash of the whitespace-collapsed text. Near duplicates: banded LSH
over the signatures, each candidate sharing a band confirmed on the whole signature (the fraction
of equal entries estimates the Jaccard similarity). bands * rows <= NUM_PERM is chosen so the LSH
threshold (1 / bands) ** (1 / rows) is closest to the target.

Memory per kept document: its signature (NUM_PERM uint32, 512 bytes), the second half of its hash
(8 bytes) and, for each band and for the hash's first half, an 8-byte key and a 4-byte document
number (132 bytes with the 11 bands of the default threshold), in numpy arrays rather than Python
objects; with the keys waiting for a merge, about 810 bytes a document measured, against 3.4 kB
for a dict of band buckets, a set of hashes and an array per signature. New keys wait in a dict
that is merged into the sorted array (an O(n) insert) when it holds a sixteenth as many keys; a
lookup is a binary search. A band key is a hash of the band's rows, so a collision only adds a candidate for
the signature check.
"""
from __future__ import annotations

from array import array

import numpy as np

NUM_PERM = 128                          # MinHash signature length
BLOCK = 4096                            # signatures per storage block: growing never copies the stored ones
MERGE_AT = 4096                         # fewest waiting keys worth a merge into the sorted array


class KeyIndex:
    """uint64 key -> the document numbers stored under it: a sorted array and a dict of recent keys."""

    def __init__(self):
        self.keys = np.zeros(0, np.uint64)
        self.docs = np.zeros(0, np.uint32)
        self.recent: dict[int, list[int]] = {}
        self.waiting = 0

    def __len__(self) -> int:
        return len(self.keys) + self.waiting

    def lookup(self, keys: np.ndarray) -> set[int]:
        """Every document stored under any of keys."""
        found: set[int] = set()
        first, last = np.searchsorted(self.keys, keys, "left"), np.searchsorted(self.keys, keys, "right")
        for lo, hi in zip(first.tolist(), last.tolist()):
            if hi > lo:
                found.update(self.docs[lo:hi].tolist())
        for key in keys.tolist():
            found.update(self.recent.get(key, ()))
        return found

    def add(self, keys: np.ndarray, doc: int) -> None:
        for key in keys.tolist():
            self.recent.setdefault(key, []).append(doc)
        self.waiting += len(keys)
        if self.waiting >= max(MERGE_AT, len(self.keys) // 16):
            self._merge()

    def _merge(self) -> None:
        keys = np.array([k for k, docs in self.recent.items() for _ in docs], dtype=np.uint64)
        docs = np.array([d for ds in self.recent.values() for d in ds], dtype=np.uint32)
        order = np.argsort(keys, kind="stable")
        at = np.searchsorted(self.keys, keys[order], "right")
        self.keys, self.docs = np.insert(self.keys, at, keys[order]), np.insert(self.docs, at, docs[order])
        self.recent, self.waiting = {}, 0


class DedupIndex:
    """The kept documents' hashes and signatures; check() decides a document and stores a new one."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.rows = min(range(1, NUM_PERM + 1), key=lambda r: abs((1 / (NUM_PERM // r)) ** (1 / r) - threshold))
        self.bands = NUM_PERM // self.rows
        rng = np.random.default_rng(0)                # the band hash; the MinHash seed is the user's
        self.multipliers = rng.integers(0, 2**63, self.rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.salts = rng.integers(0, 2**63, self.bands, dtype=np.uint64)
        self.exact, self.near = KeyIndex(), KeyIndex()
        self.tails = array("Q")                       # second half of each kept document's hash
        self.blocks: list[np.ndarray] = []            # signatures, BLOCK rows a block
        self.count = 0

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        """One uint64 key per band: a hash of the band's rows of the signature."""
        rows = signature[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        return (rows * self.multipliers).sum(axis=1, dtype=np.uint64) + self.salts

    def signatures(self, docs: list[int]) -> np.ndarray:
        """(len(docs), NUM_PERM) signatures of stored documents."""
        return np.stack([self.blocks[d // BLOCK][d % BLOCK] for d in docs])

    def check(self, digest: bytes, signature: np.ndarray) -> str | None:
        """"exact_dup" or "near_dup" when a stored document repeats this one; else None, and it is stored."""
        head, tail = np.frombuffer(digest, dtype=np.uint64)
        if any(self.tails[d] == tail for d in self.exact.lookup(head[None])):
            return "exact_dup"
        keys = self.band_keys(signature)
        candidates = sorted(self.near.lookup(keys))
        if candidates and (self.signatures(candidates) == signature).mean(axis=1).max() >= self.threshold:
            return "near_dup"
        if self.count % BLOCK == 0:
            self.blocks.append(np.empty((BLOCK, NUM_PERM), dtype=np.uint32))
        self.blocks[-1][self.count % BLOCK] = signature
        self.tails.append(int(tail))
        self.exact.add(head[None], self.count)
        self.near.add(keys, self.count)
        self.count += 1
        return None

    def nbytes(self) -> int:
        """Bytes the index holds (its arrays and waiting keys, roughly), for reports."""
        waiting = 100 * (self.exact.waiting + self.near.waiting)      # a dict entry, its int and list slot
        arrays = sum(a.nbytes for idx in (self.exact, self.near) for a in (idx.keys, idx.docs))
        return arrays + waiting + self.tails.itemsize * len(self.tails) + sum(b.nbytes for b in self.blocks)
