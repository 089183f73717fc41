"""SFT/DPO JSONL formats, the error for each malformed line, and the padded / packed batches."""
import json

import pytest

from posttrain_fixtures import tokenizer
from model.chat_format import ChatTokens, render
from train.data.sft_data import IGNORE, collate, encode, encode_pairs, load_dpo, load_sft, pack_rows, stream_indices

CONVERSATION = [{"role": "user", "content": "Uppercase: cat"}, {"role": "assistant", "content": "CAT"}]


def write(path, *lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_three_sft_formats_give_the_same_conversation(tmp_path):
    path = write(tmp_path / "sft.jsonl",
                 {"messages": CONVERSATION},
                 "",
                 {"prompt": "Uppercase: cat", "response": "CAT"},
                 {"instruction": "Uppercase: cat", "output": "CAT"},
                 {"instruction": "Uppercase: cat", "input": "", "output": "CAT", "extra": 1})
    assert load_sft(path) == [CONVERSATION] * 4


def test_alpaca_input_follows_the_instruction(tmp_path):
    path = write(tmp_path / "alpaca.jsonl", {"instruction": "Uppercase:", "input": "cat", "output": "CAT"})
    assert load_sft(path)[0][0] == {"role": "user", "content": "Uppercase:\n\ncat"}


def test_multi_turn_messages(tmp_path):
    turns = CONVERSATION + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "CAT"}]
    assert load_sft(write(tmp_path / "m.jsonl", {"messages": turns})) == [turns]


@pytest.mark.parametrize("line, error", [
    ('{"prompt": "a", "response": ', "not valid JSON"),
    ('["prompt", "response"]', "expected a JSON object, got list"),
    ({"prompt": "a"}, "missing field 'response'"),
    ({"response": "a"}, "missing field 'prompt'"),
    ({"prompt": 1, "response": "b"}, "field 'prompt' must be a string, got int"),
    ({"instruction": "a"}, "missing field 'output'"),
    ({"instruction": "a", "input": ["x"], "output": "b"}, "field 'input' must be a string, got list"),
    ({"output": "b"}, "missing field 'instruction'"),
    ({"messages": "hi"}, "field 'messages' must be a list, got str"),
    ({"messages": []}, "field 'messages': empty conversation"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "field 'messages': message 0: role 'assistant'"),
    ({"messages": CONVERSATION[:1]}, "field 'messages': conversation must end with a assistant message"),
    ({"messages": [CONVERSATION[0], {"role": "assistant", "content": None}]},
     "field 'messages': message 1: 'content' must be a string"),
    ({"text": "a"}, r"unrecognised SFT record with fields \['text'\]"),
])
def test_malformed_sft_line_names_file_line_and_field(tmp_path, line, error):
    path = write(tmp_path / "bad.jsonl", {"messages": CONVERSATION}, "", line)
    with pytest.raises(ValueError, match=f"bad.jsonl:3: {error}"):
        load_sft(path)


def test_dpo_format(tmp_path):
    record = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}
    assert load_dpo(write(tmp_path / "dpo.jsonl", record, record)) == [record, record]


@pytest.mark.parametrize("line, error", [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "p", "chosen": 2, "rejected": "3"}, "field 'chosen' must be a string, got int"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "field 'rejected' equals 'chosen'"),
    ("nope", "not valid JSON"),
])
def test_malformed_dpo_line(tmp_path, line, error):
    path = write(tmp_path / "bad.jsonl", {"prompt": "p", "chosen": "a", "rejected": "b"}, line)
    with pytest.raises(ValueError, match=f"bad.jsonl:2: {error}"):
        load_dpo(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="no such file; pass a JSONL file, or 'tasks'"):
        load_sft(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no examples"):
        load_dpo(write(tmp_path / "empty.jsonl", ""))


def test_padded_batch_ignores_everything_but_replies():
    tok = tokenizer()
    ct = ChatTokens.of(tok)
    (a, b), dropped = encode([CONVERSATION, [CONVERSATION[0], {"role": "assistant", "content": "CAT CAT"}]], tok, 64)
    assert dropped == 0
    batch = collate([a, b], pad_id=ct.bos)
    L = len(b) - 1
    assert batch["x"].shape == batch["y"].shape == (2, L)
    assert batch["x"][0].tolist() == a.ids[:-1] + [ct.bos] * (L - len(a) + 1)
    # Targets are the next tokens where those are reply tokens, IGNORE elsewhere (padding included).
    assert batch["y"][0].tolist() == [t if m else IGNORE for t, m in zip(a.ids[1:], a.mask[1:])] + [IGNORE] * (L - len(a) + 1)
    assert batch["y"][1].tolist() == [t if m else IGNORE for t, m in zip(b.ids[1:], b.mask[1:])]
    assert (batch["y"] != IGNORE).sum() == len(tok.encode("CAT")) + len(tok.encode("CAT CAT")) + 2


def test_packing_keeps_every_example_whole_and_apart_in_fewer_rows():
    tok = tokenizer()
    bos = ChatTokens.of(tok).bos
    conversations = [[{"role": "user", "content": f"What is {i} + {i * 37}?"}, {"role": "assistant", "content": str(i * 38)}]
                     for i in range(12)]
    examples, _ = encode(conversations, tok, 64)
    padded, packed = collate(examples, bos), collate(examples, bos, pack_to=64)
    assert packed["x"].shape[0] < padded["x"].shape[0] and packed["x"].shape[1] <= 64
    assert "documents" in packed and "documents" not in padded
    assert padded["tokens"] == packed["tokens"] == sum(len(e) - 1 for e in examples)     # padding not counted
    assert packed["x"].numel() - packed["tokens"] < padded["x"].numel() - padded["tokens"]
    docs, L = packed["documents"], packed["x"].shape[1]
    starts = set(docs.cu_seqlens[:-1].tolist())
    flat = {k: packed[k].flatten() for k in ("x", "y", "segment")}
    for i, e in enumerate(examples):
        # Example i lies in one row, whole and contiguous: its inputs, its own shifted targets (so its
        # last position predicts its own <|end|>, never the next example's <|endoftext|>), one document
        # of its own that starts at position 0.
        at = (flat["segment"] == i).nonzero().squeeze(1)
        first = int(at[0])
        assert at.tolist() == list(range(first, first + len(e) - 1)) and first // L == int(at[-1]) // L
        assert flat["x"][at].tolist() == e.ids[:-1] and flat["x"][first] == bos
        assert flat["y"][at].tolist() == [t if m else IGNORE for t, m in zip(e.ids[1:], e.mask[1:])]
        assert first in starts and first + len(e) - 1 in starts | {docs.cu_seqlens[-1].item()}
        assert docs.positions.flatten()[at].tolist() == list(range(len(e) - 1))
    # Padding: no example, no target, and documents no longer than the longest example.
    pad = packed["segment"] == len(examples)
    assert (packed["y"][pad] == IGNORE).all() and docs.max_seqlen == max(len(e) for e in examples) - 1


def test_pack_rows_fills_the_fewest_rows_about_equally():
    lengths = [30, 28, 25, 25, 22, 20, 18, 17, 15, 12, 10, 9, 5]        # 236 tokens
    rows, width = pack_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert len(rows) == 3 and width == max(sum(lengths[i] for i in row) for row in rows)
    assert width < 85                            # not 100, 100, 36: about a third each
    assert pack_rows([100, 60, 60], 100) == ([[0], [1], [2]], 100)         # no item split or dropped
    assert pack_rows([7], 100) == ([[0]], 7)


def test_too_long_examples_are_dropped():
    tok = tokenizer()
    long = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]
    kept, dropped = encode([CONVERSATION, long], tok, block_size=len(render(CONVERSATION, tok)[0]) - 1)
    assert (len(kept), dropped) == (1, 1)
    pairs, dropped = encode_pairs([{"prompt": "hi", "chosen": "a", "rejected": "b " * 80}], tok, 32)
    assert (pairs, dropped) == ([], 1)


def test_pair_masks_cover_the_responses():
    tok = tokenizer()
    [(chosen, rejected)], _ = encode_pairs([{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "11"}], tok, 64)
    end = ChatTokens.of(tok).end
    assert [t for t, m in zip(chosen.ids, chosen.mask) if m] == tok.encode("2") + [end]
    assert [t for t, m in zip(rejected.ids, rejected.mask) if m] == tok.encode("11") + [end]


def test_stream_indices_are_seeded_epoch_permutations():
    first, second = stream_indices(10, 0, 10, seed=1), stream_indices(10, 10, 10, seed=1)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert stream_indices(10, 5, 10, seed=1) == first[5:] + second[:5]
    assert stream_indices(10, 0, 10, seed=2) != first
    assert stream_indices(7, 3, 4, 0) == stream_indices(7, 3, 4, 0)
