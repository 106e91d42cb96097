"""scripts/bench.py runs end to end in --quick mode and prints its tables (its figures are
checked for sense, never against a speed: speed is the benchmark's job, not a test's)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from bnexp import data
from bnexp.config import compose

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_prints_every_table_it_measures(isolated: Path) -> None:
    out = isolated / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--only", "throughput",
         "steady", "vectorized", "startup", "gpu", "--json", str(out)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for title in ("### throughput", "### steady", "### vectorized", "### startup", "### gpu"):
        assert title in result.stdout
    rows = json.loads(out.read_text())
    loops = {(r["model"], r["loop"]): r for r in rows["throughput"]}
    for model in ("mlp",):  # --quick measures the MLP only
        minimal = loops[(model, "minimal resident loop")]
        assert minimal["vs minimal"] == 1.0 and minimal["quartiles"] == "1.000-1.000"
        for name in ("DataLoader, 0 workers", "DataLoader, 2 workers",
                     "arithmetic limit (1 thread)"):  # ratios of medians
            row = loops[(model, name)]
            assert row["samples/s"] > 0 and math.isfinite(row["samples/s"])
            assert row["vs minimal"] == row["samples/s"] / minimal["samples/s"]
        for name in ("bnexp train (no eval, logs, diagnostics)", "bnexp train (default logging)",
                     "bnexp train (every diagnostic)", "bnexp train (dense diagnostics)"):
            row = loops[(model, name)]  # medians of ratios paired round by round
            assert row["samples/s"] > 0 and math.isfinite(row["samples/s"])
            assert row["rounds"] == minimal["rounds"] == 3
            low, high = (float(q) for q in row["quartiles"].split("-"))
            assert 0 < low <= row["vs minimal"] <= high, row
            assert row["vs minimal, CPU time"] > 0
            assert 0 < row["best vs best"] < math.inf
    steady = rows["steady"][0]  # a projection from medians of single iterations and events
    loop, minimal = steady["bnexp loop ms/step"], steady["minimal loop ms/step"]
    assert abs(steady["no events vs minimal"] - minimal / loop) < 1e-9
    assert 0 < steady["every diagnostic vs minimal"] < steady["default logging vs minimal"] \
        < minimal / loop  # each adds work to the same loop
    assert 0 < steady["events add, default"] < steady["events add, every diagnostic"]
    assert abs((1 + steady["events add, default"]) * steady["default logging vs minimal"]
               - minimal / loop) < 1e-9  # the same projection, two ways
    for event in ("log line", "evaluation", "diagnostics", "histograms", "landscape probe"):
        assert steady[f"{event} ms"] > 0
    ways = {r["way"]: r for r in rows["vectorized"]}
    assert ways["sequential"]["wall speed-up"] == 1.0 and ways["vectorized"]["wall s"] > 0
    assert ways["sequential"]["training speed-up"] == 1.0
    assert 0 < ways["vectorized"]["training samples/s"] < math.inf
    layouts = [r for w, r in ways.items() if w.startswith("one stack's step")]
    # two layouts, vmap, and the arithmetic limit
    assert len(layouts) == 4 and layouts[0]["wall speed-up"] == 1.0
    for row in layouts[1:]:
        assert math.isclose(row["wall speed-up"], layouts[0]["wall s"] / row["wall s"])
    # Stacking alone (one thread) and with the cores, against single-model steps on one.
    per_core = [r for w, r in ways.items() if w.startswith("per core:")]
    assert len(per_core) == 3 and per_core[0]["wall speed-up"] == 1.0
    assert "1 thread (stacking alone)" in per_core[1]["way"]
    for row in per_core[1:]:
        assert math.isclose(row["wall speed-up"], per_core[0]["wall s"] / row["wall s"])
        assert math.isclose(row["training samples/s"], 2 * 64 / row["wall s"])  # 2 x batch 64
    evaluations = [r for w, r in ways.items() if w.startswith("a stack's evaluation")]
    assert len(evaluations) == 3 and evaluations[1]["wall speed-up"] == 1.0
    for row in (evaluations[0], evaluations[2]):
        assert math.isclose(row["wall speed-up"], evaluations[1]["wall s"] / row["wall s"])
    # The limits' FLOPs, counted here from the default MLP's shape (784-100-100-100-10): a
    # step spends 3 x forward less the first layer's input gradient; an evaluation, forward.
    forward = 2 * (784 * 100 + 100 * 100 + 100 * 100 + 100 * 10)
    models, batch = 2, 64  # --quick: one learning rate, two seeds; the default batch
    n_val = len(data.load(compose(["device=cpu"]).data).y_val)
    for row, flops in ((layouts[3], models * batch * (3 * forward - 2 * 784 * 100)),
                       (evaluations[2], models * n_val * forward)):
        gflop = float(re.search(r"\(([0-9.e+-]+) GFLOP at", row["way"]).group(1))
        assert math.isclose(gflop, flops / 1e9, rel_tol=2e-3), (row["way"], flops)
        assert row["wall s"] > 0
    startup = {r["what"]: r for r in rows["startup"]}
    for command in ("bnexp --help", "bnexp list", "bnexp compare"):
        assert startup[command]["imports torch"] == "False", command
    assert startup["run set-up on mnist5k (imports excluded)"]["seconds"] > 0
    assert "GPU" in result.stdout


def test_bench_endtoend_times_the_real_commands(isolated: Path) -> None:
    """The end-to-end section runs the CLI as subprocesses (sweeps with and without
    --vectorize, a study, one `bnexp train`) and its figures add up."""
    out = isolated / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--only", "endtoend",
         "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "### endtoend" in result.stdout
    rows = {r["what"]: r for r in json.loads(out.read_text())["endtoend"]}
    sequential = rows["sweep, 6 jobs, sequential"]["wall s"]
    vectorized = rows["sweep, 6 jobs, --vectorize"]
    assert sequential > 0 and vectorized["wall s"] > 0
    assert math.isclose(vectorized["ratio"], sequential / vectorized["wall s"])  # one pair
    ceiling = rows["  the same two sweeps' training alone (train_seconds): the ceiling"]
    assert 0 < ceiling["wall s"] < vectorized["wall s"] and ceiling["ratio"] > 0
    # What 2x asks of the stack's training: half the sequential wall, less the rest of the
    # vectorized command (one pair in --quick, so the rows add up exactly).
    outside = rows["  --vectorize outside its training (start-up, planning, files, evals)"]
    assert math.isclose(outside["wall s"], vectorized["wall s"] - ceiling["wall s"])
    needed = rows["  for 2x, its training would have to take at most"]
    assert math.isclose(needed["wall s"], sequential / 2 - outside["wall s"])
    assert math.isclose(needed["ratio"], needed["wall s"] / ceiling["wall s"])
    study = next(r for w, r in rows.items() if w.startswith("bnexp reproduce lr_stability"))
    assert "(16 runs)" in [w for w in rows if w.startswith("bnexp reproduce")][0]
    assert study["ratio"] > 1  # a study's wall holds its training and more
    whole = rows["bnexp train: process, whole"]
    assert whole["ratio"] == "torch._dynamo imported: [False]"
    parts = [r["wall s"] for w, r in rows.items() if w.startswith("bnexp train:")
             and w != "bnexp train: process, whole" and "of it" not in w]
    assert math.isclose(sum(parts), whole["wall s"], rel_tol=1e-9)
    inside = sum(r["wall s"] for w, r in rows.items() if "of it" in w)
    assert math.isclose(inside, rows["bnexp train: bnexp train"]["wall s"], rel_tol=1e-9)
