"""Figures hold the expected lines; PNGs and aggregated TensorBoard runs are real files."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from conftest import write_summary
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from bnexp import plots
from bnexp.runs import find

CURVES = {("batch", 0.1): [[0.5, 0.8], [0.6, 0.9]], ("batch", 1.0): [[0.7, 0.95], [0.7, 0.97]],
          ("none", 0.1): [[0.2, 0.5], [0.3, 0.6]], ("none", 1.0): [[0.1, 0.1], [0.1, 0.1]]}


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """A hand-made LR x norm sweep with 2 seeds: summaries plus real TensorBoard events."""
    for (norm, lr), seeds in CURVES.items():
        for seed, curve in enumerate(seeds):
            run_dir = write_summary(
                tmp_path / f"lr={lr},norm={norm},seed={seed}",
                "diverged" if curve[-1] == 0.1 and seed == 1 else "completed",
                **{"model.norm": norm, "optim.lr": lr, "seed": seed, "best_val_acc": max(curve),
                   "steps_to_target": 20 if max(curve) >= 0.9 else None,
                   "diverged": curve[-1] == 0.1 and seed == 1})
            writer = SummaryWriter(str(run_dir))
            for step, acc in zip((10, 20), curve):
                writer.add_scalar("val/acc", acc, step)
                writer.add_scalar("train/loss", 1 - acc, step)
            writer.close()
    return tmp_path


def test_figures_hold_one_line_per_variant_with_seed_means(sweep_dir: Path) -> None:
    figs = plots.make_figures(find([sweep_dir]))
    assert set(figs) == {"acc_vs_lr", "steps_to_target_vs_lr", "divergence_heatmap",
                         "val_acc_curves"}
    (ax,) = figs["acc_vs_lr"].axes
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"norm=batch", "norm=none"}
    assert list(lines["norm=batch"].get_xdata()) == [0.1, 1.0]
    assert list(lines["norm=batch"].get_ydata()) == pytest.approx([0.85, 0.96])
    assert ax.get_xscale() == "log"
    curves = {line.get_label(): line for line in figs["val_acc_curves"].axes[0].lines}
    assert set(curves) == {"norm=batch,lr=1", "norm=none,lr=0.1"}  # each at its best LR
    assert list(curves["norm=batch,lr=1"].get_ydata()) == pytest.approx([0.7, 0.96])
    heat = figs["divergence_heatmap"].axes[0].images[0].get_array()
    assert heat.tolist() == [[0.0, 0.0], [0.0, 0.5]]


def test_pngs_and_aggregated_tensorboard_runs(sweep_dir: Path, tmp_path: Path) -> None:
    runs = find([sweep_dir])
    pngs = plots.save(plots.make_figures(runs), tmp_path / "plots")
    assert len(pngs) == 4
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(png).size[0] > 300
    base = plots.tensorboard_runs(runs, sweep_dir, pngs)
    events = EventAccumulator(str(base / "norm=batch,lr=1"))
    events.Reload()
    assert [e.value for e in events.Scalars("val_acc/mean")] == pytest.approx([0.7, 0.96])
    upper = events.Scalars("val_acc/upper")[1].value
    assert upper == pytest.approx(0.96 + statistics.stdev([0.95, 0.97]), rel=1e-5)
    images = EventAccumulator(str(base / "figures"), size_guidance={"images": 0})
    images.Reload()
    assert "figures/acc_vs_lr" in images.Tags()["images"]
    assert len(find([sweep_dir])) == 8  # aggregated runs are not mistaken for runs
