"""Rates with their confidence intervals, and the one rule that compares two of them.

A rate (ASR, refusal rate, accuracy) is ``successes / n``; its interval is Wilson's score
interval (scipy's ``binomtest(...).proportion_ci(method="wilson")``), which stays inside [0, 1]
and is honest at 0% and 100%, where the normal approximation collapses to a point. Two rates
differ when the interval of their difference excludes 0: Newcombe's hybrid score interval
(Newcombe 1998, method 10), built from the two Wilson intervals. Runs repeated with several
seeds are pooled (:meth:`Rate.pooled`): their answers are counted together, so the interval is
that of all the answers (it does not model seed-to-seed variation beyond the answers'; the
reports give the per-seed rates beside it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from scipy import stats

CONFIDENCE = 0.95


class Comparison(StrEnum):
    """A rate against another, by :func:`compare`."""

    HIGHER = "higher"
    LOWER = "lower"
    SIMILAR = "similar"


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval of ``successes`` out of ``n``."""
    if n <= 0:
        raise ValueError(f"a rate needs n >= 1 samples, got {n}")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Rate:
    """A rate measured on ``n`` samples (``value`` = successes / n)."""

    value: float
    n: int

    @property
    def successes(self) -> int:
        return round(self.value * self.n)

    @property
    def interval(self) -> tuple[float, float]:
        """Wilson's 95% interval."""
        return wilson(self.successes, self.n)

    @classmethod
    def pooled(cls, rates: Iterable[Rate]) -> Rate:
        """The answers of several runs (e.g. seeds) counted together."""
        rates = list(rates)
        n = sum(r.n for r in rates)
        return cls(sum(r.successes for r in rates) / n, n)

    def below(self, ceiling: float) -> bool:
        """Whether the whole interval is at most ``ceiling`` (the rate is shown to be that low)."""
        return self.interval[1] <= ceiling

    def __str__(self) -> str:
        low, high = self.interval
        return f"{100 * self.value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def percent(x: float | None) -> str:
    """A fraction in percent with one decimal (``13.5%``), or a dash for a value not measured."""
    return "—" if x is None else f"{100 * x:.1f}%"


def shown(rate: Rate | None) -> str:
    """A report's cell: the rate with its Wilson 95% interval (``13.5% [8.1, 21.8]``), or a dash
    for a rate not measured."""
    return "—" if rate is None else str(rate)


def percent_bars(rates: Iterable[Rate]) -> tuple[list[float], list[list[float]]]:
    """Plot inputs of ``rates``: their values in percent and the ``yerr`` of matplotlib (the
    distances below and above each value to its Wilson interval, ``[2, len]``)."""
    rates = list(rates)
    values = [100 * r.value for r in rates]
    return values, [[v - 100 * r.interval[0] for v, r in zip(values, rates)],
                    [100 * r.interval[1] - v for v, r in zip(values, rates)]]


def mean_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student's t interval of the mean of ``values`` (e.g. a per-query
    measure, or paired differences of two models on the same queries)."""
    x = [float(v) for v in values]
    if len(x) < 2:
        raise ValueError(f"an interval of a mean needs at least 2 values, got {len(x)}")
    mean = sum(x) / len(x)
    sem = stats.sem(x)
    if sem == 0:
        return mean, mean, mean
    low, high = stats.t.interval(confidence, len(x) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def difference(a: Rate, b: Rate) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``a.value - b.value``."""
    (la, ua), (lb, ub) = a.interval, b.interval
    d = a.value - b.value
    return (d - math.hypot(a.value - la, ub - b.value), d + math.hypot(ua - a.value, b.value - lb))


def compare(a: Rate, b: Rate) -> Comparison:
    """``a`` against ``b``: 'higher' / 'lower' when the 95% interval of their difference
    excludes 0, else 'similar'."""
    low, high = difference(a, b)
    if low > 0:
        return Comparison.HIGHER
    if high < 0:
        return Comparison.LOWER
    return Comparison.SIMILAR
