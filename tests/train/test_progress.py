"""train/progress.py: bars on stderr that a log reads as lines, redrawn while one slow item runs, shown
only when asked."""
import time

from tqdm import tqdm

from train import progress


def test_a_log_gets_whole_lines_with_the_count_and_nothing_on_stdout(capsys):
    with progress.progress(3, "phase", " things") as bar:
        for _ in range(3):
            bar.update(1)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and "\r" not in err and "\x1b" not in err
    assert lines[0].startswith("phase:") and "0/3" in lines[0] and "3/3" in lines[-1] and "things" in lines[-1]


def test_a_slow_item_is_not_silence(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.2)
    with progress.progress(2, "slow", " things") as bar:
        time.sleep(0.9)                    # one item that takes 4 intervals: the thread redraws meanwhile
        bar.update(2)
    lines = capsys.readouterr().err.splitlines()
    waiting = [line for line in lines if "0/2" in line]
    assert len(waiting) >= 3 and "2/2" in lines[-1], lines                 # the start and >= 2 redraws


def test_an_unknown_total_shows_the_time_taken(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.2)
    with progress.progress(None, "waiting on x", bar_format="{desc} [{elapsed}]"):
        time.sleep(0.5)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3 and all(line.startswith("waiting on x [00:0") for line in lines), lines


def test_inside_another_bar_a_log_gets_no_cursor_moves(capsys):
    with tqdm(total=2, desc="outer") as outer, progress.progress(2, "inner", leave=False) as inner:
        inner.update(2)
        outer.update(2)
    err = capsys.readouterr().err
    assert "\x1b[A" not in err and [line for line in err.split("\n") if line.startswith("inner")][-1].count("2/2")


def test_show_false_shows_nothing_and_stops_no_thread(capsys):
    with progress.progress(5, "hidden", show=False) as bar:
        bar.update(5)
    assert capsys.readouterr().err == "" and bar._thread is None
