"""bench/posttrain_memory.py at a tiny size: both paths compute the same loss, and the script runs
its subprocesses and writes its report."""
import json

import pytest

from bench import posttrain_memory

TINY = {"rows": 4, "seq": 16, "hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "group": 2}


@pytest.mark.parametrize("step", posttrain_memory.STEPS)
def test_chunked_and_unfused_steps_compute_the_same_loss(step):
    chunked, unfused = (posttrain_memory.measure(step, path, 300, TINY) for path in posttrain_memory.PATHS)
    assert chunked["loss"] == pytest.approx(unfused["loss"], rel=1e-5, abs=1e-6)
    assert chunked["peak_mib"] >= 0 and unfused["peak_mib"] >= 0


def test_the_script_measures_each_path_in_a_subprocess_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "memory.json"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    posttrain_memory.main(["--vocab", "300", "--steps", "dpo", *flags, "--out", str(out)])
    report = json.loads(out.read_text())
    assert [(r["step"], r["path"], r["vocab"]) for r in report["results"]] == [("dpo", "chunked", 300),
                                                                              ("dpo", "unfused", 300)]
    chunked, unfused = report["results"]
    assert chunked["loss"] == pytest.approx(unfused["loss"], rel=1e-5)
    ratio = chunked["peak_mib"] / unfused["peak_mib"] if unfused["peak_mib"] > 0 else None    # 0: below import's peak
    assert report["ratios"] == [{"step": "dpo", "vocab": 300, "ratio": ratio}]
    assert report["shape"] == TINY and report["bar"]["vocab"] == 300
    assert "| dpo | 300 |" in capsys.readouterr().out


def test_rows_must_split_into_pairs_and_groups(capsys):
    with pytest.raises(SystemExit):
        posttrain_memory.main(["--rows", "6", "--group", "4"])
    assert "--rows 6 must be even (dpo's pairs) and a multiple of --group 4" in capsys.readouterr().err
