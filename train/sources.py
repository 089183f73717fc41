"""Corpus sources: where documents come from, streamed one at a time as (doc_id, text).

  stdlib          the .py files of the running interpreter's standard library (site-packages and
                  dist-packages excluded), one document per file; offline everywhere
  PATH            a file, a directory (searched recursively for TEXT_SUFFIXES) or a glob; .jsonl
                  files hold one document per line in a "text" field, other files are one document
  hf:NAME[:split] a Hugging Face dataset through `datasets` (streamed; "text" column; split train)

doc_id is stable across runs (a relative path, path:line or hf row index): the train/val split
hashes it, so the split does not depend on the order documents arrive in.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cpp", ".hpp", ".rs", ".go", ".js", ".ts",
                 ".java", ".sh", ".toml", ".yaml", ".yml", ".html", ".css", ".tex", ".jsonl")
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def iter_documents(source: str) -> Iterator[tuple[str, str]]:
    """(doc_id, text) for every document of the source, in a deterministic order."""
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in _walk(root, (".py",)):
            yield str(path.relative_to(root)), path.read_text(encoding="utf-8", errors="replace")
    elif source.startswith("hf:"):
        yield from _iter_hf(source)
    else:
        for path in local_files(source):
            if path.suffix == ".jsonl":
                yield from _iter_jsonl(path)
            else:
                yield str(path), path.read_text(encoding="utf-8", errors="replace")


def local_files(source: str) -> list[Path]:
    """The files a local source names: a file, a directory's text files (recursively) or a glob's matches."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = list(_walk(path, TEXT_SUFFIXES))
        if not files:
            raise ValueError(f"corpus directory {source} holds no text files (suffixes {' '.join(TEXT_SUFFIXES)})")
        return files
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
        if files:
            return files
    raise FileNotFoundError(f"corpus source {source!r}: no such file or directory, and no file matches it as a glob; "
                            f"use stdlib, a file, a directory, a glob or hf:NAME[:split]")


def _walk(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(suffixes):
                yield Path(dirpath) / name


def _iter_jsonl(path: Path) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string \"text\" field")
            yield f"{path}:{lineno}", row["text"]


def _parse_hf(source: str) -> tuple[str, str]:
    name, _, split = source.removeprefix("hf:").partition(":")
    if not name:
        raise ValueError(f"bad source {source!r}: expected hf:NAME or hf:NAME:SPLIT")
    return name, split or "train"


def _iter_hf(source: str) -> Iterator[tuple[str, str]]:
    name, split = _parse_hf(source)
    try:
        import datasets
    except ImportError:
        raise ImportError(f"source {source!r} needs the Hugging Face `datasets` package: pip install 'tritongpt[data]' "
                          f"(or use stdlib or a local path)") from None
    try:
        rows = datasets.load_dataset(name, split=split, streaming=True)
        first = next(iter(rows), None)
    except Exception as e:   # offline, unknown name or split: datasets raises many kinds
        raise RuntimeError(f"could not load Hugging Face dataset {name!r} split {split!r}: {type(e).__name__}: {e}. "
                           f"It needs the internet or a local HF cache; or use stdlib or a local path") from e
    if first is not None and not isinstance(first.get("text"), str):
        raise ValueError(f"Hugging Face dataset {name!r} has no string \"text\" column (columns: {sorted(first)})")
    for i, row in enumerate(rows):
        yield f"hf:{name}:{split}:{i}", row["text"]


def source_slug(source: str) -> str:
    """A short directory-name-safe label for the source: stdlib, hf-NAME-SPLIT, or the path's name."""
    if source == "stdlib":
        return "stdlib"
    if source.startswith("hf:"):
        label = "hf-" + "-".join(_parse_hf(source))
    else:
        label = Path(source.rstrip("/\\")).name or source
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[-60:] or "corpus"


def source_fingerprint(source: str) -> str:
    """Cheap identity of the source's current contents: interpreter version, or file names, sizes and mtimes."""
    if source == "stdlib":
        return f"python {sys.version.split()[0]} {sysconfig.get_paths()['stdlib']}"
    if source.startswith("hf:"):
        return "hf:{}:{}".format(*_parse_hf(source))
    h = hashlib.sha256()
    for path in local_files(source):
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]
