"""The learning-rate schedule and the run length: linear warm-up, then cosine decay to min_lr at
the last step, over --max-steps (or --max-tokens) steps, or over the steps a --max-minutes budget
fits.

A --max-minutes budget is the run length unless the length is fixed (--fixed-length, on when
--max-steps or --max-tokens is typed): the loop times the steps of the warm-up (skipping the first
two, which are slower; evaluations and checkpoints are timed apart and counted at their intervals),
and at the end of the warm-up (FIT_MIN_STEP to FIT_MAX_STEP) fixes the most steps, at most the
configured length, that finish within the budget. Until then the schedule runs toward the
configured length, which only warm-up steps see. The length goes into config.json as fitted_steps,
so --resume keeps it. With a fixed length the budget is a hard stop.
"""
from __future__ import annotations

import math

from train.config import TrainConfig

# Fitting the run length to --max-minutes: the first steps of an invocation are slower (allocation,
# autotuning, caches) and are not timed; the length is fixed at the end of the warm-up, but no
# sooner than FIT_MIN_STEP (a few steps timed) and no later than FIT_MAX_STEP; and it leaves at
# least MIN_DECAY_STEPS of decay after the warm-up, however short the budget.
SKIPPED_STEPS, FIT_MIN_STEP, FIT_MAX_STEP, MIN_DECAY_STEPS = 2, 5, 50, 10


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def total_steps(cfg: TrainConfig, tokens_per_step: int) -> int:
    """The configured run length: --max-tokens in steps, else --max-steps (a --max-minutes budget
    may fit a shorter one: cfg.fitted_steps)."""
    return max(1, cfg.max_tokens // tokens_per_step) if cfg.max_tokens else cfg.max_steps


def fit_step(cfg: TrainConfig) -> int:
    """The step at whose end a --max-minutes budget fixes the run length: the end of the warm-up,
    whose learning rate does not depend on the length, within [FIT_MIN_STEP, FIT_MAX_STEP]."""
    return min(max(cfg.warmup_steps, FIT_MIN_STEP), FIT_MAX_STEP)


def shortest_fit(cfg: TrainConfig) -> int:
    """The fewest steps a budget may fit: the warm-up (and the timed steps) and some decay."""
    return max(cfg.warmup_steps, fit_step(cfg)) + MIN_DECAY_STEPS


def occurrences(interval: int, after: int, upto: int) -> int:
    """How many of the steps after..upto (after excluded) evaluate or save at `interval` (0: never):
    the multiples of interval, and the last step, which always does."""
    multiples = upto // interval - after // interval if interval else 0
    return multiples + (not interval or upto % interval != 0)


def seconds_to(n_steps: int, cfg: TrainConfig, fixed_at: int, step_s: float, eval_s: float, save_s: float) -> float:
    """The time from the end of step fixed_at (before its evaluation and checkpoint) to the end of
    a run of n_steps: its steps, evaluations and checkpoints."""
    return ((n_steps - fixed_at) * step_s + occurrences(cfg.eval_interval, fixed_at - 1, n_steps) * eval_s
            + occurrences(cfg.ckpt_interval, fixed_at - 1, n_steps) * save_s)


def steps_that_fit(cfg: TrainConfig, fixed_at: int, ceiling: int, seconds_left: float, step_s: float,
                   eval_s: float, save_s: float) -> int:
    """The most steps, at most ceiling and at least shortest_fit, whose rest after fixed_at takes
    at most seconds_left."""
    def fits(n: int) -> bool:
        return seconds_to(n, cfg, fixed_at, step_s, eval_s, save_s) <= seconds_left

    low, high = min(ceiling, shortest_fit(cfg)), ceiling
    if fits(high) or not fits(low):
        return high if fits(high) else low
    while high - low > 1:               # fits(low) and not fits(high); the time only grows with the length
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def fitted(cfg: TrainConfig, n_steps: int, ceiling: int, timed_from: int, fixed_at: int, step_s: float, eval_s: float,
           save_s: float, elapsed: float) -> str:
    """The line that says the run length a --max-minutes budget fitted, and from what."""
    evals = occurrences(cfg.eval_interval, fixed_at - 1, n_steps)
    how = (f"{step_s:.3g} s/step measured over steps {timed_from + 1}-{fixed_at}, "
           f"{evals:,} evaluation{'s' * (evals != 1)}" + (f" of {eval_s:.3g} s" if eval_s else "")
           + (f", checkpoints of {save_s:.3g} s" if save_s >= 0.01 else ""))
    budget = f"--max-minutes {cfg.max_minutes:g}"
    if seconds_to(n_steps, cfg, fixed_at, step_s, eval_s, save_s) > 60 * cfg.max_minutes - elapsed:
        return (f"{budget}: not even {n_steps:,} steps (the warm-up and {MIN_DECAY_STEPS} more) fit ({how}); "
                f"the schedule ends at step {n_steps:,}, past the budget")
    fit = f"all {n_steps:,} steps fit" if n_steps == ceiling else f"{n_steps:,} steps fit"
    return f"{budget}: {fit} ({how}); the schedule ends at step {n_steps:,}"
