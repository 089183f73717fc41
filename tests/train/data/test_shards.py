"""write_documents: documents tokenized by another engine become a shard of our format, or nothing."""
import numpy as np
import pytest

from train.data.shards import HEADER, MAGIC, read_shard, write_documents


def test_documents_become_a_shard_each_after_the_end_of_text_id(tmp_path):
    docs = [[5, 6, 7], np.array([], dtype=np.int64), np.array([65535, 0], dtype=np.uint32)]
    assert write_documents(tmp_path / "a.bin", iter(docs), n_vocab=65536, eot_id=3) == (3, 8)
    assert read_shard(tmp_path / "a.bin").tolist() == [3, 5, 6, 7, 3, 3, 65535, 0]
    assert HEADER.unpack((tmp_path / "a.bin").read_bytes()[:HEADER.size]) == (MAGIC, 1, 2, 8)
    assert write_documents(tmp_path / "b.bin", [[70000]], n_vocab=70001, eot_id=1) == (1, 2)
    assert read_shard(tmp_path / "b.bin").dtype == np.uint32


@pytest.mark.parametrize("docs, message", [
    ([[1, 2], [9, 10]], r"document 1 of bad.bin: token id 10 is outside the vocabulary 0..9; encode the documents"),
    ([[1], [-1]], "document 1 of bad.bin: token id -1 is outside"),
    ([[1], [[1, 2]]], r"document 1 of bad.bin: expected a flat sequence of integer token ids, got shape \(1, 2\)"),
    ([[0.5]], "expected a flat sequence of integer token ids, got shape \\(1,\\) of float64"),
])
def test_a_bad_document_leaves_no_shard(tmp_path, docs, message):
    with pytest.raises(ValueError, match=message):
        write_documents(tmp_path / "bad.bin", docs, n_vocab=10, eot_id=0)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="eot_id 10 is outside the vocabulary 0..9"):
        write_documents(tmp_path / "bad.bin", [], n_vocab=10, eot_id=10)
