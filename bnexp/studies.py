"""The classic BN claims as named studies: each a sweep (configs/experiment/NAME.yaml) plus the
claims it tests, every claim measured over paired seeds (bnexp.stats) from the runs'
summary.json files. Nothing here hard-codes an answer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnexp import metrics, stats
from bnexp.runs import Run

HOLDS, FAILS, UNSURE = stats.HOLDS, stats.FAILS, stats.UNSURE
MARGIN = 0.01  # "matters little": the equivalence margin, 1 point of accuracy
LEVEL_FRACTION = 0.95  # convergence level: 95% of the lower final accuracy of a seed pair
EARLY_FRACTIONS = (0.1, 0.5)  # accuracy at these fractions of the budget
LEARNED = 0.5  # a run "trains": it gets at least half-way from chance to the weaker best
GOOD_LR_TOLERANCE = 0.01  # an LR is "good" for a seed within 1 point of that seed's best
MODE_TOLERANCE = 0.001  # eval-mode predictions that change with the batch size: at most 0.1%
RUNNING_TOLERANCE = 0.1  # running statistics "match": errors below 10% (see train_eval_claims)
NORM_LABELS = {"batch": "BN", "layer": "LN", "group": "GN", "instance": "IN", "none": "no norm"}

RULES = f"""\
Seeds pair up: a seed fixes a run's initialization and data order, so the same seed in two
variants differs only by what the variants change. Each claim's effect is computed per paired
seed (a difference, or a ratio where the claim is "k× fewer / larger"), and its interval is the
{stats.INTERVAL}. A seed present in one variant only is left out and named. With fewer than 2
pairs there is no interval and the verdict is inconclusive.

- **Directional claims** (A is better than B): **holds** when the interval lies wholly on the
  claimed side of no effect (0 for a difference, 1× for a ratio); **does not hold** when it lies
  wholly on the other side; **inconclusive** when it contains no effect.
- **"Matters little" claims**: equivalence within ±{MARGIN:g} (absolute accuracy): **holds** when
  the whole interval of the paired difference lies inside ±{MARGIN:g}; **does not hold** when it
  lies wholly outside; **inconclusive** when it straddles the margin.
- **Convergence** is measured at a level both variants reach: for each seed pair,
  {LEVEL_FRACTION:.0%} of the lower of the two final validation accuracies; the effect is the
  ratio of the steps each variant needs to first reach it (at the evaluation cadence). The area
  under the validation-accuracy curve (per step of the budget) and the accuracy at
  {" and ".join(f"{f:.0%}" for f in EARLY_FRACTIONS)} of the budget are paired differences.
- **Stability at large learning rates**: a run *trains* at an LR when it did not diverge and
  its final accuracy is at least {LEARNED:.0%} of the way from chance to the lower of the two
  variants' best mean accuracy over the grid (a level both reach at some LR). Per seed, the
  largest LR of the grid at which it trains; the effect is the per-seed ratio. A seed that
  trains at no LR counts as training at the lowest LR, a bound that can only understate the
  advantage of the other variant; the report says so. The grid statement ("stable up to")
  is the largest LR at which every seed trains.
- **"Holds its accuracy" claims** (a norm's accuracy at a tiny batch against batch 64):
  non-inferiority with the same margin: **holds** when the whole interval of the paired
  difference (tiny − 64) lies above −{MARGIN:g}, **does not hold** when it lies wholly below,
  **inconclusive** otherwise. Being more accurate at the tiny batch does not count against it.
- **Mechanics claims** keep their own metrics (percentile drift, gradient ratios, eval/train
  gaps, running statistics against a tolerance stated with the claim), judged by the same
  interval rule.
"""


@dataclass
class Verdict:
    id: str
    claim: str
    metric: str  # what was measured, in words
    variants: dict[str, dict[Hashable, float | None]]  # label -> seed -> value
    effect: stats.Effect | None
    rule: str  # which rule decided
    verdict: str
    measured: str  # one line for the report's table
    reason: str = ""  # why, where it is not what the paper says or cannot be decided
    runs: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------- selection


def pick(runs: Sequence[Run], **where: Any) -> list[Run]:
    """Runs whose config matches every key (short keys allowed: norm=batch), by seed."""
    def match(run: Run, key: str, value: Any) -> bool:
        return any((k == key or k.endswith("." + key)) and v == value
                   for k, v in run.config.items())

    chosen = [r for r in runs if all(match(r, k.replace("__", "."), v) for k, v in
                                     where.items())]
    return sorted(chosen, key=lambda r: (r.seed is None, r.seed))


def by_seed(runs: Sequence[Run], value: Callable[[Run], float | None]
            ) -> dict[Hashable, float | None]:
    """value(run) for each seed; two runs with one seed is a selection error."""
    out: dict[Hashable, float | None] = {}
    for r in runs:
        if r.seed in out:
            raise ValueError(f"two runs with seed {r.seed} in one variant: {r.path}")
        v = value(r)
        out[r.seed] = None if v is None else float(v)
    return out


def metric(name: str) -> Callable[[Run], float | None]:
    return lambda run: run.metrics.get(name)


def chance(runs: Sequence[Run]) -> float:
    classes = next((r.metrics.get("num_classes") for r in runs
                    if r.metrics.get("num_classes")), 10)
    return 1 / classes


def lrs(runs: Sequence[Run]) -> list[float]:
    return sorted({r.config["optim.lr"] for r in runs})


def best_lr(runs: Sequence[Run], value: Callable[[Run], float | None]) -> float | None:
    """The LR whose seed mean of value is highest (ties: the smaller LR)."""
    means = {}
    for lr in lrs(runs):
        vals = [v for r in runs if r.config["optim.lr"] == lr
                if (v := value(r)) is not None and math.isfinite(v)]
        if vals:
            means[lr] = statistics.fmean(vals)
    return max(means, key=lambda lr: (means[lr], -lr)) if means else None


def grid_edge(runs: Sequence[Run], lr: float | None, label: str) -> str:
    """A warning when a variant's best LR is the smallest or largest of its grid: its optimum
    may lie beyond, and a comparison "at its best LR" is then only at the best LR tried."""
    grid = lrs(runs)
    if lr is None or len(grid) < 2 or lr not in (grid[0], grid[-1]):
        return ""
    end = "smallest" if lr == grid[0] else "largest"
    return (f"{label}'s best LR {lr:g} is the {end} of the grid: its optimum may lie beyond "
            "it (extend optim.lr)")


def budget(run: Run) -> int:
    """The run's planned steps (a diverged run stops before them)."""
    return int(run.metrics.get("total_steps") or run.config.get("trainer.steps")
               or run.metrics.get("steps") or 0)


def curve_area(run: Run) -> float | None:
    curve = run.curves.get("val_acc")
    return metrics.curve_area(curve, budget(run)) if curve else None


def acc_at(fraction: float) -> Callable[[Run], float | None]:
    def value(run: Run) -> float | None:
        curve = [(s, v) for s, v in run.curves.get("val_acc", []) if v is not None]
        return metrics.value_at_fraction(curve, budget(run), fraction) if curve else None
    return value


# ----------------------------------------------------------------------------- numbers


def num(v: float | None, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def mean_of(values: Mapping[Hashable, float | None], geometric: bool = False) -> float | None:
    xs = [v for v in values.values() if v is not None and math.isfinite(v)]
    if geometric and xs and min(xs) > 0:
        return statistics.geometric_mean(xs)
    return statistics.fmean(xs) if xs else None


def effect_text(effect: stats.Effect, x: str, y: str) -> str:
    if effect.estimate is None:
        return "no seed pair"
    if effect.kind == "ratio":
        head = f"{x} / {y} = {num(effect.estimate)}×"
        ci = f"95% CI {num(effect.low)}–{num(effect.high)}×" if effect.low is not None else ""
        if effect.low is not None and effect.low == effect.high:
            ci = "every seed pair the same, no spread"
    else:
        head = f"{x} − {y} = {effect.estimate:+.3g}"
        ci = (f"95% CI {effect.low:+.3g} to {effect.high:+.3g}"
              if effect.low is not None else "")
    tail = [ci or "no interval", f"n = {effect.n}"]
    if effect.unpaired:
        tail.append(f"unpaired seeds left out: {effect.unpaired}")
    if effect.dropped:
        tail.append(f"no ratio for seeds {effect.dropped}")
    return f"{head} ({', '.join(tail)})"


def compare(id: str, claim: str, what: str, x: tuple[str, Mapping], y: tuple[str, Mapping],
            *, kind: str = "difference", direction: str = "greater",
            margin: float | None = None, noninferior: float | None = None,
            runs: Sequence[Run] = (), reason: str = "", digits: int = 3) -> Verdict:
    """A claim about x against y, decided on their paired effect: directional, equivalent
    within ±margin, or x no worse than y by more than `noninferior`."""
    (xl, xv), (yl, yv) = x, y
    effect = stats.paired(xv, yv, kind)
    if noninferior is not None:
        verdict = stats.noninferior(effect, noninferior)
        rule = f"non-inferiority: {xl} − {yl} > −{noninferior:g}"
    elif margin is not None:
        verdict, rule = stats.equivalent(effect, margin), f"equivalence within ±{margin:g}"
    else:
        verdict = stats.directional(effect, direction)
        rule = f"directional: {xl} {'>' if direction == 'greater' else '<'} {yl}" + (
            " (ratio)" if kind == "ratio" else "")
    geo = kind == "ratio"  # ratios are averaged on the log scale, and so are their parts
    measured = (f"{what}: {xl} {num(mean_of(xv, geo), digits)}, {yl} "
                f"{num(mean_of(yv, geo), digits)} (seed {'geometric ' if geo else ''}means); "
                f"{effect_text(effect, xl, yl)}")
    return Verdict(id, claim, what, {xl: dict(xv), yl: dict(yv)}, effect, rule, verdict,
                   measured, reason, [r.path for r in runs])


# ----------------------------------------------------------------------------- convergence


def first_reach(run: Run, level: float) -> float | None:
    curve = [(s, v) for s, v in run.curves.get("val_acc", []) if v is not None]
    return metrics.steps_to_target(curve, level)


def common_level_steps(x: Sequence[Run], y: Sequence[Run], fraction: float = LEVEL_FRACTION
                       ) -> tuple[dict, dict, list[float]]:
    """Per seed pair, the steps each variant needs to reach `fraction` of the lower of the
    two final accuracies (a level both reach); also the levels. A seed of one variant only
    keeps its steps to `fraction` of its own final accuracy (reported as unpaired)."""
    xs, ys = {r.seed: r for r in x}, {r.seed: r for r in y}
    sx: dict[Hashable, float | None] = {}
    sy: dict[Hashable, float | None] = {}
    levels = []
    for seed in xs.keys() | ys.keys():
        finals = [r.metrics.get("final_val_acc") for r in (xs.get(seed), ys.get(seed)) if r]
        if any(f is None for f in finals):
            continue  # a run without a final accuracy (diverged at once) has no level
        level = fraction * min(finals)
        if seed in xs and seed in ys:
            levels.append(level)
        if seed in xs:
            sx[seed] = first_reach(xs[seed], level)
        if seed in ys:
            sy[seed] = first_reach(ys[seed], level)
    return sx, sy, levels


def convergence_claims(x: Sequence[Run], y: Sequence[Run], xl: str, yl: str, prefix: str,
                       subject: str) -> list[Verdict]:
    """x converges faster than y: steps to a level both reach, area under the accuracy
    curve, accuracy early in the budget."""
    sx, sy, levels = common_level_steps(x, y)
    level = (f"{LEVEL_FRACTION:.0%} of the lower final val accuracy of each seed pair "
             f"({num(min(levels))}–{num(max(levels))})" if levels else "no seed pair")
    both = [*x, *y]
    out = [compare(f"{prefix}.steps", f"{subject} reaches a level both variants reach in fewer "
                   "steps", f"steps to {level}", (yl, sy), (xl, sx), kind="ratio", runs=both)]
    out.append(compare(f"{prefix}.auc", f"{subject} has the higher validation accuracy over "
                       "the run", "area under the val-accuracy curve per step",
                       (xl, by_seed(x, curve_area)), (yl, by_seed(y, curve_area)), runs=both))
    for f in EARLY_FRACTIONS:
        out.append(compare(f"{prefix}.acc_at_{int(f * 100)}pct",
                           f"{subject} is ahead at {f:.0%} of the budget",
                           f"val accuracy at {f:.0%} of the steps",
                           (xl, by_seed(x, acc_at(f))), (yl, by_seed(y, acc_at(f))), runs=both))
    return out


def optimum_claims(x: Sequence[Run], y: Sequence[Run], xl: str, yl: str, prefix: str,
                   subject: str) -> list[Verdict]:
    """x reaches a better optimum: best and final validation accuracy. Where it does not
    hold, the training accuracies say whether the gap is optimization or generalization."""
    out = []
    for name, what in (("best_val_acc", "best val accuracy"),
                       ("final_val_acc", "final val accuracy")):
        v = compare(f"{prefix}.{name.split('_')[0]}", f"{subject} reaches a better optimum "
                    f"({what})", what, (xl, by_seed(x, metric(name))),
                    (yl, by_seed(y, metric(name))), runs=[*x, *y])
        if v.verdict == stats.FAILS:
            v.reason = generalization_reason(x, y, xl, yl)
        out.append(v)
    return out


def generalization_reason(x: Sequence[Run], y: Sequence[Run], xl: str, yl: str) -> str:
    tx = mean_of(by_seed(x, metric("final_train_acc")))
    ty = mean_of(by_seed(y, metric("final_train_acc")))
    n = next((r.metrics.get("train_samples") for r in [*x, *y]
              if r.metrics.get("train_samples")), None)
    if tx is None or ty is None:
        return ""
    images = f"{n:,} training images" if n else "this training set"
    if min(tx, ty) >= 0.98:
        return (f"both fit the training set (final train accuracy {xl} {tx:.3f}, {yl} "
                f"{ty:.3f}): the gap is generalization on {images}, not optimization")
    return (f"final train accuracy {xl} {tx:.3f}, {yl} {ty:.3f}: "
            + (f"{xl} fits the training set better but generalizes worse" if tx > ty else
               f"{xl} does not optimize better either"))


# ----------------------------------------------------------------------------- stability


def trains(run: Run, level: float) -> bool:
    acc = run.metrics.get("final_val_acc")
    return not run.metrics.get("diverged") and acc is not None and acc >= level


def learning_level(*variants: Sequence[Run]) -> float:
    """A level every variant reaches at some LR: LEARNED of the way from chance to the lower
    of the variants' best seed-mean final accuracy over the grid."""
    bests = []
    for runs in variants:
        lr = best_lr(runs, metric("final_val_acc"))
        vals = [r.metrics["final_val_acc"] for r in runs if r.config["optim.lr"] == lr
                and r.metrics.get("final_val_acc") is not None]
        bests.append(statistics.fmean(vals) if vals else chance(runs))
    base = chance([r for v in variants for r in v])
    return base + LEARNED * (min(bests) - base)


def max_stable(runs: Sequence[Run], level: float) -> tuple[dict, float | None, list]:
    """Per seed, the largest LR at which it trains (the lowest LR of the grid, flagged, when
    it trains at none); the largest LR at which every seed trains; the flagged seeds."""
    grid = lrs(runs)
    per_seed: dict[Hashable, float | None] = {}
    nowhere = []
    for seed in sorted({r.seed for r in runs}, key=repr):
        good = [r.config["optim.lr"] for r in runs if r.seed == seed and trains(r, level)]
        if not good:
            nowhere.append(seed)
        per_seed[seed] = max(good, default=grid[0] if grid else None)
    every = [lr for lr in grid
             if all(trains(r, level) for r in runs if r.config["optim.lr"] == lr)]
    return per_seed, max(every, default=None), nowhere


def stable_statement(label: str, lr: float | None, grid: Sequence[float]) -> str:
    if lr is not None:
        return f"{label} stable up to {lr:g}"
    return f"{label} stable at no LR of the grid (≥ {min(grid):g}): its bound is < {min(grid):g}"


def good_decades(runs: Sequence[Run]) -> dict[Hashable, float | None]:
    """Per seed, the width in decades of the LRs within GOOD_LR_TOLERANCE of that seed's best
    final accuracy, without divergence."""
    out: dict[Hashable, float | None] = {}
    for seed in sorted({r.seed for r in runs}, key=repr):
        mine = [r for r in runs if r.seed == seed and r.metrics.get("final_val_acc") is not None]
        if not mine:
            out[seed] = None
            continue
        top = max(r.metrics["final_val_acc"] for r in mine)
        good = [r.config["optim.lr"] for r in mine if not r.metrics.get("diverged")
                and r.metrics["final_val_acc"] >= top - GOOD_LR_TOLERANCE]
        out[seed] = math.log10(max(good) / min(good)) if good else 0.0
    return out


def stability_claims(x: Sequence[Run], y: Sequence[Run], xl: str, yl: str, prefix: str,
                     subject: str, wider: bool = True) -> list[Verdict]:
    level = learning_level(x, y)
    grid = lrs([*x, *y])
    px, every_x, nowhere_x = max_stable(x, level)
    py, every_y, nowhere_y = max_stable(y, level)
    statement = (f"{stable_statement(xl, every_x, grid)}; {stable_statement(yl, every_y, grid)}"
                 + (f" (ratio {every_x / every_y:.3g}×)" if every_x and every_y else ""))
    v = compare(f"{prefix}.max_stable_lr", f"{subject} trains at larger learning rates",
                f"largest LR at which a seed trains (no divergence, final val acc ≥ "
                f"{level:.3f})", (xl, px), (yl, py), kind="ratio", runs=[*x, *y])
    flagged = [f"{label} seeds {seeds} train at no LR: counted at the lowest LR {grid[0]:g}"
               for label, seeds in ((xl, nowhere_x), (yl, nowhere_y)) if seeds]
    v.measured = f"{statement}. Per seed: {v.measured}"
    v.reason = "; ".join(flagged)
    out = [v]
    if wider:
        out.append(compare(f"{prefix}.good_lr_range", f"{subject} has a wider range of good "
                           "learning rates", f"decades of LRs within {GOOD_LR_TOLERANCE:g} of "
                           "the seed's best final val acc, no divergence",
                           (xl, good_decades(x)), (yl, good_decades(y)), runs=[*x, *y]))
    return out


# ----------------------------------------------------------------------------- studies


def ioffe_claims(runs: list[Run]) -> list[Verdict]:
    bn, plain = pick(runs, norm="batch"), pick(runs, norm="none")
    out = convergence_claims(bn, plain, "BN", "no BN", "convergence", "BN")
    out += optimum_claims(bn, plain, "BN", "no BN", "optimum", "BN")
    out.append(compare("mechanics.drift", "BN keeps the input distribution of the last hidden "
                       "sigmoid stable; without BN it drifts",
                       "drift of its 15/50/85th percentiles", ("no BN", by_seed(
                           plain, metric("act_input_drift"))),
                       ("BN", by_seed(bn, metric("act_input_drift"))), kind="ratio",
                       runs=[*bn, *plain]))
    return out


def lr_claims(runs: list[Run]) -> list[Verdict]:
    out = []
    for act in sorted({r.config.get("model.activation") for r in runs}):
        bn = pick(runs, norm="batch", activation=act)
        plain = pick(runs, norm="none", activation=act)
        out += stability_claims(bn, plain, "BN", "no BN", f"stability.{act}", f"BN ({act} MLP)")
    return out


def affine_claims(runs: list[Run]) -> list[Verdict]:
    out = []
    for act in sorted({r.config.get("model.activation") for r in runs}):
        on, off = pick(runs, affine=True, activation=act), pick(runs, affine=False,
                                                               activation=act)
        out.append(compare(f"affine.{act}", f"BN's γ/β matter little for {act} nets",
                           "final val accuracy", ("with γ/β", by_seed(on, metric(
                               "final_val_acc"))), ("without", by_seed(
                                   off, metric("final_val_acc"))), margin=MARGIN,
                           runs=[*on, *off]))
    return out


def _abs_gap(r: Run) -> float | None:
    v = r.metrics.get("train_eval_gap")
    return abs(v) if v is not None else None


def batch_claims(runs: list[Run]) -> list[Verdict]:
    """Wu & He 2018, Figure 1: BN degrades at tiny batches; the per-sample norms (group and
    layer norm, where the study runs them) do not, and only BN's train and eval modes differ."""
    sizes = sorted({r.config["trainer.batch_size"] for r in runs})
    small, large = sizes[0], sizes[-1]
    reference = 64 if 64 in sizes else sizes[len(sizes) // 2]
    bn_small, bn_ref = pick(runs, norm="batch", batch_size=small), pick(
        runs, norm="batch", batch_size=reference)
    plain_small, plain_ref = pick(runs, norm="none", batch_size=small), pick(
        runs, norm="none", batch_size=reference)
    acc = metric("final_val_acc")
    degrade = compare("small_batch.bn_degrades", f"BN degrades at very small batches (batch "
                      f"{small} vs {reference})", "BN's final val accuracy",
                      (f"batch {reference}", by_seed(bn_ref, acc)),
                      (f"batch {small}", by_seed(bn_small, acc)),
                      runs=[*bn_small, *bn_ref, *plain_small, *plain_ref])
    plain = stats.paired(by_seed(plain_ref, acc), by_seed(plain_small, acc))
    degrade.reason = (f"without BN: {effect_text(plain, f'batch {reference}', f'batch {small}')}"
                      if plain.estimate is not None else "")
    bn_large = pick(runs, norm="batch", batch_size=large)
    grows = compare("small_batch.mode_gap", "The gap between eval-mode and train-mode "
                    "accuracy grows as batches shrink", "|eval − train-mode val acc| with BN",
                    (f"batch {small}", by_seed(bn_small, _abs_gap)),
                    (f"batch {large}", by_seed(bn_large, _abs_gap)), runs=[*bn_small, *bn_large])
    out = [degrade, grows]
    for norm in ("group", "layer", "instance"):
        x_small, x_ref = pick(runs, norm=norm, batch_size=small), pick(
            runs, norm=norm, batch_size=reference)
        if not x_small or not x_ref:
            continue
        label = NORM_LABELS[norm]
        out.append(compare(
            f"small_batch.{norm}_holds", f"{label} holds its accuracy at very small batches "
            f"(batch {small} no more than {MARGIN:g} below batch {reference})",
            f"{label}'s final val accuracy", (f"batch {small}", by_seed(x_small, acc)),
            (f"batch {reference}", by_seed(x_ref, acc)), noninferior=MARGIN,
            runs=[*x_small, *x_ref]))
        out.append(compare(
            f"small_batch.{norm}_beats_bn", f"At batch {small} {label} is more accurate than BN",
            f"final val accuracy at batch {small}", (label, by_seed(x_small, acc)),
            ("BN", by_seed(bn_small, acc)), runs=[*x_small, *bn_small]))
        mine = pick(runs, norm=norm)
        gaps = by_seed(x_small, _abs_gap)
        worst = {seed: max((g for r in mine if r.seed == seed
                            if (g := _abs_gap(r)) is not None), default=None)
                 for seed in sorted({r.seed for r in mine}, key=repr)}
        verdict, low, high = stats.below([v for v in worst.values() if v is not None],
                                         MODE_TOLERANCE)
        v = Verdict(
            f"small_batch.{norm}_no_mode_gap", f"Only BN's train and eval modes differ: {label}'s "
            "eval-mode and train-mode accuracies agree at every batch size",
            f"largest |eval − train-mode val acc| of a seed over batch sizes {small}…{large}",
            {label: worst}, None, f"below {MODE_TOLERANCE:g} (upper end of the 95% t-interval "
            "of the seed mean)", verdict, f"{label}: seed mean {num(mean_of(worst))}, 95% CI "
            f"{num(low)} to {num(high)}, n = {len(worst)}; BN at batch {small}: "
            f"{num(mean_of(by_seed(bn_small, _abs_gap)))} (seed mean); tolerance "
            f"{MODE_TOLERANCE:g}", runs=[r.path for r in mine])
        if not gaps:
            v.reason = f"no {label} runs at batch {small}"
        out.append(v)
    return out


def normalizer_claims(runs: list[Run]) -> list[Verdict]:
    """Each norm against no normalization: convergence with each variant at its own best LR
    (by the area under its accuracy curve), and stability over the whole LR grid."""
    out = []
    plain = pick(runs, norm="none")
    if not plain:
        return out
    plain_lr = best_lr(plain, curve_area)
    for norm in ("batch", "layer", "group", "instance"):
        mine = pick(runs, norm=norm)
        if not mine:
            continue
        label = NORM_LABELS[norm]
        lr = best_lr(mine, curve_area)
        a, b = pick(mine, lr=lr), pick(plain, lr=plain_lr)
        found = convergence_claims(a, b, label, "no norm", f"normalizers.{norm}.convergence",
                                   f"{label} (at its best lr {lr:g}; no norm at {plain_lr:g})")
        edge = "; ".join(filter(None, (grid_edge(mine, lr, label),
                                       grid_edge(plain, plain_lr, "no norm"))))
        for v in found:
            v.reason = "; ".join(filter(None, (v.reason, edge)))
        out += found
        out += stability_claims(mine, plain, label, "no norm", f"normalizers.{norm}.stability",
                                label)
    return out


def position_claims(runs: list[Run]) -> list[Verdict]:
    out = []
    for act in sorted({r.config.get("model.activation") for r in runs}):
        before = pick(runs, norm_position="before_act", activation=act)
        after = pick(runs, norm_position="after_act", activation=act)
        acc = metric("final_val_acc")
        out.append(compare(f"position.{act}", f"BN's position (before or after the "
                           f"activation) matters little ({act} MLP)", "final val accuracy",
                           ("after", by_seed(after, acc)), ("before", by_seed(before, acc)),
                           margin=MARGIN, runs=[*before, *after]))
    return out


def saturation_claims(runs: list[Run]) -> list[Verdict]:
    bn, plain = pick(runs, norm="batch"), pick(runs, norm="none")
    ratio = metric("grad_norm_first_over_last")
    return [
        compare("saturation.gradients", "Without BN the early layers' gradients vanish",
                "grad-norm ratio layer 1 / last hidden layer", ("BN", by_seed(bn, ratio)),
                ("no BN", by_seed(plain, ratio)), kind="ratio", runs=[*bn, *plain]),
        compare("saturation.stalls", "Without BN training stalls", "final val accuracy",
                ("BN", by_seed(bn, metric("final_val_acc"))),
                ("no BN", by_seed(plain, metric("final_val_acc"))), runs=[*bn, *plain]),
    ]


def santurkar_claims(runs: list[Run]) -> list[Verdict]:
    high = max(lrs(runs))
    low = min(lrs(runs))
    bn, plain = pick(runs, norm="batch", lr=high), pick(runs, norm="none", lr=high)
    out = [compare("santurkar.high_lr", f"BN trains at lr {high:g} where the plain net does "
                   "not", f"final val accuracy at lr {high:g}",
                   ("BN", by_seed(bn, metric("final_val_acc"))),
                   ("no BN", by_seed(plain, metric("final_val_acc"))), runs=[*bn, *plain])]
    bn, plain = pick(runs, norm="batch", lr=low), pick(runs, norm="none", lr=low)
    for name, what in (("landscape_loss_range", "loss range along the gradient"),
                       ("landscape_beta_smoothness", "effective β-smoothness")):
        out.append(compare(f"santurkar.{name}", f"BN's loss landscape is smoother: smaller "
                           f"{what}", f"{what} at lr {low:g}",
                           ("no BN", by_seed(plain, metric(name))),
                           ("BN", by_seed(bn, metric(name))), kind="ratio",
                           runs=[*bn, *plain]))
    return out


def input_claims(runs: list[Run]) -> list[Verdict]:
    """Standardized inputs against raw and mismatched ones: without BN, each input variant at
    its own best LR for the convergence claim; with BN, at the standardized net's best LR."""
    out = []
    std_plain = pick(runs, inputs="standardized", norm="none")
    std_bn = pick(runs, inputs="standardized", norm="batch")
    bn_lr = best_lr(std_bn, curve_area)
    for other in ("raw", "mismatched"):
        plain = pick(runs, inputs=other, norm="none")
        if not plain or not std_plain:
            continue
        a_lr, b_lr = best_lr(std_plain, curve_area), best_lr(plain, curve_area)
        a, b = pick(std_plain, lr=a_lr), pick(plain, lr=b_lr)
        sx, sy, levels = common_level_steps(a, b)
        v = compare(f"inputs.{other}.steps", f"Without BN, standardized inputs reach a level "
                    f"both reach in fewer steps than {other} ones (each at its best LR)",
                    f"steps to {LEVEL_FRACTION:.0%} of the lower final val accuracy of each "
                    f"seed pair; standardized at lr {a_lr:g}, {other} at lr {b_lr:g}",
                    (other, sy), ("standardized", sx), kind="ratio", runs=[*a, *b])
        if v.verdict != HOLDS and a_lr != b_lr:
            v.reason = (f"the {other} inputs moved the best LR from {a_lr:g} to {b_lr:g}; at "
                        f"its own best LR the {other} net is not slower here")
        v.reason = "; ".join(filter(None, (v.reason, grid_edge(std_plain, a_lr, "standardized"),
                                           grid_edge(plain, b_lr, other))))
        out.append(v)
        out += stability_claims(std_plain, plain, "standardized", other,
                                f"inputs.{other}", f"Without BN, standardized input (vs "
                                f"{other})", wider=False)
        with_bn = pick(runs, inputs=other, norm="batch", lr=bn_lr)
        ref = pick(std_bn, lr=bn_lr)
        acc = metric("final_val_acc")
        out.append(compare(f"inputs.{other}.with_bn", f"With BN after the first layer, {other} "
                           "inputs train as well as standardized ones (the input scale no "
                           "longer matters)", f"final val accuracy at lr {bn_lr:g}, the "
                           "standardized BN net's best", (other, by_seed(with_bn, acc)),
                           ("standardized", by_seed(ref, acc)), margin=MARGIN,
                           runs=[*with_bn, *ref]))
        if out[-1].verdict != HOLDS and other == "mismatched":
            out[-1].reason = ("BN after the first layer normalizes each unit's output, which "
                              "undoes one scale shared by all inputs (raw pixels), not a "
                              "scale per input feature inside the first layer's weights and "
                              "their gradients")
    return out


def train_eval_claims(runs: list[Run]) -> list[Verdict]:
    bn = pick(runs, norm="batch")
    sizes = sorted({int(k.rsplit("bs", 1)[1]) for r in bn for k in r.metrics
                    if k.startswith(("modes_eval_acc_bs", "modes_train_acc_bs"))})
    if not sizes:
        return []
    largest = sizes[-1]
    train_sizes = [s for s in sizes if any(r.metrics.get(f"modes_train_acc_bs{s}") is not None
                                           for r in bn)]
    smallest_train = train_sizes[0] if train_sizes else None

    def most_changed(mode: str) -> Callable[[Run], float | None]:
        def value(r: Run) -> float | None:
            xs = [r.metrics.get(f"modes_{mode}_changed_bs{s}") for s in sizes]
            xs = [x for x in xs if x is not None]
            return max(xs) if xs else None
        return value

    out = []
    changed = by_seed(bn, most_changed("eval"))
    verdict, low, high = stats.below([v for v in changed.values() if v is not None],
                                     MODE_TOLERANCE)
    out.append(Verdict(
        "modes.eval_independent", "Eval-mode predictions do not depend on the eval batch "
        f"size (batch of one included; sizes {sizes[0]}…{largest})",
        f"largest fraction of val predictions that change against batch {largest}, eval mode",
        {"BN, eval mode": changed}, None, f"below {MODE_TOLERANCE:g} (upper end of the 95% "
        "t-interval of the seed mean)", verdict,
        f"fraction changed: seed mean {num(mean_of(changed))}, 95% CI {num(low)} to "
        f"{num(high)}, n = {len(changed)}; tolerance {MODE_TOLERANCE:g}",
        runs=[r.path for r in bn]))
    if smallest_train is not None and smallest_train != largest:
        acc_small = by_seed(bn, metric(f"modes_train_acc_bs{smallest_train}"))
        acc_large = by_seed(bn, metric(f"modes_train_acc_bs{largest}"))
        v = compare("modes.train_depends", "Train-mode predictions depend on the batch size",
                    "val accuracy in train mode (each batch's own statistics)",
                    (f"batch {largest}", acc_large), (f"batch {smallest_train}", acc_small),
                    runs=bn)
        moved = by_seed(bn, metric(f"modes_train_changed_bs{smallest_train}"))
        v.reason = (f"train mode at batch {smallest_train}: {num(mean_of(moved))} of the "
                    f"predictions differ from batch {largest} (seed mean)")
        out.append(v)
    if 1 in sizes:
        refused = [r for r in bn if r.metrics.get("modes_train_acc_bs1") is None]
        measured = [r for r in bn if r.metrics.get("modes_train_acc_bs1") is not None]
        verdict = stats.HOLDS if bn and not measured else stats.FAILS if not refused \
            else stats.UNSURE
        note = next((r.notes.get("modes_train_acc_bs1") for r in refused), "")
        out.append(Verdict(
            "modes.batch_of_one", "A batch of one cannot be normalized in train mode",
            "train-mode evaluation one sample at a time",
            {"BN, train mode": {r.seed: r.metrics.get("modes_train_acc_bs1") for r in bn}},
            None, "every run refused (holds), none did (does not hold)", verdict,
            f"refused in {len(refused)} of {len(bn)} runs; eval mode at batch 1: val acc "
            f"{num(mean_of(by_seed(bn, metric('modes_eval_acc_bs1'))))} (seed mean)",
            note, [r.path for r in bn]))
    layers = sorted({k.rsplit("_bn", 1)[1] for r in bn for k in r.metrics
                     if k.startswith("running_mean_error_bn")}, key=int)
    for short, stat, key, what in (
            ("mean", "mean", "running_mean_error_bn",
             "error of the running mean in population standard deviations"),
            ("var", "variance", "running_var_rel_error_bn",
             "relative error of the running variance")):
        worst = by_seed(bn, lambda r, key=key: max(
            (r.metrics[f"{key}{i}"] for i in layers if r.metrics.get(f"{key}{i}") is not None),
            default=None))
        verdict, low, high = stats.below([v for v in worst.values() if v is not None],
                                         RUNNING_TOLERANCE)
        per_layer = ", ".join(f"bn{i} {num(mean_of(by_seed(bn, metric(f'{key}{i}'))))}"
                              for i in layers)
        out.append(Verdict(
            f"modes.running_{short}", f"The running {stat}s match the population {stat}s of "
            "each BN layer's input (over the whole training set)",
            f"{what} (RMS over features), worst layer", {"BN": worst}, None,
            f"below {RUNNING_TOLERANCE:g} (upper end of the 95% t-interval of the seed mean)",
            verdict, f"worst layer: seed mean {num(mean_of(worst))}, 95% CI {num(low)} to "
            f"{num(high)}, n = {len(worst)}; per layer: {per_layer}; tolerance "
            f"{RUNNING_TOLERANCE:g}", runs=[r.path for r in bn]))
    return out


@dataclass
class Study:
    title: str
    reference: str
    claims: Callable[[list[Run]], list[Verdict]]
    claim_texts: tuple[str, ...]
    paper: str = ""  # what the paper reports, for the comparison in the report


STUDIES: dict[str, Study] = {
    "ioffe2015_fig1": Study(
        "Ioffe & Szegedy 2015, Figure 1: a sigmoid MLP on MNIST with and without BN",
        "Ioffe & Szegedy, Batch Normalization, ICML 2015, section 4.1 and Figure 1",
        ioffe_claims,
        ("BN converges faster: fewer steps to a level both reach, more area under the "
         "accuracy curve, ahead early in the budget",
         "BN reaches a better optimum (best and final val accuracy)",
         "BN's percentiles stay stable while the un-normalized ones drift"),
        "BN reaches higher test accuracy faster, and the input distribution of the last "
        "hidden sigmoid stays stable with BN while it drifts without (50,000 steps, full "
        "MNIST)"),
    "lr_stability": Study(
        "Learning-rate stability with and without BN",
        "Ioffe & Szegedy 2015, section 3.3; Bjorck et al., Understanding BN, NeurIPS 2018",
        lr_claims,
        ("BN trains at larger learning rates (ratio per activation)",
         "BN widens the range of good learning rates"),
        "BN allows higher learning rates without divergence (Bjorck et al.: about 10× for "
        "a ResNet on CIFAR-10)"),
    "affine_ablation": Study(
        "BN with and without its learnable γ/β",
        "Ioffe & Szegedy 2015, section 3 (γ/β restore the representation power)",
        affine_claims,
        ("γ/β matter little (equivalence within ±1 point), per activation",),
        "γ/β let BN represent the identity; the paper does not measure their effect alone"),
    "batch_size": Study(
        "BN, GroupNorm and LayerNorm at small batch sizes",
        "Wu & He, Group Normalization, ECCV 2018, Figure 1",
        batch_claims,
        ("BN degrades at very small batches",
         "The gap between eval-mode and train-mode accuracy grows as batches shrink",
         f"GroupNorm and LayerNorm hold their accuracy (no more than {MARGIN:g} below batch "
         "64) and beat BN at the smallest batch",
         "Only BN's train and eval modes differ"),
        "BN's ImageNet error rises steeply below 8 images per GPU, while GroupNorm's stays "
        "flat from 32 down to 2 images per GPU and is lower than BN's there"),
    "normalizers": Study(
        "The normalization family: BN, LayerNorm, GroupNorm and no normalization",
        "Ioffe & Szegedy 2015; Ba, Kiros & Hinton, Layer Normalization, 2016; Wu & He, "
        "Group Normalization, ECCV 2018",
        normalizer_claims,
        ("Each norm converges faster than no normalization, each at its own best LR (steps "
         "to a level both reach, area under the accuracy curve, accuracy at 10%/50% of the "
         "budget)",
         "Each norm trains at larger learning rates and has a wider range of good ones"),
        "BN speeds up training and allows larger learning rates; LN and GN normalize each "
        "sample alone, do not depend on the batch, and train comparably to BN at normal "
        "batch sizes (GN: slightly worse than BN on ImageNet at 32 images per GPU)"),
    "bn_position": Study(
        "BN before vs after the activation",
        "Ioffe & Szegedy 2015 (BN before the nonlinearity); common practice places it after",
        position_claims,
        ("BN's position matters little (equivalence within ±1 point), per activation",),
        "the paper normalizes Wx + b before the nonlinearity, arguing it is more Gaussian"),
    "sigmoid_saturation": Study(
        "A deep sigmoid MLP with and without BN",
        "Ioffe & Szegedy 2015, section 3.3 (saturating nonlinearities)",
        saturation_claims,
        ("Without BN the early layers' gradients vanish and training stalls; with BN not",),
        "BN keeps sigmoid inputs out of the saturated regime, so deep sigmoid nets train"),
    "santurkar2018_vgg": Study(
        "Santurkar et al. 2018: VGG on CIFAR-10, BN and the loss landscape",
        "Santurkar, Tsipras, Ilyas, Madry, How Does Batch Normalization Help Optimization?, "
        "NeurIPS 2018, Figures 1 and 4",
        santurkar_claims,
        ("BN trains at the high lr where the plain net does not",
         "BN's loss landscape is smoother (loss range, β-smoothness)"),
        "with BN, VGG trains at lr 0.5, and the loss and gradient change less along the "
        "gradient direction"),
    "input_normalization": Study(
        "Why normalize inputs: standardized vs raw vs mismatched feature scales",
        "LeCun, Bottou, Orr & Müller, Efficient BackProp, 1998, section 4.3; Ioffe & Szegedy "
        "2015, section 2 (whitening inputs speeds up training)",
        input_claims,
        ("Without BN, standardized inputs reach the level in fewer steps than raw or "
         "mismatched ones, each at its best LR",
         "Without BN, standardized inputs train at larger learning rates",
         "With BN after the first layer the input scale no longer matters (equivalence "
         "within ±1 point)"),
        "inputs with zero mean and unit variance make gradient descent converge faster; "
        "features on very different scales make it zig-zag"),
    "train_eval_modes": Study(
        "BN's train and eval modes: batch statistics vs running statistics",
        "Ioffe & Szegedy 2015, section 3.1 (inference with population statistics)",
        train_eval_claims,
        ("Eval-mode predictions do not depend on the eval batch size",
         "Train-mode predictions do, and a batch of one cannot be normalized in train mode",
         "The running statistics match the population statistics of each BN layer's input"),
        "at inference BN uses population statistics, so the output depends only on the "
        "input, not on the batch"),
}
