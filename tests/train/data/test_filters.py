"""Cleaning, each quality filter on crafted documents (kept and removed), exact and MinHash
near-duplicate removal, and a report that adds up."""
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.data.dedup import DedupIndex
from train.data.filters import (FILTERS, DocumentFilter, FilterConfig, Inspector, MinHash, alnum_fraction,
                                binary_fractions, clean, codepoints, dup_line_fraction, markup_fraction,
                                top_ngram_fraction, word_hashes)

FEW = settings(max_examples=20, deadline=None)
WORDS = ("model token layer kernel python gradient batch vector matrix softmax attention value query key "
         "embedding norm residual optimizer schedule warmup dataset shard memory cache block").split()


def prose(seed: int, n_words: int = 300) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


def reason(text: str, **thresholds) -> str | None:
    return DocumentFilter(FilterConfig(**thresholds)).reason(clean(text))


def test_clean_normalises_and_strips_controls():
    assert clean("cafe\u0301") == "caf\u00e9"                       # NFC
    assert clean("a\r\nb\rc") == "a\nb\nc"
    assert clean("a\x00b\x07c\x1b[0md\x7f\x85e") == "abc[0mde"
    assert clean("tab\tnewline\n") == "tab\tnewline\n"
    assert clean("lone \ud800 surrogate") == "lone  surrogate"
    assert clean("\U0001F600 \u4e2d") == "\U0001F600 \u4e2d"


def test_good_prose_is_kept():
    assert reason(prose(0)) is None


def test_too_short():
    assert reason("x = 1\n") == "too_short"
    assert reason("x = 1\n", min_chars=3) is None


def test_duplicate_lines():
    text = prose(1, 120) + "same line repeated here\n" * 40
    assert dup_line_fraction(text) > 0.5
    assert reason(text) == "dup_lines"
    assert dup_line_fraction("a\n\n\nb\n\n") == 0.0                  # blank lines do not count
    assert dup_line_fraction("a\nb\na\na\n") == 0.5


def test_top_ngram_repetition():
    text = "\n".join(f"buy cheap pills now {w}" for w in WORDS)
    assert top_ngram_fraction(*word_hashes(codepoints(text)), 2) > 0.4
    assert reason(text, max_dup_line_frac=1.0) == "top_ngram"
    assert reason(text, max_dup_line_frac=1.0, max_top_ngram_frac=0.9) is None


def test_top_ngram_fraction_matches_python_count():
    words = "a b a b a b c d".split()
    grams = list(zip(words, words[1:]))
    top = max(set(grams), key=grams.count)
    expected = grams.count(top) * sum(map(len, top)) / sum(map(len, words))
    assert top_ngram_fraction(*word_hashes(codepoints(" ".join(words))), 2) == pytest.approx(expected)
    assert top_ngram_fraction(*word_hashes(codepoints("a b c d")), 2) == 0.0        # no n-gram repeats


def test_alphanumeric_fraction():
    junk = "\n".join("#### ---- **** ==== !!!! %%%% " + w for w in WORDS) * 3
    assert alnum_fraction(codepoints(junk)) < 0.3
    assert reason(junk, max_dup_line_frac=1.0, max_top_ngram_frac=1.0) == "alnum"
    assert alnum_fraction(codepoints("ab \u00e9\u4e2d\U0001D400 !")) == pytest.approx(5 / 6)   # astral letter counts


def test_markup_and_boilerplate():
    html = "".join(f'<div class="c{i}"><span>{w}</span></div>&nbsp;\n' for i, w in enumerate(WORDS * 3))
    assert markup_fraction(html) > 0.5
    assert reason(html, max_dup_line_frac=1.0, max_top_ngram_frac=1.0) == "markup"
    boiler = prose(2, 36) + "Copyright 2024. All Rights Reserved. See our privacy policy and terms of use.\n" * 3
    assert markup_fraction(boiler) > 0.3 and markup_fraction(prose(2)) == 0.0
    assert markup_fraction("if a < b and c > d: pass") == 0.0        # comparisons are not tags


def test_exact_duplicate_ignores_whitespace():
    f = DocumentFilter(FilterConfig())
    doc = prose(3)
    assert f(doc) is not None
    assert f(doc.replace(" ", "  ").replace("\n", " \n")) is None
    assert f.report.removed["exact_dup"] == [1, len(doc.replace(" ", "  ").replace("\n", " \n").encode())]


def test_minhash_finds_near_copy_and_keeps_distinct_texts():
    f = DocumentFilter(FilterConfig())
    base = prose(4, 1200)
    words = base.split(" ")
    near = " ".join("CHANGED" if i % 97 == 0 else w for i, w in enumerate(words))     # ~1% of words edited
    assert f(base) is not None
    assert f(near) is None and f.report.removed["near_dup"][0] == 1
    for seed in range(5, 10):                                        # same vocabulary, different texts
        assert f(prose(seed, 1200)) is not None


def test_minhash_estimates_jaccard():
    minhash, index = MinHash(), DedupIndex(0.8)
    a = word_hashes(codepoints(" ".join(f"w{i}" for i in range(400))))[0]
    b = word_hashes(codepoints(" ".join(f"w{i}" for i in range(200, 600))))[0]
    shingles = lambda n: {tuple(range(i, i + 5)) for i in range(n, n + 396)}     # noqa: E731
    true = len(shingles(0) & shingles(200)) / len(shingles(0) | shingles(200))
    estimate = np.mean(minhash.signature(a) == minhash.signature(b))
    assert abs(estimate - true) < 0.12
    assert index.bands * index.rows <= 128 and abs((1 / index.bands) ** (1 / index.rows) - 0.8) < 0.05


@FEW
@given(st.lists(st.sampled_from(["alpha", "beta", "gamma", "\u00e9t\u00e9", "\U0001F600"]), min_size=1, max_size=30))
def test_word_hashes_depend_on_the_word_only(words):
    hashes, lengths = word_hashes(codepoints("  ".join(words) + "\n"))
    assert lengths.tolist() == [len(w) for w in words]
    by_word = {}
    for w, h in zip(words, hashes.tolist()):
        assert by_word.setdefault(w, h) == h
    assert len(set(by_word.values())) == len(by_word)


def test_report_adds_up():
    docs = ["", "tiny", prose(11), prose(11), prose(12) + "same line repeated here\n" * 40,
            "<p>x</p>" * 200, "#### ---- " * 80, prose(13), "\x00\x00" + prose(14) + "\r\n"]
    f = DocumentFilter(FilterConfig())
    kept = [t for t in map(f, docs) if t is not None]
    r = f.report
    assert r.docs_in == len(docs) == r.kept[0] + sum(d for d, _ in r.removed.values())
    assert r.bytes_in == sum(len(d.encode()) for d in docs)
    assert r.bytes_in == r.cleaned_bytes + r.kept[1] + sum(b for _, b in r.removed.values())
    assert r.kept == [len(kept), sum(len(t.encode()) for t in kept)]
    assert r.kept[0] == 3 and r.cleaned_bytes == 3
    table = r.table()
    assert all(name in table for name in ("input", "cleaning", *FILTERS, "kept"))
    assert r.as_dict()["removed"]["exact_dup"] == {"docs": 1, "bytes": len(prose(11).encode())}


def test_inspection_in_any_order_then_admission_in_order_is_the_stream():
    """What the workers do (Inspector, any process, any order) and what prepare does (admit, in
    corpus order) keep and count exactly what one DocumentFilter over the stream does."""
    base = prose(15, 600)
    docs = [prose(14), base, base, base.replace("model", "MODEL", 1), "tiny", "\x00" * 200 + prose(16)]
    stream = DocumentFilter(FilterConfig())
    kept = [stream(raw) for raw in docs]
    inspect, split = Inspector(FilterConfig()), DocumentFilter(FilterConfig())
    verdicts = [inspect(raw) for raw in reversed(docs)][::-1]
    assert [v.text.decode() if split.admit(v) else None for v in verdicts] == kept
    assert split.report.as_dict() == stream.report.as_dict()
    assert [split.report.removed[k][0] for k in ("exact_dup", "near_dup", "too_short", "binary")] == [1, 1, 1, 1]


def test_filter_config_errors():
    with pytest.raises(TypeError, match=r"unknown filter thresholds \['min_char'\]; valid: \['min_chars'"):
        FilterConfig.from_kwargs(min_char=3)
    with pytest.raises(ValueError, match=r"max_dup_line_frac must be a fraction in \[0, 1\], got 1.5"):
        FilterConfig(max_dup_line_frac=1.5)
    with pytest.raises(ValueError, match=r"near_dup_threshold must be in \(0, 1\], got 0"):
        FilterConfig(near_dup_threshold=0)
    with pytest.raises(ValueError, match="min_chars must be >= 0, got -1"):
        FilterConfig(min_chars=-1)


def binary_samples() -> dict[str, str]:
    """Files that are not UTF-8 text, decoded the way train/data/sources.py reads them."""
    rng = random.Random(0)
    noise = bytes(rng.randrange(256) for _ in range(4000))
    english = prose(20)
    raw = {"random bytes": noise, "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + noise,
           "utf-16": english.encode("utf-16"), "utf-16-be": english.encode("utf-16-be"),
           "utf-32": english.encode("utf-32"),
           "cp1251 russian": ("Обычный русский текст для проверки. " * 60).encode("cp1251")}
    return {name: data.decode("utf-8", errors="replace") for name, data in raw.items()}


TEXTS = {   # UTF-8 text that must pass: other scripts (with their joiners and marks), code with tabs, CR, form feeds
    "chinese": "机器学习模型需要大量的训练数据。\n我们在这里测试普通的中文文本，包括标点符号和数字 2024。\n北京是中国的首都。\n",
    "japanese": "これは日本語の文章です。カタカナ、ひらがな、漢字が混ざっています。\n東京は大きな都市です。\n",
    "arabic": "هذا نص عربي عادي لاختبار المرشح، ويحتوي على علامات الترقيم والأرقام ١٢٣.\nمی‌خواهم با نیم‌فاصله بنویسم.\n",
    "hindi": "यह एक सामान्य हिंदी पाठ है जिसमें संयुक्ताक्षर और मात्राएँ हैं। क्‍ष और त्‍र।\n",
    "greek+emoji": "Καλημέρα κόσμε, αυτό είναι ελληνικό κείμενο.\n👩‍💻 🏳️‍🌈 👍🏽 café naïve résumé Ελλάδα\n",
    "code": "def f(x):\r\n\treturn x  # tab, CRLF\r\n\x0c\nclass A:\n\tpass\n" + prose(21, 60),
}


def test_binary_and_mis_decoded_files_are_removed_and_counted():
    f = DocumentFilter(FilterConfig())
    samples = binary_samples()
    assert all(f(text) is None for text in samples.values())
    assert f.report.removed["binary"][0] == len(samples) and f.report.kept[0] == 0
    assert "binary" in f.report.table()
    assert f.report.docs_in == len(samples)
    assert f.report.bytes_in == f.report.cleaned_bytes + sum(b for _, b in f.report.removed.values())


def test_text_in_any_script_and_code_passes_the_binary_filter():
    def as_read(text, **thresholds):                           # the binary filter sees the text before cleaning
        return DocumentFilter(FilterConfig(**thresholds)).reason(clean(text), text)

    for name, text in TEXTS.items():
        assert binary_fractions(text) == (0.0, 0.0), name
        assert as_read(text, min_chars=10) is None, name
    assert as_read(prose(22) + "\ufffd\x00\x1b") is None         # one of each in ~2000 characters is still text
    assert as_read("x" * 50 + "\ufffd" * 2, min_chars=10) == "binary"        # 4% U+FFFD
    assert as_read(prose(23) + "\x00" * 200) == "binary"                      # 9% NUL
    assert as_read(prose(23) + "\x00" * 200, max_control_frac=1.0) is None


def test_no_stdlib_source_is_binary():
    from train.data.sources import iter_documents
    cfg = FilterConfig()
    worst = {doc_id: binary_fractions(text) for doc_id, text in iter_documents("stdlib") if len(text) >= cfg.min_chars}
    assert max(r for r, _ in worst.values()) < cfg.max_replacement_frac / 10     # room to spare
    assert max(c for _, c in worst.values()) < cfg.max_control_frac / 10


def test_binary_thresholds_are_checked():
    with pytest.raises(ValueError, match=r"max_replacement_frac must be a fraction in \[0, 1\], got 1.5"):
        FilterConfig(max_replacement_frac=1.5)
    with pytest.raises(ValueError, match=r"max_control_frac must be a fraction in \[0, 1\], got -0.1"):
        FilterConfig(max_control_frac=-0.1)
