"""The dedup index: its decisions are those of a plain dict of band buckets and a set of hashes,
through the merges of its sorted arrays, in under a kilobyte a document."""
import hashlib
import tracemalloc

import numpy as np
import pytest

from train.data import dedup as dedup_mod
from train.data.dedup import NUM_PERM, DedupIndex


class Reference:
    """The decisions by the book: exact hashes in a set, LSH buckets keyed by the band's bytes."""

    def __init__(self, threshold: float):
        self.index = DedupIndex(threshold)                         # only for bands and rows
        self.seen, self.buckets, self.signatures = set(), {}, []

    def check(self, digest: bytes, sig: np.ndarray) -> str | None:
        rows, bands = self.index.rows, self.index.bands
        if digest in self.seen:
            return "exact_dup"
        keys = [bytes([b]) + sig[b * rows: (b + 1) * rows].tobytes() for b in range(bands)]
        if any(np.mean(self.signatures[d] == sig) >= self.index.threshold
               for d in {d for k in keys for d in self.buckets.get(k, ())}):
            return "near_dup"
        for k in keys:
            self.buckets.setdefault(k, []).append(len(self.signatures))
        self.seen.add(digest)
        self.signatures.append(sig)
        return None


def stream(n: int, seed: int = 0):
    """(digest, signature) pairs: fresh documents, exact repeats, and copies with 5% to 40% of the
    signature redrawn (near duplicates above the threshold and distinct documents below it)."""
    rng = np.random.default_rng(seed)
    made = []
    for i in range(n):
        kind = rng.integers(4) if made else 0
        if kind == 0:
            sig = rng.integers(0, 2**32, NUM_PERM, dtype=np.uint32)
            digest = hashlib.blake2b(f"doc {i}".encode(), digest_size=16).digest()
        elif kind == 1:
            digest, sig = made[rng.integers(len(made))]
        else:
            digest = hashlib.blake2b(f"doc {i}".encode(), digest_size=16).digest()
            sig = made[rng.integers(len(made))][1].copy()
            changed = rng.choice(NUM_PERM, int(NUM_PERM * rng.uniform(0.05, 0.4)), replace=False)
            sig[changed] = rng.integers(0, 2**32, changed.size, dtype=np.uint32)
        made.append((digest, sig))
        yield digest, sig


def test_decisions_match_the_reference_through_merges(monkeypatch):
    monkeypatch.setattr(dedup_mod, "MERGE_AT", 50)                 # many merges into the sorted arrays
    ours, reference = DedupIndex(0.8), Reference(0.8)
    decisions = [ours.check(d, s) for d, s in stream(2000)]
    assert decisions == [reference.check(d, s) for d, s in stream(2000)]
    assert {"exact_dup", "near_dup", None} == set(decisions)
    assert len(ours.near.keys) > 0 and ours.count == decisions.count(None)


def test_exact_needs_the_whole_hash():
    index = DedupIndex(0.8)
    digest = bytes(range(16))
    sig = np.arange(NUM_PERM, dtype=np.uint32)
    assert index.check(digest, sig) is None
    assert index.check(digest, sig[::-1].copy()) == "exact_dup"
    other_tail = digest[:8] + bytes(8)                              # same first half, other second half
    assert index.check(other_tail, sig[::-1].copy()) is None


def test_memory_per_document_is_under_a_kilobyte():
    index = DedupIndex(0.8)
    rng = np.random.default_rng(1)
    sigs = rng.integers(0, 2**32, (4_096, NUM_PERM), dtype=np.uint32)        # one whole block
    digests = [hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in range(len(sigs))]
    tracemalloc.start()
    for digest, sig in zip(digests, sigs):
        index.check(digest, sig)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert index.count == len(sigs)
    assert held / len(sigs) < 1000                                 # a dict of band buckets: about 3.4 kB
    assert index.nbytes() == pytest.approx(held, rel=0.25)
