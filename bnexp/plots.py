"""Figures over many runs (matplotlib PNGs) and seed-aggregated TensorBoard runs.

Variants are the varying config keys other than optim.lr and seed; seeds are aggregated into
mean ± std bands. The same grouping as `bnexp compare`, drawn.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnexp import metrics
from bnexp.config import short_keys
from bnexp.record import FINISHED
from bnexp.runs import Run, distinct, scalar_series, varying_keys

AGGREGATE_DIR = "_aggregate"  # TensorBoard runs of seed means, inside the sweep directory


def _label(values: Sequence[Any], keys: Sequence[str]) -> str:
    names = short_keys(list(keys))
    return ",".join(f"{names[k]}={v}" for k, v in zip(keys, values)) or "all runs"


def group(runs: list[Run]) -> tuple[list[str], dict[str, dict[Any, list[Run]]]]:
    """variant label -> lr -> runs (one per seed)."""
    keys = [k for k in varying_keys(runs) if k not in ("optim.lr", "seed")]
    out: dict[str, dict[Any, list[Run]]] = {}
    for run in runs:
        label = _label([run.config.get(k) for k in keys], keys)
        out.setdefault(label, {}).setdefault(run.config.get("optim.lr"), []).append(run)
    return keys, out


def mean_curve(series: list[list[tuple[int, float]]]) -> tuple[list[int], list[float],
                                                                  list[float]]:
    """Mean and std over seeds at the steps every seed logged."""
    if not series:
        return [], [], []
    common = sorted(set.intersection(*(set(s for s, _ in one) for one in series)))
    by_seed = [dict(one) for one in series]
    means, stds = [], []
    for step in common:
        mean, std, _ = metrics.mean_std([d[step] for d in by_seed])
        means.append(mean)
        stds.append(std)
    return common, means, stds


def _band(ax: Any, x: Sequence[float], mean: Sequence[float], std: Sequence[float],
          label: str, markers: bool = True) -> None:
    line = ax.plot(x, mean, marker="o" if markers else None, ms=3, label=label)[0]
    lo = [m - s for m, s in zip(mean, std)]
    hi = [m + s for m, s in zip(mean, std)]
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)


def _lr_curve(points: dict[Any, list[Run]], metric: str) -> tuple[list, list, list]:
    xs, means, stds = [], [], []
    for lr in sorted(points):
        mean, std, _ = metrics.mean_std([r.metrics.get(metric) for r in points[lr]])
        if mean is not None:
            xs.append(lr)
            means.append(mean)
            stds.append(std)
    return xs, means, stds


FORMATS = ("png", "svg", "pdf")
DPI = 150  # legible on a slide and in a paper at the figures' sizes
# What the figures call the metrics they draw.
METRIC_LABELS = {"final_val_acc": "final val accuracy", "best_val_acc": "best val accuracy",
                 "final_train_loss": "final training loss",
                 "val_acc_eval_mode": "val accuracy (eval mode)"}


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name.replace("_", " "))


def save(figs: dict[str, Any], out: Path, fmt: str = "png") -> list[Path]:
    """Write figures as out/<name>.<fmt> (png, svg or pdf); return the paths."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figs.items():
        fig.tight_layout()
        fig.savefig(out / f"{name}.{fmt}", dpi=DPI, format=fmt)
        plt.close(fig)
        written.append(out / f"{name}.{fmt}")
    return written


def make_figures(runs: list[Run], metric: str = "final_val_acc",
                 notes: list[str] | None = None) -> dict[str, Any]:
    """The figures for these runs, by name (matplotlib Figure objects). metric: the accuracy
    the LR figures draw and the best LR is chosen by (compare ranks by final_val_acc too).
    notes gets a line for each figure left out, saying why."""
    plt = _pyplot()
    notes = notes if notes is not None else []
    runs, repeats = distinct([r for r in runs if r.status in FINISHED])
    if repeats:
        notes.append(f"counted once: {len(repeats)} run(s) trained the same config and seed "
                     "as a run drawn (`bnexp compare` names them)")
    _, variants = group(runs)
    lr_sweep = any(len(points) > 1 for points in variants.values())
    figs: dict[str, Any] = {}

    if lr_sweep:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label, points in variants.items():
            xs, means, stds = _lr_curve(points, metric)
            if xs:
                _band(ax, xs, means, stds, label)
        ax.set_xscale("log")
        _finish(ax, "learning rate", metric_label(metric),
                f"{metric_label(metric)} vs learning rate (mean ± std over seeds)")
        figs["acc_vs_lr"] = fig

        targets = sorted({t for r in runs if (t := r.config.get("trainer.target_acc"))})
        target = "val accuracy ≥ " + "/".join(f"{t:g}" for t in targets) if targets else \
            "the target"
        reached = [r for r in runs if r.metrics.get("steps_to_target") is not None]
        if reached:
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for label, points in variants.items():
                xs, means, stds = _lr_curve(points, "steps_to_target")
                if xs:
                    _band(ax, xs, means, stds, label)
            ax.set_xscale("log")
            _finish(ax, "learning rate", f"steps to {target}",
                    f"steps to {target} vs learning rate (mean over the seeds that reached "
                    f"it; {len(reached)} of {len(runs)} runs did)")
            figs["steps_to_target_vs_lr"] = fig
        else:
            notes.append(f"steps_to_target_vs_lr: not drawn: none of the {len(runs)} runs "
                         f"reached {target} (trainer.target_acc)")
        figs["divergence_heatmap"] = _outcome_heatmap(variants)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, curve in curves(variants, metric).items():
        steps, means, stds = curve
        if steps:
            _band(ax, steps, means, stds, label, markers=False)
    _finish(ax, "step", "val accuracy (eval mode)",
            "val accuracy, mean ± std over seeds"
            + (f"\n(each variant at its best LR by {metric_label(metric)})" if lr_sweep else ""))
    figs["val_acc_curves"] = fig
    return figs


def _outcome_heatmap(variants: dict[str, dict[Any, list[Run]]]) -> Any:
    """Per variant and LR, the fraction of seeds that diverged and, in a second panel, of
    those that did not diverge but stayed at chance: a plain sigmoid net that never learns is
    not a diverged one, and the two call for different conclusions."""
    from matplotlib.ticker import PercentFormatter

    plt = _pyplot()
    lrs = sorted({lr for points in variants.values() for lr in points})
    labels = list(variants)
    panels = (("diverged", _diverged_fraction, "Reds"),
              (f"stuck at chance (not diverged; final val accuracy < chance + "
               f"{metrics.STUCK_MARGIN:.0%} of the way to 1)", _stuck_fraction, "Blues"))
    fig, axes = plt.subplots(1, 2, figsize=(2.4 + 1.6 * len(lrs), 2.4 + 0.45 * len(labels)),
                             squeeze=False)
    for ax, (title, fraction, cmap) in zip(axes[0], panels):
        grid = [[fraction(variants[v].get(lr)) for lr in lrs] for v in labels]
        image = ax.imshow([[math.nan if g is None else g for g in row] for row in grid],
                          cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(grid):
            for j, g in enumerate(row):
                ax.text(j, i, "" if g is None else f"{g:.0%}", ha="center", va="center",
                        fontsize=8, color="white" if g and g > 0.6 else "black")
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], rotation=45)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("learning rate")
        ax.set_title(f"seeds {title}", fontsize=9, wrap=True)
        fig.colorbar(image, ax=ax, format=PercentFormatter(1.0))
    return fig


def _diverged_fraction(runs: list[Run] | None) -> float | None:
    if not runs:
        return None
    return sum(bool(r.metrics.get("diverged")) for r in runs) / len(runs)


def _stuck_fraction(runs: list[Run] | None) -> float | None:
    if not runs:
        return None
    return sum(not r.metrics.get("diverged") and metrics.stuck_at_chance(
        r.metrics.get("final_val_acc"), r.metrics.get("num_classes") or 10)
        for r in runs) / len(runs)


def curves(variants: dict[str, dict[Any, list[Run]]], metric: str,
           tag: str = "val/acc") -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per variant, the seed-mean curve of `tag`; in an LR sweep, at the variant's best LR."""
    out = {}
    for label, points in variants.items():
        if len(points) > 1:
            best = metrics.lr_stats({lr: [r.metrics for r in rs] for lr, rs in points.items()},
                                    metric, 0.0)["best_lr"]
            chosen, name = points.get(best, []), f"{label},lr={best:g}" if best else label
        else:
            chosen, name = next(iter(points.values())), label
        out[name] = mean_curve([scalar_series(r.path, tag) for r in chosen])
    return out


def aggregate_name(run: Run) -> str:
    """The name of the seed aggregate a run belongs to: its own name without its seed, so that
    aggregates keep the sweep's key order (lr=0.1,norm=batch,seed=0 -> lr=0.1,norm=batch) and
    one regex selects a variant's runs and its aggregate."""
    parts = [p for p in run.path.name.split(",") if not p.startswith("seed=")]
    return ",".join(parts) or "all runs"


AGGREGATE_TAGS = {"val/acc": "val/acc_seeds", "train/loss": "train/loss_seeds"}


def tensorboard_runs(runs: list[Run], root: Path) -> Path:
    """Seed-aggregated TensorBoard runs under root/_aggregate: per variant and LR (named as
    the sweep's runs, less the seed), the seed mean and mean ± std of val accuracy and train
    loss, beside the curves they summarize (val/acc_seeds/mean in the val group) and as
    Margin charts in Custom Scalars. Figures are not written as events: every directory
    TensorBoard reads is a run in every run selector."""
    from torch.utils.tensorboard import SummaryWriter

    base = root / AGGREGATE_DIR
    shutil.rmtree(base, ignore_errors=True)  # derived from the runs, rebuilt whole
    by_name: dict[str, list[Run]] = {}
    for run in distinct([r for r in runs if r.status in FINISHED])[0]:
        by_name.setdefault(aggregate_name(run), []).append(run)
    layout = {f"{tag} (seed mean ± std; run _aggregate/<variant>)": [
        "Margin", [f"{name}/mean", f"{name}/lower", f"{name}/upper"]]
        for tag, name in AGGREGATE_TAGS.items()}
    for label, members in sorted(by_name.items()):
        writer = SummaryWriter(str(base / label.replace("/", "_")))
        writer.add_custom_scalars({"bnexp seeds aggregated": layout})
        for tag, name in AGGREGATE_TAGS.items():
            steps, means, stds = mean_curve([scalar_series(r.path, tag) for r in members])
            for step, mean, std in zip(steps, means, stds):
                writer.add_scalar(f"{name}/mean", mean, step)
                writer.add_scalar(f"{name}/lower", mean - std, step)
                writer.add_scalar(f"{name}/upper", mean + std, step)
        writer.close()
    return base


def _bn_panels(runs: list[Run], draw: Any, ylabel: str) -> Any:
    """Two panels, without BN and with BN, each drawn by draw(ax, run) for the first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, norm in zip(axes, ("none", "batch")):
        chosen = sorted((r for r in runs if r.config.get("model.norm") == norm),
                        key=lambda r: (r.seed is None, r.seed))
        if not chosen:
            continue
        draw(ax, chosen[0])
        ax.set_title(f"{'with' if norm == 'batch' else 'without'} BN (seed {chosen[0].seed})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    # The first panel with lines (a study stopped early may have BN runs only).
    labelled = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
    if labelled:
        labelled[0].legend(fontsize=7)
    return fig


def percentile_figure(runs: list[Run]) -> Any:
    """Ioffe & Szegedy 2015, Figure 1(b, c): the 15th, 50th and 85th percentiles of the input
    of the last hidden sigmoid over training, with BN and without, for the first seed."""
    def draw(ax: Any, run: Run) -> None:
        layer = f"act{run.config.get('model.depth', 3)}"
        for q, style in zip(metrics.PERCENTILES, (":", "-", ":")):
            series = scalar_series(run.path, f"act_input/{layer}/p{q}")
            ax.plot([s for s, _ in series], [v for _, v in series], style, color="C0",
                    label=f"{q}th percentile")

    return _bn_panels(runs, draw, "input of the last hidden sigmoid")


def layer_gradient_figure(runs: list[Run]) -> Any:
    """Per-layer gradient norms over training, with BN and without (first seed): vanishing
    gradients in the early layers of a deep sigmoid net show as lines far below the last."""
    import matplotlib.pyplot as plt

    def draw(ax: Any, run: Run) -> None:
        layers = int(run.config.get("model.depth", 3)) + 1
        for i in range(1, layers + 1):
            series = scalar_series(run.path, f"grad_norm/layer{i}")
            ax.plot([s for s, _ in series], [v for _, v in series], label=f"layer {i}",
                    color=plt.cm.viridis(i / layers))
        ax.set_yscale("log")

    return _bn_panels(runs, draw, "gradient norm of the layer's weights")


def _pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend (no display on servers or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(ax: Any, xlabel: str, ylabel: str, title: str, legend: int | None = 8) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend)
    ax.grid(alpha=0.3)


def _seed_mean(series: list[list[tuple[int, float | None]]]) -> tuple[list, list, list]:
    return mean_curve([[(s, v) for s, v in one if v is not None] for one in series if one])


def loss_curves_figure(runs: list[Run], metric: str = "best_val_acc") -> Any:
    """Training loss over steps per variant at its best LR (seed mean ± std), log scale: how
    fast each input scaling and norm setting brings the loss down."""
    plt = _pyplot()
    _, variants = group(runs)
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for label, points in variants.items():
        best = metrics.lr_stats({lr: [r.metrics for r in rs] for lr, rs in points.items()},
                                metric, 0.0)["best_lr"]
        chosen = points.get(best) or next(iter(points.values()))
        steps, means, stds = _seed_mean([r.curves.get("train_loss", []) for r in chosen])
        if steps:
            _band(ax, steps, means, stds, f"{label}, lr={best:g}" if best else label,
                  markers=False)
    ax.set_yscale("log")
    _finish(ax, "step", "training loss",
            "training loss at each variant's best LR (mean ± std over seeds)", legend=7)
    return fig


def modes_figure(runs: list[Run]) -> Any:
    """Validation accuracy against the eval batch size, in eval mode (running statistics)
    and train mode (each batch's statistics), seed mean ± std; a batch size that train mode
    refused is marked."""
    plt = _pyplot()
    sizes = sorted({int(k.rsplit("bs", 1)[1]) for r in runs for k in r.metrics
                    if k.startswith("modes_eval_acc_bs")})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, label in (("eval", "eval mode (running statistics)"),
                        ("train", "train mode (batch statistics)")):
        xs, means, stds = [], [], []
        for size in sizes:
            mean, std, n = metrics.mean_std([r.metrics.get(f"modes_{mode}_acc_bs{size}")
                                             for r in runs])
            if n:
                xs.append(size)
                means.append(mean)
                stds.append(std)
            elif mode == "train":
                ax.annotate("train mode:\nrefused", (size, 0.1), ha="center", fontsize=8,
                            color="C1")
        if xs:
            _band(ax, xs, means, stds, label)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    _finish(ax, "eval batch size", "val accuracy", "BN's two modes against the eval batch size")
    return fig


def running_statistics_figure(runs: list[Run]) -> Any:
    """Per BN layer, how far the running mean and variance are from the population
    statistics of the layer's input (seed mean ± std)."""
    plt = _pyplot()
    layers = sorted({int(k.rsplit("_bn", 1)[1]) for r in runs for k in r.metrics
                     if k.startswith("running_mean_error_bn")})
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    width = 0.38
    for offset, (key, label) in zip((-width / 2, width / 2), (
            ("running_mean_error_bn", "mean: error / population std"),
            ("running_var_rel_error_bn", "variance: relative error"))):
        stats = [metrics.mean_std([r.metrics.get(f"{key}{i}") for r in runs]) for i in layers]
        ax.bar([i + offset for i in layers], [m or 0 for m, _, _ in stats], width,
               yerr=[s or 0 for _, s, _ in stats], label=label, capsize=3)
    ax.set_xticks(layers, [f"bn{i}" for i in layers])
    _finish(ax, "BN layer", "RMS over features",
            "running statistics vs population statistics of each BN input")
    return fig


NORM_NAMES = {"batch": "BatchNorm", "layer": "LayerNorm", "group": "GroupNorm",
              "instance": "InstanceNorm", "none": "no norm"}


def batch_size_figure(runs: list[Run]) -> Any:
    """Wu & He 2018, Figure 1, measured: final val accuracy against the training batch size,
    one line per norm (eval mode, seed mean ± std), and BN's train-mode accuracy dashed, so
    the gap between BN's two modes at tiny batches shows beside the other norms' flat lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    norms = [n for n in NORM_NAMES if any(r.config.get("model.norm") == n for r in runs)]
    sizes = sorted({r.config["trainer.batch_size"] for r in runs})
    for colour, norm in enumerate(norms):
        mine = [r for r in runs if r.config.get("model.norm") == norm]
        for key, suffix, style in (("final_val_acc", "", "-"),
                                   ("val_acc_train_mode", ", train mode (batch statistics)",
                                    "--")):
            if key == "val_acc_train_mode" and norm != "batch":
                continue  # the other norms compute the same function in both modes
            xs, means, stds = [], [], []
            for size in sizes:
                mean, std, n = metrics.mean_std([r.metrics.get(key) for r in mine
                                                 if r.config["trainer.batch_size"] == size])
                if n:
                    xs.append(size)
                    means.append(mean)
                    stds.append(std)
            if xs:
                _band(ax, xs, means, stds, NORM_NAMES[norm] + suffix)
                line = ax.lines[-1]
                line.set_linestyle(style)
                line.set_color(f"C{colour}")  # one colour per norm, both of BN's modes
                ax.collections[-1].set_color(f"C{colour}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_ylim(0, 1)
    _finish(ax, "training batch size (LR scaled linearly)", "final val accuracy (eval mode)",
            "accuracy against the batch size, by norm (mean ± std over seeds)")
    return fig
