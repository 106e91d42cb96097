"""compare's aggregation and LR statistics on hand-made summaries with known answers."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from conftest import write_summary
from typer.testing import CliRunner

from bnexp import compare, metrics
from bnexp.cli import app
from bnexp.runs import find, varying_keys

runner = CliRunner()


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """norm x lr x 3 seeds with known accuracies; no-BN diverges at lr=1 for seed 2."""
    accs = {("batch", 0.1): [0.90, 0.92, 0.94], ("batch", 1.0): [0.95, 0.95, 0.95],
            ("none", 0.1): [0.80, 0.82, 0.84], ("none", 1.0): [0.50, 0.60, 0.10]}
    for (norm, lr), values in accs.items():
        for seed, acc in enumerate(values):
            diverged = norm == "none" and lr == 1.0 and seed == 2
            write_summary(tmp_path / "sweep" / f"lr={lr},norm={norm},seed={seed}",
                          "diverged" if diverged else "completed",
                          **{"model.norm": norm, "optim.lr": lr, "seed": seed,
                             "data.root": "/somewhere", "final_val_acc": acc,
                             "diverged": diverged,
                             "steps_to_target": None if norm == "none" and lr == 1.0 else 100})
    write_summary(tmp_path / "sweep" / "broken", "failed", **{"model.norm": "batch"})
    return tmp_path / "sweep"


def test_varying_keys_ignore_paths_and_derived_affine(grid: Path) -> None:
    assert varying_keys(find([grid])) == ["model.norm", "optim.lr", "seed"]


def test_aggregation_over_seeds_has_known_mean_and_std(grid: Path) -> None:
    result = compare.compare(find([grid]), ["final_val_acc"])
    rows = {(r["model.norm"], r["optim.lr"]): r for r in result["rows"]}
    assert len(rows) == 4 and all(r["n"] == 3 for r in rows.values())
    cell = rows[("batch", 0.1)]["final_val_acc"]
    assert cell["mean"] == pytest.approx(0.92)
    assert cell["std"] == pytest.approx(statistics.stdev([0.90, 0.92, 0.94]))
    assert rows[("batch", 1.0)]["final_val_acc"]["std"] == 0
    assert result["skipped"] == {"failed": 1}


def test_lr_statistics_per_variant(grid: Path) -> None:
    result = compare.compare(find([grid]), ["final_val_acc"], tolerance=0.05)
    lr = {r["model.norm"]: r for r in result["lr"]}
    assert lr["batch"]["best_lr"] == 1.0 and lr["batch"]["max_stable_lr"] == 1.0
    assert lr["batch"]["good_lr_decades"] == pytest.approx(1.0)  # 0.92 is within 0.05 of 0.95
    assert lr["none"]["best_lr"] == 0.1 and lr["none"]["max_stable_lr"] == 0.1
    assert lr["none"]["good_lr_decades"] == 0


def test_max_stable_lr_on_a_hand_made_grid() -> None:
    ok = {"diverged": False, "steps_to_target": 10, "acc": 0.9}
    slow = {"diverged": False, "steps_to_target": None, "acc": 0.5}
    boom = {"diverged": True, "steps_to_target": None, "acc": 0.1}
    points = {0.01: [ok, ok], 0.1: [ok, ok], 1.0: [ok, slow], 3.0: [ok, ok], 10.0: [ok, boom]}
    stats = metrics.lr_stats(points, "acc", tolerance=0.0)
    # 3.0 is the largest LR where every seed reached the target and none diverged.
    assert stats["max_stable_lr"] == 3.0
    assert stats["best_lr"] == 0.01  # ties go to the smaller LR
    assert stats["good_lr_min"] == 0.01 and stats["good_lr_max"] == 3.0
    assert stats["good_lr_decades"] == pytest.approx(math.log10(300))


def test_where_filters_and_short_keys(grid: Path) -> None:
    runs = compare.select(find([grid]), ["norm=batch", "optim.lr=1.0"])
    assert len(runs) == 3
    with pytest.raises(ValueError, match="KEY=VALUE"):
        compare.select(runs, ["norm"])


@pytest.mark.parametrize("fmt", ["table", "csv", "markdown", "json"])
def test_cli_formats(grid: Path, fmt: str) -> None:
    result = runner.invoke(app, ["compare", str(grid), "-f", fmt, "-m", "final_val_acc",
                                 "--sort", "final_val_acc"])
    assert result.exit_code == 0, result.output
    out = result.output
    if fmt == "json":
        body = json.loads(out)
        assert len(body["rows"]) == 4 and body["rows"][0]["final_val_acc"]["mean"] == 0.95
        assert {r["model.norm"] for r in body["lr"]} == {"batch", "none"}
    elif fmt == "csv":
        lines = out.strip().splitlines()
        assert lines[0].startswith("model.norm,optim.lr,n,final_val_acc_mean")
        assert len(lines) == 5 and lines[1].startswith("batch,1.0,3,0.95")
    else:
        assert "0.92 ± 0.02" in out and "max_stable_lr" in out


def test_compare_never_imports_torch(grid: Path) -> None:
    import subprocess
    import sys

    # main() ends the process itself (cli.leave): read sys.modules from an atexit handler.
    code = ("import atexit, sys; from bnexp.cli import main\n"
            "atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'))\n"
            f"sys.argv=['bnexp','compare',{str(grid)!r}]\nmain()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().endswith("NO-TORCH"), out.stdout + out.stderr


def test_no_runs_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["compare", str(tmp_path)])
    assert result.exit_code == 2 and "no runs" in result.output


@pytest.fixture
def repeated(tmp_path: Path) -> Path:
    """A sweep's two seeds (diagnostics=summary, as a sweep's jobs record) and two repeats of
    its seed 0: a lone `bnexp train` (diagnostics=full, its histograms) and a rerun whose
    dataset lay elsewhere. Directory names sort against the seeds."""
    same = {"model.norm": "batch", "optim.lr": 0.1, "data.root": "/data"}
    for seed, acc in ((0, 0.90), (1, 0.80)):
        write_summary(tmp_path / "sweeps" / "s" / f"z-seed={seed}", **same, seed=seed,
                      **{"trainer.diagnostics": "summary"}, final_val_acc=acc)
    write_summary(tmp_path / "runs" / "a-lone", **same, seed=0,
                  **{"trainer.diagnostics": "full", "trainer.histogram_every": 50},
                  final_val_acc=0.90, saturation_final=0.1)
    write_summary(tmp_path / "runs" / "b-moved", **{**same, "data.root": "/elsewhere"}, seed=0,
                  **{"trainer.diagnostics": "summary"}, final_val_acc=0.90)
    return tmp_path


def test_a_config_and_seed_trained_twice_counts_once(repeated: Path) -> None:
    result = compare.compare(find([repeated]), ["final_val_acc"])
    assert result["keys"] == ["seed"]  # what was recorded is no variant
    [row] = result["rows"]
    assert row["n"] == 2 and row["final_val_acc"]["mean"] == pytest.approx(0.85)
    assert row["final_val_acc"]["std"] == pytest.approx(statistics.stdev([0.90, 0.80]))
    # The one kept measured most (the lone run's saturation); the others are named.
    assert sorted(Path(r["run"]).name for r in result["repeats"]) == ["b-moved", "z-seed=0"]
    assert {Path(r["same_as"]).name for r in result["repeats"]} == {"a-lone"}


def test_per_run_rows_name_their_own_runs(repeated: Path) -> None:
    result = compare.compare(find([repeated]), ["final_val_acc"], per_run=True)
    named = {row["seed"]: (row["run"], row["final_val_acc"]["mean"]) for row in result["rows"]}
    assert named == {0: ("a-lone", 0.90), 1: ("z-seed=1", 0.80)}


def test_cli_says_which_runs_were_counted_once(repeated: Path) -> None:
    table = runner.invoke(app, ["compare", str(repeated)])
    assert table.exit_code == 0, table.output
    assert "counted once: 2 run(s)" in table.output and "b-moved" in table.output
    as_json = json.loads(runner.invoke(app, ["compare", str(repeated), "-f", "json"]).output)
    assert len(as_json["repeats"]) == 2 and as_json["rows"][0]["n"] == 2
    markdown = runner.invoke(app, ["compare", str(repeated), "-f", "markdown"]).output
    assert "|\n\ncounted once: 2 run(s)" in markdown  # a paragraph of its own
    as_csv = runner.invoke(app, ["compare", str(repeated), "-f", "csv"]).output
    assert "counted once" not in as_csv and len(as_csv.strip().splitlines()) == 2


def test_paths_that_overlap_read_each_run_once(grid: Path) -> None:
    once = find([grid])
    assert [r.path for r in find([grid.parent, grid, grid / "lr=0.1,norm=batch,seed=0"])] \
        == [r.path for r in once]
    result = compare.compare(find([grid.parent, grid]), ["final_val_acc"])
    assert result["repeats"] == [] and result["runs"] == len(once)
