"""Paired differences between two arms trained with the same seeds and scored on the same cases: their mean, a
percentile-bootstrap interval, and the verdict the comparison report prints (``scripts/compare_methods.py``).

:func:`bootstrap_interval` resamples the paired differences themselves: right when each is one seed (one held-out
case per task, as in the built-in tasks and the 2-D SemSim study). :func:`crossed_bootstrap_interval` is for seeds
crossed with several held-out cases: the differences of one seed share its trained model and those of one case
share its anatomy, so resampling them one by one would treat correlated numbers as independent and give too
narrow an interval. It resamples seeds and cases independently, each with replacement, and takes the mean over the
drawn seed x case grid (the two-way bootstrap for crossed random effects; with one case it resamples seeds only).
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


def _checked(differences: Sequence[float], resamples: int, level: float) -> np.ndarray:
    """``differences`` as a flat float array, refused when empty, not finite, or with a level or resample count
    no interval can have."""
    values = np.asarray(differences, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a flat, non-empty list of paired differences, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"paired differences must be finite, got {values.tolist()}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1, got {level} and {resamples}")
    return values


def _percentile_interval(values: np.ndarray, means: np.ndarray, n: int, level: float) -> Interval:
    """The mean of ``values`` with the central ``level`` share of the resampled ``means`` around it."""
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(values.mean()), float(low), float(high), n, level)


def bootstrap_interval(differences: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = SEED) -> Interval:
    """Percentile bootstrap of the mean of ``differences``: ``resamples`` draws of as many differences with
    replacement, from ``numpy.random.default_rng(seed)``, so the same input always gives the same interval."""
    values = _checked(differences, resamples, level)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    return _percentile_interval(values, means, int(values.size), level)


def crossed_bootstrap_interval(differences: Sequence[float], seeds: Sequence[object], cases: Sequence[object],
                               resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> Interval:
    """Percentile bootstrap of the mean paired difference over seeds crossed with cases: ``differences[k]`` is the
    difference of seed ``seeds[k]`` on case ``cases[k]``. Each resample draws the seeds with replacement and the
    cases with replacement, independently, and averages the differences of every drawn (seed, case) pair present
    (a drawn seed or case counts as often as it was drawn; a missing pair is left out). ``n`` is the number of
    seeds: the independent trainings behind the interval."""
    values = _checked(differences, resamples, level)
    if not len(values) == len(seeds) == len(cases):
        raise ValueError(f"need as many seeds ({len(seeds)}) and cases ({len(cases)}) as paired differences "
                         f"({values.size})")
    if len(set(zip(seeds, cases))) != values.size:
        raise ValueError("a (seed, case) pair occurs twice: each needs exactly one paired difference")
    seed_row = {label: i for i, label in enumerate(dict.fromkeys(seeds))}
    case_column = {label: j for j, label in enumerate(dict.fromkeys(cases))}
    grid, present = np.zeros((len(seed_row), len(case_column))), np.zeros((len(seed_row), len(case_column)))
    for value, s, c in zip(values, seeds, cases):
        grid[seed_row[s], case_column[c]] = value
        present[seed_row[s], case_column[c]] = 1.0
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(len(seed_row), np.full(len(seed_row), 1 / len(seed_row)), size=resamples)
    case_counts = rng.multinomial(len(case_column), np.full(len(case_column), 1 / len(case_column)), size=resamples)
    total = np.einsum("rs,sc,rc->r", seed_counts, grid, case_counts)
    weight = np.einsum("rs,sc,rc->r", seed_counts, present, case_counts)
    means = total[weight > 0] / weight[weight > 0]  # a draw of only missing pairs has no mean
    return _percentile_interval(values, means, len(seed_row), level)


def verdict(interval: Interval, places: int = 3) -> str:
    """``"no measurable effect (...)"`` where the interval spans 0, else ``"better by X (95 % CI a to b)"`` or
    ``"worse by X (...)"``, X the absolute mean difference. One difference has no spread to resample: it is
    reported as too few to tell, as is one seed (``n`` of a crossed interval)."""
    ci = f"{interval.level:.0%} CI {interval.low:+.{places}f} to {interval.high:+.{places}f}".replace("%", " %")
    if interval.n < 2:
        return f"{NO_EFFECT} (one paired difference or seed, {interval.mean:+.{places}f}: too few for an interval)"
    if interval.spans_zero:
        return f"{NO_EFFECT} (mean {interval.mean:+.{places}f}, {ci})"
    direction = "better" if interval.low > 0 else "worse"
    return f"{direction} by {abs(interval.mean):.{places}f} ({ci})"


def paired_interval(pairs: Sequence[tuple[object, object, float]]) -> Interval:
    """:func:`crossed_bootstrap_interval` of ``(seed, case, difference)`` triples."""
    seeds, cases, differences = zip(*pairs)
    return crossed_bootstrap_interval(differences, seeds, cases)
