"""Tokenizer: the trainer against a naive one, tiktoken against a plain merge-order encoder, round
trips over arbitrary text (lone surrogates included), special tokens, save/load, errors."""
import json
import random
import threading

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from model.tokenizer import DEFAULT_SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, count_chunks, learn_merges

FEW = settings(max_examples=25, deadline=None)
TRICKY = ["", "hello world", "  leading and trailing  ", "e\u0301 combining, \u00e9 precomposed", "\x00nul\x00",
          "emoji \U0001F600\U0001F469\u200d\U0001F4BB", "\ud800", "a\udfffb\ud800", "\ud83d\ude00 split pair",
          "<|endoftext|> and <|user|> as text", "tab\tnew\nline\r\n",
          "\u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
          "x" * 500, "123456789 1,000.5"]


def corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    """Small mixed corpus: code-like lines, prose, numbers and some non-ASCII."""
    rng = random.Random(seed)
    words = ["def", "return", "self", "the", "value", "import", "print", "data", "caf\u00e9", "na\u00efve",
             "\u4e2d\u6587", "\U0001F600", "for", "in", "range", "x", "y", "if", "else", "token"]
    syllables = ["ka", "lo", "mi", "ne", "tor", "str", "ing", "pe", "qu", "är", "zu"]
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(3, 12)):
            indent = " " * rng.choice([0, 4, 8])
            lines.append(indent + " ".join(rng.choice(words) if rng.random() < 0.6 else
                                           "".join(rng.choices(syllables, k=rng.randint(1, 3)))
                                           for _ in range(rng.randint(2, 9)))
                         + rng.choice(["", ":", "()", " = 1", f" {rng.randint(0, 99999)}", "'s", "!"]))
        docs.append("\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus(), vocab_size=600)


def reference_encode(tok: Tokenizer, text: str) -> list[int]:
    """Pre-split with the regex, then apply the merges one after another, in the order learned."""
    out = []
    for chunk in regex.findall(tok.pattern, text):
        ids = list(chunk.encode("utf-8"))
        for new, (a, b) in enumerate(tok.merges, start=256):
            if len(ids) < 2:
                break
            merged, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            ids = merged
        out.extend(ids)
    return out


def naive_merges(chunk_counts: dict[bytes, int], n_merges: int) -> list[tuple[int, int]]:
    """Recount every pair before every merge; same tie-break (smaller ids) and duplicate-bytes rule."""
    words = {tuple(c): n for c, n in chunk_counts.items()}
    token_bytes = [bytes([i]) for i in range(256)]
    merges = []
    while len(merges) < n_merges:
        counts = {}
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + n
        ranked = sorted(counts, key=lambda p: (-counts[p], p))
        ranked = [p for p in ranked if token_bytes[p[0]] + token_bytes[p[1]] not in token_bytes]
        if not ranked:
            break
        a, b = ranked[0]
        new = len(token_bytes)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        merges.append((a, b))
        rewritten = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            rewritten[tuple(out)] = rewritten.get(tuple(out), 0) + n
        words = rewritten
    return merges


def test_fast_trainer_matches_naive_trainer():
    chunks = count_chunks(corpus(20, seed=1) + ["aaaaaaa abababab aaabaaab"])
    assert learn_merges(chunks, 200) == naive_merges(chunks, 200)


@FEW
@given(st.lists(st.text(alphabet="ab c\n", max_size=40), max_size=8))
def test_fast_trainer_matches_naive_trainer_on_repetitive_text(texts):
    chunks = count_chunks(texts)
    assert learn_merges(chunks, 30) == naive_merges(chunks, 30)


def test_training_is_deterministic_and_fills_the_vocabulary(tok):
    again = Tokenizer.train(corpus(), vocab_size=600)
    assert again.fingerprint == tok.fingerprint and again.merges == tok.merges
    assert tok.n_vocab == 600 and len(tok.merges) == 600 - 256 - len(DEFAULT_SPECIAL_TOKENS)
    assert len(set(tok.token_bytes)) == len(tok.token_bytes)


def test_special_tokens_default_and_custom(tok):
    assert list(tok.special_tokens) == ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert sorted(tok.special_tokens.values()) == list(range(596, 600))
    assert tok.eot_id == tok.special_tokens["<|endoftext|>"]
    custom = Tokenizer.train(corpus(5), vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert custom.special_tokens == {"<|endoftext|>": 298, "<|pad|>": 299}
    none = Tokenizer.train(corpus(5), vocab_size=300, special_tokens=[])
    with pytest.raises(ValueError, match="has no <\\|endoftext\\|> token"):
        none.eot_id


def test_special_text_is_never_a_control_token(tok):
    text = "<|endoftext|><|user|>hi<|assistant|>yo<|end|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    assert tok.decode([tok.eot_id, *tok.encode("x"), tok.special_tokens["<|end|>"]]) == "<|endoftext|>x<|end|>"


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tok, text):
    assert tok.decode(tok.encode(text)) == text


@FEW
@given(st.text(alphabet=st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=200))
def test_round_trip_any_string(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_lone_surrogate_policy(tok):
    # Each lone surrogate is a pre-split boundary encoded as its three 'surrogatepass' UTF-8 bytes.
    assert tok.encode("\ud800") == [0xED, 0xA0, 0x80]
    assert tok.encode("ab\udfffab") == tok.encode("ab") + [0xED, 0xBF, 0xBF] + tok.encode("ab")
    assert tok.decode([0xED, 0xA0, 0x80]) == "\ud800"
    # Other invalid UTF-8 (a partial character a model might emit) decodes to U+FFFD.
    assert tok.decode([0xE2]) == "\ufffd" and tok.decode([0xFF, ord("a")]) == "\ufffda"


@FEW
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_tiktoken_equals_merges_applied_in_order(tok, text):
    assert tok.encode(text) == reference_encode(tok, text)


def test_tiktoken_equals_merges_applied_in_order_on_corpus(tok):
    for doc in corpus(10, seed=3):
        assert tok.encode(doc) == reference_encode(tok, doc)


def test_encode_batch_equals_encode(tok):
    texts = TRICKY + corpus(5, seed=4)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(corpus(5, seed=4), num_threads=2) == [tok.encode(t) for t in corpus(5, seed=4)]


def test_batch_encoding_leaves_no_threads_behind(tok):
    """encode_batch's threads (data preparation) end with the call: none are left to compete with
    training for the cores (the only tokenizer work during training is a sample's short prompt)."""
    before = {t.ident for t in threading.enumerate()}
    tok.encode_batch(corpus(16), num_threads=4)
    assert {t.ident for t in threading.enumerate()} == before


def test_compresses_its_training_text(tok):
    text = "".join(corpus(10))
    assert len(tok.encode(text)) < 0.5 * len(text.encode("utf-8"))


def test_save_load_identity(tok, tmp_path):
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
    assert loaded.fingerprint == tok.fingerprint and loaded.n_vocab == tok.n_vocab
    for text in TRICKY:
        assert loaded.encode(text) == tok.encode(text)
    assert json.loads(path.read_text())["fingerprint"] == tok.fingerprint
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]          # no temp file left behind


def test_load_rejects_bad_files(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    payload = json.loads(path.read_text())
    payload["merges"][0] = payload["merges"][1]
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="is corrupt: its contents hash to"):
        Tokenizer.load(path)
    path.write_text(json.dumps({"merges": []}))
    with pytest.raises(ValueError, match="is not a tritongpt-bpe tokenizer file"):
        Tokenizer.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a tokenizer file: invalid JSON"):
        Tokenizer.load(path)

    path.write_bytes(bytes(range(256)))                                   # a binary file
    with pytest.raises(ValueError, match="is not a tokenizer file: invalid JSON"):
        Tokenizer.load(path)
    path.write_text(json.dumps({"format": "tritongpt-bpe", "version": 1, "pattern": SPLIT_PATTERN}))
    with pytest.raises(ValueError, match="is an incomplete tokenizer file \\(KeyError: 'merges'\\)"):
        Tokenizer.load(path)


def test_training_on_no_text_is_refused():
    with pytest.raises(ValueError, match="got no text to learn merges from"):
        Tokenizer.train([], vocab_size=300)
    with pytest.raises(ValueError, match="got no text"):
        Tokenizer.train(["", ""], vocab_size=300)


def test_vocab_smaller_than_bytes_plus_specials():
    with pytest.raises(ValueError, match=r"vocab_size 259 is smaller than the 256 byte tokens \+ 4 special tokens "
                                         r"= 260"):
        Tokenizer.train(["abc"], vocab_size=259)
    assert Tokenizer.train(["abc"], vocab_size=260).n_vocab == 260      # no merges at all is fine
    with pytest.raises(ValueError, match="special tokens must be distinct non-empty strings"):
        Tokenizer.train(["abc"], vocab_size=300, special_tokens=["<|a|>", "<|a|>"])


def test_small_corpus_learns_fewer_merges():
    tok = Tokenizer.train(["ab ab"], vocab_size=1000)
    assert tok.n_vocab < 1000 and tok.special_tokens["<|endoftext|>"] == 256 + len(tok.merges)


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(ValueError, match=r"token ids \[600\] are outside the vocabulary 0..599"):
        tok.decode([1, 600])
    with pytest.raises(ValueError, match=r"token ids \[-1\] are outside the vocabulary"):
        tok.decode([-1])


def test_split_pattern_is_gpt4_style_with_single_digits():
    assert regex.findall(SPLIT_PATTERN, "I'll  go 12345 x+=1\n\n  y") == \
        ["I", "'ll", " ", " go", " ", "1", "2", "3", "4", "5", " x", "+=", "1", "\n\n", " ", " y"]
