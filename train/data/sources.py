"""Corpus sources: where documents come from, streamed one at a time as (doc_id, text).

  stdlib          the .py files of the running interpreter's standard library (site-packages and
                  dist-packages excluded), one document per file; offline everywhere
  PATH            a file, a directory (searched recursively for TEXT_SUFFIXES) or a glob; .jsonl
                  files hold one document per line in a "text" field, other files are one document
  hf:NAME[:split] a Hugging Face dataset through `datasets` (streamed; "text" column; split train)

doc_id is stable across runs (a path relative to the source's directory, path:line or hf row
index): the train/val split hashes it, so the split depends neither on the order documents arrive
in nor on how the source's path is spelled (resolve_source gives its one spelling).

Files are decoded as UTF-8 (a .py file: as its PEP 263 coding cookie says) with errors="replace",
so a binary or otherwise encoded file named .txt does not stop the run: it arrives as text full of
U+FFFD and NULs, which the binary filter (train/data/filters.py) removes and counts.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
import tokenize
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
            yield str(path.relative_to(root)), read_text(path)
    elif source.startswith("hf:"):
        yield from _iter_hf(source)
    else:
        root = _local_root(source)
        for path in iter_local_files(source):
            doc_id = Path(os.path.relpath(path, root)).as_posix()
            if path.suffix == ".jsonl":
                yield from _iter_jsonl(path, doc_id)
            else:
                yield doc_id, read_text(path)


def document_count(source: str) -> int | None:
    """How many documents iter_documents(source) yields, when that is known without reading them (for
    a progress bar's total and ETA): one per file of the stdlib or of a local source without JSONL
    files; None for JSONL files (a document per line) and hf: data sets."""
    if source == "stdlib":
        return sum(1 for _ in _walk(Path(sysconfig.get_paths()["stdlib"]), (".py",)))
    if source.startswith("hf:"):
        return None
    count = 0
    for path in iter_local_files(source):
        if path.suffix == ".jsonl":
            return None
        count += 1
    return count


def read_text(path: Path) -> str:
    """The text of a file: UTF-8, or for Python source the encoding its coding cookie declares;
    bytes that do not decode become U+FFFD (the binary filter measures them)."""
    data = path.read_bytes()
    encoding = "utf-8"
    if path.suffix in (".py", ".pyi"):
        try:
            encoding = tokenize.detect_encoding(io.BytesIO(data).readline)[0]
        except SyntaxError:              # an unknown or malformed cookie: read it as UTF-8
            pass
    return data.decode(encoding, errors="replace")


def local_files(source: str) -> list[Path]:
    """The files a local source names: a file, a directory's text files (recursively) or a glob's matches."""
    return list(iter_local_files(source))


def iter_local_files(source: str) -> Iterator[Path]:
    """local_files(source), a directory's files found as it is walked (no list of a large corpus's
    files is held)."""
    path = Path(source).expanduser()
    if path.is_file():
        yield path
        return
    if path.is_dir():
        found = False
        for file in _walk(path, TEXT_SUFFIXES):
            found = True
            yield file
        if not found:
            raise ValueError(f"corpus directory {source} holds no text files (none with the suffixes "
                             f"{' '.join(TEXT_SUFFIXES)}; hidden, __pycache__ and site-packages folders skipped); "
                             f"name a directory of text files, one file of any name, or a glob such as "
                             f"'{source}/*.log'")
        return
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
        if files:
            yield from files
            return
    where = f" (looked for {path.absolute()})" if not path.is_absolute() else ""
    raise FileNotFoundError(f"corpus source {source!r}: no such file or directory, and no file matches it as a glob"
                            f"{where}; use stdlib, a file, a directory, a glob or hf:NAME[:split]")


def _local_root(source: str) -> Path:
    """The directory a local source's doc_ids are relative to: the directory itself, a file's
    folder, or a glob's folder before its first wildcard."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.parent
    if path.is_dir() or not glob.has_magic(source):
        return path
    parts = []
    for part in path.parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def resolve_source(source: str) -> str:
    """The one spelling of a source: stdlib, hf:NAME:SPLIT, or the absolute path with symlinks
    resolved (for a glob, of its folder before the first wildcard), so that every way of naming the
    same files gives the same string."""
    if source == "stdlib":
        return source
    if source.startswith("hf:"):
        return "hf:{}:{}".format(*_parse_hf(source))
    path = Path(source).expanduser()
    if path.exists() or not glob.has_magic(source):
        return str(path.resolve())
    root = _local_root(source)
    return str(root.resolve() / path.relative_to(root))


def _walk(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(suffixes):
                yield Path(dirpath) / name


def _iter_jsonl(path: Path, doc_id: str) -> Iterator[tuple[str, str]]:
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
            yield f"{doc_id}:{lineno}", row["text"]


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
    elif glob.has_magic(source) and not Path(source).expanduser().exists():
        label = _local_root(source).resolve().name          # a glob: its folder's name
    else:
        label = Path(source.rstrip("/\\")).name or source
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[-60:] or "corpus"


def dataset_name(args: dict) -> str:
    """The name of the prepared dataset of prepare()'s args: <source name>-v<vocab size>-<8 hex digits of
    a hash of the resolved source and the other arguments, not of the source's contents> (an edited
    corpus finds its old dataset and is told). The stdlib is keyed by its interpreter's version and
    path, so two Pythons do not share one."""
    key = {k: v for k, v in args.items() if k != "source_fingerprint"}
    if key["source"] == "stdlib":
        key["source"] = args["source_fingerprint"]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{source_slug(args['source'])}-v{args['vocab_size']}-{digest}"


def source_fingerprint(source: str) -> str:
    """Cheap identity of the source's current contents: interpreter version, or file names (relative
    to the source's folder), sizes and mtimes."""
    if source == "stdlib":
        return f"python {sys.version.split()[0]} {sysconfig.get_paths()['stdlib']}"
    if source.startswith("hf:"):
        return "hf:{}:{}".format(*_parse_hf(source))
    h = hashlib.sha256()
    root = _local_root(source)
    for path in iter_local_files(source):
        st = path.stat()
        name = Path(os.path.relpath(path, root)).as_posix()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]
