"""The evaluate command (train/eval/evaluate.py): language-model metrics of held-out text, eval.json,
and quantized formats side by side."""
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
    saved = json.loads((run / "eval.json").read_text())
    assert saved == result and {"val_loss", "perplexity", "bits_per_byte", "exact_match"} <= set(saved)
    assert "bits_per_byte" in capsys.readouterr().out
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
    assert json.loads((run / "eval.json").read_text()) == result
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
