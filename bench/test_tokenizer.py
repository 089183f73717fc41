"""Tokenizer benchmark (issue 6): BPE training time, encode throughput and tokens per byte.

About 10 MB of the default corpus (the stdlib's .py files in a seeded random order) trains a
vocabulary of 8192; the next 2 MB are held out for encoding. Our trainer + tiktoken runs against
the HF `tokenizers` BPE trainer with the same pre-split regex and byte-level alphabet, when that
package is installed (it is not a dependency; the hf rows skip without it). Both encoders use all
cores. Training is one round (seconds each); encoding is the median of 3.
"""
from __future__ import annotations

import os
import random

import pytest

from train.data.sources import iter_documents
from model.tokenizer import DEFAULT_SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

TRAIN_BYTES, HELD_OUT_BYTES, VOCAB = 10_000_000, 2_000_000, 8192
BACKENDS = ("ours", "hf_tokenizers")
_trained: dict[str, object] = {}


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) from the stdlib corpus."""
    docs = [text for _, text in iter_documents("stdlib")]
    random.Random(0).shuffle(docs)
    train, held, size = [], [], 0
    for doc in docs:
        size += len(doc.encode("utf-8"))
        if size <= TRAIN_BYTES:
            train.append(doc)
        elif size <= TRAIN_BYTES + HELD_OUT_BYTES:
            held.append(doc)
    return train, held


def train(backend: str, texts: list[str]):
    if backend == "ours":
        return Tokenizer.train(texts, VOCAB)
    hf = pytest.importorskip("tokenizers")
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.Sequence([
        hf.pre_tokenizers.Split(hf.Regex(SPLIT_PATTERN), behavior="isolated"),
        hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(DEFAULT_SPECIAL_TOKENS),
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_all(backend: str, tok, texts: list[str]) -> int:
    """Number of tokens of texts, encoded in one parallel batch."""
    if backend == "ours":
        return sum(map(len, tok.encode_batch(texts)))
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)     # fast: no offsets, where available
    return sum(len(e.ids) for e in encode(texts, add_special_tokens=False))


def trained(backend: str, texts: list[str]):
    if backend not in _trained:
        _trained[backend] = train(backend, texts)
    return _trained[backend]


def label(benchmark, op: str, backend: str, shape: str) -> None:
    benchmark.extra_info.update(op=op, pass_="cpu", backend=backend, shape=shape, dtype="text", device="cpu",
                                median_ms=benchmark.stats.stats.median * 1e3, threads=os.cpu_count())


@pytest.mark.parametrize("backend", BACKENDS)
def test_train(benchmark, corpus, backend):
    texts = corpus[0]
    if backend != "ours":
        pytest.importorskip("tokenizers")
    tok = benchmark.pedantic(train, args=(backend, texts), rounds=1, iterations=1, warmup_rounds=0)
    _trained[backend] = tok
    label(benchmark, "tokenizer_train", backend, f"{sum(len(t.encode()) for t in texts) / 1e6:.1f}MB V={VOCAB}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode(benchmark, corpus, backend):
    tok = trained(backend, corpus[0])
    held = corpus[1]
    n_bytes = sum(len(t.encode("utf-8")) for t in held)
    n_tokens = benchmark.pedantic(encode_all, args=(backend, tok, held), rounds=3, iterations=1, warmup_rounds=1)
    label(benchmark, "tokenizer_encode", backend, f"{n_bytes / 1e6:.1f}MB held out V={VOCAB}")
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({"tokens/s": n_tokens / median, "MB/s": n_bytes / median / 1e6,
                                 "tokens_per_byte": n_tokens / n_bytes})
    if backend == "ours":
        assert tok.decode(tok.encode(held[0])) == held[0]
