"""bench.serving: the load it sends is counted right, and the table compares batched with one at a time."""
import pytest

pytest.importorskip("fastapi")

from bench.serving import measure, table  # noqa: E402
from model.io.checkpoint import load_model, load_tokenizer  # noqa: E402
from model.serve.engine import Engine  # noqa: E402
from model.serve.api import build_app  # noqa: E402
from posttrain_fixtures import make_run  # noqa: E402
from serve_fixtures import LoopbackServer  # noqa: E402


def test_measure_counts_every_client_s_tokens(tmp_path):
    run = make_run(tmp_path / "run")
    model, _ = load_model(run)
    engine = Engine(model, load_tokenizer(run), max_batch=4)
    server = LoopbackServer(build_app(engine, "tiny"))
    try:
        row = measure(server.url, clients=3, requests=2, max_tokens=20)   # long enough to overlap
    finally:
        server.close()
        engine.close()
    assert row["clients"] == 3 and row["requests"] == 6
    assert 6 <= row["tokens"] <= 120 and row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"], rel=0.01)
    assert engine.stats.peak_batch >= 2


def test_table_puts_both_servers_side_by_side():
    rows = [{"preset": "tiny", "clients": c, "max_batch": b, "tokens_per_s": t}
            for c, b, t in ((1, 1, 100.0), (1, 16, 110.0), (16, 1, 120.0), (16, 16, 480.0))]
    assert table(rows).splitlines()[2:] == ["| tiny | 1 | 100 | 110 | 1.10x |", "| tiny | 16 | 120 | 480 | 4.00x |"]
