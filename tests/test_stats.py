"""The intervals the reports quote, against values computed by hand."""

import math

import pytest

from athanor.stats import Z95, mean_interval


def test_mean_interval_by_hand() -> None:
    values = [0.0, 0.5, 1.0, 0.5]  # mean 0.5, sample sd sqrt(1/6)
    mean, low, high = mean_interval(values)
    half = Z95 * math.sqrt(1 / 6) / 2
    assert (mean, low, high) == pytest.approx((0.5, 0.5 - half, 0.5 + half))


def test_mean_interval_needs_two_items() -> None:
    with pytest.raises(ValueError, match="at least two"):
        mean_interval([1.0])
