"""python -m model.serve on loopback with the official openai client: chat and completions, streamed or not,
stop strings, seeds, usage; concurrent greedy replies equal one-at-a-time ones; a bounded load test
with a client that walks away; every bad input is a 4xx with OpenAI's error body and the server
goes on; the command's one-line errors and a clean Ctrl-C."""
import argparse
import ast
import json
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import torch  # noqa: E402

from model.chat_format import render_prompt  # noqa: E402
from model.io.checkpoint import load_model, load_tokenizer  # noqa: E402
from model.serve.engine import Engine, Request  # noqa: E402
from model.quantized import quantized_format  # noqa: E402
from model.generate import generate  # noqa: E402
from model.serve import api as serve  # noqa: E402
from model.command import run_command  # noqa: E402
from model.serve.api import build_app, listen  # noqa: E402
from posttrain_fixtures import make_run  # noqa: E402
from serve_fixtures import LoopbackServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
MAX_BATCH = 4


class Server(LoopbackServer):
    """build_app over a tiny run's engine, on loopback."""

    def __init__(self, run: Path):
        model, _ = load_model(run)
        self.tok = load_tokenizer(run)
        self.model, self.engine = model, Engine(model, self.tok, MAX_BATCH)
        super().__init__(build_app(self.engine, "tiny"))

    def client(self) -> "openai.OpenAI":
        # trust_env=False: a proxy in the environment must not see loopback traffic.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60,
                             http_client=httpx.Client(trust_env=False))

    def post(self, path: str, content: bytes | str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, content=content, timeout=60, trust_env=False, **kwargs)

    def close(self) -> None:
        super().close()
        self.engine.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A larger init spreads the logits: replies vary and some end on the end-of-turn token. A long
    # context: a reply left to run to its end outlasts a busy machine's pause in the test.
    server = Server(make_run(tmp_path_factory.mktemp("serve") / "run", n_layer=2, init_std=0.3, block_size=1024))
    yield server
    server.close()


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_reply_is_generate_s_with_our_token_counts(server):
    reply = server.client().chat.completions.create(model="tiny", messages=ask("What is 2 + 3?"),
                                                    max_tokens=20, temperature=0)
    prompt = render_prompt(ask("What is 2 + 3?"), server.tok)
    specials = list(server.tok.special_tokens.values())          # each ends a reply
    out = generate(server.model, torch.tensor([prompt]), 20, temperature=0, stop_tokens=specials)
    out = out[0, len(prompt):].tolist()
    stopped = out[-1] in specials
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == server.tok.decode(out[:-1] if stopped else out)
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert reply.id.startswith("chatcmpl-") and reply.model == "tiny" and reply.object == "chat.completion"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(out))
    assert reply.usage.total_tokens == len(prompt) + len(out)


def test_streamed_chat_equals_the_whole_reply(server):
    client = server.client()
    kwargs = dict(model="tiny", messages=[{"role": "system", "content": "Be brief."}, *ask("hello")],
                  max_tokens=25, temperature=0.8, seed=5)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len(chunks) > 3


def test_content_parts_and_system_messages_render_as_text(server):
    client = server.client()

    def reply(messages):
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        return r.choices[0].message.content, r.usage.prompt_tokens

    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 3?"}]
    assert reply([{"role": "user", "content": parts}]) == reply(ask("What is 2 + 3?"))
    system = [{"role": "system", "content": "Be brief."}, *ask("hi")]
    assert reply(system) == reply(ask("Be brief.\n\nhi"))


def test_completions_streamed_or_not(server):
    client = server.client()
    whole = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=15, temperature=0)
    streamed = list(client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=15,
                                              temperature=0, stream=True))
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    prompt = [server.tok.special_tokens["<|endoftext|>"], *server.tok.encode("def add(a, b):")]
    assert whole.usage.prompt_tokens == len(prompt)


@pytest.mark.parametrize("special", ["<|end|>", "<|user|>"])
def test_a_special_token_ends_the_reply_and_is_never_its_text(server, monkeypatch, special):
    # The README's completion on a chat run: the model ends its turn, then would go on with junk.
    said = server.tok.encode("Hi")
    script = [*said, server.tok.special_tokens[special], *server.tok.encode("weUTUMOON4 biab")]
    monkeypatch.setattr(server.engine, "_sample", lambda logits, seqs: torch.tensor(
        [script[min(s.generated, len(script) - 1)] for s in seqs]))
    client = server.client()
    text = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=20)
    streamed = list(client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=20, stream=True))
    chat = client.chat.completions.create(model="tiny", messages=ask("hi"), max_tokens=20)
    assert (text.choices[0].text, text.choices[0].finish_reason) == ("Hi", "stop")
    assert text.usage.completion_tokens == len(said) + 1
    assert "".join(c.choices[0].text for c in streamed) == "Hi" and streamed[-1].choices[0].finish_reason == "stop"
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == ("Hi", "stop")


def test_the_serve_extra_installs_what_the_readme_s_client_imports():
    tomllib = pytest.importorskip("tomllib")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    client = re.search(r"```python\n(.*?)```", readme[readme.index("### Serve"):], re.S).group(1)
    imported = {name.split(".")[0] for node in ast.walk(ast.parse(client))
                for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                             else [node.module] if isinstance(node, ast.ImportFrom) else [])}
    serve_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    installed = {re.match(r"[\w.-]+", requirement).group(0).lower() for requirement in serve_extra}
    assert "openai" in imported and imported <= installed, f"pip install -e '.[serve]' lacks {imported - installed}"


def test_stop_strings_cut_the_reply(server):
    client = server.client()
    full = client.chat.completions.create(messages=ask("hi"), model="tiny", max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    assert len(text) > 8
    for stop in (text[4:6], [text[6:8], "never there"]):
        cut = client.chat.completions.create(messages=ask("hi"), model="tiny", max_tokens=30, temperature=0, stop=stop)
        first = stop if isinstance(stop, str) else stop[0]
        assert cut.choices[0].message.content == text[:text.index(first)]
        assert cut.choices[0].finish_reason == "stop"


def test_same_seed_same_reply(server):
    client = server.client()
    replies = [client.chat.completions.create(model="tiny", messages=ask("Tell me a story"), max_tokens=30,
                                              temperature=1.0, seed=seed).choices[0].message.content
               for seed in (11, 11, 12)]
    assert replies[0] == replies[1] != replies[2]


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    health = httpx.get(server.url + "/health", trust_env=False).json()
    assert health == {"status": "ok", "model": "tiny", "active": 0, "waiting": 0, "max_batch": MAX_BATCH}


def test_concurrent_greedy_replies_equal_one_at_a_time(server):
    client = server.client()
    questions = [f"What is {i} * {i + 3}? " + "Think. " * i for i in range(8)]

    def reply(q):
        r = client.chat.completions.create(model="tiny", messages=ask(q), max_tokens=24, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

    alone = [reply(q) for q in questions]
    server.engine.stats.peak_batch = 0
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(reply, questions))
    assert together == alone
    assert server.engine.stats.peak_batch == MAX_BATCH
    assert len({text for text, _, _ in alone}) > 4


def test_load_and_a_client_that_walks_away(server):
    client = server.client()

    def one(i):
        kwargs = dict(model="tiny", max_tokens=8 + i % 5, temperature=0.7, seed=i)
        if i % 2:
            chunks = list(client.chat.completions.create(messages=ask(f"q{i}"), stream=True, **kwargs))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        r = client.completions.create(prompt=f"p{i}", **kwargs)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
        return r.choices[0].text

    with ThreadPoolExecutor(10) as pool:            # 50 requests from 10 clients
        replies = list(pool.map(one, range(50)))
    assert len(replies) == 50 and all(isinstance(r, str) for r in replies)

    # A client reads a little of a long stream and disconnects: its row is free at once.
    body = {"model": "tiny", "messages": ask("go on"), "max_tokens": 10_000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, trust_env=False, timeout=60) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        next(events), next(events)                  # the role, then the first token: it holds a row
        assert server.engine.load()["active"] == 1
    deadline = time.monotonic() + 5
    while server.engine.load()["active"]:
        assert time.monotonic() < deadline, "the disconnected stream kept its row"
        time.sleep(0.01)
    # ... and the next requests still run at full batch.
    server.engine.stats.peak_batch = 0
    with ThreadPoolExecutor(MAX_BATCH) as pool:
        list(pool.map(lambda i: client.chat.completions.create(model="tiny", messages=ask(f"again {i}"),
                                                              max_tokens=40, temperature=1.0, seed=i), range(MAX_BATCH)))
    assert server.engine.stats.peak_batch == MAX_BATCH


GOOD = {"model": "tiny", "messages": ask("hi"), "max_tokens": 3}
BAD = [  # (path, body, status, param, code)
    ("/v1/chat/completions", "{not json", 400, None, "invalid_json"),
    ("/v1/chat/completions", "[1, 2]", 400, None, "invalid_type"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages", "missing_field"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt", "missing_field"),
    ("/v1/chat/completions", {**GOOD, "messages": "hi"}, 400, "messages", "invalid_type"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user"}]}, 400, "messages.0.content", "missing_field"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "messages": ask("a") + ask("b")}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("/v1/chat/completions", {**GOOD, "temperature": -1}, 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    ("/v1/chat/completions", {**GOOD, "n": 2}, 400, "n", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "stop": 7}, 400, "stop", "invalid_type"),
    ("/v1/chat/completions", {**GOOD, "stop": ["a", 7]}, 400, "stop", "invalid_type"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400,
     "messages.0.content", "invalid_type"),
    ("/v1/chat/completions", {**GOOD, "seed": 2**64}, 400, "seed", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "top_k": -1}, 400, "top_k", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "messages": ask("word " * 1100)}, 400, "messages", "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 1100}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {**GOOD, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/nothing", {}, 404, None, "not_found"),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD, ids=[f"{b[4]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_with_an_openai_error_and_the_server_goes_on(server, path, body, status, param, code):
    response = server.post(path, body if isinstance(body, str) else json.dumps(body),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"]
    assert server.post("/v1/chat/completions", json.dumps(GOOD)).json()["choices"][0]["finish_reason"]


def test_wrong_method_is_405(server):
    response = httpx.get(server.url + "/v1/chat/completions", trust_env=False)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def command(capsys, *argv: str) -> tuple[int, str]:
    """model.serve.api's main as the program runs it: -> (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit:
        run_command(lambda: serve.main(list(argv)))
    return exit.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, status, message", [
    ((), 2, "the following arguments are required: path"),
    (("RUN", "--port", "http"), 2, "argument --port: expected a whole number, got 'http'"),
    (("RUN", "--port", "70000"), 2, "argument --port: must be at most 65535"),
    (("RUN", "--port", "0"), 2, "argument --port: must be at least 1"),
    (("RUN", "--max-batch", "0"), 2, "argument --max-batch: must be at least 1"),
    (("RUN", "--prefill-tokens", "0"), 2, "argument --prefill-tokens: must be at least 1"),
])
def test_bad_flags_are_one_line(capsys, args, status, message):
    code, err = command(capsys, *args)
    assert code == status and message in err and "Traceback" not in err


def test_missing_run_and_busy_port_are_one_line(capsys, tmp_path):
    with listen("127.0.0.1", 0) as busy:
        port = str(busy.getsockname()[1])
        busy.listen()
        code, err = command(capsys, str(make_run(tmp_path / "run")), "--port", port)
    assert code == 1 and err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1
    with listen("127.0.0.1", 0) as free:
        port = str(free.getsockname()[1])
    code, err = command(capsys, str(tmp_path / "nothing"), "--port", port)
    assert code == 1 and err.startswith("error: no checkpoint at") and err.count("\n") == 1


def test_ctrl_c_shuts_down_cleanly(tmp_path):
    run = make_run(tmp_path / "run")
    with listen("127.0.0.1", 0) as free:
        port = free.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "model.serve", str(run), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", trust_env=False).json()["data"][0]["id"] == "run"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err and f"on http://127.0.0.1:{port}" in out
    assert "Shutting down" in err or "Finished server process" in err



def test_quantize_flag_serves_the_quantized_model(tmp_path):
    parser = argparse.ArgumentParser()
    serve.add_engine_flags(parser)
    with listen("127.0.0.1", 0) as free:
        port = str(free.getsockname()[1])
    engine, name, sock = serve.start_engine(parser.parse_args([str(make_run(tmp_path / "run")), "--port", port,
                                                               "--quantize", "int8", "--max-batch", "2"]))
    sock.close()
    try:
        assert name == "run" and quantized_format(engine.model) == {"format": "int8", "head": False}
        replies = [engine.stream(Request([1, 2, 3], max_tokens=6, temperature=0)) for _ in range(3)]
        assert all(list(r)[-1].completion_tokens >= 1 for r in replies)
    finally:
        engine.close()
