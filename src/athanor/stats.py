"""Confidence intervals for the rates athanor reports (held-out accuracy, pass@1)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) for a binomial rate of `successes` in `n` trials.

    Chosen over the normal (Wald) interval p +- z sqrt(p(1-p)/n), which collapses to a point at
    p = 0 or 1 and undercovers for the few dozen held-out items a small run has; Wilson's stays
    inside [0, 1] and keeps close to its nominal coverage there (Brown, Cai & DasGupta 2001).
    """
    if n <= 0:
        raise ValueError("an interval needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-item values with a normal-approximation interval,
    mean +- z s / sqrt(n), s the sample standard deviation.

    For rates measured per task (a task's share of passing samples, or the paired difference of two
    models' results on the same task) the task is the unit that was sampled, so the interval is taken
    over tasks, not over the samples within them, which are not independent of each other. Pairing the
    two models on the same tasks removes the spread in task difficulty from the difference's interval.
    """
    n = len(values)
    if n < 2:
        raise ValueError("an interval needs at least two items")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_diff_text(values: list[float]) -> str:
    """A paired difference of rates (after minus before, per task) in points, with its 95% interval."""
    if not any(values):
        return "+0.0 points (no task's result changed)"
    return points_text(*mean_interval(values))


def points_text(mean: float, low: float, high: float) -> str:
    """A difference of rates and its 95% interval, in percentage points."""
    return f"{mean * 100:+.1f} points [{low * 100:+.1f}, {high * 100:+.1f}]"


def paired_verdict(values: list[float]) -> str:
    """What a paired difference shows: a change only where its 95% interval excludes 0."""
    if not any(values):
        return "did not change"
    _, low, high = mean_interval(values)
    return interval_verdict(low, high)


def interval_verdict(low: float, high: float) -> str:
    """A difference's 95% interval read as a change only where it excludes 0."""
    return "raised" if low > 0 else "lowered" if high < 0 else "did not measurably change"
