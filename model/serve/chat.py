"""Chat with a trained run in the terminal: `python -m model.chat RUN_OR_CKPT`.

Replies stream token by token. The whole conversation is the context of each reply (rendered with
the chat template of model/chat_format.py, the one SFT and DPO trained on); the oldest turns are
dropped when it no longer fits in the model's block_size. Type /reset to forget the conversation,
/quit (or Ctrl-D) to leave. When stdin is not a terminal, all of it is one prompt: the reply is
printed and the program exits, e.g. `echo "What is 2 + 3?" | python -m model.chat runs/sft-...`.
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

import torch

from tritongpt import kernels
from tritongpt.kernels.quantization import FORMATS
from model import GPT
from model.chat_format import ChatTokens, fit_history, render_prompt, reply_text
from model.io.checkpoint import load_model, load_tokenizer
from model.command import DEBUG_HELP, Parser, at_least, at_most, flag_type, greater_than, pick_device, run_command
from model.generate import generate
from model.io.quantized import QUANTIZE_HELP


class Chat:
    """A conversation with a model: history, context fitting and streamed sampling."""

    def __init__(self, model: GPT, tok, temperature: float, top_k: int | None, top_p: float | None,
                 max_tokens: int, seed: int | None):
        self.model, self.tok = model.eval(), tok
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.max_tokens, self.seed = max_tokens, seed
        self.stop = ChatTokens.of(tok).stop
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def _prompt(self) -> list[int]:
        """The rendered history, without its oldest exchanges while it leaves no room to answer."""
        budget = self.model.cfg.block_size - min(self.max_tokens, self.model.cfg.block_size // 2)
        self.history = fit_history(self.history, self.tok, budget)
        return render_prompt(self.history, self.tok)

    def reply(self, text: str, out: TextIO) -> str:
        """Answer the user's text, writing the reply to out as it is generated; returns the reply."""
        message = {"role": "user", "content": text}
        alone = len(render_prompt([message], self.tok))
        if alone >= self.model.cfg.block_size:      # refused before any history is given up for it
            raise ValueError(f"message too long: {alone} tokens with the template; this model sees at "
                             f"most {self.model.cfg.block_size}")
        self.history.append(message)
        ids = self._prompt()
        room = self.model.cfg.block_size - len(ids)
        new_ids: list[int] = []
        shown = 0

        def stream(token: torch.Tensor) -> None:
            # Decode everything so far and print what is new, holding back a split UTF-8 character.
            nonlocal shown
            new_ids.append(int(token[0]))
            text_so_far = reply_text(new_ids, self.tok)
            if not text_so_far.endswith("\ufffd") and len(text_so_far) > shown:
                out.write(text_so_far[shown:])
                out.flush()
                shown = len(text_so_far)

        device = next(self.model.parameters()).device
        generate(self.model, torch.tensor([ids], device=device), min(self.max_tokens, room),
                 stop_tokens=self.stop, seed=self.seed, on_token=stream, **self.sampling)
        answer = reply_text(new_ids, self.tok)
        out.write(answer[shown:] + "\n")
        out.flush()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def interactive(chat: Chat, out: TextIO) -> None:
    print("chat: /reset forgets the conversation, /quit or Ctrl-D leaves", file=out)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print(file=out)
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            chat.reset()
            print("(conversation cleared)", file=out)
        elif text:
            out.write("assistant> ")
            try:
                chat.reply(text, out)
            except ValueError as e:
                print(f"\n{e}", file=out)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m model.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="run directory or checkpoint (with tokenizer.json in its run directory)")
    parser.add_argument("--temperature", type=flag_type(float, at_least(0)), default=0.7,
                        help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-k", type=flag_type(int, at_least(0)), default=50,
                        help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=flag_type(float, greater_than(0), at_most(1)), default=0.95,
                        help="nucleus sampling mass (1: off)")
    parser.add_argument("--max-tokens", type=flag_type(int, at_least(1)), default=256, help="longest reply in tokens")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one per reply)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    parser.add_argument("--kernels", type=kernels.spec_type, default="auto",
                        help="kernel backends, as for training (auto, triton, torch, ...)")
    parser.add_argument("--quantize", choices=FORMATS, default=None, help=QUANTIZE_HELP)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with kernels.use(args.kernels):
        talk(args)


def talk(args: argparse.Namespace) -> None:
    """Load the run and answer: a terminal session, or the one prompt piped to stdin."""
    model, _ = load_model(args.path, pick_device(args.device), quantize=args.quantize)
    chat = Chat(model, load_tokenizer(args.path), args.temperature, args.top_k or None,
                args.top_p, args.max_tokens, args.seed)
    if sys.stdin.isatty():
        interactive(chat, sys.stdout)
        return
    prompt = sys.stdin.read().strip()
    if not prompt:
        raise SystemExit("stdin was empty: pipe a prompt in, or run in a terminal to chat")
    try:
        chat.reply(prompt, sys.stdout)
    except ValueError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    run_command(main)
