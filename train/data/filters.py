"""Cleaning, quality filters and deduplication of documents, with a report that adds up.

Each document is cleaned (`clean`), then goes through the filters in FILTERS order and is removed
by the first one it fails: binary or not UTF-8 (measured on the text as read, before cleaning drops
its control characters), too short, Gopher-style quality rules (duplicate lines, top word n-gram
repetition, too few alphanumeric characters, markup/boilerplate), an exact duplicate of an earlier
document (hash of its whitespace-collapsed text), a near duplicate (MinHash + LSH). The Report
counts documents and bytes per filter so that bytes in = bytes changed by cleaning + bytes removed
+ bytes kept, and documents in = documents removed + documents kept.

The work splits in two so that it can run on every core with the result of one process: an
Inspector cleans a document and runs every filter up to markup, then hashes and MinHashes a
document that passes (any process, any order); DocumentFilter.admit makes the dedup decisions
against the kept documents (train/data/dedup.py) and counts the report, in corpus order.

Words are whitespace-separated runs of code points; they are hashed with a polynomial hash mod
2**64 in numpy (prefix sums of c_j * P**j, scaled back by powers of P's inverse), so n-gram and
shingle hashes need no Python loop over words.
"""
from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np

from train.data.dedup import NUM_PERM, DedupIndex

FILTERS = ("binary", "too_short", "dup_lines", "top_ngram", "alnum", "markup", "exact_dup", "near_dup")
SHINGLE = 5                                        # words per MinHash shingle
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")   # Cc but \t \n, and lone surrogates
_NON_TEXT = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # the same, less \v \f \r (text has them)
_MARKUP = re.compile(r"<!--.*?-->"                                     # comment
                     r"|</?[A-Za-z][\w:.-]*(?:\s[^<>]{0,300})?/?>"      # tag with attributes
                     r"|&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[a-zA-Z]{2,8});", re.S)   # entity
_BOILERPLATE = ("all rights reserved", "terms of use", "terms of service", "privacy policy", "cookie policy",
                "javascript must be enabled", "subscribe to our", "sign up for")
_P = np.uint64(0x100000001B3)                      # odd, so invertible mod 2**64
_P_INV = np.uint64(pow(int(_P), -1, 2**64))
_Q = np.uint64(0x9E3779B97F4A7C15)                 # combines word hashes into n-gram hashes


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds; a document is removed when its measure is past one (set a bound loose to disable).

    The binary thresholds (see binary_fractions), measured on files decoded as UTF-8 with
    errors="replace" (train/data/sources.py): the Python stdlib sources and UTF-8 text in any script have
    no control characters and at most 0.05% U+FFFD (a test of decoding errors); ANSI colour codes in
    a terminal log come to 2-3% control characters. Random bytes, PNG, gzip, ELF and .pyc files give
    7-45% U+FFFD and 10-57% control characters, UTF-16 and UTF-32 text 50-75% NULs. Text in another
    encoding gets a U+FFFD per non-ASCII character: nearly all of Cyrillic (cp1251, KOI8-R) or
    Japanese (Shift-JIS) text, a few to 15% of French or German in Latin-1: removed. English with
    a stray cp1252 quote or sign (under 1%) is kept, its U+FFFDs and all.
    """
    min_chars: int = 64
    max_dup_line_frac: float = 0.5
    max_top_ngram_frac: float = 0.25
    min_alnum_frac: float = 0.3
    max_markup_frac: float = 0.3
    near_dup_threshold: float = 0.8
    max_replacement_frac: float = 0.01
    max_control_frac: float = 0.05

    HELP = {
        "min_chars": "remove documents with fewer characters than this (after cleaning, whitespace stripped)",
        "max_dup_line_frac": "remove documents where more than this fraction of the non-blank lines repeats "
                             "an earlier line",
        "max_top_ngram_frac": "remove documents where the most frequent word 2-, 3- or 4-gram covers more than this "
                              "fraction of the word characters",
        "min_alnum_frac": "remove documents where less than this fraction of the non-space characters is "
                          "a letter or digit",
        "max_markup_frac": "remove documents where more than this fraction of the characters is HTML/XML markup, "
                           "entities or boilerplate lines (copyright, cookies, sign up...)",
        "near_dup_threshold": "remove a document whose estimated Jaccard similarity (MinHash of word 5-grams, LSH) "
                              "to an earlier kept one is at least this; 1.0 removes only near-identical copies",
        "max_replacement_frac": "remove documents (binary or not UTF-8) where more than this fraction of the "
                                "characters is U+FFFD, the replacement character of undecodable bytes",
        "max_control_frac": "remove documents (binary, UTF-16) where more than this fraction of the characters is "
                            "NUL or another control character (tab, newline, CR, form feed and vertical tab "
                            "excepted)",
    }

    def __post_init__(self):
        for name in ("max_replacement_frac", "max_control_frac", "max_dup_line_frac", "max_top_ngram_frac",
                     "min_alnum_frac", "max_markup_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ValueError(f"near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
        if self.min_chars < 0:
            raise ValueError(f"min_chars must be >= 0, got {self.min_chars}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "FilterConfig":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unknown filter thresholds {unknown}; valid: {names}")
        return cls(**kwargs)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def check(cls, name: str):
        """The range check of one threshold (raises ValueError), for its command-line flag."""
        return lambda value: cls(**{name: value}) and None


def clean(text: str) -> str:
    """NFC-normalise, turn \\r\\n and \\r into \\n, drop control characters (but tab and newline)."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def binary_fractions(text: str) -> tuple[float, float]:
    """(fraction of U+FFFD, fraction of control characters but tab, newline, CR, FF and VT) of the
    characters of a text as read: what undecodable bytes and NULs leave when a binary or non-UTF-8
    file is decoded as UTF-8 with errors="replace"."""
    if not text:
        return 0.0, 0.0
    controls = sum(1 for _ in _NON_TEXT.finditer(text))
    return text.count("\ufffd") / len(text), controls / len(text)


def dup_line_fraction(text: str) -> float:
    """Fraction of non-blank lines (stripped) that repeat an earlier line."""
    lines = [s for s in (line.strip() for line in text.split("\n")) if s]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


@functools.cache
def _bmp_tables() -> tuple[np.ndarray, np.ndarray]:
    """str.isalnum and str.isspace of every code point below 0x10000, as bool lookup tables."""
    chars = [chr(c) for c in range(0x10000)]
    return np.array([c.isalnum() for c in chars]), np.array([c.isspace() for c in chars])


def _char_class(cps: np.ndarray, which: int) -> np.ndarray:
    """Per code point: isalnum (which=0) or isspace (which=1); astral code points are looked up one by one."""
    out = _bmp_tables()[which][np.minimum(cps, 0xFFFF)]
    astral = np.flatnonzero(cps > 0xFFFF)
    if astral.size:
        test = str.isalnum if which == 0 else str.isspace
        out[astral] = [test(chr(c)) for c in cps[astral].tolist()]
    return out


def alnum_fraction(cps: np.ndarray) -> float:
    """Fraction of non-whitespace code points for which str.isalnum holds."""
    visible = ~_char_class(cps, 1)
    n = int(visible.sum())
    return float((_char_class(cps, 0) & visible).sum() / n) if n else 0.0


def markup_fraction(text: str) -> float:
    """Fraction of characters in HTML/XML tags, comments and entities, or on lines with boilerplate phrases."""
    if not text:
        return 0.0
    covered = sum(len(m) for m in _MARKUP.findall(text)) if ("<" in text or "&" in text) else 0
    lower = text.lower()                 # str.find per phrase beats a case-insensitive regex by far
    line_starts = set()
    for phrase in _BOILERPLATE:
        at = lower.find(phrase)
        while at >= 0:
            line_starts.add(lower.rfind("\n", 0, at))
            at = lower.find(phrase, at + len(phrase))
    for start in line_starts:
        end = lower.find("\n", start + 1)
        covered += (len(lower) if end < 0 else end) - start - 1
    return min(1.0, covered / len(text))


def word_hashes(cps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hash, length) of each whitespace-separated word of the code points, as uint64 / int64 arrays."""
    is_word = ~_char_class(cps, 1)
    edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if starts.size == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    prefix = np.concatenate(([np.uint64(0)], np.cumsum(cps.astype(np.uint64) * _powers(_P, cps.size))))
    return (prefix[ends] - prefix[starts]) * _powers(_P_INV, cps.size)[starts], ends - starts


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base**j for j < n, wrapping mod 2**64."""
    p = np.full(n, base, dtype=np.uint64)
    p[0] = 1
    return np.cumprod(p)


def ngram_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """Hash of each run of n consecutive word hashes (empty if there are fewer than n words)."""
    if words.size < n:
        return np.zeros(0, np.uint64)
    h = words[: words.size - n + 1].copy()
    for k in range(1, n):
        h = h * _Q + words[k: words.size - n + 1 + k]
    return h


def top_ngram_fraction(words: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Characters covered by the most frequent word n-gram (count * its length) / all word characters;
    0 when no n-gram occurs twice."""
    grams = ngram_hashes(words, n)
    if grams.size == 0:
        return 0.0
    uniq, first, counts = np.unique(grams, return_index=True, return_counts=True)
    best = int(np.argmax(counts))
    if counts[best] < 2:                 # nothing repeats (in a tiny document one n-gram covers it all)
        return 0.0
    start = int(first[best])
    return float(counts[best] * lengths[start: start + n].sum() / lengths.sum())


class MinHash:
    """MinHash signatures of a document's word 5-gram shingles, NUM_PERM uint32 entries.

    Permutation i maps a 64-bit shingle hash x to (a_i * x + b_i) >> 32 (multiply-shift, a_i odd), a
    universal family, so the fraction of equal signature entries estimates the Jaccard similarity.
    """

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)

    def signature(self, words: np.ndarray) -> np.ndarray:
        shingles = np.unique(ngram_hashes(words, min(SHINGLE, words.size))) if words.size else words
        sig = np.full(NUM_PERM, np.iinfo(np.uint32).max, dtype=np.uint32)
        for start in range(0, shingles.size, 4096):             # bounds the (NUM_PERM, block) temporary
            block = shingles[start: start + 4096]
            perm = (self.a[:, None] * block[None, :] + self.b[:, None]) >> np.uint64(32)
            sig = np.minimum(sig, perm.min(axis=1).astype(np.uint32))
        return sig


class Verdict(NamedTuple):
    """One document inspected on its own (any process may do it): its sizes, the first per-document
    filter it fails, and for a document that passes them its cleaned UTF-8 text, the hash of its
    whitespace-collapsed text and its MinHash signature, for the dedup decisions made in corpus order."""
    raw_bytes: int                      # UTF-8 bytes as read
    nbytes: int                         # UTF-8 bytes after cleaning
    reason: str | None
    text: bytes = b""
    digest: bytes = b""
    signature: np.ndarray | None = None


class Inspector:
    """Cleans a document and runs every filter but the dedup ones: the work done in parallel."""

    def __init__(self, config: FilterConfig, seed: int = 0):
        self.cfg, self.minhash = config, MinHash(seed)

    def __call__(self, raw: str) -> Verdict:
        return self.verdict(clean(raw), raw)

    def verdict(self, text: str, raw: str | None = None) -> Verdict:
        """The verdict of the cleaned text; the binary filter measures raw, the text before cleaning
        (default: text)."""
        data = text.encode("utf-8")
        raw_bytes = len(data) if raw is None else len(raw.encode("utf-8", "surrogatepass"))
        reason, words = self._reason(text, text if raw is None else raw)
        if reason is not None:
            return Verdict(raw_bytes, len(data), reason)
        digest = hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()
        return Verdict(raw_bytes, len(data), None, data, digest, self.minhash.signature(words))

    def _reason(self, text: str, raw: str) -> tuple[str | None, np.ndarray | None]:
        """(the first per-document filter the text fails, None) or (None, the word hashes of the text)."""
        cfg = self.cfg
        replacement, control = binary_fractions(raw)
        if replacement > cfg.max_replacement_frac or control > cfg.max_control_frac:
            return "binary", None
        if len(text.strip()) < cfg.min_chars:
            return "too_short", None
        if dup_line_fraction(text) > cfg.max_dup_line_frac:
            return "dup_lines", None
        cps = codepoints(text)
        words, lengths = word_hashes(cps)
        if any(top_ngram_fraction(words, lengths, n) > cfg.max_top_ngram_frac for n in (2, 3, 4)):
            return "top_ngram", None
        if alnum_fraction(cps) < cfg.min_alnum_frac:
            return "alnum", None
        if markup_fraction(text) > cfg.max_markup_frac:
            return "markup", None
        return None, words


class Report:
    """Documents and UTF-8 bytes in, changed by cleaning, removed per filter, kept."""

    def __init__(self):
        self.docs_in = self.bytes_in = self.cleaned_bytes = 0
        self.removed = {name: [0, 0] for name in FILTERS}
        self.kept = [0, 0]

    def as_dict(self) -> dict:
        return {"docs_in": self.docs_in, "bytes_in": self.bytes_in, "bytes_removed_by_cleaning": self.cleaned_bytes,
                "removed": {k: {"docs": d, "bytes": b} for k, (d, b) in self.removed.items()},
                "kept": {"docs": self.kept[0], "bytes": self.kept[1]}}

    def why_empty(self, source: str) -> str:
        """One line for a corpus that kept no document: how many each filter removed, and what to do."""
        removed = sorted(((d, name) for name, (d, _) in self.removed.items() if d), key=lambda x: -x[0])
        if [name for _, name in removed] == ["binary"]:
            fix = ("they are binary or not UTF-8 text (past --max-replacement-frac or --max-control-frac); convert "
                   "them to UTF-8 or name other files")
        else:
            fix = ("name other files, or loosen the thresholds that removed them with python -m train.data (e.g. "
                   "--min-chars 16; --help lists them) and train on the directory it prints (--data DIR)")
        by = ", ".join(f"{name} {d:,}" for d, name in removed) or "no document was read"
        return (f"the corpus {source!r} is empty after filtering: all {self.docs_in:,} documents were removed "
                f"({by}); {fix}")

    def table(self) -> str:
        rows = [("input", self.docs_in, self.bytes_in), ("cleaning", 0, self.cleaned_bytes)]
        rows += [(name, d, b) for name, (d, b) in self.removed.items()] + [("kept", *self.kept)]
        lines = [f"{'filter':<12}{'docs':>10}{'bytes':>15}{'% bytes':>9}"]
        for name, d, b in rows:
            pct = 100 * b / self.bytes_in if self.bytes_in else 0.0
            lines.append(f"{name:<12}{d:>10,}{b:>15,}{pct:>8.2f}%")
        return "\n".join(lines)


class DocumentFilter:
    """Cleans and filters a stream of documents in order, keeping the report and the dedup index."""

    def __init__(self, config: FilterConfig, seed: int = 0):
        self.inspect, self.report = Inspector(config, seed), Report()
        self.index = DedupIndex(config.near_dup_threshold)

    def __call__(self, raw: str) -> str | None:
        """The cleaned document, or None when a filter removes it (counted in the report either way)."""
        verdict = self.inspect(raw)
        return verdict.text.decode("utf-8") if self.admit(verdict) else None

    def admit(self, verdict: Verdict) -> bool:
        """Decide an inspected document (exact and near duplicates of the kept ones are removed) and
        count it in the report; True when it is kept, and then it enters the dedup index."""
        self.report.docs_in += 1
        self.report.bytes_in += verdict.raw_bytes
        self.report.cleaned_bytes += verdict.raw_bytes - verdict.nbytes
        reason = self.decide(verdict)
        counts = self.report.kept if reason is None else self.report.removed[reason]
        counts[0] += 1
        counts[1] += verdict.nbytes
        return reason is None

    def decide(self, verdict: Verdict) -> str | None:
        """The filter that removes the inspected document, dedup included, or None (it is then indexed)."""
        if verdict.reason is not None:
            return verdict.reason
        return self.index.check(verdict.digest, verdict.signature)

    def reason(self, text: str, raw: str | None = None) -> str | None:
        """The first filter the cleaned text fails, or None; a kept text enters the dedup index. The
        binary filter measures raw, the text before cleaning (default: text)."""
        return self.decide(self.inspect.verdict(text, raw))
