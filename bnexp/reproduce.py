"""The classic BN claims as named studies: each a sweep (configs/experiment/NAME.yaml) plus the
claims it tests, and the rules that turn measurements into verdicts. Nothing here hard-codes an
answer: every verdict is computed from the runs' summary.json files by the rules in RULES.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnexp import metrics
from bnexp.runs import Run

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
LITTLE = 0.01  # "matters little": within 1 percentage point of accuracy

RULES = f"""\
- **Directional claims** (A is better than B): let *d* be the difference of the means over
  seeds in the claimed direction, and *spread* the larger of the two sample standard
  deviations (0 with one seed). The claim **holds** if *d* > *spread* and, where seeds pair
  up, every seed shows the effect; it **does not hold** if *d* < −*spread* and every seed shows
  the opposite; otherwise it is **inconclusive** (the effect is inside the seed spread, or the
  seeds disagree). A run that never reached the target counts as steps budget + 1.
- **Learning-rate claims** are decided on the grid: the maximum stable LR (largest LR at which
  no seed diverged and every seed reached the target) and the width of the good-LR range (LRs
  without divergence whose mean accuracy is within 0.01 of the best, in decades). Larger for BN:
  **holds**; smaller: **does not hold**; equal: **inconclusive**. No stable LR counts as 0.
- **"Matters little" claims**: the mean gap is within {LITTLE:.0%} (absolute accuracy):
  **holds** if |gap| ≤ {LITTLE:.0%}; **does not hold** if |gap| > {LITTLE:.0%} + *spread*;
  otherwise **inconclusive**.
- **"Trains" claims**: every seed of every variant reached the target accuracy: **holds**; no
  seed of some variant did: **does not hold**; otherwise **inconclusive**.
"""


@dataclass
class Verdict:
    claim: str
    measured: str
    verdict: str
    runs: list[Path]


# ----------------------------------------------------------------------------- selection


def pick(runs: Sequence[Run], **where: Any) -> list[Run]:
    """Runs whose config matches every key (short keys allowed: norm=batch), by seed."""
    def match(run: Run, key: str, value: Any) -> bool:
        return any((k == key or k.endswith("." + key)) and v == value
                   for k, v in run.config.items())

    chosen = [r for r in runs if all(match(r, k.replace("__", "."), v) for k, v in
                                     where.items())]
    return sorted(chosen, key=lambda r: (r.seed is None, r.seed))


def values(runs: Sequence[Run], metric: str, never: float | None = None) -> list[float]:
    """A metric over runs; None (e.g. target never reached) becomes `never` if given."""
    out = []
    for run in runs:
        v = run.metrics.get(metric)
        if v is None:
            v = never
        if v is not None:
            out.append(float(v))
    return out


def budget(runs: Sequence[Run]) -> float:
    """Steps budget + 1: what 'never reached the target' counts as."""
    return max((r.metrics.get("steps") or 0) for r in runs) + 1 if runs else math.inf


def fmt(xs: Sequence[float]) -> str:
    if not xs:
        return "n/a"
    mean = statistics.mean(xs)
    return f"{mean:.4g} ± {statistics.stdev(xs):.2g}" if len(xs) > 1 else f"{mean:.4g}"


# ----------------------------------------------------------------------------- rules


def directional(a: Sequence[float], b: Sequence[float], higher_is_better: bool) -> str:
    """A better than B (see RULES)."""
    if not a or not b:
        return UNSURE
    sign = 1 if higher_is_better else -1
    d = sign * (statistics.mean(a) - statistics.mean(b))
    spread = max(statistics.stdev(a) if len(a) > 1 else 0.0,
                 statistics.stdev(b) if len(b) > 1 else 0.0)
    paired = [sign * (x - y) for x, y in zip(a, b)] if len(a) == len(b) else []
    if d > spread and all(p > 0 for p in paired):
        return HOLDS
    if d < -spread and all(p < 0 for p in paired):
        return FAILS
    return UNSURE


def little(a: Sequence[float], b: Sequence[float]) -> str:
    if not a or not b:
        return UNSURE
    gap = abs(statistics.mean(a) - statistics.mean(b))
    spread = max(statistics.stdev(a) if len(a) > 1 else 0.0,
                 statistics.stdev(b) if len(b) > 1 else 0.0)
    if gap <= LITTLE:
        return HOLDS
    return FAILS if gap > LITTLE + spread else UNSURE


def larger(bn: float | None, plain: float | None) -> str:
    bn, plain = bn or 0.0, plain or 0.0
    return HOLDS if bn > plain else FAILS if bn < plain else UNSURE


def trains(groups: Sequence[Sequence[Run]]) -> str:
    reached = [[r.metrics.get("steps_to_target") is not None for r in g] for g in groups]
    if all(all(g) and g for g in reached):
        return HOLDS
    if any(not any(g) for g in reached):
        return FAILS
    return UNSURE


def lr_summary(runs: Sequence[Run]) -> dict[str, Any]:
    points: dict[float, list[dict]] = {}
    for r in runs:
        points.setdefault(r.config["optim.lr"], []).append(r.metrics)
    return metrics.lr_stats(points, "final_val_acc", 0.01)


# ----------------------------------------------------------------------------- claims


def bn_vs_plain(metric: str, claim: str, higher: bool, label: str, **where: Any
                ) -> Callable[[list[Run]], Verdict]:
    def judge(runs: list[Run]) -> Verdict:
        bn, plain = pick(runs, norm="batch", **where), pick(runs, norm="none", **where)
        never = budget(runs) if metric == "steps_to_target" else None
        a, b = values(bn, metric, never), values(plain, metric, never)
        return Verdict(claim, f"{label}: BN {fmt(a)}, no BN {fmt(b)}",
                       directional(a, b, higher), [r.path for r in bn + plain])
    return judge


def lr_claims(activation: str) -> list[Callable[[list[Run]], Verdict]]:
    def stable(runs: list[Run]) -> Verdict:
        bn = lr_summary(pick(runs, norm="batch", activation=activation))
        plain = lr_summary(pick(runs, norm="none", activation=activation))
        a, b = bn["max_stable_lr"], plain["max_stable_lr"]
        ratio = f"{a / b:.3g}x" if a and b else "n/a"
        chosen = pick(runs, activation=activation)
        return Verdict(f"BN raises the maximum stable learning rate ({activation} MLP)",
                       f"max stable LR: BN {a}, no BN {b} (ratio {ratio})", larger(a, b),
                       [r.path for r in chosen])

    def wider(runs: list[Run]) -> Verdict:
        bn = lr_summary(pick(runs, norm="batch", activation=activation))
        plain = lr_summary(pick(runs, norm="none", activation=activation))
        a, b = bn["good_lr_decades"], plain["good_lr_decades"]
        return Verdict(f"BN widens the range of good learning rates ({activation} MLP)",
                       f"good-LR range: BN {bn['good_lr_min']}..{bn['good_lr_max']} "
                       f"({a:.2g} decades), no BN {plain['good_lr_min']}..{plain['good_lr_max']}"
                       f" ({b:.2g} decades)" if a is not None and b is not None else "n/a",
                       larger(a, b), [r.path for r in pick(runs, activation=activation)])

    return [stable, wider]


def affine_claim(activation: str) -> Callable[[list[Run]], Verdict]:
    def judge(runs: list[Run]) -> Verdict:
        on = pick(runs, affine=True, activation=activation)
        off = pick(runs, affine=False, activation=activation)
        a, b = values(on, "final_val_acc"), values(off, "final_val_acc")
        gap = statistics.mean(a) - statistics.mean(b) if a and b else float("nan")
        return Verdict(f"BN's γ/β matter little for {activation} nets",
                       f"final val acc: with γ/β {fmt(a)}, without {fmt(b)} (gap {gap:+.3f})",
                       little(a, b), [r.path for r in on + off])
    return judge


def batch_claims(runs: list[Run]) -> list[Verdict]:
    sizes = sorted({r.config["trainer.batch_size"] for r in runs})
    small, reference, large = sizes[0], 64 if 64 in sizes else sizes[len(sizes) // 2], sizes[-1]
    bn_small = pick(runs, norm="batch", batch_size=small)
    bn_ref = pick(runs, norm="batch", batch_size=reference)
    plain_small = pick(runs, norm="none", batch_size=small)
    plain_ref = pick(runs, norm="none", batch_size=reference)
    a, b = values(bn_ref, "final_val_acc"), values(bn_small, "final_val_acc")
    degrade = Verdict(
        f"BN degrades at very small batches (batch {small} vs {reference})",
        f"BN final val acc: batch {reference} {fmt(a)}, batch {small} {fmt(b)}; no BN: batch "
        f"{reference} {fmt(values(plain_ref, 'final_val_acc'))}, batch {small} "
        f"{fmt(values(plain_small, 'final_val_acc'))}",
        directional(a, b, True), [r.path for r in bn_small + bn_ref + plain_small + plain_ref])
    gap_small = [abs(v) for v in values(bn_small, "train_eval_gap")]
    bn_large = pick(runs, norm="batch", batch_size=large)
    gap_large = [abs(v) for v in values(bn_large, "train_eval_gap")]
    grows = Verdict(
        "The gap between eval-mode and train-mode accuracy grows as batches shrink",
        f"|eval − train-mode acc| with BN: batch {small} {fmt(gap_small)}, batch {large} "
        f"{fmt(gap_large)}", directional(gap_small, gap_large, True),
        [r.path for r in bn_small + bn_large])
    return [degrade, grows]


def position_claim(activation: str) -> Callable[[list[Run]], Verdict]:
    def judge(runs: list[Run]) -> Verdict:
        before = pick(runs, norm_position="before_act", activation=activation)
        after = pick(runs, norm_position="after_act", activation=activation)
        a, b = values(before, "final_val_acc"), values(after, "final_val_acc")
        gap = statistics.mean(b) - statistics.mean(a) if a and b else float("nan")
        both = before + after
        reached = sum(r.metrics.get("steps_to_target") is not None for r in both)
        return Verdict(f"BN before and after the activation both train ({activation} MLP)",
                       f"final val acc: before {fmt(a)}, after {fmt(b)} (after − before "
                       f"{gap:+.3f}); runs reaching the target: {reached}/{len(both)}",
                       trains([before, after]), [r.path for r in both])
    return judge


def santurkar_claims(runs: list[Run]) -> list[Verdict]:
    out = [bn_vs_plain("final_val_acc", "BN trains at lr 0.5 where the plain net does not",
                       True, "final val acc at lr 0.5", lr=0.5)(runs)]
    for metric, what in (("landscape_loss_range", "smaller loss range along the gradient"),
                         ("landscape_beta_smoothness", "smaller effective β-smoothness")):
        out.append(bn_vs_plain(metric, f"BN's loss landscape is smoother: {what}", False,
                               f"{metric} at lr 0.1", lr=0.1)(runs))
    return out


@dataclass
class Study:
    title: str
    reference: str
    claims: Callable[[list[Run]], list[Verdict]]
    claim_texts: tuple[str, ...]


def _each(*judges: Callable[[list[Run]], Verdict]) -> Callable[[list[Run]], list[Verdict]]:
    return lambda runs: [judge(runs) for judge in judges]


STUDIES: dict[str, Study] = {
    "ioffe2015_fig1": Study(
        "Ioffe & Szegedy 2015, Figure 1: a sigmoid MLP on MNIST with and without BN",
        "Ioffe & Szegedy, Batch Normalization, ICML 2015, section 4.1 and Figure 1",
        _each(bn_vs_plain("steps_to_target", "BN reaches the target accuracy in fewer steps",
                          False, "steps to target"),
              bn_vs_plain("act_input_drift", "BN keeps the input distribution of the last "
                          "hidden sigmoid stable; without BN it drifts", False,
                          "drift of its 15/50/85th percentiles")),
        ("BN reaches the target accuracy in fewer steps",
         "BN's percentiles stay stable while the un-normalized ones drift")),
    "lr_stability": Study(
        "Learning-rate stability with and without BN",
        "Ioffe & Szegedy 2015, section 3.3; Bjorck et al., Understanding BN, NeurIPS 2018",
        _each(*lr_claims("sigmoid"), *lr_claims("relu")),
        ("BN raises the maximum stable learning rate (ratio per activation)",
         "BN widens the range of good learning rates")),
    "affine_ablation": Study(
        "BN with and without its learnable γ/β",
        "Ioffe & Szegedy 2015, section 3 (γ/β restore the representation power)",
        _each(affine_claim("relu"), affine_claim("sigmoid")),
        ("γ/β matter little for ReLU nets (the gap is reported for sigmoid too)",)),
    "batch_size": Study(
        "BN at small batch sizes",
        "Wu & He, Group Normalization, ECCV 2018, Figure 1",
        batch_claims,
        ("BN degrades at very small batches",
         "The gap between eval-mode and train-mode accuracy grows as batches shrink")),
    "bn_position": Study(
        "BN before vs after the activation",
        "Ioffe & Szegedy 2015 (BN before the nonlinearity); common practice places it after",
        _each(position_claim("relu"), position_claim("sigmoid")),
        ("Both positions train; the gap is reported",)),
    "sigmoid_saturation": Study(
        "A deep sigmoid MLP with and without BN",
        "Ioffe & Szegedy 2015, section 3.3 (saturating nonlinearities)",
        _each(bn_vs_plain("grad_norm_first_over_last", "Without BN the early layers' "
                          "gradients vanish (first/last hidden layer gradient-norm ratio)",
                          True, "grad-norm ratio layer 1 / last hidden"),
              bn_vs_plain("final_val_acc", "Without BN training stalls", True,
                          "final val acc")),
        ("Without BN the early layers' gradients vanish and training stalls; with BN not",)),
    "santurkar2018_vgg": Study(
        "Santurkar et al. 2018: VGG on CIFAR-10, BN and the loss landscape",
        "Santurkar, Tsipras, Ilyas, Madry, How Does Batch Normalization Help Optimization?, "
        "NeurIPS 2018, Figures 1 and 4",
        santurkar_claims,
        ("BN trains at lr 0.5 where the plain net does not",
         "BN's loss landscape is smoother (loss range, β-smoothness)")),
}


# ----------------------------------------------------------------------------- report


def report(study_name: str, runs: list[Run], sweep_dir: Path, command: str,
           manifest: dict) -> tuple[Path, list[Verdict]]:
    """Write report.md and its figures into the sweep directory."""
    from bnexp import plots

    base = study_name.removesuffix("_paper")
    study = STUDIES[base]
    results = [r for r in runs if r.status in ("completed", "diverged")]
    verdicts = study.claims(results)
    pngs = plots.save(plots.make_figures(results), sweep_dir / "plots")
    if base == "ioffe2015_fig1":
        pngs += plots.save({"percentiles": plots.percentile_figure(results)}, sweep_dir / "plots")
    if base == "sigmoid_saturation":
        pngs += plots.save({"layer_gradients": plots.layer_gradient_figure(results)},
                           sweep_dir / "plots")
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    seeds = sorted({r.seed for r in results if r.seed is not None})
    lines = [
        f"# {study.title}", "",
        f"Reference: {study.reference}.", "",
        f"Command: `{command}`", "",
        f"Grid: {', '.join(manifest.get('swept', []))}; {len(runs)} runs "
        f"({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}); seeds {seeds}.", "",
        "## Verdicts", "",
        "| claim | measured | seeds | verdict | runs |", "|---|---|---|---|---|",
    ]
    for v in verdicts:
        links = " ".join(f"[{i + 1}]({p.relative_to(sweep_dir)}/summary.json)"
                         for i, p in enumerate(v.runs[:12]))
        more = f" +{len(v.runs) - 12}" if len(v.runs) > 12 else ""
        measured = v.measured.replace("|", "\\|")  # a literal bar inside a table cell
        lines.append(f"| {v.claim} | {measured} | {len(seeds)} | **{v.verdict}** | "
                     f"{links}{more} |")
    lines += ["", "## How verdicts are decided", "", RULES, "## Figures", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in pngs]
    path = sweep_dir / "report.md"
    from bnexp.record import atomic_write_bytes

    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path, verdicts
