"""Progress of the long phases around training: DPO's sampling of replies, exact match on the
held-out tasks, HumanEval, lm-eval and data preparation. Each is a tqdm bar on stderr with a count,
a rate and an ETA (elapsed time alone where the amount of work is unknown), never on stdout, whose
lines tests and scripts parse.

A phase must never be silent for more than a few seconds, also while one slow item runs (a batch
of generations, a program under test, the tokenizer's training), so a thread redraws the bar every
few seconds without waiting for an update. Where stderr is not a terminal (a log file, a pipe, a
test's capture) each redraw is a line of its own, every LOG_INTERVAL seconds and once at the end,
instead of tqdm's carriage-return overwrites, which a log keeps as one ever-growing line.
"""
from __future__ import annotations

import sys
import threading
from typing import TextIO

from tqdm import tqdm

TTY_INTERVAL, LOG_INTERVAL = 1.0, 5.0      # most seconds between two redraws: on a terminal, in a log


class Lines:
    """A stream for tqdm that writes each redraw of a bar as a whole line: carriage returns, cursor
    moves and the blank redraw that clears a bar are dropped."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class Progress(tqdm):
    """A tqdm bar that a thread also redraws every `interval` seconds without an update, so the
    elapsed time and the ETA keep moving while one slow item runs. Use it as a context manager (or
    close it): closing stops the thread."""

    def __init__(self, *args, interval: float = TTY_INTERVAL, **kwargs):
        super().__init__(*args, **kwargs)
        self._stop = threading.Event()
        self._redrawn = 0.0
        self._thread = None
        if not self.disable:
            self._thread = threading.Thread(target=self._redraw_every, args=(interval,), daemon=True)
            self._thread.start()

    def _redraw_every(self, interval: float) -> None:
        while not self._stop.wait(interval):
            # tqdm's own update draws at most every mininterval and stamps last_print_t; only a bar
            # that neither drew nor was redrawn here for a whole interval is redrawn.
            if self._time() - max(self.last_print_t, self._redrawn) >= interval:
                self.refresh()
                self._redrawn = self._time()

    def close(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        super().close()


def progress(total: int | float | None, desc: str, unit: str = "it", show: bool = True, leave: bool = True,
             **tqdm_kwargs) -> Progress:
    """A progress bar on stderr for a phase of `total` items (None: unknown; elapsed time and the count
    only). show=False shows nothing: a process other than the main one, or a quiet run. leave=False
    clears a terminal's bar when the phase ends (a phase inside training); a log keeps its last line
    anyway, the count reached. Further keywords go to tqdm (unit_scale, bar_format, ...)."""
    stream = sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):         # no stream, or a closed one
        terminal = False
    if terminal:
        return Progress(total=total, desc=desc, unit=unit, disable=not show, leave=leave, file=stream,
                        dynamic_ncols=True, interval=TTY_INTERVAL, **tqdm_kwargs)
    # position=0: a log has no lines to move between, whatever other bars are open (the training loop's).
    return Progress(total=total, desc=desc, unit=unit, disable=not show, leave=True, file=Lines(stream),
                    position=0, mininterval=LOG_INTERVAL, miniters=1, interval=LOG_INTERVAL, **tqdm_kwargs)
