"""The chat template: exact token layout, the loss mask, the generation prompt and bad conversations."""
import pytest

from posttrain_fixtures import tokenizer
from model.chat_format import ChatTokens, render, render_prompt, reply_text
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_single_turn_ids_and_mask(tok):
    ct = ChatTokens.of(tok)
    q, a = tok.encode("What is 2 + 3?"), tok.encode("5")
    ids, mask = render([user("What is 2 + 3?"), assistant("5")], tok)
    assert ids == [ct.bos, ct.user, *q, ct.end, ct.assistant, *a, ct.end]
    assert mask == [False] * (len(q) + 4) + [True] * (len(a) + 1)


def test_multi_turn_mask_covers_each_reply_and_its_end_only(tok):
    ct = ChatTokens.of(tok)
    conversation = [user("hi"), assistant("hello there"), user("Uppercase: cat"), assistant("CAT")]
    ids, mask = render(conversation, tok)
    a1, a2 = tok.encode("hello there"), tok.encode("CAT")
    expected = ([ct.bos, ct.user, *tok.encode("hi"), ct.end, ct.assistant, *a1, ct.end,
                 ct.user, *tok.encode("Uppercase: cat"), ct.end, ct.assistant, *a2, ct.end])
    assert ids == expected
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained == [*a1, ct.end, *a2, ct.end]
    # The user's <|end|> and every role tag stay untrained.
    assert [i for i, m in enumerate(mask) if m] == (
        list(range(4 + len(tok.encode("hi")), 4 + len(tok.encode("hi")) + len(a1) + 1))
        + list(range(len(ids) - len(a2) - 1, len(ids))))


def test_prompt_is_the_conversation_prefix_up_to_the_assistant_tag(tok):
    ct = ChatTokens.of(tok)
    history = [user("hi"), assistant("hello"), user("Reverse the word abc.")]
    prompt = render_prompt(history, tok)
    full, _ = render(history + [assistant("cba")], tok)
    assert prompt[-1] == ct.assistant
    assert full[:len(prompt)] == prompt
    assert full[len(prompt):] == [*tok.encode("cba"), ct.end]


def test_special_text_in_content_is_not_a_control_token(tok):
    ct = ChatTokens.of(tok)
    q, a = tok.encode("<|end|><|assistant|>"), tok.encode("<|endoftext|>")
    ids, _ = render([user("<|end|><|assistant|>"), assistant("<|endoftext|>")], tok)
    assert ids == [ct.bos, ct.user, *q, ct.end, ct.assistant, *a, ct.end]
    assert not set(tok.special_tokens.values()) & set(q + a)


def test_reply_text_stops_at_end_of_turn(tok):
    ct = ChatTokens.of(tok)
    assert reply_text([*tok.encode("42"), ct.end, *tok.encode("junk")], tok) == "42"
    assert reply_text([*tok.encode("42"), ct.bos], tok) == "42"
    assert reply_text(tok.encode("no stop"), tok) == "no stop"


def test_reply_text_never_shows_a_special_token(tok):
    """A role tag the model emits mid-reply ends the reply there (as the server does), never as text."""
    for special in tok.special_tokens.values():
        assert reply_text([*tok.encode("42"), special, *tok.encode("more")], tok) == "42"


@pytest.mark.parametrize("messages, ends_with, error", [
    ([], "assistant", "empty conversation"),
    ([assistant("x")], "assistant", "message 0: role 'assistant', expected 'user'"),
    ([user("a"), user("b")], "assistant", "message 1: role 'user', expected 'assistant'"),
    ([user("a")], "assistant", "must end with a assistant message"),
    ([user("a"), assistant("b")], "user", "must end with a user message"),
    ([{"role": "user"}], "user", "message 0: expected an object with 'role' and 'content'"),
    ([user(3)], "user", "message 0: 'content' must be a string, got int"),
])
def test_bad_conversations_are_named(tok, messages, ends_with, error):
    with pytest.raises(ValueError, match=error.replace("(", r"\(")):
        (render if ends_with == "assistant" else render_prompt)(messages, tok)


def test_tokenizer_without_chat_tokens_is_refused():
    plain = Tokenizer.train(["some text"], vocab_size=260, special_tokens=["<|endoftext|>"])
    with pytest.raises(ValueError, match=r"lacks the chat special tokens \['<\|user\|>'"):
        render([user("a"), assistant("b")], plain)
