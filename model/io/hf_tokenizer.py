"""Our byte-level BPE tokenizer in Hugging Face's formats: tokenizer.json and the chat template.

tokenizer.json (the `tokenizers` library's format) describes the same tokenizer as ours:

- pre-tokenizer: our split pattern (model.tokenizer.SPLIT_PATTERN) as an isolating regex split,
  then the byte-level mapping (every byte one printable character, GPT-2's table) without a
  regex of its own;
- model: BPE over those characters, vocab = our token bytes in id order, merges = our merges in
  rank order (merge i made token 256 + i, so a merge's rank is its token's rank, which is the
  order tiktoken applies them in);
- added tokens: our special tokens at their ids; decoder: byte-level.

from_tokenizer_json reads such a document back, whatever order its ids are in (GPT-2-style files
number the byte characters in table order and often put special tokens first): our ids are the
256 bytes in byte order, then one token per merge in rank order, then the added tokens, and it
returns the map from the file's ids to ours, by which an importer permutes the embedding rows.
It refuses what is not byte-level BPE (a normalizer, byte fallback, word prefixes or suffixes, a
token no merge makes), naming the field.

One difference is the `tokenizers` convention, not a choice here: a transformers tokenizer turns
the text of a special token ("<|user|>") into that token, where Tokenizer.encode treats all text
as text; `tokenizer(text, split_special_tokens=True)` gives our ids for such text too. The chat
template renders the same token ids as model.chat_format.render / render_prompt, since it writes
the special tokens' text around each message and each message is encoded on its own.
"""
from __future__ import annotations

import functools
import json

from model.chat_format import SPECIALS
from model.tokenizer import Tokenizer

# The split of GPT-2's ByteLevel pre-tokenizer with use_regex=True.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

CHAT_TEMPLATE = (
    "{{ '" + SPECIALS[0] + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + SPECIALS[1] + "' + message['content'] + '" + SPECIALS[3] + "' }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + SPECIALS[2] + "' + message['content'] + '" + SPECIALS[3]
    + "' }}"
    "{% else %}{{ raise_exception('roles are user and assistant, alternating from user') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + SPECIALS[2] + "' }}{% endif %}"
)


@functools.cache
def byte_chars() -> tuple[str, ...]:
    """The printable character standing for each byte (GPT-2's byte-level table): printable
    Latin-1 bytes stand for themselves, the other 68 for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def token_text(token: bytes) -> str:
    table = byte_chars()
    return "".join(table[b] for b in token)


def tokenizer_json(tok: Tokenizer) -> dict:
    """tok as a `tokenizers` tokenizer.json document."""
    texts = [token_text(t) for t in tok.token_bytes]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in sorted(tok.special_tokens.items(),
                                                                                   key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  # a piece that is one token whole is that token, before any merge: tiktoken's rule
                  "ignore_merges": True,
                  "vocab": {text: i for i, text in enumerate(texts)},
                  "merges": [[texts[a], texts[b]] for a, b in tok.merges]},
    }


def tokenizer_config(tok: Tokenizer, max_length: int) -> dict:
    """tokenizer_config.json: a fast tokenizer over tokenizer.json, its special tokens and the chat template."""
    bos, user, assistant, end = SPECIALS
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "bos_token": bos,
        "eos_token": end,
        "pad_token": bos,
        "additional_special_tokens": [user, assistant],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _split_pattern(pre: dict | None) -> str:
    """Our split pattern of a byte-level pre-tokenizer, or ValueError naming what it is instead."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space")):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"pre_tokenizer {json.dumps(pre)[:200]} is not a byte-level split we can represent "
                     f"(expected ByteLevel with its regex, or Split(Regex, Isolated) then ByteLevel without one)")


def from_tokenizer_json(doc: dict, where: str = "tokenizer.json") -> tuple[Tokenizer, dict[int, int]]:
    """Our Tokenizer of a `tokenizers` byte-level BPE document, and {file id: our id}."""
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: model.type is {model.get('type')!r}; only byte-level BPE can be imported")
    for field in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(field):
            raise ValueError(f"{where}: model.{field} is {model[field]!r}; byte-level BPE has none")
    if doc.get("normalizer"):
        raise ValueError(f"{where}: normalizer {doc['normalizer'].get('type')!r} is set; ours has none")
    pattern = _split_pattern(doc.get("pre_tokenizer"))
    char_byte = {c: b for b, c in enumerate(byte_chars())}
    added = sorted(doc.get("added_tokens") or [], key=lambda t: t["id"])
    added_ids = {t["id"] for t in added}
    ours_of_bytes: dict[bytes, int] = {}
    vocab: dict[int, bytes] = {}
    for text, i in model.get("vocab", {}).items():
        if i in added_ids:
            continue
        if any(c not in char_byte for c in text):
            raise ValueError(f"{where}: vocab token {text!r} (id {i}) is not in the byte-level alphabet")
        vocab[i] = bytes(char_byte[c] for c in text)
    by_bytes = {b: i for i, b in vocab.items()}
    missing = [b for b in range(256) if bytes([b]) not in by_bytes]
    if missing:
        raise ValueError(f"{where}: the vocab lacks the single-byte tokens of bytes {missing[:8]}; "
                         f"byte-level BPE has all 256")
    ours_of_bytes.update({bytes([b]): b for b in range(256)})
    merges = []
    for n, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        a, b = (bytes(char_byte[c] for c in part) for part in (left, right))
        token = a + b
        if a not in ours_of_bytes or b not in ours_of_bytes or token not in by_bytes or token in ours_of_bytes:
            raise ValueError(f"{where}: merge {n} ({left!r}, {right!r}) does not make a new vocab token from "
                             f"tokens made before it")
        merges.append((ours_of_bytes[a], ours_of_bytes[b]))
        ours_of_bytes[token] = 255 + len(merges)
    unmade = [vocab[i] for i in sorted(vocab) if vocab[i] not in ours_of_bytes]
    if unmade:
        raise ValueError(f"{where}: {len(unmade)} vocab tokens are made by no merge (first: {unmade[0]!r})")
    n_ordinary = 256 + len(merges)
    specials = {t["content"]: n_ordinary + j for j, t in enumerate(added)}
    mapping = {i: ours_of_bytes[b] for i, b in vocab.items()}
    mapping.update({t["id"]: specials[t["content"]] for t in added})
    return Tokenizer(merges, specials, pattern), mapping
