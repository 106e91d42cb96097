"""Paired-seed statistics: the t quantile and interval against worked numbers, pairing by seed,
ratios on the log scale, and each verdict rule on both sides of its boundary."""

from __future__ import annotations

import math

import pytest

from bnexp import stats


@pytest.mark.parametrize("df,value", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622),
                                      (30, 2.0423)])
def test_t_quantile_matches_the_printed_table(df: int, value: float) -> None:
    # Two-sided 95% critical values of Student's t, as printed in every statistics textbook.
    assert stats.t_quantile(df) == pytest.approx(value, abs=1e-4)


def test_t_quantile_equals_scipy_stats_ppf() -> None:
    from scipy.stats import t

    for df in (1, 2, 3, 5, 8, 13, 29, 60, 200):
        for p in (0.5, 0.9, 0.95, 0.975, 0.995, 0.025):
            assert stats.t_quantile(df, p) == pytest.approx(float(t.ppf(p, df)), rel=1e-12)


def test_t_interval_on_a_worked_example() -> None:
    # 1..5: mean 3, s = sqrt(2.5) = 1.5811, s/sqrt(5) = 0.70711, t(0.975, 4) = 2.77645:
    # half-width 1.96324, interval 1.03676 .. 4.96324.
    mean, low, high = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert low == pytest.approx(1.03676, abs=1e-5) and high == pytest.approx(4.96324, abs=1e-5)
    assert stats.t_interval([7.0]) == (7.0, None, None)


def test_paired_difference_pairs_by_seed_and_names_the_unpaired() -> None:
    x = {0: 0.95, 1: 0.96, 2: 0.94, 3: 0.97}
    y = {0: 0.90, 1: 0.92, 2: 0.91, 4: 0.80, 3: None}
    effect = stats.paired(x, y)
    assert effect.per_seed == pytest.approx({0: 0.05, 1: 0.04, 2: 0.03})
    assert effect.n == 3 and effect.unpaired == [3, 4]
    # t(0.975, 2) = 4.30265, s = 0.01, half-width 4.30265 * 0.01 / sqrt(3) = 0.024841
    assert effect.estimate == pytest.approx(0.04)
    assert effect.low == pytest.approx(0.04 - 0.024841, abs=1e-6)
    assert effect.high == pytest.approx(0.04 + 0.024841, abs=1e-6)


def test_paired_ratio_is_a_geometric_mean_with_a_log_scale_interval() -> None:
    x = {0: math.e ** 0, 1: math.e ** 1, 2: math.e ** 2}
    effect = stats.paired(x, {0: 1.0, 1: 1.0, 2: 1.0}, "ratio")
    half = 4.30265 * 1.0 / math.sqrt(3)  # log ratios 0, 1, 2: mean 1, s = 1
    assert effect.estimate == pytest.approx(math.e)
    assert effect.low == pytest.approx(math.exp(1 - half), rel=1e-4)
    assert effect.high == pytest.approx(math.exp(1 + half), rel=1e-4)
    assert effect.null == 1.0


def test_a_ratio_needs_positive_values() -> None:
    effect = stats.paired({0: 4.0, 1: 0.0, 2: 6.0}, {0: 2.0, 1: 1.0, 2: 3.0}, "ratio")
    assert effect.dropped == [1] and effect.per_seed == {0: 2.0, 2: 2.0}
    assert effect.low == effect.high == pytest.approx(2.0)  # every seed the same: no spread


@pytest.mark.parametrize("x,y,direction,verdict", [
    ([0.95, 0.96, 0.94], [0.90, 0.92, 0.91], "greater", stats.HOLDS),
    ([0.95, 0.96, 0.94], [0.90, 0.92, 0.91], "less", stats.FAILS),
    ([0.90, 0.92, 0.91], [0.95, 0.96, 0.94], "greater", stats.FAILS),
    ([0.95, 0.90, 0.97], [0.93, 0.94, 0.92], "greater", stats.UNSURE),  # interval holds 0
    ([0.95], [0.90], "greater", stats.UNSURE),  # one pair: no interval
])
def test_directional_rule(x, y, direction, verdict) -> None:
    effect = stats.paired(dict(enumerate(x)), dict(enumerate(y)))
    assert stats.directional(effect, direction) == verdict


def test_directional_rule_on_ratios_uses_one_as_no_effect() -> None:
    faster = stats.paired({0: 400, 1: 520, 2: 480}, {0: 100, 1: 120, 2: 90}, "ratio")
    assert stats.directional(faster, "greater") == stats.HOLDS
    same = stats.paired({0: 400, 1: 100, 2: 480}, {0: 300, 1: 120, 2: 500}, "ratio")
    assert stats.directional(same, "greater") == stats.UNSURE


@pytest.mark.parametrize("x,y,verdict", [
    ([0.950, 0.951, 0.949, 0.952], [0.948, 0.950, 0.949, 0.950], stats.HOLDS),
    ([0.95, 0.96, 0.955, 0.951], [0.90, 0.91, 0.905, 0.902], stats.FAILS),
    ([0.95, 0.93, 0.96, 0.94], [0.94, 0.95, 0.93, 0.95], stats.UNSURE),  # too wide to tell
])
def test_equivalence_rule(x, y, verdict) -> None:
    effect = stats.paired(dict(enumerate(x)), dict(enumerate(y)))
    assert stats.equivalent(effect, 0.01) == verdict


@pytest.mark.parametrize("x,y,verdict", [
    ([0.950, 0.951, 0.949, 0.952], [0.948, 0.950, 0.949, 0.950], stats.HOLDS),
    # clearly better: no equivalence, but it did not fall, which is all the claim says
    ([0.95, 0.96, 0.955, 0.951], [0.90, 0.91, 0.905, 0.902], stats.HOLDS),
    ([0.90, 0.91, 0.905, 0.902], [0.95, 0.96, 0.955, 0.951], stats.FAILS),
    ([0.95, 0.91, 0.96, 0.92], [0.94, 0.95, 0.93, 0.95], stats.UNSURE),  # reaches below -0.01
    ([0.95], [0.90], stats.UNSURE),
])
def test_noninferiority_rule(x, y, verdict) -> None:
    effect = stats.paired(dict(enumerate(x)), dict(enumerate(y)))
    assert stats.noninferior(effect, 0.01) == verdict
    if verdict == stats.HOLDS and effect.estimate > 0.02:
        assert stats.equivalent(effect, 0.01) == stats.FAILS  # the two rules part here


def test_below_a_tolerance() -> None:
    assert stats.below([0.01, 0.02, 0.015], 0.1)[0] == stats.HOLDS
    assert stats.below([0.3, 0.32, 0.31], 0.1)[0] == stats.FAILS
    assert stats.below([0.01, 0.3, 0.05], 0.1)[0] == stats.UNSURE
    assert stats.below([0.01], 0.1)[0] == stats.UNSURE
