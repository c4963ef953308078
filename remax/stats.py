"""Summary statistics of evaluation samples (trainers and ``jobs.evaluate`` report the same way):
mean and standard error, and the paired win rate with its Wilson interval."""

from __future__ import annotations

import math

import torch


def mean_stderr(values: torch.Tensor) -> dict:
    """``{"mean", "stderr", "n"}`` of a 1-D sample (stderr = sample std / sqrt(n))."""
    v = values.detach().double().cpu()
    n = v.numel()
    std = float(v.std(unbiased=True)) if n > 1 else 0.0
    return {"mean": float(v.mean()), "stderr": std / math.sqrt(n) if n else 0.0, "n": n}


Z_95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` trials.

    Why Wilson: it is closed-form and deterministic (no bootstrap RNG to seed), stays inside
    [0, 1], and keeps a sensible width at p = 0 or 1 and small n, where the normal and percentile
    bootstrap intervals collapse to a point. With ties counted as ½ each outcome is in {0, ½, 1},
    whose variance (W + T/4)/n − p² is at most the binomial p(1 − p) Wilson assumes, so the
    interval is conservative when there are ties (all ties: 0.5 with a binomial-width interval).
    """
    if n <= 0:
        raise ValueError(f"n={n}: a win rate needs at least one compared prompt")
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At p = 0 (1) the bound is exactly 0 (1); float rounding of centre − half must not move it.
    low = 0.0 if p == 0 else max(0.0, centre - half)
    high = 1.0 if p == 1 else min(1.0, centre + half)
    return low, high


def win_rate(a, b, *, z: float = Z_95) -> dict[str, float]:
    """Win rate of A over B from per-prompt scores ``a`` and ``b`` (same prompts, same order).

    Returns ``{"win_rate", "wins", "ties", "losses", "n", "ci_low", "ci_high"}``: win_rate =
    (wins + ties / 2) / n, a fraction in [0, 1]; ``[ci_low, ci_high]`` its Wilson interval at the
    normal quantile ``z`` (95 % by default).
    """
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b):
        raise ValueError(f"win_rate needs paired scores: len(a)={len(a)} but len(b)={len(b)}")
    n = len(a)
    wins = sum(x > y for x, y in zip(a, b))
    losses = sum(x < y for x, y in zip(a, b))
    ties = n - wins - losses
    p = (wins + 0.5 * ties) / n if n else float("nan")
    low, high = wilson_interval(p, n, z)
    return {
        "win_rate": p,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "n": n,
        "ci_low": low,
        "ci_high": high,
    }
