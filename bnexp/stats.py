"""Paired-seed statistics behind every verdict: the effect of one variant against another,
seed by seed, its 95% confidence interval, and the rules that turn an interval into a verdict.

Seeds pair up because a seed fixes a run's initialization and data order: the same seed in two
variants differs only by what the variants change. Intervals are Student-t intervals on the
per-seed effects (on their logarithms for ratios), which is what a reviewer expects at 3–10
seeds; scipy.special gives the t quantile. Pure functions of numbers: no runs, files or torch
here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
LEVEL = 0.95
INTERVAL = ("95% Student-t interval over the paired seeds (n − 1 degrees of freedom): on the "
            "per-seed differences, or on the logarithms of the per-seed ratios, shown back as "
            "ratios")


@dataclass(frozen=True)
class Effect:
    """x against y over the seeds both have: per-seed differences (x − y) or ratios (x / y),
    their mean (a geometric mean for ratios) and its confidence interval (None below n = 2)."""

    kind: str  # "difference" or "ratio"
    per_seed: dict[Hashable, float]
    estimate: float | None
    low: float | None
    high: float | None
    unpaired: list[Hashable] = field(default_factory=list)  # seeds in one variant only
    dropped: list[Hashable] = field(default_factory=list)  # paired, but no ratio defined

    @property
    def n(self) -> int:
        return len(self.per_seed)

    @property
    def null(self) -> float:
        """The value of no effect."""
        return 1.0 if self.kind == "ratio" else 0.0


def t_quantile(df: int, p: float = 0.5 + LEVEL / 2) -> float:
    """The p-quantile of Student's t with df degrees of freedom."""
    # scipy.special's inverse of the t CDF: the same values as scipy.stats.t.ppf, whose
    # import costs ~0.45 s more (every report pays it; docs/performance.md).
    from scipy.special import stdtrit

    return float(stdtrit(df, p))


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float | None,
                                                                   float | None]:
    """Mean and the two-sided `level` t-interval of the mean; no interval for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = t_quantile(len(values) - 1, 0.5 + level / 2) * statistics.stdev(values) / math.sqrt(
        len(values))
    return mean, mean - half, mean + half


def paired(x: Mapping[Hashable, float | None], y: Mapping[Hashable, float | None],
           kind: str = "difference") -> Effect:
    """The effect of x against y over the seeds where both have a value."""
    if kind not in ("difference", "ratio"):
        raise ValueError(f"kind={kind!r}: allowed 'difference' or 'ratio'")
    have_x = {s for s, v in x.items() if v is not None and math.isfinite(v)}
    have_y = {s for s, v in y.items() if v is not None and math.isfinite(v)}
    seeds = sorted(have_x & have_y, key=repr)
    unpaired = sorted(have_x ^ have_y, key=repr)
    per_seed: dict[Hashable, float] = {}
    dropped = []
    for s in seeds:
        a, b = float(x[s]), float(y[s])  # type: ignore[arg-type]
        if kind == "difference":
            per_seed[s] = a - b
        elif a > 0 and b > 0:
            per_seed[s] = a / b
        else:
            dropped.append(s)
    if not per_seed:
        return Effect(kind, {}, None, None, None, unpaired, dropped)
    if kind == "difference":
        est, low, high = t_interval(list(per_seed.values()))
    else:
        est, low, high = t_interval([math.log(r) for r in per_seed.values()])
        est, low, high = (None if v is None else math.exp(v) for v in (est, low, high))
    return Effect(kind, per_seed, est, low, high, unpaired, dropped)


def directional(effect: Effect, direction: str) -> str:
    """x is greater (or less) than y: holds when the interval excludes no effect in that
    direction, does not hold when it excludes it in the other, inconclusive otherwise."""
    if direction not in ("greater", "less"):
        raise ValueError(f"direction={direction!r}: allowed 'greater' or 'less'")
    if effect.low is None or effect.high is None:
        return UNSURE
    above, below = effect.low > effect.null, effect.high < effect.null
    if above or below:
        return HOLDS if above == (direction == "greater") else FAILS
    return UNSURE


def equivalent(effect: Effect, margin: float) -> str:
    """x and y differ by no more than margin (a difference): holds when the whole interval
    lies within ±margin, does not hold when it lies wholly beyond it, inconclusive otherwise
    (the interval is too wide to tell)."""
    if effect.kind != "difference":
        raise ValueError("equivalence is decided on differences")
    if effect.low is None or effect.high is None:
        return UNSURE
    if -margin <= effect.low and effect.high <= margin:
        return HOLDS
    if effect.low > margin or effect.high < -margin:
        return FAILS
    return UNSURE


def noninferior(effect: Effect, margin: float) -> str:
    """x is worse than y by no more than margin (a difference x − y): holds when the whole
    interval lies above −margin, does not hold when it lies wholly below it, inconclusive
    otherwise. Being better is no failure: the claim is "does not fall", not "stays equal"."""
    if effect.kind != "difference":
        raise ValueError("non-inferiority is decided on differences")
    if effect.low is None or effect.high is None:
        return UNSURE
    if effect.low > -margin:
        return HOLDS
    if effect.high < -margin:
        return FAILS
    return UNSURE


def below(values: list[float], bound: float) -> tuple[str, float | None, float | None]:
    """The mean of values is below bound (one variant against a fixed level, e.g. a relative
    error against a tolerance): the verdict and the interval."""
    mean, low, high = t_interval(values)
    if low is None or high is None:
        return UNSURE, low, high
    return (HOLDS if high < bound else FAILS if low > bound else UNSURE), low, high
