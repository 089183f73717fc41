"""The evaluate command (train/eval/evaluate.py): language-model metrics of held-out text, eval.json,
quantized formats side by side, and the progress of each phase on stderr."""
import torch

from posttrain_fixtures import tiny_model, tokenizer
from train.eval import evaluate


def test_text_metrics_of_a_uniform_model_are_log_vocab():
    """All-zero weights give uniform logits: loss ln V per token, bits per byte ln V / ln 2 * tokens
    / bytes; every token after the first is predicted once across the windows."""
    import math
    tok, model = tokenizer(), tiny_model(block_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    texts = ["alpha beta gamma " * 9, "the second document, with a comma", "x"]
    ids = [t for text in texts for t in [tok.eot_id, *tok.encode(text)]]
    metrics = evaluate.text_metrics(model, tok, texts, max_tokens=10_000, batch_size=2)
    V = model.cfg.vocab_size
    assert metrics["eval_tokens"] == len(ids) - 1 and metrics["eval_bytes"] == sum(len(t) for t in texts)
    assert abs(metrics["val_loss"] - math.log(V)) < 1e-5 and abs(metrics["perplexity"] - V) < 1e-2
    assert abs(metrics["bits_per_byte"] - math.log2(V) * (len(ids) - 1) / metrics["eval_bytes"]) < 1e-5
    few = evaluate.text_metrics(model, tok, texts, max_tokens=5)
    assert few["eval_bytes"] == len(texts[0])                      # whole documents, at least max_tokens


def test_command_line_writes_eval_json(tmp_path, capsys):
    import json
    import pytest
    from posttrain_fixtures import make_run
    run = make_run(tmp_path / "run")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("Some held-out prose that the model never saw.\n" * 20)
    result = evaluate.main([str(run), "--data", str(held_out), "--tasks", "7", "--device", "cpu"])
    saved = json.loads((run / "eval.json").read_text())[-1]
    assert saved == result and {"val_loss", "perplexity", "bits_per_byte", "exact_match"} <= set(saved)
    captured = capsys.readouterr()
    assert "bits_per_byte" in captured.out and "held-out loss" not in captured.out
    done = {line.split(":")[0]: line for line in captured.err.splitlines() if "100%" in line}
    assert f"{result['eval_tokens']}/{result['eval_tokens']}" in done["held-out loss"] and "7/7" in done["exact match"]
    (run / "config.json").unlink()       # a run that names no corpus of its own
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        evaluate.main([str(run), "--tasks", "0"])
    with pytest.raises((ValueError, OSError)):
        evaluate.main([str(run), "--data", str(tmp_path / "missing.txt"), "--tasks", "0"])


def test_quantized_formats_side_by_side(tmp_path, capsys):
    import json
    from posttrain_fixtures import make_run
    run = make_run(tmp_path / "run")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("Some held-out prose that the model never saw.\n" * 20)
    result = evaluate.main([str(run), "--data", str(held_out), "--tasks", "5", "--device", "cpu",
                            "--quantize", "none,int8,fp4"])
    assert json.loads((run / "eval.json").read_text())[-1] == result
    by_format = result["by_format"]
    assert list(by_format) == ["none", "int8", "fp4"]
    assert by_format["none"]["projection_bytes_vs_bf16"] == 1.0
    assert 0.5 < by_format["int8"]["projection_bytes_vs_bf16"] < 0.6
    assert by_format["fp4"]["projection_bytes_vs_bf16"] == 4.5 / 16
    # a random model's loss barely moves under int8, more under fp4
    none, int8, fp4 = (by_format[f]["val_loss"] for f in by_format)
    assert abs(int8 - none) < 0.01 * none and abs(fp4 - none) < 0.1 * none and fp4 != none
    out = capsys.readouterr().out
    assert "none" in out and "int8" in out and "fp4" in out and "perplexity" in out


def test_a_quantized_run_is_labelled_with_its_format(tmp_path):
    from model.io.quantized import quantize_run
    from posttrain_fixtures import make_run
    quantized, _, _ = quantize_run(make_run(tmp_path / "run"), "fp4", tmp_path / "q")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("Some held-out prose that the model never saw.\n" * 5)
    result = evaluate.main([str(quantized), "--data", str(held_out), "--tasks", "0", "--quantize", "none"])
    assert list(result["by_format"]) == ["fp4"]
    assert result["by_format"]["fp4"]["projection_bytes_vs_bf16"] == 4.5 / 16
    plain = evaluate.main([str(quantized), "--data", str(held_out), "--tasks", "0"])
    assert plain["projection_bytes_vs_bf16"] == 4.5 / 16


def pretrain_run_with_dataset(tmp_path):
    """A run whose config.json says it pretrained on a corpus prepared (with the run's tokenizer) under
    tmp_path/data, next to a damaged dataset directory; the run and the prepared dataset."""
    import json
    from posttrain_fixtures import make_run
    from train.data.prepare import prepare
    from train.data.tasks import make_tasks
    run = make_run(tmp_path / "run")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, task in enumerate(make_tasks("train", 40, seed=7)):
        (corpus / f"doc{i}.txt").write_text(f"{task.prompt}\nThe answer is {task.answer}, task {i} ({task.kind}).\n")
    dataset = prepare(str(corpus), data_dir=tmp_path / "data", tokenizer=tokenizer(), verbose=False, val_fraction=0.2)
    (tmp_path / "data" / "damaged").mkdir()
    (tmp_path / "data" / "damaged" / "manifest.json").write_text("{")
    (run / "config.json").write_text(json.dumps({"job": "pretrain", "args": {"data": str(corpus),
                                                                             "data_dir": str(tmp_path / "data")}}))
    return run, dataset


def test_a_pretrain_run_is_evaluated_on_its_own_val_split_by_default(tmp_path):
    """No --data: the val split of the dataset the run trained on, every byte of it counted once, and
    no exact match (a base model has not learned the chat format); with the dataset gone, one line."""
    import json
    import shutil
    import pytest
    run, dataset = pretrain_run_with_dataset(tmp_path)
    result = evaluate.main([str(run), "--device", "cpu"])
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert result["data"] == str(dataset / "val.bin") and "exact_match" not in result
    assert result["eval_tokens"] == manifest["val"]["tokens"] - 1 and result["eval_bytes"] == manifest["val"]["bytes"]
    assert result["perplexity"] > 1 and result["bits_per_byte"] > 0
    assert evaluate.main([str(run), "--data", str(dataset), "--device", "cpu"])["val_loss"] == result["val_loss"]
    shutil.rmtree(dataset)
    with pytest.raises(SystemExit, match=r"not in .* \(removed, .*; pass --data"):
        evaluate.main([str(run), "--device", "cpu"])


def test_eval_json_keeps_every_evaluation_with_its_arguments(tmp_path):
    import json
    import pytest
    from posttrain_fixtures import corpus, make_run
    run = make_run(tmp_path / "run")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("Some held-out prose that the model never saw.\n" * 20)
    older = {"checkpoint": "from before histories", "val_loss": 9.0}
    (run / "eval.json").write_text(json.dumps(older))                   # a single record, as eval.json was
    first = evaluate.main([str(run), "--data", str(held_out), "--tasks", "0", "--max-tokens", "16"])
    second = evaluate.main([str(run), "--tasks", "3"])
    history = json.loads((run / "eval.json").read_text())
    assert history == [older, first, second]
    # Without --data, the pretraining run's own corpus (its config.json names it), as recorded.
    assert first["args"]["max_tokens"] == 16 and second["args"]["tasks"] == 3
    assert second["args"]["data"] == str(corpus())
    assert first["time"] <= second["time"] and "val_loss" in first and "exact_match" in second
    (run / "eval.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON.*move it away"):
        evaluate.main([str(run), "--tasks", "3"])
    assert (run / "eval.json").read_text() == "{"
