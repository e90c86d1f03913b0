"""Intervals and agreement that respect how test sets are built.

Several questions share a slide (WSI-Bench asks up to four about each; a judged run asks every
exchange of a record), so their outcomes are not independent: an interval that resamples questions
one by one is too narrow. The bootstrap here resamples *slides* with replacement and keeps each
slide's questions together (a cluster bootstrap); with one question per slide it is the ordinary
bootstrap. The Wilson interval is the closed-form one the benchmark papers' accuracies can be read
against (it assumes independent questions).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
LEVEL = 0.95
_CHUNK = 500  # resamples drawn at once: bounds memory at 500 × number of slides


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float] | None:
    """Wilson score interval of a proportion; None when n is 0."""
    if n <= 0:
        return None
    z = _z(level)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 or n successes the bound is exactly 0 or 1; the formula leaves a rounding residue there.
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def cluster_bootstrap(values: Sequence[float], clusters: Sequence[object], *, paired: Sequence[float] | None = None,
                      resamples: int = BOOTSTRAP_RESAMPLES, level: float = LEVEL,
                      seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of mean(values) − mean(paired) (or of mean(values)), resampling whole clusters.

    `clusters[i]` is item i's slide. None when there are fewer than two clusters: with one slide
    the resamples cannot show how much the estimate would move, and a zero-width interval would claim
    a certainty the data cannot give.
    """
    values = np.asarray(values, dtype=float)
    if paired is not None:
        values = values - np.asarray(paired, dtype=float)
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    labels, index = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    if len(labels) < 2:
        return None
    sums = np.bincount(index, weights=values, minlength=len(labels))  # per slide: total outcome
    counts = np.bincount(index, minlength=len(labels)).astype(float)  # per slide: questions
    rng = np.random.default_rng(seed)
    estimates = []
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        draw = rng.integers(0, len(labels), size=(size, len(labels)))  # slides drawn with replacement
        estimates.append(sums[draw].sum(axis=1) / counts[draw].sum(axis=1))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.concatenate(estimates), [tail, 100 - tail])
    return float(low), float(high)


def cohen_kappa(first: Sequence[bool], second: Sequence[bool]) -> float | None:
    """Cohen's κ of two raters' yes/no on the same items; None when undefined (no items, or both raters
    gave one same value to every item, so chance agreement is already 1)."""
    if len(first) != len(second):
        raise ValueError("both raters must rate the same items")
    n = len(first)
    if n == 0:
        return None
    a, b = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    observed = float(np.mean(a == b))
    expected = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def agreement_table(first: Sequence[bool], second: Sequence[bool]) -> dict:
    """κ, percent agreement and the four counts of two raters' yes/no (first = judge, second = human)."""
    a, b = list(map(bool, first)), list(map(bool, second))
    return {"n": len(a), "kappa": cohen_kappa(a, b),
            "percent_agreement": float(np.mean([x == y for x, y in zip(a, b)])) if a else None,
            "both_yes": sum(x and y for x, y in zip(a, b)), "both_no": sum(not x and not y for x, y in zip(a, b)),
            "first_only": sum(x and not y for x, y in zip(a, b)), "second_only": sum(y and not x for x, y in zip(a, b))}
