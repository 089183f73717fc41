"""Byte-level BPE tokenizer: our own trainer, tiktoken's engine for encoding and decoding.

Training (Tokenizer.train):
  1. Pre-split every text with a GPT-4-style regex (contractions, letter runs with one leading
     non-letter, single digits, punctuation runs, whitespace) and count the unique
     chunks once. Merges never cross a chunk boundary, so a chunk seen n times is one word of
     weight n.
  2. Count adjacent token pairs over the weighted words and index each pair to the words holding it.
  3. Repeatedly merge the most frequent pair (a, b) into a new token: only the words in the pair's
     index are rewritten, and only the pairs next to each merge site change count (the left and
     right neighbours move from a / b to the new token). A max-heap with lazy deletion finds the
     best pair: an entry whose count went stale is re-pushed with its true count when popped, which
     is correct because counts of old pairs only ever fall and every pair that involves the new
     token is pushed fresh. Ties go to the pair with the smaller ids, so training is deterministic.
     A pair whose bytes already exist as a token is skipped, so every token's bytes are unique
     (which tiktoken's rank table needs).
Token ids: 0..255 are the raw bytes, 256.. the merges in the order learned, then the special tokens.

Encoding runs on tiktoken.Encoding built from our ranks (rank = id). tiktoken merges the lowest-
ranked adjacent pair first, which for our vocabulary is the same as applying our merges in order.
`encode` never emits special ids: "<|endoftext|>" in user text is encoded as ordinary text.

Lone surrogates (a str may hold U+D800..U+DFFF unpaired, e.g. from JSON "\\ud83d"): each one is a
pre-split boundary and is encoded as the three raw byte tokens of its 'surrogatepass' UTF-8 form
(ED A0..BF 80..BF); `decode` turns exactly those byte triples back into the surrogate, so
decode(encode(s)) == s for every str. Any other invalid UTF-8 (a model can emit a partial
character) decodes to U+FFFD.

File format (JSON, one file): {"format", "version", "pattern", "merges": [[a, b], ...],
"special_tokens": {text: id}, "fingerprint"}.
"""
from __future__ import annotations

import codecs
import hashlib
import heapq
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import regex
import tiktoken

from model.chat_format import SPECIALS
from model.io.files import atomic_write_text

# Digits split one per chunk, as LLaMA's tokenizer does: with GPT-4's groups of up to 3, BPE made 67 of
# the numbers 0..99 one token and the rest two, and a small model learns no arithmetic over that.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
# What every tokenizer trained here carries: the chat template's tokens, <|endoftext|> (the document
# separator) first.
DEFAULT_SPECIAL_TOKENS = SPECIALS
FORMAT, VERSION = "tritongpt-bpe", 1
_SURROGATES = re.compile("([\ud800-\udfff])")
_PAIR_SHIFT = 32                      # pair (a, b) is the int a << 32 | b: hashes faster than a tuple
_LOW = (1 << _PAIR_SHIFT) - 1


def _restore_surrogates(err: UnicodeDecodeError) -> tuple[str, int]:
    """Decode error handler: a 'surrogatepass' triple becomes its surrogate, anything else U+FFFD."""
    b = err.object[err.start:err.start + 3]
    if len(b) == 3 and b[0] == 0xED and 0xA0 <= b[1] <= 0xBF and 0x80 <= b[2] <= 0xBF:
        return chr(0xD000 | (b[1] & 0x3F) << 6 | (b[2] & 0x3F)), err.start + 3
    return "\ufffd", err.end


codecs.register_error("tritongpt.surrogates", _restore_surrogates)


class Tokenizer:
    """A trained byte-level BPE vocabulary: merges (a, b) -> 256 + i, then the special tokens."""

    def __init__(self, merges: list[tuple[int, int]], special_tokens: dict[str, int], pattern: str = SPLIT_PATTERN):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self.token_bytes = [bytes([i]) for i in range(256)]
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise ValueError(f"merge {i} = ({a}, {b}) refers to a token not defined before it")
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        n_ordinary = len(self.token_bytes)
        if sorted(special_tokens.values()) != list(range(n_ordinary, n_ordinary + len(special_tokens))):
            raise ValueError(f"special token ids must be {n_ordinary}..{n_ordinary + len(special_tokens) - 1} "
                             f"(right after the merges), got {special_tokens}")
        self.special_tokens = dict(special_tokens)
        self._fingerprint = _fingerprint(pattern, self.merges, self.special_tokens)
        ranks = {tb: i for i, tb in enumerate(self.token_bytes)}
        if len(ranks) != n_ordinary:
            raise ValueError("two merges produce the same bytes; a BPE vocabulary needs unique tokens")
        self._enc = tiktoken.Encoding(f"tritongpt-{self.fingerprint}", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None,
              pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        """Learn vocab_size - 256 - len(special_tokens) merges from texts (see the module docstring).

        Fewer merges are learned when the texts run out of pairs; n_vocab then is below vocab_size.
        """
        specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        check_vocab_size(vocab_size, specials)
        chunks = count_chunks(texts, pattern)
        if not chunks:
            raise ValueError("Tokenizer.train got no text to learn merges from; pass a non-empty corpus")
        merges = learn_merges(chunks, vocab_size - 256 - len(specials))
        return cls(merges, {s: 256 + len(merges) + i for i, s in enumerate(specials)}, pattern)

    @property
    def n_vocab(self) -> int:
        return len(self.token_bytes) + len(self.special_tokens)

    @property
    def eot_id(self) -> int:
        if "<|endoftext|>" not in self.special_tokens:
            raise ValueError(f"this tokenizer has no <|endoftext|> token (its specials: {sorted(self.special_tokens)})")
        return self.special_tokens["<|endoftext|>"]

    @property
    def fingerprint(self) -> str:
        """Hash of the split pattern, the merges and the special tokens: equal iff encodings are."""
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token text is encoded as ordinary text, never as a control id."""
        if not _SURROGATES.search(text):
            return self._enc.encode_ordinary(text)
        ids: list[int] = []
        for i, piece in enumerate(_SURROGATES.split(text)):
            if i % 2:       # split() with a group alternates text and the separating surrogate
                ids.extend(piece.encode("utf-8", "surrogatepass"))
            elif piece:
                ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """encode() of each text, run on tiktoken's threads (its Rust core releases the GIL)."""
        threads = num_threads or os.cpu_count() or 1
        if any(_SURROGATES.search(t) for t in texts):
            return [self.encode(t) for t in texts]
        return self._enc.encode_ordinary_batch(texts, num_threads=threads)

    def decode_bytes(self, ids: list[int]) -> bytes:
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError):
            bad = [i for i in ids if not 0 <= i < self.n_vocab]
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.n_vocab - 1}") from None

    def decode(self, ids: list[int]) -> str:
        """Text of ids; special ids become their text; see the module docstring for invalid UTF-8."""
        return self.decode_bytes(ids).decode("utf-8", "tritongpt.surrogates")

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as one JSON file, atomically (temp file in the same dir, then rename)."""
        path = Path(path)
        payload = {"format": FORMAT, "version": VERSION, "pattern": self.pattern, "merges": self.merges,
                   "special_tokens": self.special_tokens, "fingerprint": self.fingerprint}
        atomic_write_text(path, json.dumps(payload, separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a tokenizer file: invalid JSON ({e})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} tokenizer file (written by Tokenizer.save)")
        if payload.get("version") != VERSION:
            raise ValueError(f"{path} has tokenizer format version {payload.get('version')}, this code reads {VERSION}")
        try:
            merges = [(int(a), int(b)) for a, b in payload["merges"]]
            actual = _fingerprint(payload["pattern"], merges, payload["special_tokens"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is an incomplete tokenizer file ({type(e).__name__}: {e}); write it again "
                             f"with Tokenizer.save or copy the run's tokenizer.json") from None
        if actual != payload.get("fingerprint"):
            raise ValueError(f"{path} is corrupt: its contents hash to {actual}, "
                             f"not the stored fingerprint {payload.get('fingerprint')}")
        return cls(merges, payload["special_tokens"], payload["pattern"])

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, merges={len(self.merges)}, specials={list(self.special_tokens)})"


def _fingerprint(pattern: str, merges: list[tuple[int, int]], special_tokens: dict[str, int]) -> str:
    canon = json.dumps([pattern, merges, sorted(special_tokens.items())], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def check_vocab_size(vocab_size: int, special_tokens: Iterable[str]) -> None:
    """Raise ValueError unless the special tokens are distinct non-empty strings and fit in vocab_size."""
    specials = list(special_tokens)
    if len(set(specials)) != len(specials) or not all(isinstance(s, str) and s for s in specials):
        raise ValueError(f"special tokens must be distinct non-empty strings, got {specials}")
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the 256 byte tokens + {len(specials)} "
                         f"special tokens = {256 + len(specials)}; pass a larger vocab_size")


def count_chunks(texts: Iterable[str], pattern: str = SPLIT_PATTERN) -> Counter[bytes]:
    """How often each pre-split chunk occurs, as UTF-8 bytes (lone surrogates are boundaries, as in encode)."""
    split = regex.compile(pattern)
    counts: Counter[str] = Counter()
    for text in texts:
        for i, piece in enumerate(_SURROGATES.split(text)):
            if i % 2 == 0:
                counts.update(split.findall(piece))
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


def learn_merges(chunk_counts: dict[bytes, int], n_merges: int) -> list[tuple[int, int]]:
    """The first n_merges BPE merges of the weighted chunks: incremental pair counts, lazy max-heap."""
    words = [list(chunk) for chunk in chunk_counts if len(chunk) > 1]
    freqs = [n for chunk, n in chunk_counts.items() if len(chunk) > 1]
    counts: dict[int, int] = {}
    where: dict[int, set[int]] = {}
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for a, b in zip(w, w[1:]):
            key = a << _PAIR_SHIFT | b
            counts[key] = counts.get(key, 0) + f
            where.setdefault(key, set()).add(wi)
    heap = [(-n, key) for key, n in counts.items()]
    heapq.heapify(heap)
    token_bytes = [bytes([i]) for i in range(256)]
    known = set(token_bytes)
    merges: list[tuple[int, int]] = []
    while heap and len(merges) < n_merges:
        neg, key = heapq.heappop(heap)
        n = counts.get(key, 0)
        if n != -neg:
            if n > 0:
                heapq.heappush(heap, (-n, key))
            continue
        a, b = key >> _PAIR_SHIFT, key & _LOW
        merged = token_bytes[a] + token_bytes[b]
        if merged in known:
            continue
        new = len(token_bytes)
        token_bytes.append(merged)
        known.add(merged)
        merges.append((a, b))
        touched = _merge_pair(words, freqs, where.pop(key), a, b, new, counts)
        del counts[key]
        for k, wis in touched.items():
            where[k] = wis
            if counts[k] > 0:
                heapq.heappush(heap, (-counts[k], k))
    return merges


def _merge_pair(words: list[list[int]], freqs: list[int], word_ids: set[int], a: int, b: int, new: int,
                counts: dict[int, int]) -> dict[int, set[int]]:
    """Rewrite (a, b) -> new in the given words, updating counts in place; returns the new pairs' word sets.

    Scanning left to right, a merge site's left neighbour is read from the rewritten word, so in
    "a b a b" the second site turns the (new, a) counted by the first into (new, new).
    """
    touched: dict[int, set[int]] = {}
    for wi in word_ids:
        w, f = words[wi], freqs[wi]
        out: list[int] = []
        i, n, sites = 0, len(w), 0
        while i < n:
            if w[i] == a and i + 1 < n and w[i + 1] == b:
                sites += 1
                if out:
                    left = out[-1]
                    counts[left << _PAIR_SHIFT | a] -= f
                    k = left << _PAIR_SHIFT | new
                    counts[k] = counts.get(k, 0) + f
                    touched.setdefault(k, set()).add(wi)
                if i + 2 < n:
                    right = w[i + 2]
                    counts[b << _PAIR_SHIFT | right] -= f
                    k = new << _PAIR_SHIFT | right
                    counts[k] = counts.get(k, 0) + f
                    touched.setdefault(k, set()).add(wi)
                out.append(new)
                i += 2
            else:
                out.append(w[i])
                i += 1
        if sites:
            words[wi] = out
            counts[a << _PAIR_SHIFT | b] -= sites * f
    return touched
