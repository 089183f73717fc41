"""An OpenAI-compatible HTTP server on the batching engine: `python -m model.serve RUN`.

Endpoints: GET /v1/models, GET /health, POST /v1/chat/completions (messages, rendered with the chat
template of model/chat_format.py) and POST /v1/completions (a prompt continued as a document after
<|endoftext|>). Both take max_tokens (or max_completion_tokens), temperature, top_p, top_k (an
extension), stop (a string or a list), seed and stream; a stream is Server-Sent Events in the
OpenAI chunk schema, ending with `data: [DONE]`. Every request joins the engine's batch (model/serve/engine.py).
Both end a reply at the first special token the model emits (<|end|>, <|endoftext|>, a role tag),
with finish_reason "stop" and without the token's text: a chat run's completion ends where the
model ends its turn, often at once (ask a chat run through /v1/chat/completions).

A bad request is answered 4xx with OpenAI's error body {"error": {"message", "type", "param",
"code"}}: the body is parsed and checked here, not by the framework, so that invalid JSON, a missing
field, a wrong type or range, a prompt that does not fit the context and an unknown model each get
their own message and code. The chat template has no system role: system messages are put before
the next user message's text. A client that disconnects from a stream cancels its request: its row
is free at the engine's next step. Ctrl-C stops taking connections, waits a few seconds for running
replies, and exits. Needs the `serve` extra (FastAPI, uvicorn).
"""
from __future__ import annotations

import argparse
import json
import secrets
import socket
import time
from pathlib import Path
from typing import AsyncIterator, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from tritongpt import kernels
from tritongpt.kernels.quantization import FORMATS
from model.chat_format import ChatTokens, render_prompt
from model.io.checkpoint import load_model, load_tokenizer
from model.command import DEBUG_HELP, Parser, at_least, at_most, flag_type, pick_device, run_command
from model.serve.engine import Delta, Engine, PromptTooLong, Request
from model.io.quantized import QUANTIZE_HELP

SHUTDOWN_GRACE_S = 3        # how long Ctrl-C waits for running replies before cutting them


class ApiError(Exception):
    """A request the server refuses, with what OpenAI's error body says about it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> Response:
        return json_response({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                        "code": self.code}}, self.status)


class Sampling(BaseModel):
    """The fields both endpoints share. Strict: "5" is not a number and 1 is not a bool."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)                      # an extension: 0 is off
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)      # what torch.Generator takes
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(Sampling):
    messages: list[Message]


class CompletionBody(Sampling):
    prompt: str


FIELDS = {name for schema in (ChatBody, CompletionBody, Message, TextPart) for name in schema.model_fields}


def json_response(payload: dict, status: int = 200) -> Response:
    # json.dumps escapes non-ASCII, so a lone surrogate that a model can emit still encodes.
    return Response(json.dumps(payload), status, media_type="application/json")


async def parse(http: HttpRequest, schema: type[Sampling]) -> Sampling:
    try:
        payload = json.loads(await http.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    try:
        return schema.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        # The path to the field, without the names pydantic adds for each type of a union.
        path = first["loc"][:next((i for i, part in enumerate(first["loc"])
                                   if not isinstance(part, int) and part not in FIELDS), len(first["loc"]))]
        param = ".".join(map(str, path)) or None
        code = ("missing_field" if first["type"] == "missing" else "invalid_type" if first["type"].endswith("_type")
                else "invalid_value")
        raise ApiError(400, f"{param or 'body'}: {first['msg']}" if param else first["msg"], param, code) from None


def chat_messages(messages: list[Message]) -> list[dict]:
    """The messages as the chat template takes them: system text goes before the next user turn's."""
    out, system = [], []
    for m in messages:
        if m.role == "system":
            system.append(m.text())
        elif m.role == "user":
            out.append({"role": "user", "content": "\n\n".join([*system, m.text()])})
            system = []
        else:
            out.append({"role": "assistant", "content": m.text()})
    return out


class Api:
    """The OpenAI-compatible endpoints over one engine and the model's name."""

    def __init__(self, engine: Engine, name: str):
        self.engine, self.name, self.tok = engine, name, engine.tok
        self.chat_tokens = ChatTokens.of(self.tok)

    def request(self, body: Sampling, prompt: list[int]) -> Request:
        """The engine's request for a checked body and its prompt ids (no stop tokens: the engine
        ends every reply at the model's, its special tokens)."""
        if body.model is not None and body.model != self.name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {self.name!r} "
                                f"(GET /v1/models)", "model", "model_not_found")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        return Request(prompt, body.max_completion_tokens or body.max_tokens, body.temperature, body.top_k or None,
                       body.top_p, stop=tuple(s for s in stop if s), seed=body.seed)

    async def chat(self, http: HttpRequest) -> Response:
        body = await parse(http, ChatBody)
        try:
            prompt = render_prompt(chat_messages(body.messages), self.tok)
        except ValueError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        return await self.complete(body, self.request(body, prompt), "messages", chat=True)

    async def completion(self, http: HttpRequest) -> Response:
        body = await parse(http, CompletionBody)
        request = self.request(body, [self.chat_tokens.bos, *self.tok.encode(body.prompt)])
        return await self.complete(body, request, "prompt", chat=False)

    async def complete(self, body: Sampling, request: Request, prompt_param: str, chat: bool) -> Response:
        try:
            deltas = self.engine.astream(request)
        except PromptTooLong as e:
            raise ApiError(400, str(e), prompt_param, "context_length_exceeded") from None
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        except RuntimeError as e:                      # the engine closed: shutting down
            raise ApiError(503, str(e), kind="server_error", code="shutting_down") from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
                "model": self.name, "system_fingerprint": None}
        if body.stream:
            usage_chunk = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(sse(deltas, head, chat, usage_chunk), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = []
        async for delta in deltas:
            text.append(delta.text)
        if delta.finish_reason == "error":
            raise ApiError(500, delta.text, kind="server_error", code="generation_failed")
        reply = "".join(text)
        choice = ({"message": {"role": "assistant", "content": reply}} if chat else {"text": reply})
        return json_response({**head, "object": "chat.completion" if chat else "text_completion",
                              "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": delta.finish_reason}],
                              "usage": usage(delta)})


def usage(last: Delta) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


async def sse(deltas: AsyncIterator[Delta], head: dict, chat: bool, usage_chunk: bool) -> AsyncIterator[str]:
    """The reply as OpenAI's stream: a chunk per Delta (the chat's first names the role), the last
    with the finish_reason and the usage, then with stream_options.include_usage a usage chunk
    without choices, then [DONE]. A generation error is an error event."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None = None, role: bool = False, **extra) -> str:
        if chat:
            choice = {"delta": ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})}
        else:
            choice = {"text": text or ""}
        payload = {**head, "object": obj, "choices": [{"index": 0, **choice, "logprobs": None,
                                                       "finish_reason": finish}], **extra}
        return f"data: {json.dumps(payload)}\n\n"

    if chat:
        yield chunk("", role=True)
    async for delta in deltas:
        if delta.finish_reason == "error":
            error = {"message": delta.text, "type": "server_error", "param": None, "code": "generation_failed"}
            yield f"data: {json.dumps({'error': error})}\n\n"
        elif delta.finish_reason is not None:
            if delta.text:
                yield chunk(delta.text)
            yield chunk(None if chat else "", delta.finish_reason, usage=usage(delta))
            if usage_chunk:
                yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': usage(delta)})}\n\n"
        else:
            yield chunk(delta.text)
    yield "data: [DONE]\n\n"


def build_app(engine: Engine, name: str) -> FastAPI:
    """The FastAPI app of the OpenAI-compatible API over engine, serving the model as `name`."""
    api = Api(engine, name)
    app = FastAPI(title="tritongpt", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, lambda http, e: e.response())
    app.add_exception_handler(HTTPException, lambda http, e: ApiError(
        e.status_code, f"{http.method} {http.url.path}: {e.detail}", code="not_found" if e.status_code == 404
        else "method_not_allowed" if e.status_code == 405 else None).response())
    app.add_exception_handler(Exception, lambda http, e: ApiError(
        500, f"internal error: {type(e).__name__}", kind="server_error", code="internal_error").response())
    app.post("/v1/chat/completions")(api.chat)
    app.post("/v1/completions")(api.completion)
    created = int(time.time())
    app.get("/v1/models")(lambda: {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "tritongpt"}]})
    app.get("/health")(lambda: {"status": "ok", "model": name, **engine.load()})
    return app


def listen(host: str, port: int) -> socket.socket:
    """A bound listening socket; a port in use is one line (OSError), not a server log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port or --host") from None
    return sock


def run_server(app: FastAPI, sock: socket.socket, engine: Engine) -> None:
    """Serve app on sock until Ctrl-C (or SIGTERM), then close the engine."""
    import uvicorn

    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


def add_engine_flags(parser: argparse.ArgumentParser, port: int = 8000) -> None:
    """The flags python -m model.serve and python -m model.web share: the run, where to listen, the batch and device."""
    parser.add_argument("path", help="run directory or checkpoint (with tokenizer.json in its run directory)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default loopback only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=flag_type(int, at_least(1), at_most(65535)), default=port, help=f"TCP port (default {port})")
    parser.add_argument("--max-batch", type=flag_type(int, at_least(1)), default=16,
                        help="most requests decoded together; more wait for a free row")
    parser.add_argument("--prefill-tokens", type=flag_type(int, at_least(1)), default=4096,
                        help="most prompt tokens prefilled in one forward: requests admitted together "
                             "are packed up to this (a longer prompt alone; 1: every prompt alone)")
    parser.add_argument("--quantize", choices=FORMATS, default=None, help=QUANTIZE_HELP)
    parser.add_argument("--name", default=None, help="the model's name in the API (default: the run directory's name)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    parser.add_argument("--kernels", type=kernels.spec_type, default="auto",
                        help="kernel backends, as for training (auto, triton, torch, ...)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def start_engine(args: argparse.Namespace) -> tuple[Engine, str, socket.socket]:
    """Listen first (a busy port fails before the model loads), then load the run into an engine.
    The caller holds `kernels.use(args.kernels)` for as long as the engine runs."""
    sock = listen(args.host, args.port)
    try:
        model, _ = load_model(args.path, pick_device(args.device), quantize=args.quantize)
        engine = Engine(model, load_tokenizer(args.path), args.max_batch, args.prefill_tokens)
    except BaseException:
        sock.close()
        raise
    name = args.name or Path(args.path).resolve().name
    print(f"serving {args.path} as {name!r} on http://{args.host}:{args.port} (OpenAI API under /v1; "
          f"{args.max_batch} rows; Ctrl-C stops)", flush=True)
    return engine, name, sock


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m model.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(parser)
    args = parser.parse_args(argv)
    with kernels.use(args.kernels):
        engine, name, sock = start_engine(args)
        run_server(build_app(engine, name), sock, engine)


if __name__ == "__main__":
    run_command(main)
