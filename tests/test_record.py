"""What a run leaves in TensorBoard and summary.json, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from typer.testing import CliRunner

from bnexp.cli import app
from bnexp.record import HPARAM_KEYS

runner = CliRunner()
METRICS = (
    "steps_to_target", "epochs_to_target", "seconds_to_target", "train_loss_auc",
    "val_acc_at_25pct", "val_acc_at_50pct", "val_acc_at_100pct", "diverged", "diverged_at_step",
    "loss_spikes", "loss_std_tail", "grad_norm_max", "grad_norm_median", "val_acc_eval_mode",
    "val_acc_train_mode", "train_eval_gap", "val_acc_eval_bs1", "val_acc_train_bs1",
)


def run(tmp: Path, name: str, *overrides: str) -> tuple[Path, dict, EventAccumulator]:
    run_dir = tmp / name
    result = runner.invoke(app, [
        "train", "trainer=debug", "trainer.diagnostics_every=10", "trainer.histogram_every=10",
        "trainer.progress=none", "trainer.checkpoint=true", "device=cpu",
        f"hydra.run.dir={run_dir}", *overrides])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    return run_dir, json.loads((run_dir / "summary.json").read_text()), events


@pytest.fixture(scope="module")
def bn_and_plain(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("runs")
    return (run(tmp, "bn", "model.activation=sigmoid"),
            run(tmp, "plain", "model.activation=sigmoid", "model.norm=none"))


def test_summary_holds_every_metric(bn_and_plain) -> None:
    for _, summary, _ in bn_and_plain:
        assert set(METRICS) <= set(summary["metrics"])
        assert summary["metrics"]["target_acc"] == 0.9  # mnist5k's default
        assert summary["config"]["trainer"]["target_acc"] == 0.9
    (_, bn, _), (_, plain, _) = bn_and_plain
    assert bn["metrics"]["val_acc_train_bs1"] is None and "val_acc_train_bs1" in bn["notes"]
    assert plain["metrics"]["train_eval_gap"] == 0
    assert bn["config"]["model"]["affine"] is True and plain["config"]["model"]["affine"] is False


def test_bn_run_writes_bn_histograms_and_plain_run_writes_none(bn_and_plain) -> None:
    (_, _, bn), (_, _, plain) = bn_and_plain
    bn_tags, plain_tags = set(bn.Tags()["histograms"]), set(plain.Tags()["histograms"])
    assert {"bn1/running_mean", "bn1/running_var", "bn1/gamma", "bn1/beta",
            "bn3/running_var"} <= bn_tags
    assert not any(t.startswith("bn") for t in plain_tags)
    assert {"act_input/act1", "act_input/act3"} <= bn_tags & plain_tags


def test_diagnostic_scalars_from_step_zero(bn_and_plain) -> None:
    for _, _, events in bn_and_plain:
        tags = set(events.Tags()["scalars"])
        for layer in ("act1", "act2", "act3"):
            for q in (15, 50, 85):
                assert f"act_input/{layer}/p{q}" in tags
            assert f"saturation/{layer}" in tags
        assert {"weight_norm/layer1", "grad_norm/layer4", "train/grad_norm"} <= tags
        steps = [e.step for e in events.Scalars("act_input/act3/p50")]
        assert steps[0] == 0 and steps[-1] == 20
        p15, p85 = (events.Scalars(f"act_input/act3/p{q}")[-1].value for q in (15, 85))
        assert p15 < p85


def test_hparams_entry_lives_in_the_run_directory_itself(bn_and_plain) -> None:
    for run_dir, summary, events in bn_and_plain:
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]).session_start_info
        assert set(start.hparams) == set(HPARAM_KEYS)
        assert start.hparams["model.norm"].string_value == summary["config"]["model"]["norm"]
        assert start.hparams["optim.lr"].number_value == summary["config"]["optim"]["lr"]
        experiment = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/experiment"]).experiment
        metric_tags = {m.name.tag for m in experiment.metric_infos}
        assert "~summary/best_val_acc" in metric_tags and "val/acc" not in metric_tags
        value = events.Scalars("~summary/best_val_acc")[-1].value
        assert value == pytest.approx(summary["metrics"]["best_val_acc"])
        subdirs = {p.name for p in run_dir.iterdir() if p.is_dir()}
        assert subdirs == {".hydra", "checkpoints"}  # no timestamped hparams sub-run


def test_custom_scalars_layout_overlays_runs(bn_and_plain) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    (_, _, events), _ = bn_and_plain
    (tag,) = events.PluginTagToContent("custom_scalars")
    layout = layout_pb2.Layout.FromString(events.Tensors(tag)[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["train loss"] == ["^train/loss$"]
    assert any("act_input" in t for t in charts["activation-input percentiles (15/50/85)"])


def test_inspect_prints_the_bn_layers(bn_and_plain) -> None:
    (bn_dir, _, _), (plain_dir, _, _) = bn_and_plain
    result = runner.invoke(app, ["inspect", str(bn_dir), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 3 and rows[0]["num_batches_tracked"] == 20
    text = runner.invoke(app, ["inspect", str(plain_dir)]).output
    assert "No norm layers" in text
    assert runner.invoke(app, ["inspect", str(bn_dir / "nope")]).exit_code == 2


def test_probe_every_records_landscape(tmp_path: Path) -> None:
    _, summary, events = run(tmp_path, "probe", "trainer.probe_every=10")
    assert summary["metrics"]["landscape_loss_range"] > 0
    assert summary["metrics"]["landscape_beta_smoothness"] > 0
    assert [e.step for e in events.Scalars("landscape/loss_range")] == [0, 10, 20]


def test_probes_change_nothing_about_training(tmp_path: Path) -> None:
    def final(name: str, *o: str) -> dict:
        m = run(tmp_path, name, *o)[1]["metrics"]
        return {k: m[k] for k in ("final_val_acc", "final_train_loss", "grad_norm_max")}

    assert final("off", "trainer.diagnostics=false") == final(
        "on", "trainer.probe_every=5", "trainer.diagnostics_every=3")


@pytest.mark.parametrize(("level", "scalars", "histograms", "measured"), [
    ("full", True, True, True), ("scalars", True, False, True),
    ("summary", False, False, True), ("off", False, False, False)])
def test_each_diagnostics_level_writes_what_it_says(tmp_path: Path, level: str, scalars: bool,
                                                    histograms: bool, measured: bool) -> None:
    _, summary, events = run(tmp_path, level, "model.activation=sigmoid",
                             f"trainer.diagnostics={level}")
    tags = events.Tags()
    assert ("act_input/act1/p50" in tags["scalars"]) == scalars
    assert ("saturation/act1" in tags["scalars"]) == scalars
    assert bool(tags["histograms"]) == histograms
    assert {"train/loss", "val/acc"} <= set(tags["scalars"])  # the curves, at every level
    assert (summary["metrics"]["saturation_final"] is not None) == measured
    assert (summary["metrics"]["val_acc_eval_bs1"] is not None) == measured
    assert summary["config"]["trainer"]["diagnostics"] == level  # the level that ran


def test_auto_diagnostics_are_full_for_a_single_run(bn_and_plain) -> None:
    (_, summary, events), _ = bn_and_plain
    assert summary["config"]["trainer"]["diagnostics"] == "full"
    assert events.Tags()["histograms"]


def test_a_diagnostics_level_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "trainer.diagnostics=some", "device=cpu",
                                 f"hydra.run.dir={tmp_path / 'r'}"])
    assert result.exit_code == 2
    assert "trainer.diagnostics" in result.output and "summary" in result.output
    assert not (tmp_path / "r" / "summary.json").exists()


def test_crc32c_matches_tensorboards_own_checksum() -> None:
    import random

    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as reference

    from bnexp.record import crc32c, masked_crc32c

    rng = random.Random(0)
    # short records take the byte loop; from 256 bytes on, whole and partial numpy blocks
    for n in (0, 1, 3, 4, 5, 255, 256, 257, 511, 512, 1000, 14_000, 100_003):
        data = rng.randbytes(n)
        assert crc32c(data) == reference.crc32c(data), n
        assert masked_crc32c(data) == reference.masked_crc32c(data), n
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_event_records_pass_tensorboards_checksum_check(tmp_path: Path) -> None:
    """Large (histogram) and small records written by Events read back through TensorBoard's
    pure-Python record reader, which recomputes every checksum; a flipped byte is caught."""
    import torch
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    from bnexp.record import Events

    events = Events(tmp_path)
    events.scalars(1, {"train/loss": 0.5})
    events.histograms(1, {f"bn{i}/running_mean": torch.randn(100) for i in range(12)})
    events.close()
    path = next(tmp_path.glob("events.out.tfevents.*"))

    def records(file: Path) -> list[bytes]:
        reader, found = PyRecordReader_New(str(file)), []
        while True:
            try:
                reader.GetNext()
            except errors.OutOfRangeError:
                return found
            found.append(reader.record())

    read = records(path)
    assert max(len(r) for r in read) > 10_000  # the histogram event takes the numpy path
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the last record's payload
    broken = tmp_path / "broken" / path.name
    broken.parent.mkdir()
    broken.write_bytes(bytes(data))
    with pytest.raises(errors.DataLossError):
        records(broken)


def test_a_resume_in_the_same_second_still_replaces_the_killed_runs_tail(tmp_path: Path) -> None:
    """TensorBoard orders a run's event files by name (second, host, PID): a killed run's file
    that sorts after the resumed run's would be read last and wipe the resumed steps."""
    import socket
    import time

    from bnexp.record import Events

    killed = Events(tmp_path)
    for step in range(0, 100, 10):
        killed.scalars(step, {"train/loss": 1.0})
    killed.close()
    # The killed process's file as it is named when the same second and a PID that sorts last.
    first = next(tmp_path.glob("events.out.tfevents.*"))
    first.rename(tmp_path / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
                            ".99999999.0")
    resumed = Events(tmp_path, purge_step=50)
    for step in range(50, 200, 10):
        resumed.scalars(step, {"train/loss": 0.5})
    resumed.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(0, 200, 10))
    assert {e.value for e in loss if e.step >= 50} == {0.5}
