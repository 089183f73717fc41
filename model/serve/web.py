"""A web chat on the batching engine: `python -m model.web RUN`, then open http://127.0.0.1:7860.

Gradio's ChatInterface streams each reply as the engine produces it, with the sampling controls
(temperature, top-p, top-k, length, seed) under "Sampling" and a Reset button that forgets the
conversation. The whole conversation is the context of each reply (the chat template of
model/chat_format.py), its oldest turns dropped when it no longer fits. Every browser tab's
request joins the same engine batch, and the same server also answers python -m model.serve's OpenAI API
under /v1. Gradio stays offline: no analytics or version check, no share link, no server-side
rendering, and the default theme's fonts come from the server itself. Needs the `serve` and `web`
extras.
"""
from __future__ import annotations

import argparse
import os

# Before gradio is imported: it reads this once, and with it on it phones home.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from tritongpt import kernels  # noqa: E402
from model.chat_format import fit_history, render_prompt  # noqa: E402
from model.command import Parser, run_command  # noqa: E402
from model.serve.engine import Engine, Request  # noqa: E402
from model.serve.api import add_engine_flags, build_app, run_server, start_engine  # noqa: E402


def text_of(content) -> str:
    """A chat history entry's content as text (Gradio gives a string or a list of parts)."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)


def build_ui(engine: Engine, name: str) -> gr.Blocks:
    """The chat page: a streaming ChatInterface over engine, the sampling controls and Reset."""
    tok, block = engine.tok, engine.block_size

    def respond(message: str, history: list[dict], temperature: float, top_p: float, top_k: float,
                max_tokens: float, seed: float):
        messages = [{"role": m["role"], "content": text_of(m["content"])} for m in history]
        messages.append({"role": "user", "content": message})
        try:
            prompt = render_prompt(fit_history(messages, tok, block - min(int(max_tokens), block // 2)), tok)
            deltas = engine.stream(Request(prompt, int(max_tokens), temperature, int(top_k) or None, top_p,
                                           seed=int(seed) or None))
        except ValueError as e:
            raise gr.Error(str(e)) from None
        reply = ""
        for delta in deltas:
            if delta.finish_reason == "error":
                raise gr.Error(delta.text)
            reply += delta.text
            yield reply

    controls = [
        gr.Slider(0, 2, value=0.7, step=0.05, label="temperature (0: greedy)", render=False),
        gr.Slider(0.05, 1, value=0.95, step=0.05, label="top-p", render=False),
        gr.Slider(0, 200, value=50, step=1, label="top-k (0: off)", render=False),
        gr.Slider(1, block - 1, value=min(256, block // 2), step=1, label="max tokens", render=False),
        gr.Number(0, precision=0, label="seed (0: a fresh one each reply)", render=False),
    ]
    with gr.Blocks(title=f"tritongpt: {name}", analytics_enabled=False) as ui:
        chat = gr.ChatInterface(respond, additional_inputs=controls, title=f"tritongpt: {name}",
                                chatbot=gr.Chatbot(buttons=["copy", "copy_all"], height=480, render=False),
                                additional_inputs_accordion=gr.Accordion("Sampling", open=False, render=False),
                                concurrency_limit=None, analytics_enabled=False, fill_height=False)
        reset = gr.Button("Reset", variant="secondary")
        # ChatInterface keeps the history it sends to respond in its own state, besides what it shows.
        reset.click(lambda: ([], []), None, [chat.chatbot, chat.chatbot_state], queue=False)
    return ui


def web_app(engine: Engine, name: str) -> FastAPI:
    """The OpenAI API of model/serve/api.py with the chat page mounted at /, both on engine."""
    return gr.mount_gradio_app(build_app(engine, name), build_ui(engine, name), path="/", ssr_mode=False)


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="python -m model.web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(parser, port=7860)
    args = parser.parse_args(argv)
    with kernels.use(args.kernels):
        engine, name, sock = start_engine(args)
        print(f"web chat at http://{args.host}:{args.port}/", flush=True)
        run_server(web_app(engine, name), sock, engine)


if __name__ == "__main__":
    run_command(main)
