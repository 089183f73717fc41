"""bench/speedrun.py's arithmetic and report, on made-up runs (the real ones take half an hour)."""
import json
import math

import pytest

from bench import speedrun


def test_first_reach_interpolates_between_evaluations():
    evaluations = [(0.0, 0, 0, 8.0), (10.0, 100, 1000, 6.0), (20.0, 200, 2000, 5.0)]
    assert speedrun.first_reach(evaluations, 5.5) == {"elapsed": 15.0, "tokens": 1500.0}
    assert speedrun.first_reach(evaluations, 6.0) == {"elapsed": 10.0, "tokens": 1000.0}
    assert speedrun.first_reach(evaluations, 4.9) is None


def test_bits_per_byte_uses_the_validation_splits_counts(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"val": {"tokens": 300, "bytes": 1000}}))
    assert speedrun.bits_per_byte(2.0, tmp_path) == pytest.approx(2.0 * 0.3 / math.log(2))


def test_the_report_compares_each_run_with_its_baseline(tmp_path, monkeypatch, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps({"val": {"tokens": 300, "bytes": 1000}}))
    curves = {"old": [(0.0, 0, 0, 8.0), (600.0, 1200, 4_915_200, 5.0)],
              "new": [(0.0, 0, 0, 8.0), (300.0, 600, 2_457_600, 5.0), (600.0, 1200, 4_915_200, 4.7)],
              "new-short": [(0.0, 0, 0, 8.0), (360.0, 700, 2_867_200, 4.9)],
              "old-cut": [(0.0, 0, 0, 8.0), (180.0, 340, 1_392_640, 6.0)],
              "new-cut": [(0.0, 0, 0, 8.0), (180.0, 330, 1_351_680, 5.6)]}
    calls = []

    def fake(run_dir, flags):
        calls.append((run_dir.name, flags))
        return {"flags": flags, "evaluations": curves[run_dir.name], "command_seconds": 1.0,
                "config": {"data": "stdlib", "vocab_size": 4096, "data_dir": "data"}}
    prepared = []
    monkeypatch.setattr(speedrun, "pretrain", fake)
    monkeypatch.setattr(speedrun, "prepare", lambda source, **kw: prepared.append((source, kw)) or tmp_path)
    speedrun.prepared.cache_clear()            # found once per process: found here with the fake
    report = speedrun.main(["--out", str(tmp_path / "report.json")])
    assert [name for name, _ in calls] == ["old", "new", "new-short", "old-cut", "new-cut"]
    assert calls[1][1] == ["--max-minutes", "10.000"] and calls[2][1] == ["--max-minutes", "6.000"]
    assert calls[3][1][-2:] == ["--max-minutes", "3"] and "--max-steps" in calls[3][1]
    runs = report["runs"]
    assert runs["new"]["reaches_old_final"]["fraction_of_old"] == pytest.approx(0.5)
    assert runs["new-short"]["reaches_old_final"]["elapsed"] == pytest.approx(360 * 3 / 3.1)
    assert "reaches_old_final" not in runs["new-cut"]
    table = capsys.readouterr().out
    assert "| new | 1,200 | 4,915,200 | 600 | 4.700 |" in table and "0.300 nats (vs old)" in table
    assert "0.400 nats (vs old-cut)" in table
    saved = json.loads((tmp_path / "report.json").read_text())["runs"]["old"]["summary"]
    assert saved["val_loss"] == 5.0 and saved["bits_per_byte"] == pytest.approx(5.0 * 0.3 / math.log(2))
    assert prepared[0] == ("stdlib", {"vocab_size": 4096, "data_dir": str(speedrun.ROOT / "data"), "verbose": False})
