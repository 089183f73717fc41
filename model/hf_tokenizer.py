"""Our byte-level BPE tokenizer in Hugging Face's formats: tokenizer.json and the chat template.

tokenizer.json (the `tokenizers` library's format) describes the same tokenizer as ours:

- pre-tokenizer: our split pattern (model.tokenizer.SPLIT_PATTERN) as an isolating regex split,
  then the byte-level mapping (every byte one printable character, GPT-2's table) without a
  regex of its own;
- model: BPE over those characters, vocab = our token bytes in id order, merges = our merges in
  rank order (merge i made token 256 + i, so a merge's rank is its token's rank, which is the
  order tiktoken applies them in);
- added tokens: our special tokens at their ids; decoder: byte-level.

One difference is the `tokenizers` convention, not a choice here: a transformers tokenizer turns
the text of a special token ("<|user|>") into that token, where Tokenizer.encode treats all text
as text; `tokenizer(text, split_special_tokens=True)` gives our ids for such text too. The chat
template renders the same token ids as model.chat_format.render / render_prompt, since it writes
the special tokens' text around each message and each message is encoded on its own.
"""
from __future__ import annotations

import functools

from model.chat_format import SPECIALS
from model.tokenizer import Tokenizer

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
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
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
