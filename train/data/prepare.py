"""Data pipeline: corpus -> cleaning and dedup -> BPE tokenizer -> token shards (batches: train/pretrain.py).

    python -m train.data                                   # the Python stdlib corpus, vocabulary 4096
    python -m train.data --source docs/ --vocab-size 8192 --out data/docs

prepare() makes a dataset directory, by default DATA_DIR/<source>-v<vocab size>-<hash of the resolved
source (any spelling of a path gives one) and the arguments> (train/data/sources.py dataset_name):
  manifest.json   arguments, source fingerprint, filter report, tokenizer hash, token counts
  tokenizer.json  the BPE tokenizer trained on a sample of the training documents
  train.bin       uint16 tokens when the vocabulary fits, else uint32, after a 24-byte header
  val.bin         (magic b"TGPTTOKS", u32 version, u32 bytes per token, u64 token count)
Each document is preceded by <|endoftext|>. The split is by document: a document goes to val
when a hash of (seed, doc_id) falls below val_fraction; a corpus of one document is cut at a line
break instead. The directory is built under a temporary name and renamed into place at the end,
so a dataset directory either is complete or does not exist; re-running with the same arguments
(and unchanged source files) reuses it. Each phase (filtering, the tokenizer's training, encoding
each split) shows its progress on stderr (train/progress.py) unless quiet.

Filtering runs on `workers` processes (default: every core; train/data/workers.py) and encoding on
as many of tiktoken's threads; duplicates and the split are decided in corpus order by this
process, so the dataset is byte for byte the same for any number of workers, and memory holds the
dedup index (train/data/dedup.py), 9 bytes a kept document and a few batches per worker, never the
corpus (train/data/docs.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from model.command import DEBUG_HELP, Parser, at_least, flag_type, run_command
from model.io.files import atomic_write_text
from model.tokenizer import DEFAULT_SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, check_vocab_size
from train.data.docs import filter_corpus, read_docs, tokenizer_sample
from train.data.filters import FilterConfig
from train.data.shards import read_shard, shard_dtype, write_documents, write_shard
from train.data.sources import dataset_name, resolve_source, source_fingerprint
from train.data.workers import available_cores, check_workers
from train.progress import progress

FORMAT, VERSION = "tritongpt-data", 1
MIN_VOCAB = 256 + len(DEFAULT_SPECIAL_TOKENS)
ENCODE_BATCH_BYTES = 4 << 20          # text handed to tiktoken's threads at a time


def _val_fraction(value: float) -> None:
    if not 0.0 < value <= 0.5:
        raise ValueError(f"must be in (0, 0.5], got {value:g}")


def non_empty(value: str) -> None:
    """The check of a directory flag: not empty."""
    if not value.strip():
        raise ValueError("must name a directory, got an empty string")


CHECKS = {"vocab_size": lambda v: check_vocab_size(v, DEFAULT_SPECIAL_TOKENS), "seed": at_least(0),
          "val_fraction": _val_fraction, "tokenizer_sample_bytes": at_least(1), "data_dir": non_empty,
          "workers": check_workers}


def prepare(source: str = "stdlib", out: str | Path | None = None, vocab_size: int = 4096, seed: int = 0,
            val_fraction: float = 0.01, tokenizer_sample_bytes: int = 8_000_000, verbose: bool = True,
            data_dir: str | Path = "data", tokenizer: Tokenizer | None = None, workers: int | None = None,
            **filter_thresholds) -> Path:
    """Prepare (or reuse) the dataset of source in out (default: data_dir/dataset_name(...)); its path.

    With a tokenizer (continued pretraining) the data is encoded with it instead of a new one
    trained on it; vocab_size is then the tokenizer's. workers (default: every core) processes
    filter the documents and as many threads encode them; the dataset is the same for any number."""
    source = str(source)
    if (Path(source) / "manifest.json").is_file():            # already a prepared dataset directory
        made_with = PreparedData(source).tokenizer.fingerprint
        if tokenizer is not None and made_with != tokenizer.fingerprint:
            raise ValueError(f"the prepared dataset {source} was tokenized with tokenizer {made_with}, not the "
                             f"given one ({tokenizer.fingerprint}); pass the raw corpus instead, to be "
                             f"tokenized with the given tokenizer")
        return Path(source)
    filters = FilterConfig.from_kwargs(**filter_thresholds)
    check_vocab_size(vocab_size, DEFAULT_SPECIAL_TOKENS)
    workers = available_cores() if workers is None else workers
    for name, value in dict(seed=seed, val_fraction=val_fraction, tokenizer_sample_bytes=tokenizer_sample_bytes,
                            workers=workers).items():
        try:
            CHECKS[name](value)
        except ValueError as e:
            raise ValueError(f"{name} {e}") from None
    fingerprint = source_fingerprint(source)           # first: a missing or empty source fails in its own words
    if tokenizer is not None:
        vocab_size = tokenizer.n_vocab
    args = {"source": resolve_source(source), "vocab_size": vocab_size, "seed": seed, "val_fraction": val_fraction,
            "tokenizer_sample_bytes": tokenizer_sample_bytes, "split_pattern": SPLIT_PATTERN,
            "filters": filters.as_dict(),
            "source_fingerprint": fingerprint,
            **({} if tokenizer is None else {"tokenizer": tokenizer.fingerprint})}
    out = Path(out) if out is not None else Path(data_dir) / dataset_name(args)
    blocker = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("."))
    if not blocker.is_dir():
        raise ValueError(f"{blocker} is a file, not a directory, so the dataset cannot be made in {out.parent}; "
                         f"choose another data directory (--data-dir) or --out")
    if _reusable(out, args, verbose):
        return out
    new_parent = not out.parent.exists()                     # removed again (if empty) when the build fails
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    done = False
    try:
        if verbose:
            print(f"data: preparing {args['source']} into {out}")
        _build(tmp, args, filters, verbose, workers, tokenizer)
        try:
            os.rename(tmp, out)
        except OSError:
            if not _reusable(out, args, verbose):    # another process finished the same dataset first
                raise
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if new_parent and not done:
            with contextlib.suppress(OSError):
                out.parent.rmdir()
    return out


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged (not JSON: {e}); delete {path.parent} and prepare it again") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is damaged (not a JSON object); delete {path.parent} and prepare it again")
    return manifest


def _reusable(out: Path, args: dict, verbose: bool) -> bool:
    """True when out holds a complete dataset made with args; raise if it holds anything else."""
    if not out.exists():
        return False
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{out} exists but is not a prepared dataset (no manifest.json); "
                         f"delete it or pass another out")
    manifest = _read_manifest(manifest_path)
    if manifest.get("args") != args:
        old = manifest.get("args", {})
        diff = {k: (old.get(k), v) for k, v in args.items() if old.get(k) != v}
        if list(diff) == ["source_fingerprint"]:
            raise ValueError(f"{out} was prepared from {args['source']} before its files changed (names, sizes or "
                             f"modification times differ); delete {out} to prepare it again, or name {out} "
                             f"itself as the data source to use it as it is")
        raise ValueError(f"{out} was prepared with other arguments or source contents ({{name: (then, now)}}: {diff}); "
                         f"delete it or pass another out")
    if verbose:
        print(f"data: reusing {out} ({manifest['train']['tokens']:,} train / {manifest['val']['tokens']:,} val tokens)")
    return True


def _remove_abandoned_builds(out: Path) -> None:
    """Delete temporary build directories of out left by processes that no longer run."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 2)[-2]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _build(tmp: Path, args: dict, filters: FilterConfig, verbose: bool, workers: int,
           given: Tokenizer | None = None) -> None:
    """Filter the corpus into tmp/docs.tmp, train the tokenizer (unless given), write the shards, then
    the manifest."""
    t0 = time.perf_counter()
    docs_path = tmp / "docs.tmp"
    docs, keep = filter_corpus(args["source"], docs_path, filters, args["seed"], args["val_fraction"], verbose,
                                workers)
    t1 = time.perf_counter()
    with open(docs_path, "rb") as f:
        sample = [] if given else read_docs(f, tokenizer_sample(docs, args["tokenizer_sample_bytes"], args["seed"]))
    sample_bytes = sum(len(t.encode("utf-8")) for t in sample)
    if given:
        tok = given
    else:
        # One call learns every merge and reports nothing: the bar shows the time it has taken so far.
        with progress(None, f"tokenizer: learning {args['vocab_size']:,} tokens from {sample_bytes:,} bytes",
                      show=verbose, bar_format="{desc} [{elapsed}]"):
            tok = Tokenizer.train(sample, args["vocab_size"])
    if tok.n_vocab < args["vocab_size"]:
        print(f"data: warning: the tokenizer sample ({sample_bytes:,} bytes) ran out of "
              f"token pairs: {tok.n_vocab} tokens instead of {args['vocab_size']}; a larger "
              f"--tokenizer-sample-bytes or corpus, or a smaller --vocab-size, gives the full vocabulary",
              file=sys.stderr)
    tok.save(tmp / "tokenizer.json")
    t2 = time.perf_counter()
    dtype = shard_dtype(tok.n_vocab)
    splits = {}
    for name, is_val in (("train", False), ("val", True)):
        sizes = docs.split(is_val)[1]
        chunks = _encode_docs(tok, docs_path, docs.spans(is_val), int(sizes.sum()), name, verbose, workers)
        tokens = write_shard(tmp / f"{name}.bin", chunks, dtype)
        splits[name] = {"docs": len(sizes), "bytes": int(sizes.sum()), "tokens": tokens}
    os.unlink(docs_path)
    t3 = time.perf_counter()
    manifest = {"format": FORMAT, "version": VERSION, "args": args, "filters": keep.report.as_dict(),
                "dedup_index_bytes": keep.index.nbytes(),
                "tokenizer": {"file": "tokenizer.json", "fingerprint": tok.fingerprint, "n_vocab": tok.n_vocab,
                              "sample_bytes": sample_bytes},
                "dtype": np.dtype(dtype).name, **splits,
                "tokens_per_byte": (splits["train"]["tokens"] + splits["val"]["tokens"])
                / max(1, splits["train"]["bytes"] + splits["val"]["bytes"]),
                "workers": workers,
                "seconds": {"filter": round(t1 - t0, 2), "tokenizer": round(t2 - t1, 2), "encode": round(t3 - t2, 2)}}
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
    if verbose:
        print(f"data: tokenizer {tok.n_vocab} tokens in {t2 - t1:.1f}s; {splits['train']['tokens']:,} train / "
              f"{splits['val']['tokens']:,} val tokens ({manifest['tokens_per_byte']:.3f} tokens/byte) "
              f"in {t3 - t0:.1f}s total")


def _encode_docs(tok: Tokenizer, docs_path: Path, spans: Iterator[tuple[int, int]], nbytes: int, name: str,
                 verbose: bool, workers: int) -> Iterator[np.ndarray]:
    """Token arrays of the documents, each preceded by <|endoftext|>, encoded in batches of about
    ENCODE_BATCH_BYTES on `workers` of tiktoken's threads."""
    with open(docs_path, "rb") as f, progress(nbytes, f"encode {name}", "B", show=verbose, unit_scale=True) as bar:
        while batch := list(_take_bytes(spans, ENCODE_BATCH_BYTES)):
            flat: list[int] = []
            for ids in tok.encode_batch(read_docs(f, batch), num_threads=workers):
                flat.append(tok.eot_id)
                flat.extend(ids)
            yield np.array(flat, dtype=np.uint32)
            bar.update(sum(n for _, n in batch))


def _take_bytes(spans: Iterator[tuple[int, int]], budget: int) -> Iterator[tuple[int, int]]:
    """The next spans from the iterator until their sizes reach the budget."""
    total = 0
    for span in spans:
        yield span
        total += span[1]
        if total >= budget:
            return


def write_dataset(out: str | Path, tokenizer: Tokenizer, train: Iterable[Sequence[int] | np.ndarray],
                  val: Iterable[Sequence[int] | np.ndarray], source: str) -> Path:
    """A dataset directory that training reads (--data OUT) from documents tokenized elsewhere, e.g. by
    the last step of a datatrove pipeline that filtered and deduplicated a corpus on many machines:
    each document one sequence of ids from tokenizer.encode, train and val already split. source
    names where they came from (the manifest and the training log show it). Built under a temporary
    name and renamed into place, like prepare's."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose another directory or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tokenizer.save(tmp / "tokenizer.json")
        splits = {}
        for name, documents in (("train", train), ("val", val)):
            docs, tokens = write_documents(tmp / f"{name}.bin", documents, tokenizer.n_vocab, tokenizer.eot_id)
            if not docs:
                raise ValueError(f"the {name} split has no documents; give it at least one")
            splits[name] = {"docs": docs, "tokens": tokens}
        manifest = {"format": FORMAT, "version": VERSION, "args": {"source": source, "vocab_size": tokenizer.n_vocab},
                    "tokenizer": {"file": "tokenizer.json", "fingerprint": tokenizer.fingerprint,
                                  "n_vocab": tokenizer.n_vocab},
                    "dtype": np.dtype(shard_dtype(tokenizer.n_vocab)).name, **splits}
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class PreparedData:
    """A dataset directory made by prepare(): its manifest, tokenizer and memory-mapped token shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a prepared dataset (no manifest.json; an interrupted "
                                    f"prepare leaves none); make one with python -m train.data --out {self.path}")
        self.manifest = _read_manifest(manifest_path)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{manifest_path}: not a {FORMAT} v{VERSION} manifest (format "
                             f"{self.manifest.get('format')!r}, version {self.manifest.get('version')!r})")
        self.tokenizer = Tokenizer.load(self.path / self.manifest["tokenizer"]["file"])
        if self.tokenizer.fingerprint != self.manifest["tokenizer"]["fingerprint"]:
            raise ValueError(f"{self.path}: tokenizer fingerprint {self.tokenizer.fingerprint} does not match the "
                             f"manifest's {self.manifest['tokenizer']['fingerprint']}; "
                             f"the shards were made with another tokenizer")
        self.train, self.val = (self._shard(name) for name in ("train", "val"))

    def _shard(self, name: str) -> np.ndarray:
        tokens = read_shard(self.path / f"{name}.bin")
        if tokens.dtype.name != self.manifest["dtype"] or len(tokens) != self.manifest[name]["tokens"]:
            raise ValueError(f"{self.path / name}.bin: {len(tokens):,} {tokens.dtype.name} tokens, but the manifest "
                             f"lists {self.manifest[name]['tokens']:,} {self.manifest['dtype']}")
        return tokens


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m train.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="stdlib",
                        help="corpus: stdlib (the Python standard library, offline), a file, directory or glob of "
                             "text/code/JSONL, or hf:NAME[:split] (needs the datasets package) (default: stdlib)")
    parser.add_argument("--out", default=None, help="dataset directory (default: <data-dir>/<source>-v<vocab-size>-"
                                                    "<hash of the resolved source and these arguments>)")
    for flag, default, parse, help_text in (
            ("data-dir", "data", str, "where the default --out is made"),
            ("vocab-size", 4096, int, f"tokenizer vocabulary, 256 bytes + merges + {len(DEFAULT_SPECIAL_TOKENS)} "
                                      f"special tokens, at least {MIN_VOCAB}"),
            ("seed", 0, int, "seed of the train/val split, tokenizer sample and MinHash, at least 0"),
            ("val-fraction", 0.01, float, "fraction of documents held out for validation, in (0, 0.5]"),
            ("tokenizer-sample-bytes", 8_000_000, int, "bytes of training documents the tokenizer is trained on, "
                                                       "at least 1 (too few learn fewer tokens, with a warning)")):
        parser.add_argument("--" + flag, type=flag_type(parse, CHECKS[flag.replace("-", "_")]), default=default,
                            help=f"{help_text} (default: {default})")
    parser.add_argument("--workers", type=flag_type(int, check_workers), default=None,
                        help="processes that clean, filter and hash the documents, and threads that encode them; "
                             "the dataset is the same for any number (default: every core this process may use, "
                             f"{available_cores()} here)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or report")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    group = parser.add_argument_group("filter thresholds")
    defaults = FilterConfig()
    for name, help_text in FilterConfig.HELP.items():
        default = getattr(defaults, name)
        group.add_argument("--" + name.replace("_", "-"), type=flag_type(type(default), FilterConfig.check(name)),
                           default=default, help=f"{help_text} (default: {default})")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = vars(build_parser().parse_args(argv))
    args.pop("debug")
    top = {k: args.pop(k) for k in ("source", "out", "data_dir", "vocab_size", "seed", "val_fraction",
                                    "tokenizer_sample_bytes", "workers")}
    path = prepare(**top, verbose=not args.pop("quiet"), **args)
    print(path)
    return path


if __name__ == "__main__":
    run_command(main)
