"""Rates with Wilson intervals, Newcombe's interval of a difference, the comparison rule and the
interval of a mean (``ssah_jax.evaluation.intervals``)."""

import math

import pytest

from ssah_jax.evaluation.intervals import Comparison, Rate, compare, difference, mean_interval, shown


def test_rates_carry_wilson_intervals_and_compare_by_newcombes_difference_interval():
    # Wilson's closed form (z = 1.959964): scipy's interval is it
    z = 1.959964
    for k, n in ((0, 10), (15, 148), (81, 263), (100, 100)):
        p = k / n
        centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(
            p * (1 - p) / n + z * z / (4 * n * n))
        assert Rate(p, n).interval == pytest.approx((max(centre - half, 0), min(centre + half, 1)), abs=1e-6)
    # Newcombe (1998), Table II, method 10: the four worked examples
    for (a, m), (b, n), expected in (((56, 70), (48, 80), (0.0524, 0.3339)), ((9, 10), (3, 10), (0.1705, 0.8090)),
                                     ((6, 7), (2, 7), (0.0582, 0.8062)), ((5, 56), (0, 29), (-0.0381, 0.1926))):
        assert difference(Rate(a / m, m), Rate(b / n, n)) == pytest.approx(expected, abs=1e-4)
    # against 0 of 100, 5 of 100 differ and 4 do not; against 50 of 100, 64 and 36 do, 63 and 37 not
    zero, half = Rate(0.0, 100), Rate(0.5, 100)
    assert compare(Rate(0.04, 100), zero) == Comparison.SIMILAR
    assert compare(Rate(0.05, 100), zero) == Comparison.HIGHER
    assert compare(zero, Rate(0.05, 100)) == Comparison.LOWER
    assert compare(Rate(0.63, 100), half) == compare(Rate(0.37, 100), half) == Comparison.SIMILAR
    assert compare(Rate(0.64, 100), half) == Comparison.HIGHER
    assert compare(Rate(0.36, 100), half) == Comparison.LOWER
    # more samples, narrower intervals: the same gap differs
    assert compare(Rate(0.63, 1000), Rate(0.5, 1000)) == Comparison.HIGHER
    # seeds pool their answers; a rate shown below a ceiling needs its whole interval below it
    pooled = Rate.pooled([Rate(0.25, 64), Rate(0.5, 64), Rate(0.0, 72)])
    assert (pooled.n, pooled.successes) == (200, 48)
    assert Rate(0.0, 200).below(0.02) and not Rate(0.0, 64).below(0.05)
    assert str(Rate(0.135, 96)) == "13.5% [8.1, 21.8]"


def test_the_interval_of_a_mean_is_students_t():
    mean, low, high = mean_interval([1.0, 2.0, 3.0, 4.0])
    # sd = 1.2910, sem = 0.6455, t(0.975, 3) = 3.1824
    assert mean == 2.5 and (low, high) == pytest.approx((2.5 - 2.0543, 2.5 + 2.0543), abs=1e-3)
    assert mean_interval([0.25, 0.25, 0.25]) == (0.25, 0.25, 0.25)  # no spread, no width
    with pytest.raises(ValueError, match="at least 2 values"):
        mean_interval([1.0])


def test_percent_bars_reach_each_rates_wilson_interval():
    from ssah_jax.evaluation.intervals import percent_bars

    rates = [Rate(0.0, 100), Rate(0.5, 40)]
    values, (below, above) = percent_bars(rates)
    assert values == [0.0, 50.0] and below[0] == 0.0
    for v, lo, hi, r in zip(values, below, above, rates):
        assert (v - lo, v + hi) == pytest.approx(tuple(100 * b for b in r.interval))


def test_a_rate_cell_shows_the_interval_and_a_dash_when_not_measured():
    assert shown(Rate(0.135, 200)) == "13.5% [9.4, 18.9]" and shown(None) == "—"
