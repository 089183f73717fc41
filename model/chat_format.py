"""The one chat template, shared by SFT, DPO, evaluation and the chats (model/serve/).

A conversation of {"role", "content"} messages (roles "user" and "assistant", alternating, user
first) is rendered as

    <|endoftext|> <|user|> u1 <|end|> <|assistant|> a1 <|end|> <|user|> u2 <|end|> <|assistant|> a2 <|end|>

The leading <|endoftext|> is what separates documents in the pretraining stream, so the model
starts a conversation in the state it starts any document in. Role tags are single special tokens,
never produced by tok.encode, so no user text can forge a turn. The loss mask covers exactly the
assistant content tokens and the <|end|> closing each assistant turn: the model learns to answer
and to stop, never to predict what the user says.
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("user", "assistant")
SPECIALS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>")


@dataclass(frozen=True)
class ChatTokens:
    """The special ids of the template, looked up once from a tokenizer."""
    bos: int        # <|endoftext|>
    user: int
    assistant: int
    end: int        # end of turn

    @classmethod
    def of(cls, tok) -> "ChatTokens":
        missing = [s for s in SPECIALS if s not in tok.special_tokens]
        if missing:
            raise ValueError(f"tokenizer lacks the chat special tokens {missing} (it has "
                             f"{sorted(tok.special_tokens)}); train it with the default special tokens")
        ids = [tok.special_tokens[s] for s in SPECIALS]
        return cls(*ids)

    @property
    def stop(self) -> list[int]:
        """Tokens that end a generated reply: end of turn, or end of text from a confused model."""
        return [self.end, self.bos]


def check_messages(messages: list[dict], ends_with: str) -> None:
    """Raise ValueError unless messages alternate user/assistant from a user turn and the last has
    role ends_with, each with a string content."""
    if not messages:
        raise ValueError("empty conversation: need at least one user message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise ValueError(f"message {i}: expected an object with 'role' and 'content', got {m!r}")
        expected = ROLES[i % 2]
        if m["role"] != expected:
            raise ValueError(f"message {i}: role {m['role']!r}, expected {expected!r} (roles alternate "
                             f"user, assistant, ... starting with user)")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: 'content' must be a string, got {type(m['content']).__name__}")
    if messages[-1]["role"] != ends_with:
        raise ValueError(f"conversation must end with a {ends_with} message, ends with {messages[-1]['role']}")


def _turns(messages: list[dict], tok, ct: ChatTokens) -> tuple[list[int], list[bool]]:
    ids, mask = [ct.bos], [False]
    for m in messages:
        if m["role"] == "user":
            turn = [ct.user, *tok.encode(m["content"]), ct.end]
            ids += turn
            mask += [False] * len(turn)
        else:
            reply = [*tok.encode(m["content"]), ct.end]
            ids += [ct.assistant, *reply]
            mask += [False] + [True] * len(reply)
    return ids, mask


def render(messages: list[dict], tok) -> tuple[list[int], list[bool]]:
    """A whole conversation (ending with an assistant turn) -> token ids and a same-length loss
    mask, True on assistant content tokens and the <|end|> after each of them."""
    check_messages(messages, ends_with="assistant")
    return _turns(messages, tok, ChatTokens.of(tok))


def render_prompt(messages: list[dict], tok) -> list[int]:
    """The history (ending with a user turn) followed by <|assistant|>: what generation continues."""
    check_messages(messages, ends_with="user")
    ct = ChatTokens.of(tok)
    ids, _ = _turns(messages, tok, ct)
    return ids + [ct.assistant]


def fit_history(messages: list[dict], tok, budget: int) -> list[dict]:
    """The newest messages (ending with a user turn) whose prompt fits in budget tokens: the oldest
    exchanges go first, the last user message always stays."""
    while len(messages) > 1 and len(render_prompt(messages, tok)) > budget:
        messages = messages[2:]
    return messages


def reply_text(ids: list[int], tok) -> str:
    """Decode generated reply ids up to (not including) the first special token: the end of the
    turn, or any other the model emits (a role tag is never reply text)."""
    special = set(tok.special_tokens.values())
    cut = next((i for i, t in enumerate(ids) if t in special), len(ids))
    return tok.decode(ids[:cut])
