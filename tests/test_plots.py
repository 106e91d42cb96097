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
                   "final_val_acc": curve[-1], "trainer.target_acc": 0.9,
                   "steps_to_target": 20 if max(curve) >= 0.9 else None,
                   "diverged": curve[-1] == 0.1 and seed == 1})
            writer = SummaryWriter(str(run_dir))
            for step, acc in zip((10, 20), curve):
                writer.add_scalar("val/acc", acc, step)
                writer.add_scalar("train/loss", 1 - acc, step)
            writer.close()
    return tmp_path


def test_figures_hold_one_line_per_variant_with_seed_means(sweep_dir: Path) -> None:
    notes: list[str] = []
    figs = plots.make_figures(find([sweep_dir]), "best_val_acc", notes)
    assert set(figs) == {"acc_vs_lr", "steps_to_target_vs_lr", "divergence_heatmap",
                         "val_acc_curves"} and notes == []
    (ax,) = figs["acc_vs_lr"].axes
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"norm=batch", "norm=none"}
    assert list(lines["norm=batch"].get_xdata()) == [0.1, 1.0]
    assert list(lines["norm=batch"].get_ydata()) == pytest.approx([0.85, 0.96])
    assert ax.get_xscale() == "log"
    assert ax.get_ylabel() == "best val accuracy" and "best_val_acc" not in ax.get_title()
    curves = {line.get_label(): line for line in figs["val_acc_curves"].axes[0].lines}
    assert set(curves) == {"norm=batch,lr=1", "norm=none,lr=0.1"}  # each at its best LR
    assert list(curves["norm=batch,lr=1"].get_ydata()) == pytest.approx([0.7, 0.96])
    diverged, stuck = (a for a in figs["divergence_heatmap"].axes if a.images)
    assert diverged.images[0].get_array().tolist() == [[0.0, 0.0], [0.0, 0.5]]
    # norm=none at lr=1: one seed diverged, the other stayed at chance (0.1) without diverging
    assert stuck.images[0].get_array().tolist() == [[0.0, 0.0], [0.0, 0.5]]
    assert "%" in diverged.figure.axes[-1].get_yticklabels()[-1].get_text()  # the colour bar
    reached = figs["steps_to_target_vs_lr"].axes[0]
    assert "0.9" in reached.get_title() and "3 of 8 runs" in reached.get_title()


def test_a_run_repeated_elsewhere_is_drawn_once(sweep_dir: Path, tmp_path: Path) -> None:
    """A lone run of seed 0 at norm=batch, lr=0.1 (its diagnostics full) beside the sweep's
    own: the seed mean stays the mean over 2 seeds, not a mean weighting seed 0 twice."""
    write_summary(sweep_dir / "runs" / "lone", **{
        "model.norm": "batch", "optim.lr": 0.1, "seed": 0, "best_val_acc": 0.8,
        "final_val_acc": 0.8, "trainer.target_acc": 0.9, "trainer.diagnostics": "full",
        "steps_to_target": None, "diverged": False})
    notes: list[str] = []
    figs = plots.make_figures(find([sweep_dir]), "best_val_acc", notes)
    lines = {line.get_label(): line for line in figs["acc_vs_lr"].axes[0].lines}
    assert set(lines) == {"norm=batch", "norm=none"}
    assert list(lines["norm=batch"].get_ydata()) == pytest.approx([0.85, 0.96])
    assert notes == ["counted once: 1 run(s) trained the same config and seed as a run drawn "
                     "(`bnexp compare` names them)"]


def test_a_target_no_run_reached_is_said_not_drawn(tmp_path: Path) -> None:
    for lr in (0.1, 1.0):
        write_summary(tmp_path / f"lr={lr},seed=0", **{"optim.lr": lr, "seed": 0,
                      "trainer.target_acc": 0.97, "final_val_acc": 0.5, "best_val_acc": 0.5,
                      "steps_to_target": None})
    notes: list[str] = []
    figs = plots.make_figures(find([tmp_path]), notes=notes)
    assert "steps_to_target_vs_lr" not in figs
    assert notes == ["steps_to_target_vs_lr: not drawn: none of the 2 runs reached val "
                     "accuracy ≥ 0.97 (trainer.target_acc)"]


@pytest.mark.parametrize("fmt", plots.FORMATS)
def test_figures_in_each_format_at_150_dpi(sweep_dir: Path, tmp_path: Path, fmt: str) -> None:
    written = plots.save(plots.make_figures(find([sweep_dir])), tmp_path / "plots", fmt)
    assert len(written) == 4 and all(p.suffix == f".{fmt}" for p in written)
    head = written[0].read_bytes()[:8]
    assert {"png": head == b"\x89PNG\r\n\x1a\n", "pdf": head.startswith(b"%PDF"),
            "svg": b"<svg" in written[0].read_bytes()[:2000]}[fmt]
    if fmt == "png":
        width, _ = Image.open(written[0]).size
        assert width == pytest.approx(6.4 * 150, abs=2)  # 6.4 in at 150 dpi


def test_aggregated_tensorboard_runs_at_every_lr_in_the_sweeps_key_order(
        sweep_dir: Path) -> None:
    runs = find([sweep_dir])
    base = plots.tensorboard_runs(runs, sweep_dir)
    names = sorted(p.name for p in base.iterdir())
    assert names == ["lr=0.1,norm=batch", "lr=0.1,norm=none", "lr=1.0,norm=batch",
                     "lr=1.0,norm=none"]  # every LR; the runs' names less the seed
    events = EventAccumulator(str(base / "lr=1.0,norm=batch"))
    events.Reload()
    assert [e.value for e in events.Scalars("val/acc_seeds/mean")] == pytest.approx(
        [0.7, 0.96])
    upper = events.Scalars("val/acc_seeds/upper")[1].value
    assert upper == pytest.approx(0.96 + statistics.stdev([0.95, 0.97]), rel=1e-5)
    assert "figures" not in names and not events.Tags()["images"]  # no figures as a run
    assert len(find([sweep_dir])) == 8  # aggregated runs are not mistaken for runs


def test_bn_panels_with_bn_runs_only_label_the_bn_panel_without_a_warning(
        tmp_path: Path) -> None:
    """matplotlib warned "No artists with labels" into a study's output when its runs without
    BN were missing (the legend went on their empty panel)."""
    import warnings

    for seed in (0, 1):
        run_dir = write_summary(tmp_path / f"norm=batch,seed={seed}", "completed",
                                **{"model.norm": "batch", "seed": seed, "model.depth": 3})
        writer = SummaryWriter(str(run_dir))
        for step in (0, 10):
            for q in (15, 50, 85):
                writer.add_scalar(f"act_input/act3/p{q}", q / 100 + step, step)
        writer.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.percentile_figure(find([tmp_path]))
    without, with_bn = fig.axes
    assert not without.lines and without.get_legend() is None
    assert len(with_bn.lines) == 3 and with_bn.get_legend() is not None
    assert [t.get_text() for t in with_bn.get_legend().get_texts()] == [
        "15th percentile", "50th percentile", "85th percentile"]
