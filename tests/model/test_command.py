"""The commands a user types end a mistake with one line on stderr (status 1; argparse's usage
errors status 2), never a traceback; --debug shows the traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def command(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv, message", [
    (["model.chat", "no/such/run"], "no/such/run: expected a run directory"),
    (["train.sft", "--init", "no/such/run"], "no/such/run: expected a run directory"),
    (["train.data", "--source", "no/such/corpus", "--out", "never/written"], "error: corpus source 'no/such/corpus'"),
])
def test_a_mistake_is_one_line_and_status_1(argv, message, tmp_path):
    done = command(*argv, *(["--out", str(tmp_path / "out")] if argv[0] == "train.sft" else []))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() and not (ROOT / "never").exists()


def test_debug_shows_the_traceback():
    done = command("model.chat", "no/such/run", "--debug")
    assert done.returncode == 1 and "Traceback" in done.stderr and "ValueError: no checkpoint" in done.stderr


def test_a_usage_error_is_status_2():
    done = command("train.pretrain", "--batch-size", "0")
    assert done.returncode == 2 and "--batch-size: must be at least 1, got 0" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [["model.chat", "RUN", "--device", "cuda"],
                                  ["train.evaluate", "RUN", "--device", "cuda:1", "--tasks", "0", "--humaneval"]])
def test_cuda_without_a_gpu_is_one_line(argv, tmp_path):
    from posttrain_fixtures import make_run
    run = make_run(tmp_path / "run")
    done = command(*[str(run) if a == "RUN" else a for a in argv])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "was asked for but no CUDA GPU is visible; use --device cpu" in done.stderr.strip().splitlines()[-1]


def test_pick_device():
    import torch
    from model.command import pick_device
    assert pick_device("auto") == pick_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == "cpu"


def test_a_usage_error_is_the_error_and_a_hint_not_the_usage(capsys):
    from model.command import Parser, at_least, flag_type
    parser = Parser(prog="python -m x")
    parser.add_argument("--max-steps", type=flag_type(int, at_least(1)))
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("path")
    for argv, hint in ([["p", "--max-stesp", "3"], "did you mean --max-steps? (python -m x --help lists every flag)"],
                       [["p", "--max-steps", "0"], "python -m x --help lists every flag"],
                       [["p", "--colour"], "python -m x --help lists every flag"],
                       [["p", "--steps-max", "3"], "python -m x --help lists every flag"]):   # near no flag
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 2 and lines[0].startswith("python -m x: error: ") and lines[1] == hint


COMMANDS = ["train.pretrain", "train.sft", "train.dpo", "train.grpo", "train.data", "train.tasks", "train.evaluate",
            "model.chat", "model.serve", "model.web", "model.quantize", "model.hf", "bench.compiled", "bench.report",
            "bench.serving", "bench.sandbox"]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_answers_a_misspelt_flag_in_two_lines(module):
    done = command(module, "--max-stesp", "3")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2 and "error:" in lines[0], done.stderr
    assert "usage:" not in done.stderr and "--help lists every flag" in lines[1]
