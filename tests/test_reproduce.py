"""Studies: configs compose into the expected grids, verdict rules decide from measurements,
and a tiny end-to-end study writes a report with one row per claim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import make_cifar10, write_summary
from typer.testing import CliRunner

from bnexp import reproduce as rep
from bnexp.cli import app
from bnexp.runs import find

runner = CliRunner()
GRIDS = {  # jobs per study: the product of its swept values
    "ioffe2015_fig1": 2 * 3, "lr_stability": 9 * 2 * 2 * 3, "affine_ablation": 2 * 2 * 3,
    "batch_size": 5 * 2 * 3, "bn_position": 2 * 2 * 3, "sigmoid_saturation": 2 * 3,
    "santurkar2018_vgg": 2 * 2 * 2,
}


def test_every_study_has_a_config_and_claims() -> None:
    assert set(GRIDS) == set(rep.STUDIES)
    result = runner.invoke(app, ["reproduce", "--list"])
    assert result.exit_code == 0
    for name, study in rep.STUDIES.items():
        assert name in result.output
        assert all(claim in result.output for claim in study.claim_texts)


@pytest.mark.parametrize("name,scale", [(n, "") for n in GRIDS] + [
    ("ioffe2015_fig1", "scale=paper"), ("santurkar2018_vgg", "scale=paper")])
def test_dry_run_lists_the_expected_grid(name: str, scale: str, isolated: Path) -> None:
    result = runner.invoke(app, ["reproduce", name, *([scale] if scale else []), "--dry-run"])
    assert result.exit_code == 0, result.output
    jobs = len(re.findall(r"^\s+run ", result.output, re.M))
    expected = GRIDS[name] * (3 / 2 if name == "santurkar2018_vgg" and scale else 1)
    assert jobs == expected
    assert not (isolated / "outputs").exists() or not list((isolated / "outputs").rglob(
        "summary.json"))


def runs_with(tmp: Path, metric: str, bn: list[float], plain: list[float], **extra) -> list:
    for norm, vals in (("batch", bn), ("none", plain)):
        for seed, v in enumerate(vals):
            write_summary(tmp / f"norm={norm},seed={seed}", **{
                "model.norm": norm, "seed": seed, metric: v, "steps": 1000, **extra})
    return find([tmp])


@pytest.mark.parametrize("bn,plain,verdict", [
    ([100, 120, 110], [400, 420, 410], rep.HOLDS),
    ([400, 420, 410], [100, 120, 110], rep.FAILS),
    ([100, 500, 300], [300, 320, 280], rep.UNSURE),  # inside the seed spread
    ([100, 120, 500], [110, 115, 400], rep.UNSURE),  # seeds disagree
])
def test_directional_verdicts_on_hand_made_summaries(tmp_path: Path, bn, plain, verdict) -> None:
    runs = runs_with(tmp_path, "steps_to_target", bn, plain)
    first = rep.STUDIES["ioffe2015_fig1"].claims(runs)[0]
    assert first.verdict == verdict
    assert len(first.runs) == 6


def test_never_reaching_the_target_counts_as_slower(tmp_path: Path) -> None:
    runs = runs_with(tmp_path, "steps_to_target", [300, 310, 320], [None, None, None])
    assert rep.STUDIES["ioffe2015_fig1"].claims(runs)[0].verdict == rep.HOLDS


@pytest.mark.parametrize("on,off,verdict", [
    ([0.95, 0.951], [0.946, 0.947], rep.HOLDS),
    ([0.95, 0.951], [0.90, 0.901], rep.FAILS),
    ([0.95, 0.99], [0.93, 0.94], rep.UNSURE),
])
def test_matters_little_rule(tmp_path: Path, on, off, verdict) -> None:
    for affine, vals in ((True, on), (False, off)):
        for seed, v in enumerate(vals):
            write_summary(tmp_path / f"a={affine},s={seed}", **{
                "model.affine": affine, "model.activation": "relu", "seed": seed,
                "final_val_acc": v})
    relu = rep.STUDIES["affine_ablation"].claims(find([tmp_path]))[0]
    assert relu.verdict == verdict and "relu" in relu.claim


def test_lr_verdicts_on_a_hand_made_grid(tmp_path: Path) -> None:
    def run(norm: str, lr: float, acc: float, diverged: bool = False) -> None:
        write_summary(tmp_path / f"{norm}-{lr}", "diverged" if diverged else "completed", **{
            "model.norm": norm, "model.activation": "relu", "optim.lr": lr, "seed": 0,
            "final_val_acc": acc, "diverged": diverged,
            "steps_to_target": None if diverged or acc < 0.9 else 10})

    for lr, acc in ((0.01, 0.9), (0.1, 0.95), (1.0, 0.95), (10.0, 0.95)):
        run("batch", lr, acc)
    for lr, acc, boom in ((0.01, 0.92, False), (0.1, 0.95, False), (1.0, 0.1, True),
                          (10.0, 0.1, True)):
        run("none", lr, acc, boom)
    stable, wider = [v for v in rep.STUDIES["lr_stability"].claims(find([tmp_path]))
                     if "relu" in v.claim]
    assert stable.verdict == rep.HOLDS and "ratio 100x" in stable.measured
    assert wider.verdict == rep.HOLDS


def test_tiny_study_writes_a_report_with_one_row_per_claim(isolated: Path) -> None:
    result = runner.invoke(app, ["reproduce", "ioffe2015_fig1", "seed=0", "trainer.steps=40",
                                 "trainer.eval_every=10", "trainer.diagnostics_every=10",
                                 "trainer.progress=none", "device=cpu"])
    assert result.exit_code == 0, result.output
    study_dir = isolated / "outputs" / "studies" / "ioffe2015_fig1"
    report = (study_dir / "report.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| ") and "**" in ln]
    assert len(rows) == 2
    assert all(any(v in row for v in (rep.HOLDS, rep.FAILS, rep.UNSURE)) for row in rows)
    for png in re.findall(r"\(plots/(\S+\.png)\)", report):
        assert (study_dir / "plots" / png).is_file()
    assert "percentiles.png" in report


def test_tiny_saturation_study_draws_per_layer_gradients(isolated: Path) -> None:
    result = runner.invoke(app, ["reproduce", "sigmoid_saturation", "seed=0", "trainer.steps=20",
                                 "trainer.eval_every=10", "trainer.diagnostics_every=5",
                                 "trainer.progress=none", "device=cpu"])
    assert result.exit_code == 0, result.output
    study_dir = isolated / "outputs" / "studies" / "sigmoid_saturation"
    assert "layer_gradients.png" in (study_dir / "report.md").read_text()
    assert (study_dir / "plots" / "layer_gradients.png").is_file()


def test_tiny_santurkar_study_on_cifar_files(isolated: Path, tmp_path: Path) -> None:
    make_cifar10(tmp_path / "cifar")
    result = runner.invoke(app, [
        "reproduce", "santurkar2018_vgg", "seed=0", f"data.root={tmp_path / 'cifar'}",
        "data.download=false", "model.width=4", "trainer.steps=4", "trainer.batch_size=16",
        "trainer.eval_every=2", "trainer.probe_every=2", "trainer.progress=none",
        "device=cpu"])
    assert result.exit_code == 0, result.output
    report = (isolated / "outputs" / "studies" / "santurkar2018_vgg" / "report.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| ") and "**" in ln]
    assert len(rows) == 3 and "landscape_loss_range" in report


def test_unknown_study_and_scale_are_clear_errors() -> None:
    bad = runner.invoke(app, ["reproduce", "ioffe"])
    assert bad.exit_code == 2 and "ioffe2015_fig1" in bad.output
    scale = runner.invoke(app, ["reproduce", "ioffe2015_fig1", "scale=huge"])
    assert scale.exit_code == 2 and "scale=paper" in scale.output
