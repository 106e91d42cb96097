"""Pure functions from what a run observed to the numbers that test BN's claims.

Nothing here knows about TensorBoard, files or the training loop: inputs are plain sequences of
(step, value) pairs or tensors, outputs are numbers. That keeps every metric unit-testable on
hand-made sequences.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where tensors come in: `bnexp compare` never imports it
    import torch

Series = Sequence[tuple[int, float]]  # (step, value), in step order

PERCENTILES = (15, 50, 85)  # Ioffe & Szegedy 2015, Figure 1(b, c)


# ----------------------------------------------------------------------------- convergence


def steps_to_target(val_acc: Series, target: float) -> int | None:
    """First evaluated step at which validation accuracy reaches the target; None if never."""
    return next((step for step, acc in val_acc if acc >= target), None)


def value_at_fraction(series: Series, total_steps: int, fraction: float) -> float | None:
    """The last value logged at or before fraction * total_steps (None if none was)."""
    limit = fraction * total_steps
    before = [v for s, v in series if s <= limit + 1e-9]
    return before[-1] if before else None


def curve_area(series: Series, total_steps: int) -> float | None:
    """Area under a curve per step of the budget: trapezoids between logged points, the first
    value held back to step 0. For validation accuracy 1.0 means perfect from the start.
    Missing values (a diverged run's NaN) count as 0, and so does the budget after a run's
    last point: a run that stopped early learned nothing more."""
    points = [(s, v if v is not None and math.isfinite(v) else 0.0) for s, v in series]
    if not points or total_steps <= 0:
        return None
    area, (prev_s, prev_v) = points[0][1] * points[0][0], points[0]
    for s, v in points[1:]:
        area += (s - prev_s) * (prev_v + v) / 2
        prev_s, prev_v = s, v
    return area / total_steps


def mean_value(series: Series) -> float | None:
    """Mean of the logged values: for the training loss, an area under the curve per step."""
    values = [v for _, v in series]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- stability


STUCK_MARGIN = 0.1  # of the way from chance to perfect accuracy


def stuck_at_chance(accuracy: float | None, num_classes: int,
                    margin: float = STUCK_MARGIN) -> bool:
    """A run that learned (next to) nothing: its accuracy within `margin` of the way from
    chance (1 / num_classes) to 1."""
    if accuracy is None:
        return False
    chance = 1 / num_classes
    return accuracy < chance + margin * (1 - chance)


def chance_loss(num_classes: int) -> float:
    """Cross-entropy of a uniform guess: what a net that learned nothing scores."""
    return math.log(num_classes)


def divergence(losses: Series, bound: float, patience: int) -> tuple[int | None, str | None]:
    """The step at which a run diverged and why: a non-finite loss, or a loss above `bound`
    for `patience` consecutive log points (the step of the last of them)."""
    above = 0
    for step, loss in losses:
        if not math.isfinite(loss):
            return step, "non-finite loss"
        above = above + 1 if loss > bound else 0
        if above >= patience:
            return step, f"loss above {bound:.3g} for {patience} log points"
    return None, None


def loss_spikes(losses: Series, ratio: float = 2.0, window: int = 10) -> int:
    """Log points whose loss exceeds `ratio` times the median of the `window` points before."""
    values = [v for _, v in losses]
    count = 0
    for i in range(1, len(values)):
        trailing = values[max(0, i - window) : i]
        if values[i] > ratio * statistics.median(trailing):
            count += 1
    return count


def tail_std(series: Series, fraction: float = 0.1) -> float | None:
    """Population std of the values logged over the last `fraction` of the steps."""
    if not series:
        return None
    last = series[-1][0]
    first = series[0][0]
    start = last - fraction * (last - first)
    tail = [v for s, v in series if s >= start]
    return statistics.pstdev(tail) if len(tail) > 1 else 0.0


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------- distributions


def sample(x: torch.Tensor, max_elements: int = 1 << 16) -> torch.Tensor:
    """The elements of x, flattened; above max_elements a fixed-seed uniform random subset of
    that size (a conv activation map has millions of elements, and sorting them took seconds
    per probe; a stride would alias with the feature-map layout)."""
    import torch

    flat = x.detach().flatten()
    if flat.numel() <= max_elements:
        return flat
    g = torch.Generator(device=flat.device).manual_seed(0)
    idx = torch.randint(flat.numel(), (max_elements,), generator=g, device=flat.device)
    return flat[idx]


def percentiles(x: torch.Tensor, qs: Sequence[float] = PERCENTILES,
                max_elements: int = 1 << 16) -> list[float]:
    """Percentiles (0-100) of all elements of x, with numpy's default (linear) interpolation;
    of a random subset of max_elements of them for larger tensors (see sample)."""
    import torch

    flat = sample(x, max_elements).float()
    if flat.device.type == "cpu" and flat.numel():
        # numpy's sort beats torch.quantile on a CPU (docs/performance.md, measured choices)
        import numpy as np

        a = np.sort(flat.numpy()).astype(np.float64)
        out = []
        for q in qs:  # numpy's default ("linear") interpolation between order statistics
            pos = (len(a) - 1) * q / 100
            lo = int(pos)
            hi = min(lo + 1, len(a) - 1)
            out.append(float(a[lo] + (a[hi] - a[lo]) * (pos - lo)))
        return out
    q = torch.tensor([v / 100 for v in qs], device=flat.device)
    return torch.quantile(flat, q).tolist()


def percentile_drift(points: Sequence[Sequence[float]]) -> float | None:
    """How far a distribution moved over training: for each tracked percentile, the range
    (max - min) of its values across the probe points; the largest of those ranges."""
    if len(points) < 2:
        return None
    return max(max(col) - min(col) for col in zip(*points))


SATURATION = {  # activation -> |pre-activation| beyond which the unit's slope is < 2% of its max
    "sigmoid": 3.89,  # sigmoid(3.89) = 0.98
    "tanh": 2.30,  # tanh(2.30) = 0.98
}


def saturated_fraction(pre_activation: torch.Tensor, activation: str) -> float | None:
    """Fraction of units whose input puts a sigmoid/tanh in its flat tails; None for ReLU."""
    if activation not in SATURATION:
        return None
    return (pre_activation.abs() > SATURATION[activation]).float().mean().item()


# ----------------------------------------------------------------------------- across runs


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (0 for one value) and count of the non-null values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)


def lr_stats(points: Mapping[float, Sequence[Mapping[str, Any]]], metric: str,
             tolerance: float) -> dict[str, Any]:
    """Learning-rate statistics of one variant from its runs at each LR (one per seed).

    best_lr: the LR with the highest mean `metric` over seeds. max_stable_lr: the largest LR at
    which no seed diverged and every seed reached the target accuracy. good_lr_min/max and
    good_lr_decades: the LRs where no seed diverged and the mean is within `tolerance` of the
    best, and the width of that range in decades (log10 of max/min)."""
    means = {lr: mean_std([run.get(metric) for run in runs])[0] for lr, runs in points.items()}
    means = {lr: m for lr, m in means.items() if m is not None and math.isfinite(m)}
    stable = [lr for lr, runs in points.items()
              if runs and all(not r.get("diverged") and r.get("steps_to_target") is not None
                              for r in runs)]
    out: dict[str, Any] = {"best_lr": None, "best_mean": None, "max_stable_lr": max(
        stable, default=None), "good_lr_min": None, "good_lr_max": None, "good_lr_decades": None}
    if means:
        best = max(means, key=lambda lr: (means[lr], -lr))
        good = [lr for lr, m in means.items() if m >= means[best] - tolerance
                and not any(r.get("diverged") for r in points[lr])] or [best]
        out.update(best_lr=best, best_mean=means[best], good_lr_min=min(good),
                   good_lr_max=max(good), good_lr_decades=math.log10(max(good) / min(good)))
    return out


# ----------------------------------------------------------------------------- landscape


def landscape_summary(losses: Sequence[float], grad_changes: Sequence[float],
                      distances: Sequence[float]) -> dict[str, float]:
    """Santurkar et al. 2018, section 3: along the gradient direction, the range of the loss,
    the largest change of the gradient, and the effective beta-smoothness (largest gradient
    change per unit of distance moved)."""
    beta = max((g / d for g, d in zip(grad_changes, distances, strict=True) if d > 0), default=0.0)
    return {
        "loss_range": max(losses) - min(losses),
        "grad_change_max": max(grad_changes),
        "beta_smoothness": beta,
    }
