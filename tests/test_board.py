"""`bnexp board` serves TensorBoard with the runs in it."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import write_summary
from torch.utils.tensorboard import SummaryWriter


def _board(path: Path) -> tuple[subprocess.Popen, str]:
    """`bnexp board path` as a user starts it; the process and the URL it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "bnexp", "board", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            # as from a terminal: a shell's background job inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = ""
    deadline = time.time() + 60
    while "http" not in line and time.time() < deadline:
        line = proc.stdout.readline()
    return proc, re.search(r"http://\S+", line).group(0).rstrip("/")


def _get(url: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def _until(fetch: Callable[[], Any], done: Callable[[Any], bool], seconds: float = 60) -> Any:
    deadline = time.time() + seconds
    while True:
        try:
            found = fetch()
            if done(found) or time.time() > deadline:
                return found
        except OSError:
            if time.time() > deadline:
                raise
        time.sleep(0.5)


def test_board_serves_the_runs(tmp_path: Path) -> None:
    for name in ("lr=0.1,norm=batch", "lr=0.1,norm=none"):
        write_summary(tmp_path / "sweep" / name)
        writer = SummaryWriter(str(tmp_path / "sweep" / name))
        writer.add_scalar("val/acc", 0.5, 1)
        writer.close()
    proc, url = _board(tmp_path / "sweep")
    try:
        runs = _until(lambda: _get(f"{url}/data/runs"), lambda r: len(r) == 2)
        assert sorted(runs) == ["lr=0.1,norm=batch", "lr=0.1,norm=none"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)


def _natural(tag: str) -> list:
    """TensorBoard's Time Series order: character codes, with runs of digits as numbers."""
    return [int(p) if p.isdigit() else [ord(c) for c in p] for p in re.split(r"(\d+)", tag)]


def test_tensorboard_compares_a_sweep(tmp_path: Path) -> None:
    """A real sweep, served by `bnexp board`, read back through TensorBoard's own HTTP data API:
    the HParams experiment marks what was swept, with real types; every run has every default
    metric (so parallel coordinates draws them all); Time Series opens on the curves."""
    done = subprocess.run(
        [sys.executable, "-m", "bnexp", "sweep", "--name", "s", "--lr-grid", "0.05:0.5:2",
         "model.norm=batch,none", "seed=0,1", "model.activation=sigmoid", "trainer.steps=30",
         "trainer.eval_every=10", "trainer.progress=none", "device=cpu"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir = tmp_path / "outputs" / "sweeps" / "s"
    proc, url = _board(sweep_dir)
    try:
        runs = _until(lambda: _get(f"{url}/data/runs"), lambda r: len(r) == 8)
        assert len(runs) == 8  # the runs only: no extra run for the experiment
        plugin = f"{url}/data/plugin/hparams"
        experiment = _until(lambda: _get(f"{plugin}/experiment", {"experimentName": ""}),
                            lambda e: "hparamInfos" in e)
        infos = {h["name"]: h for h in experiment["hparamInfos"]}
        assert [h["name"] for h in experiment["hparamInfos"][:3]] == [
            "model.norm", "optim.lr", "seed"]  # the swept keys, first
        assert {n for n, h in infos.items() if h.get("differs")} == {
            "model.norm", "optim.lr", "seed"}
        assert infos["model.norm"]["type"] == "DATA_TYPE_STRING"
        assert sorted(infos["model.norm"]["domainDiscrete"]) == ["batch", "none"]
        assert infos["optim.lr"]["type"] == "DATA_TYPE_FLOAT64"
        assert infos["optim.lr"]["domainDiscrete"] == [0.05, 0.5]
        assert infos["seed"]["domainDiscrete"] == ["0", "1"]  # an integer, printed as one
        assert infos["model.affine"]["type"] == "DATA_TYPE_BOOL"
        assert infos["model.activation"]["domainDiscrete"] == ["sigmoid"]
        shown = [m["name"]["tag"] for m in experiment["metricInfos"][:5]]  # TB's defaults
        request = {"experimentName": "", "startIndex": 0, "sliceSize": 100,
                   "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                       "STATUS_RUNNING"], "aggregationType": "AGGREGATION_AVG",
                   "colParams": [{"hparam": h, "includeInResult": True} for h in infos]
                   + [{"metric": {"group": "", "tag": t}, "includeInResult": True}
                      for t in shown]}
        groups = _get(f"{plugin}/session_groups", request)["sessionGroups"]
        assert len(groups) == 8
        for group in groups:
            values = {m["name"]["tag"]: m.get("value") for m in group["metricValues"]}
            assert all(isinstance(values.get(t), (int, float)) and math.isfinite(values[t])
                       for t in shown), (group["name"], values)
            assert group["hparams"]["seed"] in ("0", "1")
            assert isinstance(group["hparams"]["model.affine"], bool)
            summary = json.loads((sweep_dir / group["name"] / "summary.json").read_text())
            assert values["~summary/final_val_acc"] == pytest.approx(
                summary["metrics"]["final_val_acc"])
            assert values["~summary/reached_target"] == float(
                summary["metrics"]["steps_to_target"] is not None)
        tags = _get(f"{url}/data/plugin/timeseries/tags")
        scalar_tags = set().union(*tags["scalars"]["runTagInfo"].values())
        groups_in_order = list(dict.fromkeys(t.split("/", 1)[0]
                                             for t in sorted(scalar_tags, key=_natural)))
        assert groups_in_order[:2] == ["train", "val"]  # the two groups Time Series opens
        assert not tags["histograms"]["runTagInfo"]  # a sweep's runs write no histograms
        points = _get(f"{url}/data/plugin/scalars/scalars?run={urllib.parse.quote(runs[0])}"
                      "&tag=val%2Facc")
        assert [p[1] for p in points] == [10, 20, 30]  # trainer.eval_every=10
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
