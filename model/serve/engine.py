"""Continuous batching: many requests decode together, one batched forward per step.

The engine owns the model and a SlotCache (model/cache.py) with max_batch rows of keys and values. A
scheduler thread loops:
  1. admit: the requests waiting (as many as rows are free) are prefilled together: their prompts,
     back to back in one (1, total) row, go through ONE forward (SlotCache.select_packed: each
     prompt writes its keys into its own fresh row from position 0 and attends only to them,
     through kernels.varlen_attention), which gives each prompt's last logits, and each samples its
     first token. The other rows are untouched. Packs hold at most prefill_tokens prompt tokens; a
     prompt that fits no pack, or arrives alone, is prefilled alone into its row (plain causal
     attention, the training kernels on a GPU);
  2. step: one forward of (n, 1) tokens for the n active rows, each at its own position (RoPE per
     row, keys written at each row's own length, attention masked to each row's own keys), then one
     token per row, sampled with that request's parameters and its own seeded torch.Generator;
  3. retire: a request that hit a stop token, a stop string, max_tokens or the end of the context,
     or whose client went away, leaves at once; the last active row moves into its place, so the
     active rows are always 0..n-1 and a step reads the cache as a view, with no gather. Every
     special token of the tokenizer is a stop token: <|end|>, <|endoftext|> or a role tag ends a
     turn or a document, and none is ever part of a reply's text.
A request waits only for free rows, never for the others to finish. Prefills run between two
steps, one forward per pack of prompts, so long prompts delay the others' next token by their
prefill (chunked prefill would bound that). Because every request samples from its own generator and a
greedy row is an argmax of its own logits, a reply does not depend on what else is in the batch
(beyond float rounding in the batched matmuls): decoded alone, it is what model.generate gives for
the same prompt and seed, token for token.

Replies come back as text: each request detokenizes its ids as they come, holds back a split UTF-8
character and any tail that could still grow into one of its stop strings, and reports Deltas to
its consumer (engine.stream for threads, engine.astream for asyncio).
"""
from __future__ import annotations

import asyncio
import queue
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

import torch

from model.cache import SlotCache
from model.gpt import GPT
from model.generate import check_sampling, sample_next


class PromptTooLong(ValueError):
    """A prompt that leaves no room in the model's context (or is empty)."""


@dataclass
class Request:
    """One completion: prompt ids in, up to max_tokens ids out (None: until the context is full)."""
    prompt: list[int]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()                 # strings that end the reply (not part of its text)
    seed: int | None = None                    # None: a fresh random seed


@dataclass
class Delta:
    """What a request adds to its reply: new text, and at the end why it ended and the usage."""
    text: str
    finish_reason: str | None = None           # "stop", "length", or "error" (then text is the message)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TextStream:
    """A reply's ids -> its text, released as soon as it is certain: not while it ends in a split
    UTF-8 character (U+FFFD) or in a prefix of one of the stop strings, which may still complete."""

    def __init__(self, tok, stop: tuple[str, ...]):
        self.tok, self.stop = tok, stop
        self.ids: list[int] = []
        self.shown = 0                         # characters released so far

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; -> (newly certain text, whether a stop string ended the reply there)."""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.shown - len(s))) for s in self.stop) if i >= 0]
        if hits:
            return self._release(text[:min(hits)]), True
        held = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        if text.endswith("\ufffd"):
            held = max(held, len(text) - len(text.rstrip("\ufffd")))
        return self._release(text[:len(text) - held]), False

    def flush(self) -> str:
        """The text still held back, at the end of the reply."""
        return self._release(self.tok.decode(self.ids))

    def _release(self, text: str) -> str:
        new = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return new


@dataclass(eq=False)
class Sequence:
    """A request inside the engine: its sampling state and where its reply goes."""
    request: Request
    sink: Callable[[Delta], None]
    text: TextStream
    generator: torch.Generator
    generated: int = 0
    last: int = 0                              # the newest token, the input of the next step
    cancelled: bool = False
    done: bool = False

    @property
    def greedy(self) -> bool:
        return self.request.temperature == 0 or self.request.top_k == 1


@dataclass
class Stats:
    """Counters of the engine's work since it started."""
    steps: int = 0                             # batched decoding steps
    prefills: int = 0                          # prefill forwards (one prompt, or a pack of several)
    prefilled: int = 0                         # prompts prefilled
    tokens: int = 0                            # tokens generated
    peak_batch: int = 0                        # the most rows one step decoded
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=1000))   # rows of the last 1000 steps


class Engine:
    """The model behind a scheduler thread that decodes every admitted request in one batch."""

    def __init__(self, model: GPT, tok, max_batch: int = 16, prefill_tokens: int = 4096):
        """prefill_tokens: the most prompt tokens one prefill forward packs (requests admitted
        together are packed in arrival order; a longer prompt is prefilled alone; 1 prefills every
        prompt alone). It bounds the memory of a prefill forward."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1, got {prefill_tokens}")
        self.model, self.tok, self.max_batch = model.eval(), tok, max_batch
        self.prefill_tokens = prefill_tokens
        self.block_size = model.cfg.block_size
        self.special_ids = frozenset(tok.special_tokens.values())
        self.device = model.embed.weight.device
        self.cache = SlotCache(model.cfg, max_batch, self.device, model.embed.weight.dtype)
        self.active: list[Sequence] = []       # row i of the cache holds active[i]
        self.waiting: list[Sequence] = []
        self.stats = Stats()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, sink: Callable[[Delta], None]) -> Sequence:
        """Queue a request; sink receives its Deltas from the engine thread, the last with a
        finish_reason. Raises ValueError for a request the model cannot serve."""
        n = len(request.prompt)
        if not 1 <= n < self.block_size:
            raise PromptTooLong(f"the prompt is {n} tokens; this model's context is {self.block_size} tokens, "
                             f"so a prompt must have 1 to {self.block_size - 1}: shorten it")
        if request.max_tokens is not None and request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        check_sampling(request.temperature, request.top_k, request.top_p)
        seed = secrets.randbits(63) if request.seed is None else request.seed
        generator = torch.Generator(self.device).manual_seed(seed)
        seq = Sequence(request, sink, TextStream(self.tok, tuple(request.stop)), generator)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self.waiting.append(seq)
            self._wake.notify()
        return seq

    def stream(self, request: Request) -> Iterator[Delta]:
        """Submit now (a ValueError is raised here) and return the Deltas, to read in this thread;
        closing the iterator cancels the request."""
        deltas: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        seq = self.submit(request, deltas.put)

        def read() -> Iterator[Delta]:
            try:
                while (delta := deltas.get()).finish_reason is None:
                    yield delta
                yield delta
            finally:
                self.cancel(seq)
        return read()

    def astream(self, request: Request) -> AsyncIterator[Delta]:
        """Submit now (a ValueError is raised here) and return the Deltas, to read on the running
        event loop; when the reader stops early (its client disconnected and its task was
        cancelled), the request leaves the batch at the next step."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        seq = self.submit(request, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d))

        async def read() -> AsyncIterator[Delta]:
            try:
                while (delta := await deltas.get()).finish_reason is None:
                    yield delta
                yield delta
            finally:
                self.cancel(seq)
        return read()

    def cancel(self, seq: Sequence) -> None:
        """Take seq out of the batch at the next step (or out of the queue); nothing more is sent."""
        with self._wake:
            seq.cancelled = True
            self._wake.notify()

    def load(self) -> dict:
        """Rows in use and requests waiting, for /health."""
        with self._wake:
            return {"active": len(self.active), "waiting": len(self.waiting), "max_batch": self.max_batch}

    def close(self) -> None:
        """Stop the scheduler; requests still running or waiting end with an error Delta."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        for seq in self.active + self.waiting:
            self._finish(seq, "error", "the server is shutting down")
        self.active, self.waiting = [], []

    # The scheduler thread.

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self.active and not self.waiting:
                        self._wake.wait()
                    if self._closed:
                        return
                    free = self.max_batch - len(self.active)
                    admitted, self.waiting = self.waiting[:free], self.waiting[free:]
                for pack in self._packs([seq for seq in admitted if not seq.cancelled]):
                    try:
                        self._prefill(pack)
                    except Exception as e:     # fails these requests only; _retire frees their rows
                        for seq in pack:
                            self._finish(seq, "error", f"generation failed: {type(e).__name__}: {e}")
                try:
                    self._retire()
                    if self.active:
                        self._step()
                        self._retire()
                except Exception as e:         # a failed step fails its batch, never the server
                    for seq in self.active:
                        self._finish(seq, "error", f"generation failed: {type(e).__name__}: {e}")
                    self.active = []

    def _packs(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """seqs in order, cut into packs of at most prefill_tokens prompt tokens (a longer prompt alone)."""
        packs: list[list[Sequence]] = []
        size = 0
        for seq in seqs:
            n = len(seq.request.prompt)
            if packs and size + n <= self.prefill_tokens:
                packs[-1].append(seq)
                size += n
            else:
                packs.append([seq])
                size = n
        return packs

    def _prefill(self, pack: list[Sequence]) -> None:
        """One forward of the pack's prompts into the next free rows, and each one's first token."""
        row, n = len(self.active), len(pack)
        self.active.extend(pack)
        prompts = [seq.request.prompt for seq in pack]
        if n == 1:                  # the plain causal case: one row from position 0
            self.cache.reset(row)
            self.cache.select(slice(row, row + 1))
            documents = None
        else:                       # back to back in one row, each prompt into its own cache row
            documents = self.cache.select_packed(slice(row, row + n), [len(p) for p in prompts])
        idx = torch.tensor([[t for p in prompts for t in p]], device=self.device)        # (1, total)
        logits = self.model(idx, cache=self.cache, last_only=True, documents=documents)[:, -1]   # (n, V)
        self.stats.prefills += 1
        self.stats.prefilled += n
        for seq, token in zip(pack, self._sample(logits, pack).tolist()):
            self._emit(seq, token)

    def _step(self) -> None:
        n = len(self.active)
        self.cache.select(slice(0, n))
        idx = torch.tensor([[s.last] for s in self.active], device=self.device)          # (n, 1)
        logits = self.model(idx, cache=self.cache, last_only=True)[:, -1]                # (n, V)
        self.stats.steps += 1
        self.stats.peak_batch = max(self.stats.peak_batch, n)
        self.stats.batch_sizes.append(n)
        for seq, token in zip(self.active, self._sample(logits, self.active).tolist()):
            self._emit(seq, token)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row of logits (n, V): greedy rows by one argmax, each sampled row with
        its own parameters and generator (so its draws do not depend on its neighbours)."""
        tokens = logits.argmax(dim=-1)                                                   # (n,)
        for i, seq in enumerate(seqs):
            if not seq.greedy:
                r = seq.request
                tokens[i] = sample_next(logits[i:i + 1], r.temperature, r.top_k, r.top_p, seq.generator)[0]
        return tokens

    def _emit(self, seq: Sequence, token: int) -> None:
        """Account for a new token of seq and send what it adds to the reply; finish seq when it ends."""
        seq.generated += 1
        seq.last = token
        self.stats.tokens += 1
        if token in self.special_ids:          # ends the turn or the document, never part of the text
            self._finish(seq, "stop", seq.text.flush())
            return
        text, stopped = seq.text.push(token)
        row = self.active.index(seq)
        if stopped:
            self._finish(seq, "stop", text)
        elif seq.generated == seq.request.max_tokens or self.cache.row_length(row) >= self.block_size:
            # the next step would write position lengths[row], past the context's last, block_size - 1
            self._finish(seq, "length", text + seq.text.flush())
        elif text:
            self._send(seq, Delta(text))

    def _finish(self, seq: Sequence, reason: str, text: str) -> None:
        if not seq.done:
            seq.done = True
            self._send(seq, Delta(text, reason, len(seq.request.prompt), seq.generated))

    @staticmethod
    def _send(seq: Sequence, delta: Delta) -> None:
        """Hand a Delta to seq's consumer; one that is gone (its event loop closed) cancels seq only."""
        if seq.cancelled:
            return
        try:
            seq.sink(delta)
        except Exception:
            seq.cancelled = True

    def _retire(self) -> None:
        """Drop finished and cancelled rows; the last row moves into each hole."""
        for row in range(len(self.active) - 1, -1, -1):
            seq = self.active[row]
            if seq.done or seq.cancelled:
                seq.done = True
                last = len(self.active) - 1
                if row != last:
                    self.cache.move(last, row)
                    self.active[row] = self.active[last]
                self.active.pop()
