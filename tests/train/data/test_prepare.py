"""Data pipeline: sources, prepare() (manifest, shards, reuse, atomicity, progress on stderr), the
loader, the CLI, and a clear error for every bad input class."""
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from model.command import run_command
from train.data import docs as docs_mod
from train.data import prepare as data_mod
from train.data import workers as workers_mod
from train.data.prepare import PreparedData, build_parser, main, prepare, write_dataset
from train.data.shards import HEADER, MAGIC, read_shard, shard_dtype, write_shard
from train.pretrain import eval_batches, sample_batch
from train.data.sources import document_count, iter_documents, local_files, source_fingerprint, source_slug
from corpus_fixtures import document, write_corpus

VOCAB = 320
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    return prepare(str(corpus), out=out, vocab_size=VOCAB, val_fraction=0.1, verbose=False)


def test_local_sources(corpus):
    docs = list(iter_documents(str(corpus)))
    assert len(docs) == 40 + 5 + 2
    assert sum(":" in doc_id.rsplit("/", 1)[-1] for doc_id, _ in docs) == 5                  # jsonl rows
    assert local_files(str(corpus / "sub" / "*.py")) == sorted((corpus / "sub").glob("*.py"))
    assert local_files(str(corpus / "doc0.txt")) == [corpus / "doc0.txt"]
    assert source_slug(str(corpus) + "/") == corpus.name and source_slug("hf:a/b:test") == "hf-a-b-test"
    assert source_fingerprint(str(corpus)) == source_fingerprint(str(corpus))


def test_document_count_is_known_without_jsonl(corpus, tmp_path):
    assert document_count(str(corpus)) is None                          # JSONL: a document per line
    assert document_count(str(corpus / "sub")) == len(list(iter_documents(str(corpus / "sub")))) == 26
    assert document_count(str(corpus / "doc0.txt")) == 1 and document_count("hf:a/b") is None


def test_each_phase_shows_its_progress_on_stderr_unless_quiet(corpus, tmp_path, capsys):
    prepare(str(corpus / "sub"), out=tmp_path / "ds", vocab_size=VOCAB, val_fraction=0.1)
    captured = capsys.readouterr()
    last = {line.split(":")[0]: line for line in captured.err.splitlines()}         # each phase's last line
    assert "\r" not in captured.err and "filter:" not in captured.out and "encode" not in captured.out
    assert "26/26" in last["filter"] and "docs" in last["filter"]                       # a total: an ETA
    assert "learning 320 tokens from" in last["tokenizer"]
    assert "100%" in last["encode train"] and "100%" in last["encode val"]
    prepare(str(corpus / "sub"), out=tmp_path / "quiet", vocab_size=VOCAB, val_fraction=0.1, verbose=False)
    assert capsys.readouterr() == ("", "")


def test_stdlib_source_streams_python_files():
    first = next(iter(iter_documents("stdlib")))
    assert first[0].endswith(".py") and "site-packages" not in first[0] and first[1]
    assert source_slug("stdlib") == "stdlib" and "python" in source_fingerprint("stdlib")


def test_prepared_dataset(prepared, corpus):
    data = PreparedData(prepared)
    m = data.manifest
    assert m["dtype"] == "uint16" and data.train.dtype == np.uint16 and data.tokenizer.n_vocab == VOCAB
    assert len(data.train) == m["train"]["tokens"] > 0 and len(data.val) == m["val"]["tokens"] > 0
    assert m["train"]["docs"] + m["val"]["docs"] == m["filters"]["kept"]["docs"] == 45
    assert m["filters"]["removed"]["exact_dup"]["docs"] == 1 and m["filters"]["removed"]["too_short"]["docs"] == 1
    assert m["tokenizer"]["fingerprint"] == data.tokenizer.fingerprint
    eot = data.tokenizer.eot_id
    assert data.train[0] == eot and data.val[0] == eot                  # <|endoftext|> opens every document
    kept = {text for _, text in iter_documents(str(corpus))}
    decoded = data.tokenizer.decode(np.asarray(data.train).tolist()).split("<|endoftext|>")[1:]
    assert len(decoded) == m["train"]["docs"] and set(decoded) <= kept
    assert sorted(os.listdir(prepared)) == ["manifest.json", "tokenizer.json", "train.bin", "val.bin"]


def test_prepare_reuses_and_refuses_other_arguments(prepared, corpus, monkeypatch):
    monkeypatch.setattr(data_mod, "_build", lambda *a: pytest.fail("rebuilt a complete dataset"))
    assert prepare(str(corpus), out=prepared, vocab_size=VOCAB, val_fraction=0.1, verbose=False) == prepared
    assert prepare(str(prepared)) == prepared                          # a dataset directory as the source
    with pytest.raises(ValueError, match=r"was prepared with other arguments .*'seed': \(0, 1\)"):
        prepare(str(corpus), out=prepared, vocab_size=VOCAB, val_fraction=0.1, seed=1, verbose=False)


def test_split_is_deterministic_by_seed(corpus, tmp_path, prepared):
    again = prepare(str(corpus), out=tmp_path / "again", vocab_size=VOCAB, val_fraction=0.1, verbose=False)
    assert np.array_equal(PreparedData(again).val, PreparedData(prepared).val)
    other = prepare(str(corpus), out=tmp_path / "other", vocab_size=VOCAB, val_fraction=0.1, seed=5, verbose=False)
    assert PreparedData(other).manifest["val"] != PreparedData(prepared).manifest["val"]


def test_interrupted_prepare_leaves_nothing_that_loads(corpus, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_mod, "write_shard", crash)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpus), out=out, vocab_size=VOCAB, verbose=False)
    assert not out.exists() and os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="is not a prepared dataset \\(no manifest.json"):
        PreparedData(out)


def test_killed_build_is_not_done_and_gets_cleaned(corpus, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".ds.tmp-{dead.pid}-abcd1234"
    leftover.mkdir()
    (leftover / "train.bin").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        PreparedData(leftover)
    prepare(str(corpus), out=tmp_path / "ds", vocab_size=VOCAB, verbose=False)
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_single_document_is_split_at_a_line(tmp_path):
    rng = random.Random(1)
    (tmp_path / "book.txt").write_text("".join(document(rng) for _ in range(20)))
    data = PreparedData(prepare(str(tmp_path / "book.txt"), out=tmp_path / "ds", vocab_size=VOCAB, verbose=False))
    assert data.manifest["train"]["docs"] == data.manifest["val"]["docs"] == 1
    text = (tmp_path / "book.txt").read_text()
    train_text, val_text = (data.tokenizer.decode(t.tolist()) for t in (data.train, data.val))
    assert train_text.startswith("<|endoftext|>") and val_text.startswith("<|endoftext|>")
    assert train_text[13:] + val_text[13:] == text and train_text.endswith("\n")
    assert 0 < len(val_text) < 0.05 * len(text)


def test_shard_round_trip_and_dtype(tmp_path):
    assert shard_dtype(65536) == np.uint16 and shard_dtype(65537) == np.uint32
    tokens = np.array([0, 70000, 5, 2**32 - 1], dtype=np.uint32)
    assert write_shard(tmp_path / "a.bin", iter([tokens[:2], tokens[2:]]), np.uint32) == 4
    assert read_shard(tmp_path / "a.bin").tolist() == tokens.tolist()
    magic, version, itemsize, count = HEADER.unpack((tmp_path / "a.bin").read_bytes()[:HEADER.size])
    assert (magic, version, itemsize, count) == (MAGIC, 1, 4, 4)
    assert write_shard(tmp_path / "b.bin", iter([tokens[2:3]]), np.uint16) == 1
    assert read_shard(tmp_path / "b.bin").dtype == np.uint16


def test_bad_shard_headers(tmp_path, prepared):
    path = tmp_path / "bad.bin"
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="bad shard header: file of 5 bytes is shorter than the 24-byte header"):
        read_shard(path)
    path.write_bytes(HEADER.pack(b"NOTTOKEN", 1, 2, 0))
    with pytest.raises(ValueError, match="bad shard header: magic b'NOTTOKEN'"):
        read_shard(path)
    path.write_bytes(HEADER.pack(MAGIC, 9, 2, 0))
    with pytest.raises(ValueError, match="bad shard header: version 9, this code reads 1"):
        read_shard(path)
    path.write_bytes(HEADER.pack(MAGIC, 1, 3, 0))
    with pytest.raises(ValueError, match="bad shard header: 3 bytes per token, expected 2 or 4"):
        read_shard(path)
    path.write_bytes(HEADER.pack(MAGIC, 1, 2, 10) + b"\x00" * 8)
    with pytest.raises(ValueError, match="promises 10 tokens of 2 bytes but the file holds 8 bytes"):
        read_shard(path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(prepared):
        (copy / name).write_bytes((prepared / name).read_bytes())
    (copy / "val.bin").write_bytes(HEADER.pack(MAGIC, 1, 2, 1) + b"\x00\x00")
    with pytest.raises(ValueError, match="1 uint16 tokens, but the manifest lists"):
        PreparedData(copy)


def test_clear_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="corpus source '.*nope': no such file or directory"):
        prepare(str(tmp_path / "nope"), out=tmp_path / "o", vocab_size=VOCAB, verbose=False)
    with pytest.raises(ValueError, match="is empty after filtering: all 47 documents were removed"):
        prepare(str(corpus), out=tmp_path / "o", vocab_size=VOCAB, min_chars=10**6, verbose=False)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match=r"vocab_size 100 is smaller than the 256 byte tokens \+ 4 special tokens"):
        prepare(str(corpus), out=tmp_path / "o", vocab_size=100, verbose=False)
    with pytest.raises(TypeError, match="unknown filter thresholds"):
        prepare(str(corpus), out=tmp_path / "o", min_char=3, verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        prepare(str(tmp_path / "empty"), out=tmp_path / "o", verbose=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a string \"text\" field"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))
    (tmp_path / "notdata").mkdir()
    with pytest.raises(ValueError, match="exists but is not a prepared dataset"):
        prepare(str(corpus), out=tmp_path / "notdata", vocab_size=VOCAB, verbose=False)


def test_hf_source_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)              # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"needs the Hugging Face `datasets` package: pip install .tritongpt\[data\]."):
        list(iter_documents("hf:roneneldan/TinyStories"))


def test_hf_source_offline(monkeypatch):
    class Offline:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("no internet")

    monkeypatch.setitem(sys.modules, "datasets", Offline)
    with pytest.raises(RuntimeError, match="could not load Hugging Face dataset 'x' split 'test'.*no internet"):
        list(iter_documents("hf:x:test"))


def test_sample_batch_is_a_pure_function_of_seed_step_rank():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = sample_batch(tokens, 4, 16, seed=0, step=3)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64 and x.is_contiguous()
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)   # windows of the tokens
    again = sample_batch(tokens, 4, 16, seed=0, step=3)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, sample_batch(tokens, 4, 16, seed=0, step=4)[0])
    assert not torch.equal(x, sample_batch(tokens, 4, 16, seed=1, step=3)[0])
    assert not torch.equal(x, sample_batch(tokens, 4, 16, seed=0, step=3, rank=1)[0])
    assert sample_batch(tokens, 64, 999, seed=0, step=0)[1].max() == 999                # last window reachable
    with pytest.raises(ValueError, match="1,000 tokens are fewer than block_size \\+ 1 = 1001"):
        sample_batch(tokens, 1, 1000, seed=0, step=0)


def test_eval_batches_are_sequential():
    tokens = np.arange(101, dtype=np.uint32)
    batches = list(eval_batches(tokens, 3, 10))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert [len(b[0]) for b in batches] == [3, 3, 3, 1]
    assert torch.equal(x.flatten(), torch.arange(100)) and torch.equal(y.flatten(), torch.arange(1, 101))
    assert [len(b[0]) for b in eval_batches(tokens, 3, 10, max_tokens=40)] == [3, 1]
    assert len(list(eval_batches(tokens, 3, 10, max_tokens=1))) == 1
    with pytest.raises(ValueError, match="101 tokens are fewer than block_size \\+ 1 = 102"):
        list(eval_batches(tokens, 3, 101))


def test_cli(corpus, tmp_path, capsys):
    out = main(["--source", str(corpus), "--out", str(tmp_path / "cli"), "--vocab-size", str(VOCAB),
                "--min-chars", "10", "--near-dup-threshold", "0.9", "--quiet"])
    m = PreparedData(out).manifest
    assert m["args"]["filters"]["min_chars"] == 10 and m["args"]["filters"]["near_dup_threshold"] == 0.9
    assert capsys.readouterr().out.strip().endswith(str(out))
    parser = build_parser()
    flags = {a.option_strings[-1]: a.help for a in parser._actions if a.option_strings and a.dest != "help"}
    assert all(flags.values())
    assert set(flags) == {"--source", "--out", "--data-dir", "--vocab-size", "--seed", "--val-fraction",
                          "--tokenizer-sample-bytes", "--min-chars", "--max-dup-line-frac", "--max-top-ngram-frac",
                          "--min-alnum-frac", "--max-markup-frac", "--near-dup-threshold", "--max-replacement-frac",
                          "--max-control-frac", "--workers", "--quiet", "--debug"}


def write_binaries(root):
    """Files named like text that are not UTF-8 text: random bytes, a PNG, UTF-16."""
    rng = random.Random(3)
    root.mkdir(parents=True, exist_ok=True)
    noise = bytes(rng.randrange(256) for _ in range(3000))
    (root / "random.txt").write_bytes(noise)
    (root / "image.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + noise)
    (root / "notes.txt").write_bytes(document(rng).encode("utf-16"))
    return root


def snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def test_binary_files_are_removed_and_counted_text_in_any_script_is_kept(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_files=8)
    write_binaries(corpus / "bin")
    (corpus / "zh.md").write_text("机器学习模型需要大量的训练数据。\n我们在这里测试普通的中文文本。\n" + document(random.Random(4)))
    cookie = "# -*- coding: latin-1 -*-\n# caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n"
    (corpus / "latin1.py").write_bytes(cookie.encode("latin-1") + document(random.Random(5)).encode())
    data = PreparedData(prepare(str(corpus), out=tmp_path / "ds", vocab_size=VOCAB, verbose=False))
    report = data.manifest["filters"]
    assert report["removed"]["binary"]["docs"] == 3 and data.manifest["args"]["filters"]["max_control_frac"] == 0.05
    assert report["kept"]["docs"] == 8 + 5 + 2                 # every text file, the jsonl rows, zh.md, latin1.py
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]).tolist())
    assert "\ufffd" not in text and "\x00" not in text
    assert "我们在这里测试普通的中文文本" in text and "caf\u00e9 cr\u00e8me" in text     # the coding cookie is honoured


def test_a_corpus_of_binary_files_fails_in_one_line_and_leaves_nothing(tmp_path):
    corpus = write_binaries(tmp_path / "bin")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"all 3 documents were removed \(binary 3\); they are binary or not") as e:
        prepare(str(corpus), data_dir=tmp_path / "data", vocab_size=VOCAB, verbose=False)
    assert "\n" not in str(e.value)
    assert snapshot(tmp_path) == before and not (tmp_path / "data").exists()


def test_the_same_source_spelled_any_way_is_reused_and_others_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = (write_corpus(tmp_path / side / "corpus", n_files=6, seed=i) for i, side in enumerate("AB"))
    first = prepare(str(a), data_dir="data", vocab_size=VOCAB, verbose=False)
    assert first.parent == Path("data") and re.fullmatch(rf"corpus-v{VOCAB}-[0-9a-f]{{8}}", first.name)
    other = prepare("B/corpus", data_dir="data", vocab_size=VOCAB, verbose=False)     # same folder name
    assert other != first and other.parent == first.parent
    assert PreparedData(other).manifest["args"]["source"] == str(b.resolve())
    (tmp_path / "link").symlink_to(a)
    kept = snapshot(first)
    monkeypatch.setattr(data_mod, "_build", lambda *a: pytest.fail("rebuilt a dataset that exists"))
    for spelling in ("A/corpus", "./A/corpus/", "A/../A/corpus", "link"):
        assert prepare(spelling, data_dir="data", vocab_size=VOCAB, verbose=False) == first
    assert snapshot(first) == kept
    assert data_mod.dataset_name({**PreparedData(first).manifest["args"], "seed": 1}) != first.name
    os.utime(a / "doc0.txt", ns=(0, 0))                              # the source changed since
    with pytest.raises(ValueError, match=f"before its files changed.*name data/corpus-v{VOCAB}-.* itself as the data"):
        prepare("A/corpus", data_dir="data", vocab_size=VOCAB, verbose=False)
    assert snapshot(first) == kept


def test_a_data_dir_that_is_a_file_is_refused(tmp_path, corpus):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(ValueError, match="data is a file, not a directory.*--data-dir"):
        prepare(str(corpus), data_dir=tmp_path / "data" / "sub", vocab_size=VOCAB, verbose=False)
    assert (tmp_path / "data").read_text() == "not a folder"


@pytest.mark.parametrize("argv, message", [
    (["--tokenizer-sample-bytes", "0"], "argument --tokenizer-sample-bytes: must be at least 1, got 0"),
    (["--vocab-size", "100"], "argument --vocab-size: vocab_size 100 is smaller than the 256 byte tokens + 4 special"),
    (["--val-fraction", "0"], "argument --val-fraction: must be in (0, 0.5], got 0"),
    (["--val-fraction", "1"], "argument --val-fraction: must be in (0, 0.5], got 1"),
    (["--val-fraction", "-0.1"], "argument --val-fraction: must be in (0, 0.5], got -0.1"),
    (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
    (["--min-chars", "-1"], "argument --min-chars: min_chars must be >= 0, got -1"),
    (["--max-replacement-frac", "2"], "argument --max-replacement-frac: max_replacement_frac must be a fraction"),
    (["--data-dir", ""], "argument --data-dir: must name a directory"),
    (["--workers", "0"], "argument --workers: must be at least 1 (worker processes; default: every core"),
    (["--workers", "-2"], "argument --workers: must be at least 1 (worker processes; default: every core"),
])
def test_cli_range_checks_are_usage_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--source", "nowhere", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_cli_default_out_is_keyed_by_source_and_arguments(corpus, tmp_path, capsys):
    common = ["--data-dir", str(tmp_path / "d"), "--vocab-size", str(VOCAB), "--quiet"]
    out = main(["--source", str(corpus), *common])
    assert out.parent == tmp_path / "d" and re.fullmatch(rf"{corpus.name}-v{VOCAB}-[0-9a-f]{{8}}", out.name)
    again = main(["--source", str(corpus) + "/", *common])
    seeded = main(["--source", str(corpus), *common, "--seed", "1"])
    assert again == out and seeded != out and sorted(os.listdir(tmp_path / "d")) == sorted([out.name, seeded.name])


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "missing", "error: corpus source '.*missing': no such file or directory"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "error: corpus directory .*empty holds no text files"),
    (lambda root: write_binaries(root / "bin"), r"error: the corpus .* \(binary 3\)"),
])
def test_cli_bad_sources_end_in_one_line(make, message, tmp_path, monkeypatch, capsys):
    source = make(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_command(lambda: main(["--source", str(source), "--vocab-size", str(VOCAB), "--quiet"]))
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and re.match(message, err)
    assert snapshot(tmp_path) == before and not (tmp_path / "data").exists()


def corpus_of_many_batches(root, monkeypatch):
    """A corpus with an exact and a near duplicate, read in batches of about two documents, so that
    several batches are in flight on the workers and the duplicates lie in other batches than their
    originals."""
    monkeypatch.setattr(workers_mod, "BATCH_BYTES", 2_000)
    src = write_corpus(root, n_files=30)
    original = (src / "doc3.py").read_text()
    (src / "sub" / "near.txt").write_text("changed" + original[original.index(" "):])
    return src


def test_any_number_of_workers_gives_the_same_dataset_byte_for_byte(tmp_path, monkeypatch):
    src = corpus_of_many_batches(tmp_path / "corpus", monkeypatch)
    pools = []
    monkeypatch.setattr(workers_mod, "ProcessPoolExecutor",
                        lambda *a, **k: pools.append(k) or ProcessPoolExecutor(*a, **k))
    outs = [prepare(str(src), out=tmp_path / f"w{n}", vocab_size=VOCAB, val_fraction=0.2, verbose=False, workers=n)
            for n in (1, 3)]
    assert len(pools) == 1                                      # 3 workers ran in a pool, 1 in this process
    manifests = [PreparedData(out).manifest for out in outs]
    removed = manifests[0]["filters"]["removed"]
    assert removed["exact_dup"]["docs"] == 1 and removed["near_dup"]["docs"] == 1
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert [m.pop("workers") for m in manifests] == [1, 3]
    for m in manifests:
        del m["seconds"]
    assert manifests[0] == manifests[1]


def test_a_failure_mid_run_on_workers_leaves_no_dataset_and_no_worker(tmp_path, monkeypatch):
    src = corpus_of_many_batches(tmp_path / "corpus", monkeypatch)
    rng = random.Random(7)
    rows = [json.dumps({"text": document(rng)}) for _ in range(20)]
    (src / "sub" / "zz.jsonl").write_text("\n".join(rows) + '\n{"txt": 1}\n')           # read last
    with pytest.raises(ValueError, match="zz.jsonl:21: expected a JSON object"):
        prepare(str(src), data_dir=tmp_path / "data", vocab_size=VOCAB, verbose=False, workers=2)
    assert not (tmp_path / "data").exists() and multiprocessing.active_children() == []
    (src / "sub" / "zz.jsonl").unlink()
    real = docs_mod.inspect_corpus

    def killing_a_worker(*args):                   # a worker dies (the OOM killer, say) while batches are in flight
        for i, item in enumerate(real(*args)):
            if i == 0:
                os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
            yield item

    monkeypatch.setattr(docs_mod, "inspect_corpus", killing_a_worker)
    with pytest.raises(ChildProcessError, match="a data preparation worker process died") as e:
        prepare(str(src), data_dir=tmp_path / "data", vocab_size=VOCAB, verbose=False, workers=2)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "data").exists() and multiprocessing.active_children() == []


def test_workers_are_checked(corpus, tmp_path):
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"workers must be at least 1 .*got {bad}"):
            prepare(str(corpus), out=tmp_path / "o", vocab_size=VOCAB, verbose=False, workers=bad)
    assert os.listdir(tmp_path) == []


def test_write_dataset_makes_what_training_reads_from_documents_tokenized_elsewhere(prepared, tmp_path):
    tok = PreparedData(prepared).tokenizer
    texts = ["def f(x):\n    return x\n", "class A:\n    pass\n", "print('held out')\n"]
    out = write_dataset(tmp_path / "ext", tok, (tok.encode(t) for t in texts[:2]), [tok.encode(texts[2])],
                        source="datatrove:minhash-output")
    data = PreparedData(prepare(str(out)))                                   # a dataset directory as the source
    assert data.manifest["args"]["source"] == "datatrove:minhash-output" and data.manifest["train"]["docs"] == 2
    assert tok.decode(data.train.tolist()) == "<|endoftext|>" + "<|endoftext|>".join(texts[:2])
    assert tok.decode(data.val.tolist()) == "<|endoftext|>" + texts[2]
    with pytest.raises(ValueError, match="already exists"):
        write_dataset(out, tok, [], [], source="x")
    with pytest.raises(ValueError, match="the val split has no documents"):
        write_dataset(tmp_path / "empty", tok, [tok.encode("x")], [], source="x")
    assert sorted(os.listdir(tmp_path)) == ["ext"]


def test_the_data_command_loads_no_torch():
    """Its memory is the filters', the workers' and the dedup index's; torch would add about 250 MB."""
    code = "import sys, train.data.prepare; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[3])
    assert done.stdout.strip() == "[]"
