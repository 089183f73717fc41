"""The kept documents' table: where each lies in docs.tmp by split, and the tokenizer's sample."""
from train.data.docs import Docs, tokenizer_sample


def table(sizes_and_splits) -> Docs:
    docs = Docs()
    for nbytes, val in sizes_and_splits:
        docs.append(nbytes, val)
    return docs


def test_spans_and_split_agree():
    docs = table([(5, False), (3, True), (4, False), (2, True)])
    assert list(docs.spans(False)) == [(0, 5), (8, 4)] and list(docs.spans(True)) == [(5, 3), (12, 2)]
    offsets, sizes = docs.split(True)
    assert offsets.tolist() == [5, 12] and sizes.tolist() == [3, 2] and len(docs) == 4


def test_the_tokenizer_sample_is_seeded_within_budget_in_corpus_order():
    docs = table((10 + i, i % 5 == 0) for i in range(50))
    train = set(docs.spans(False))
    sample = tokenizer_sample(docs, 100, seed=0)
    total = sum(n for _, n in sample)
    assert set(sample) <= train and sample == sorted(sample)
    assert 100 <= total < 100 + max(n for _, n in sample)           # stops once the budget is reached
    assert tokenizer_sample(docs, 100, seed=0) == sample != tokenizer_sample(docs, 100, seed=1)
    assert len(tokenizer_sample(docs, 10**9, seed=0)) == len(train)
