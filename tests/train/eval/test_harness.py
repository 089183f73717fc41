"""train.eval.harness: lm-eval runs local tasks (no hub) on a run through the `tritongpt` model class and on
its export through lm-eval's `hf` model, with the same scores request by request."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from train.eval import harness  # noqa: E402  (importing it registers tritongpt)
from model.io import hf  # noqa: E402
from posttrain_fixtures import make_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]

CHOICE_DOCS = [
    {"question": "Sort 3 1 2:", "choices": [" 1 2 3", " 3 2 1", " 2 1 3"], "answer": 0},
    {"question": "Copy abc:", "choices": [" abc", " cba", " bca", " aaa"], "answer": 0},
    {"question": "Add 2 and 3:", "choices": [" 5", " 6"], "answer": 0},
    {"question": "Upper ab:", "choices": [" AB", " ab", " Ab"], "answer": 0},
    {"question": "", "choices": ["yes", "no"], "answer": 1},
]
GEN_DOCS = [{"prompt": p, "target": t} for p, t in
            [("Reverse 1 2 3:", " 3 2 1"), ("Count a in banana:", " 3"), ("Sort 9 8:", " 8 9"), ("Copy xy:", " xy")]]
ROLLING_DOCS = [{"text": "Sort 5 4 3 2 1 and then copy the answer. " * 12}, {"text": "Add 7 and 8."}]


def write_tasks(root: Path) -> Path:
    """Three local lm-eval tasks: multiple choice (acc), generation (exact match) and rolling perplexity."""
    tasks = root / "tasks"
    tasks.mkdir()
    for name, docs in (("choice", CHOICE_DOCS), ("gen", GEN_DOCS), ("rolling", ROLLING_DOCS)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = lambda name: (f"task: tg_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                           f"    test: {tasks / f'{name}.jsonl'}\ntest_split: test\n")
    (tasks / "choice.yaml").write_text(common("choice") + (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"))
    (tasks / "gen.yaml").write_text(common("gen") + (
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"))
    (tasks / "rolling.yaml").write_text(common("rolling") + (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"))
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    with pytest.MonkeyPatch.context() as env:       # local data only, cached here, for this module
        for name, value in dict(HF_DATASETS_CACHE=str(root / "datasets"), HF_HUB_OFFLINE="1",
                                HF_DATASETS_OFFLINE="1").items():
            env.setenv(name, value)
        run = make_run(root / "run", init_std=0.1, block_size=64)
        yield run, hf.export(run, root / "export"), write_tasks(root)


def evaluate(model: str, model_args: str, tasks: Path) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tg_choice", "tg_gen", "tg_rolling"],
                                   task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True,
                                   batch_size=3, device="cpu")


def responses(result: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_tritongpt_and_hf_on_the_export_give_the_same_scores(setup):
    run, export, tasks = setup
    ours = evaluate("tritongpt", f"path={run}", tasks)
    theirs = evaluate("hf", f"pretrained={export},dtype=float32", tasks)
    for task in ("tg_choice", "tg_gen", "tg_rolling"):
        assert len(ours["samples"][task]) == len(theirs["samples"][task]) > 0
    for a, b in zip(responses(ours, "tg_choice"), responses(theirs, "tg_choice")):
        assert [lp for lp, _ in a] == pytest.approx([lp for lp, _ in b], abs=1e-3)   # summed over tokens
    assert responses(ours, "tg_gen") == responses(theirs, "tg_gen")
    rolling = [r for (r,) in responses(ours, "tg_rolling")]
    assert rolling == pytest.approx([r for (r,) in responses(theirs, "tg_rolling")], rel=1e-5)
    assert rolling[0] < 5 * rolling[1] < 0          # the long document spans several block_size windows
    assert ours["results"]["tg_choice"]["acc,none"] == theirs["results"]["tg_choice"]["acc,none"]
    assert ours["results"]["tg_gen"]["exact_match,none"] == theirs["results"]["tg_gen"]["exact_match,none"]


def test_train_evaluate_runs_lm_eval_tasks_into_the_run_directory(setup, capsys):
    from train.eval import evaluate
    run, _, tasks = setup
    result = evaluate.main([str(run), "--tasks", "0", "--lm-eval", "tg_choice,tg_gen", "--lm-eval-include",
                            str(tasks), "--device", "cpu"])
    direct = lm_eval.simple_evaluate(model="tritongpt", model_args=f"path={run}", tasks=["tg_choice"],
                                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    assert result["lm_eval/tg_choice/acc"] == direct["results"]["tg_choice"]["acc,none"]
    assert "lm_eval/tg_gen/exact_match" in result
    assert json.loads((run / "lm_eval.json").read_text())["results"]["tg_choice"]["acc,none"] == result["lm_eval/tg_choice/acc"]
    captured = capsys.readouterr()
    assert "tg_choice" in captured.out
    # the progress of our model's requests: the 14 choices of 5 questions, 4 generations
    done = [line for line in captured.err.splitlines() if line.startswith("lm-eval ") and "100%" in line]
    assert any("lm-eval loglikelihood" in line and "14/14" in line for line in done), captured.err
    assert any("lm-eval generate_until" in line and "4/4" in line for line in done), captured.err
    with pytest.raises(ValueError, match="unknown lm-eval tasks"):
        evaluate.main([str(run), "--tasks", "0", "--lm-eval", "no_such_task", "--lm-eval-include", str(tasks)])
    with pytest.raises(ValueError, match="not a directory"):
        evaluate.main([str(run), "--tasks", "0", "--lm-eval", "tg_choice", "--lm-eval-include", str(tasks / "x")])


def test_the_command_line_runs_lm_eval_with_tritongpt_and_writes_results(setup, tmp_path):
    run, _, tasks = setup
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "train.harness", "--model", "tritongpt", "--model_args",
                           f"path={run}", "--tasks", "tg_choice", "--include_path", str(tasks),
                           "--output_path", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tg_choice" in done.stdout and "acc" in done.stdout
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert written and "tg_choice" in json.loads(written[0].read_text())["results"]


def test_a_missing_run_and_bad_model_args_are_errors_naming_them(setup, tmp_path):
    with pytest.raises(ValueError, match="nope"):
        harness.TritonGPTLM(path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"unknown tritongpt model_args \['foo'\]"):
        harness.TritonGPTLM(path=str(setup[0]), foo="1")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'x'"):
        harness.TritonGPTLM(path=str(setup[0]), batch_size="x")


def test_scores_are_the_models_log_probabilities_and_edge_cases_are_scored(setup):
    import torch
    run = setup[0]
    lm = harness.TritonGPTLM(path=str(run), device="cpu", batch_size=2)
    context, continuation = [5, 9, 13, 2], [7, 3]
    logprobs = lm.model(torch.tensor([context + continuation[:-1]])).log_softmax(-1)[0]   # (5, V)
    expected = logprobs[3, 7] + logprobs[4, 3]
    long = list(range(3, 3 + 100))                    # longer than block_size 64: its last 64 scored
    tail = lm._loglikelihood_tokens([(("a", "b"), [1], long)])[0][0]
    assert tail == pytest.approx(lm._loglikelihood_tokens([(("a", "b"), long[:-64], long[-64:])])[0][0], abs=1e-4)
    scores = lm._loglikelihood_tokens([(("a", "b"), context, continuation), (("c", ""), context, [])])
    assert scores[0][0] == pytest.approx(expected.item(), abs=1e-5) and scores[1] == (0.0, True)


def hub_tasks(root: Path, tasks: Path) -> Path:
    """An include directory: tg_hub (a hub data set nobody has cached), tg_local (local files) and a
    group of both."""
    hub = root / "hub_tasks"
    hub.mkdir()
    (hub / "hub.yaml").write_text("task: tg_hub\ndataset_path: tritongpt-tests/no-such-dataset\ntest_split: test\n"
                                  "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                                  "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n")
    (hub / "local.yaml").write_text((tasks / "choice.yaml").read_text().replace("tg_choice", "tg_local"))
    (hub / "group.yaml").write_text("group: tg_group\ntask:\n  - tg_hub\n  - tg_local\n")
    return hub


def test_offline_tasks_that_need_a_download_fail_at_once_in_one_line(setup, tmp_path, monkeypatch):
    """Offline, a task whose data set lm-eval would download is refused before any model loads, naming
    it and --lm-eval-include (not after the hub's retries); local tasks are not named."""
    import time
    from train.eval import evaluate
    run, _, tasks = setup
    hub = hub_tasks(tmp_path, tasks)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not harness.hub_reachable()
    manager = harness.task_manager(["tg_group"], str(hub))
    assert harness.downloads(manager, ["tg_group"]) == {"tg_hub": "tritongpt-tests/no-such-dataset"}
    assert harness.downloads(manager, ["tg_local"]) == {}
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"cannot be reached.*tg_hub \(tritongpt-tests/no-such-dataset\).*"
                                         r"--lm-eval-include DIR") as refused:
        evaluate.main([str(run), "--tasks", "0", "--lm-eval", "tg_local,tg_hub", "--lm-eval-include", str(hub)])
    assert "tg_local" not in str(refused.value) and time.perf_counter() - started < 10


def test_the_command_line_refuses_offline_downloads_in_one_line(setup, tmp_path):
    run, _, tasks = setup
    hub = hub_tasks(tmp_path, tasks)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "train.harness", "--model", "tritongpt", "--model_args",
                           f"path={run}", "--tasks", "tg_group", "--include_path", str(hub)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: the Hugging Face hub cannot be reached")
    assert "tg_hub (tritongpt-tests/no-such-dataset)" in done.stderr and "--include_path DIR" in done.stderr


def test_the_hub_is_reachable_when_its_host_takes_a_connection(monkeypatch):
    import socket
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(harness.datasets.config, "HF_HUB_OFFLINE", False)
    with socket.create_server(("127.0.0.1", 0)) as listening:        # a local stand-in for the hub
        port = listening.getsockname()[1]
        monkeypatch.setattr(harness.huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert harness.hub_reachable(timeout=1)
    assert not harness.hub_reachable(timeout=1)                      # the port is closed now
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not harness.hub_reachable()
