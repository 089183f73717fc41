"""Built-in tasks: correct answers, wrong rejections, disjoint reproducible splits and the JSONL files."""
import re

import pytest
from train.data import tasks
from train.data.sft_data import load_dpo, load_sft


def solve(task: tasks.Task) -> str:
    """An independent solver that reads only the prompt."""
    p = task.prompt
    if m := re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", p):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b)
    if m := re.fullmatch(r"Reverse the word (\w+)\.", p):
        return m[1][::-1]
    if m := re.fullmatch(r"Sort the digits ([\d ]+)\.", p):
        return " ".join(sorted(m[1].split()))
    if m := re.fullmatch(r"How many times does the letter (\w) appear in (\w+)\?", p):
        return str(m[2].count(m[1]))
    if m := re.fullmatch(r"Uppercase: (.+)", p):
        return m[1].upper()
    if m := re.fullmatch(r"Repeat after me: (.+)", p):
        return m[1]
    raise AssertionError(f"unknown prompt {p!r}")


def test_answers_are_right_and_rejections_wrong():
    for task in tasks.make_tasks("train", 700) + tasks.make_tasks("test", 140):
        assert task.answer == solve(task), task
        assert task.wrong != task.answer and task.wrong, task
        if task.kind in ("copy", "upper", "sort"):   # as long as the answer: no "stop early" signal
            assert len(task.wrong.split()) == len(task.answer.split()), task


def test_splits_are_disjoint_balanced_and_reproducible():
    train, test = tasks.make_tasks("train", 3000, seed=5), tasks.make_tasks("test", 350, seed=5)
    assert len({t.prompt for t in train}) == 3000 and len({t.prompt for t in test}) == 350
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    assert all(tasks.split_of(t.prompt) == "test" for t in test)
    assert [t.kind for t in test[:7]] == list(tasks.KINDS)
    assert tasks.make_tasks("test", 350, seed=5) == test
    assert tasks.make_tasks("test", 70, seed=5) == test[:70]      # fewer test tasks: a prefix of more
    assert tasks.make_tasks("test", 70, seed=6) != test[:70]


def test_exhausted_kinds_leave_the_rotation():
    # There are only ~130 distinct test subtractions with operands up to 50.
    with pytest.raises(ValueError, match="distinct test tasks of kinds \\('sub',\\) exist"):
        tasks.make_tasks("test", 1000, kinds=("sub",))
    mixed = tasks.make_tasks("test", 400, kinds=("sub", "copy"))
    assert len({t.prompt for t in mixed}) == 400


def test_jsonl_files_load_back(tmp_path):
    tasks.main(["--out", str(tmp_path), "--n-train", "21", "--n-test", "7", "--seed", "3"])
    test = tasks.make_tasks("test", 7, seed=3)
    assert load_sft(tmp_path / "sft_test.jsonl") == [t.messages() for t in test]
    assert load_dpo(tmp_path / "dpo_test.jsonl") == [{"prompt": t.prompt, "chosen": t.answer, "rejected": t.wrong}
                                                     for t in test]
    assert len(load_sft(tmp_path / "sft_train.jsonl")) == len(load_dpo(tmp_path / "dpo_train.jsonl")) == 21


def test_counts_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tasks.main(["--out", str(tmp_path / "t"), "--n-train", "-5"])
    assert "--n-train: must be at least 1, got -5" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
