"""model.serve.chat: a piped prompt is answered, replies stream, history is kept, /reset forgets it and
the oldest turns give way when the context is full."""
import builtins
import io
import sys

import pytest

from model.serve import chat
from posttrain_fixtures import make_run, tiny_model, tokenizer
from model.chat_format import render_prompt


class Pipe(io.StringIO):
    def isatty(self):
        return False


def test_piped_prompt_is_answered(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "run")
    monkeypatch.setattr(sys, "stdin", Pipe("What is 2 + 3?\n"))
    chat.main([str(run), "--max-tokens", "8", "--seed", "0", "--device", "cpu"])
    printed = capsys.readouterr().out
    # The same model and seed give the same reply through the Chat object directly.
    expected = io.StringIO()
    model = tiny_model()
    reply = chat.Chat(model, tokenizer(), 0.7, 50, 0.95, 8, seed=0).reply("What is 2 + 3?", expected)
    assert printed == expected.getvalue() == reply + "\n"


def test_empty_stdin_is_refused(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    monkeypatch.setattr(sys, "stdin", Pipe(""))
    with pytest.raises(SystemExit, match="stdin was empty"):
        chat.main([str(run), "--device", "cpu"])


def test_stream_writes_the_reply_as_it_grows():
    writes = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    out = Recorder()
    reply = chat.Chat(tiny_model(), tokenizer(), 1.0, None, None, 12, seed=1).reply("hello", out)
    assert "".join(writes) == reply + "\n" and len(writes) > 2


def test_history_reset_and_quit(monkeypatch):
    session = chat.Chat(tiny_model(), tokenizer(), 0.0, None, None, 4, seed=0)
    lines = iter(["hi", "there", "/reset", "again", "/quit", "never read"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    out = io.StringIO()
    chat.interactive(session, out)
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert session.history[0]["content"] == "again"
    assert "(conversation cleared)" in out.getvalue()
    assert next(lines) == "never read"


def test_multi_turn_prompt_holds_the_history():
    session = chat.Chat(tiny_model(), tokenizer(), 0.0, None, None, 4, seed=0)
    first = session.reply("hi", io.StringIO())
    session.history.append({"role": "user", "content": "more"})
    assert session._prompt() == render_prompt([{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": first},
                                               {"role": "user", "content": "more"}], tokenizer())


def test_oldest_turns_are_dropped_when_the_context_is_full():
    session = chat.Chat(tiny_model(block_size=48), tokenizer(), 0.0, None, None, 8, seed=0)
    for i in range(6):
        session.reply(f"Repeat after me: turn {i}", io.StringIO())
        assert len(render_prompt(session.history[:-1], tokenizer())) <= 48 - 8
    assert session.history[-2]["content"] == "Repeat after me: turn 5"
    assert len(session.history) < 12
    with pytest.raises(ValueError, match="message too long"):
        session.reply("word " * 60, io.StringIO())
    assert session.history[-2]["content"] == "Repeat after me: turn 5"


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "--temperature: must be at least 0, got -1.0"),
    (["--top-p", "1.5"], "--top-p: must be at most 1, got 1.5"),
    (["--top-p", "0"], "--top-p: must be greater than 0, got 0.0"),
    (["--top-k", "-2"], "--top-k: must be at least 0, got -2"),
    (["--max-tokens", "0"], "--max-tokens: must be at least 1, got 0"),
])
def test_sampling_flags_out_of_range_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat.build_parser().parse_args(["some/run", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
