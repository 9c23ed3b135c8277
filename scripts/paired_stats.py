"""Paired differences between two arms trained with the same seeds and scored on the same cases: their mean, a
percentile-bootstrap interval, and the verdict the comparison report prints (``scripts/compare_methods.py``).

The unit resampled is one paired difference (method − baseline for one seed and one held-out case), so the
interval says how much the mean difference moves when the seeds and cases had come out otherwise. It does not
model the clustering of cases within a seed; with one held-out case per task, as in the built-in tasks, each unit
is one seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0
NO_EFFECT = "no measurable effect"


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` paired differences and the bootstrap interval ``[low, high]`` at ``level``."""

    mean: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def spans_zero(self) -> bool:
        return self.low <= 0 <= self.high


def bootstrap_interval(differences: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = SEED) -> Interval:
    """Percentile bootstrap of the mean of ``differences``: ``resamples`` draws of as many differences with
    replacement, from ``numpy.random.default_rng(seed)``, so the same input always gives the same interval."""
    values = np.asarray(differences, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a flat, non-empty list of paired differences, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"paired differences must be finite, got {values.tolist()}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1, got {level} and {resamples}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(values.mean()), float(low), float(high), int(values.size), level)


def verdict(interval: Interval, places: int = 3) -> str:
    """``"no measurable effect (...)"`` where the interval spans 0, else ``"better by X (95 % CI a to b)"`` or
    ``"worse by X (...)"``, X the absolute mean difference. One difference has no spread to resample: it is
    reported as too few to tell."""
    ci = f"{interval.level:.0%} CI {interval.low:+.{places}f} to {interval.high:+.{places}f}".replace("%", " %")
    if interval.n < 2:
        return f"{NO_EFFECT} (one paired difference, {interval.mean:+.{places}f}: too few for an interval)"
    if interval.spans_zero:
        return f"{NO_EFFECT} (mean {interval.mean:+.{places}f}, {ci})"
    direction = "better" if interval.low > 0 else "worse"
    return f"{direction} by {abs(interval.mean):.{places}f} ({ci})"
