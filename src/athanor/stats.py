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
