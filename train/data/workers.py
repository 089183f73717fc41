"""Inspection on every core: documents cleaned, filtered, hashed and MinHashed in worker processes,
their verdicts handed back in corpus order.

inspect_corpus reads the documents in the calling process, sends them in batches of about
BATCH_BYTES to a pool of worker processes and yields each document's Verdict (train/data/filters.py)
in corpus order, with at most IN_FLIGHT batches per worker sent and not yet consumed: its memory is
bounded by the workers, not by the corpus. The decisions that depend on earlier documents (exact and
near duplicates, the split) stay with the caller, in that order (train/data/prepare.py), so the
result is the same for any number of workers. One worker, or a corpus of a single batch, runs in
the calling process without a pool. The pool starts its processes with forkserver (spawn where
there is none), never fork, which would copy the locks of the caller's threads (torch's, a progress
bar's) in whatever state they are; as with spawn, the workers import the main module, so a script
that calls prepare() does so under `if __name__ == "__main__":`.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator

from train.data.filters import FilterConfig, Inspector, Verdict

BATCH_BYTES = 1 << 20                  # text per task: about 0.1-0.2 s of work, so the hand-offs cost little
IN_FLIGHT = 2                          # batches per worker sent ahead: one working, one waiting

_inspector: Inspector | None = None    # a worker process's own, made once by _start


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), the default number of workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:             # no affinity on this platform (macOS, Windows)
        return os.cpu_count() or 1


def check_workers(value: int) -> None:
    """The check of the workers flag: at least 1."""
    if value < 1:
        raise ValueError(f"must be at least 1 (worker processes; default: every core, {available_cores()} here), "
                         f"got {value}")


def _start(config: FilterConfig, seed: int) -> None:
    global _inspector
    _inspector = Inspector(config, seed)
    # A worker killed with its parent would otherwise block forever on a full result pipe.
    threading.Thread(target=_exit_with, args=(multiprocessing.parent_process(),), daemon=True).start()


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()                      # returns when the process that started this one has ended
    os._exit(1)


def _inspect_batch(texts: list[str]) -> list[Verdict]:
    return [_inspector(text) for text in texts]


def _batches(documents: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc[1])
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def inspect_corpus(documents: Iterable[tuple[str, str]], config: FilterConfig, seed: int,
                   workers: int) -> Iterator[tuple[str, Verdict]]:
    """(doc_id, its Verdict) for each document, in the order given, inspected by `workers` processes."""
    batches = _batches(documents)
    head = list(itertools.islice(batches, 2))
    batches = itertools.chain(head, batches)
    if workers == 1 or len(head) < 2:
        inspect = Inspector(config, seed)
        for batch in batches:
            for doc_id, text in batch:
                yield doc_id, inspect(text)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload([__name__])       # the server imports numpy and the filters once
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start, initargs=(config, seed))
    pending: deque[tuple[list[str], Future]] = deque()
    try:
        for batch in batches:
            pending.append(([doc_id for doc_id, _ in batch], pool.submit(_inspect_batch, [t for _, t in batch])))
            if len(pending) >= IN_FLIGHT * workers:
                doc_ids, future = pending.popleft()
                yield from zip(doc_ids, future.result())
        while pending:
            doc_ids, future = pending.popleft()
            yield from zip(doc_ids, future.result())
    except BrokenProcessPool:
        raise ChildProcessError(
            "a data preparation worker process died: killed (out of memory? run it again with fewer --workers), "
            "or it failed to start (a script that calls prepare() must do so under if __name__ == '__main__'); "
            "nothing was written") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
