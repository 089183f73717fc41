"""The learning-rate schedule and the arithmetic of a run length fitted to --max-minutes
(train/schedule.py); the loop's use of them is tested in tests/train/test_loop.py."""
import pytest

from train.config import TrainConfig
from train.schedule import lr_at, steps_that_fit


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)


def test_steps_that_fit_counts_evaluations_and_checkpoints():
    cfg = TrainConfig(warmup_steps=3, eval_interval=10, ckpt_interval=5)
    assert steps_that_fit(cfg, 5, 40, 46.0, 1.0, 5.0, 0.0) == 31
    # Checkpoints of 1 s at steps 5 (after the fitting), 10, ... and the last: 30 steps take
    # 25 + 3 * 5 + 6 * 1 = 46 s, 31 take 26 + 4 * 5 + 7 * 1 = 53 s.
    assert steps_that_fit(cfg, 5, 40, 46.0, 1.0, 5.0, 1.0) == 30
    assert steps_that_fit(cfg, 5, 40, 1e9, 1.0, 5.0, 1.0) == 40          # never past the ceiling
    assert steps_that_fit(cfg, 5, 12, 0.0, 1.0, 5.0, 1.0) == 12          # nor past a ceiling shorter than the least
