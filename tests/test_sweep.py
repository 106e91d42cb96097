"""Sweeps end to end: Hydra multirun through our sweeper, resume, parallel jobs, launchers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnexp import sweep
from bnexp.cli import app

runner = CliRunner()
TINY = ["trainer.steps=8", "trainer.eval_every=4", "trainer.log_every=4",
        "trainer.progress=none", "trainer.checkpoint=false", "trainer.diagnostics=false",
        "device=cpu"]


def summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


def results(sweep_dir: Path) -> dict[str, dict]:
    """Per job, the metrics that do not depend on timing."""
    return {name: {k: v for k, v in s["metrics"].items() if "second" not in k}
            for name, s in summaries(sweep_dir).items()}


def test_log_grid_and_names() -> None:
    assert sweep.log_grid("1e-3:10:5") == [0.001, 0.01, 0.1, 1.0, 10.0]
    with pytest.raises(ValueError, match="LOW:HIGH:COUNT"):
        sweep.log_grid("1e-3:10")
    with pytest.raises(ValueError, match="0 < LOW < HIGH"):
        sweep.log_grid("1:0.1:3")
    swept = ["optim.lr", "model.norm", "seed"]
    assert sweep.job_name(["optim.lr=0.1", "model.norm=batch", "seed=0", "trainer=debug"],
                          swept) == "lr=0.1,norm=batch,seed=0"
    assert sweep.job_name(["data.name=a", "model.name=b"], ["data.name", "model.name"]) == \
        "data.name=a,model.name=b"
    assert sweep.sweep_name(["model.activation=sigmoid"], swept) == \
        "model.activation=sigmoid__lr-norm-seed"


def test_2x2x2_sweep_runs_resumes_and_compare_aggregates(isolated: Path) -> None:
    args = ["sweep", "--name", "s", "optim.lr=0.05,0.2", "model.norm=batch,none", "seed=0,1",
            *TINY]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    sweep_dir = isolated / "outputs" / "sweeps" / "s"
    names = sorted(summaries(sweep_dir))
    assert len(names) == 8 and "lr=0.05,norm=batch,seed=0" in names
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert {j["status"] for j in manifest["jobs"].values()} == {"completed"}
    assert manifest["swept"] == ["optim.lr", "model.norm", "seed"]
    assert "8 completed" in result.output

    table = runner.invoke(app, ["compare", str(sweep_dir), "-f", "json"])
    body = json.loads(table.output)
    assert body["varying"] == ["model.norm", "optim.lr", "seed"]
    assert len(body["rows"]) == 4 and all(r["n"] == 2 for r in body["rows"])

    # The same command again: nothing runs, nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/summary.json")}
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 to run, 8 finished before" in again.output
    assert stamps == {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/summary.json")}
    # A new grid point adds only its jobs.
    more = runner.invoke(app, [*args[:3], "optim.lr=0.05,0.2,0.8", *args[4:]])
    assert more.exit_code == 0 and "4 to run, 8 finished before" in more.output
    assert len(summaries(sweep_dir)) == 12
    # A dry run lists every job with what would happen, and runs nothing.
    dry = runner.invoke(app, [*args[:3], "optim.lr=0.05,3.2", *args[4:], "--dry-run"])
    assert dry.exit_code == 0
    assert len(re.findall(r"^\s+skip ", dry.output, re.M)) == 4
    assert len(re.findall(r"^\s+run ", dry.output, re.M)) == 4
    assert len(summaries(sweep_dir)) == 12


def test_parallel_jobs_give_the_same_results_as_sequential(isolated: Path) -> None:
    grid = ["optim.lr=0.05,0.2", "model.norm=batch,none", *TINY]
    assert runner.invoke(app, ["sweep", "--name", "seq", *grid]).exit_code == 0
    par = runner.invoke(app, ["sweep", "--name", "par", "--jobs", "2", *grid])
    assert par.exit_code == 0, par.output
    root = isolated / "outputs" / "sweeps"
    assert results(root / "seq") == results(root / "par")
    assert {s["env"]["threads"] for s in summaries(root / "par").values()} == {
        max(1, (os.cpu_count() or 1) // 2)}


def test_a_failed_job_does_not_stop_the_others_and_exits_3(
        isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that fails while training (here the optimizer's update raises for one learning
    rate, as a device error would) is recorded as failed; the others run."""
    from bnexp.optim import Optimizer

    update = Optimizer.update

    def failing_update(self: Optimizer, *args: object, **kwargs: object) -> object:
        if self.configs[0].lr == 0.5:
            raise RuntimeError("device-side assert triggered")
        return update(self, *args, **kwargs)

    monkeypatch.setattr(Optimizer, "update", failing_update)
    result = runner.invoke(app, ["sweep", "--name", "f", "optim.lr=0.1,0.5", *TINY])
    assert result.exit_code == sweep.EXIT_SOME_FAILED, result.output
    done = summaries(isolated / "outputs" / "sweeps" / "f")
    assert done["lr=0.1"]["status"] == "completed"
    assert done["lr=0.5"]["status"] == "failed"
    assert "device-side assert" in done["lr=0.5"]["error"]
    assert "1 completed, 1 failed" in result.output


def test_a_job_without_its_data_stops_the_sweep_before_anything_runs(isolated: Path) -> None:
    """`train` checks the dataset before it starts; a sweep checks every job's the same way."""
    result = runner.invoke(app, ["sweep", "--name", "f", "data=mnist5k,mnist",
                                 "data.download=false", f"data.root={isolated / 'nothing'}",
                                 *TINY])
    assert result.exit_code == 2, result.output
    assert "data=mnist" in result.output and "data=mnist5k" in result.output  # the advice
    assert not list((isolated / "outputs").rglob("summary.json"))


def test_each_jobs_batch_size_is_checked_against_its_data_before_anything_runs(
        isolated: Path) -> None:
    """Jobs share a check only when data, batch size, compile and device are all equal."""
    result = runner.invoke(app, ["sweep", "--name", "big", "trainer.batch_size=16,100000",
                                 *TINY])
    assert result.exit_code == 2, result.output
    assert "trainer.batch_size" in result.output and "100000" in result.output
    assert not list((isolated / "outputs").rglob("summary.json"))


def test_an_invalid_job_stops_the_sweep_before_anything_runs(isolated: Path) -> None:
    result = runner.invoke(app, ["sweep", "--name", "bad", "optim.lr=0.1,-1", *TINY])
    assert result.exit_code == 2
    assert "optim.lr" in result.output
    assert not (isolated / "outputs" / "sweeps" / "bad" / "lr=0.1").exists()


def test_killed_sweep_reruns_only_the_missing_jobs(isolated: Path) -> None:
    cmd = [sys.executable, "-m", "bnexp", "sweep", "--name", "k", "seed=0,1,2,3",
           "trainer.steps=150", "trainer.eval_every=50", "trainer.progress=none",
           "trainer.checkpoint=false", "device=cpu"]
    sweep_dir = isolated / "outputs" / "sweeps" / "k"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline:
        finished = [s for s in summaries(sweep_dir).values() if s["status"] == "completed"]
        if finished:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    before = {n: s for n, s in summaries(sweep_dir).items() if s["status"] == "completed"}
    assert 1 <= len(before) < 4
    again = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{4 - len(before)} to run, {len(before)} finished before" in again.stdout
    after = summaries(sweep_dir)
    assert {s["status"] for s in after.values()} == {"completed"} and len(after) == 4
    for name, summary in before.items():  # finished runs were not re-run
        assert after[name]["metrics"]["wall_seconds"] == summary["metrics"]["wall_seconds"]


def test_submitit_local_launcher_runs_two_jobs(isolated: Path) -> None:
    result = runner.invoke(app, ["sweep", "--name", "sub", "hydra/launcher=submitit_local",
                                 "seed=0,1", *TINY])
    assert result.exit_code == 0, result.output
    done = summaries(isolated / "outputs" / "sweeps" / "sub")
    assert sorted(done) == ["seed=0", "seed=1"]
    assert {s["status"] for s in done.values()} == {"completed"}


def test_slurm_launcher_config_composes(isolated: Path) -> None:
    result = runner.invoke(app, ["sweep", "--name", "sl", "hydra/launcher=bnexp_slurm",
                                 "hydra.launcher.partition=gpu", "seed=0,1", "--dry-run",
                                 *TINY])
    assert result.exit_code == 0, result.output
    assert "2 to run" in result.output


@pytest.mark.parametrize("overrides", [
    ["optim.lr=0.3", "seed=2", "model.norm=none"],
    ["model=cnn", "model.width=8", "optim=adam", "optim.beta1=0.8"],
    ["experiment=lr_stability", "optim.lr=100", "model.activation=relu"],
    ["data=mnist", "data.root=/x", "data.val_fraction=0.1", "seed=5"],
    ["optim.lr=1e-3", "trainer.steps=7", "hydra.sweep.dir=elsewhere"],
    ["seed=3", "hydra.sweep.subdir='lr=0.1,seed=3'", "resume='/a/lr=0.1,seed=3'"],
    ["+model.extra=1", "optim.lr=0.2"],  # composed by Hydra itself: the order matters there
    ["hydra.job.config.override_dirname.kv_sep=-", "seed=1"],
])
@pytest.mark.parametrize("master", [[], ["hydra.sweep.dir=outputs/x", "optim.lr=0.05"]])
def test_every_job_config_is_what_hydra_composes(overrides: list[str],
                                                  master: list[str]) -> None:
    """Planning and the launchers compose through ComposeOnce (once per set of group
    choices, plain values applied after): the result, Hydra's node included, must be Hydra's
    own composition of the job, flags and all."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from bnexp.config import config_dir, register
    from hydra_plugins.bnexp_sweeper.composition import ComposeOnce

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        fast = ComposeOnce(loader)
        config = loader.load_configuration("config", master, RunMode.MULTIRUN)
        for _ in range(2):  # the second time from the cache of composed bases
            ours = fast.load_sweep_config(config, overrides)
            reference = loader.load_sweep_config(config, overrides)
            assert OmegaConf.to_container(ours) == OmegaConf.to_container(reference)
            assert OmegaConf.to_yaml(ours, resolve=False) == OmegaConf.to_yaml(reference)
            for a, b in ((ours, reference), (ours.hydra, reference.hydra),
                         (ours.optim, reference.optim)):
                assert OmegaConf.is_struct(a) == OmegaConf.is_struct(b)
                assert OmegaConf.is_readonly(a) == OmegaConf.is_readonly(b)
            # Planning's copy, without Hydra's node: the same values, and struct like Hydra's.
            task = fast.load_task_config(config, overrides)
            expected = OmegaConf.to_container(reference)
            del expected["hydra"]
            assert OmegaConf.to_container(task) == expected
            without = OmegaConf.masked_copy(reference, [k for k in reference if k != "hydra"])
            assert OmegaConf.to_container(task, resolve=True) == OmegaConf.to_container(
                without, resolve=True)
            assert OmegaConf.is_struct(task) == OmegaConf.is_struct(reference)
        plain = [o for o in overrides if o.split("=")[0] in ("optim.lr", "seed", "model.width",
                                                            "optim.beta1", "trainer.steps")]
        if plain == overrides:  # only plain values: one composition for both calls
            assert len(fast.bases) == 1
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("overrides", [
    ["optim.lr=0.3", "seed=2"],
    ["model=cnn", "+hydra.job.env_set.BNEXP_PROBE=yes", "hydra.job.chdir=true"],
])
def test_a_job_runs_as_under_hydras_run_job(tmp_path: Path, overrides: list[str]) -> None:
    """jobs.run_job (one copy of the config instead of four, libyaml) against Hydra's own
    run_job on the same composed job: the same .hydra files byte for byte, the same task
    config (values, type, flags), HydraConfig as the task sees it, env_set, chdir, the same
    JobReturn, and HydraConfig and the working directory restored afterwards."""
    import copy
    import os

    from hydra import initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job as hydras_run_job
    from hydra.types import HydraContext, RunMode
    from omegaconf import OmegaConf, open_dict

    from bnexp.config import config_dir, register
    from hydra_plugins.bnexp_sweeper import jobs

    def task(cfg):
        hc = HydraConfig.get()
        return {"values": OmegaConf.to_container(cfg), "type": OmegaConf.get_type(cfg),
                "struct": OmegaConf.is_struct(cfg), "readonly": OmegaConf.is_readonly(cfg),
                "hydra": OmegaConf.to_container(hc), "output_dir": hc.runtime.output_dir,
                "cwd": os.getcwd(), "env": os.environ.get("BNEXP_PROBE")}

    register()
    GlobalHydra.instance().clear()
    cwd = os.getcwd()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(
            "config", [f"hydra.sweep.dir={tmp_path}"], RunMode.MULTIRUN)
        context = HydraContext(config_loader=loader, callbacks=Callbacks(master))
        job = loader.load_sweep_config(master, [*overrides, "hydra.sweep.subdir=job"])
        with open_dict(job):
            job.hydra.job.id = job.hydra.job.num = 3
        before = HydraConfig.instance().cfg
        results, files = [], []
        for run in (hydras_run_job, jobs.run_job):
            ret = run(task_function=task, config=copy.deepcopy(job), hydra_context=context,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            assert HydraConfig.instance().cfg is before and os.getcwd() == cwd
            hydra_dir = tmp_path / "job" / ".hydra"
            files.append({p.name: p.read_bytes() for p in hydra_dir.iterdir()})
            for p in hydra_dir.iterdir():
                p.unlink()
            results.append((ret.return_value, OmegaConf.to_container(ret.cfg),
                            OmegaConf.to_container(ret.hydra_cfg), ret.overrides,
                            ret.working_dir, ret.status, ret.task_name))
    GlobalHydra.instance().clear()
    assert sorted(files[0]) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert files[1] == files[0]
    assert results[1] == results[0]
    seen = results[0][0]
    assert seen["output_dir"] == str(tmp_path / "job") and seen["values"]["seed"] == job.seed
    assert "hydra" not in seen["values"] and seen["struct"]
    assert (seen["cwd"] == str(tmp_path / "job")) == ("hydra.job.chdir=true" in overrides)
    assert (seen["env"] == "yes") == ("+hydra.job.env_set.BNEXP_PROBE=yes" in overrides)
    assert jobs.to_yaml(job) == OmegaConf.to_yaml(job)


def test_no_bnexp_config_sets_hydra_mode() -> None:
    """jobs.lean_main skips Hydra's composition that only reads hydra.mode, taking it as
    unset: true for the default config and every experiment."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bnexp.config import config_dir, group_options, register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        for extra in [[], *[[f"experiment={e}"] for e in group_options("experiment")]]:
            cfg = compose("config", overrides=extra, return_hydra_config=True)
            assert cfg.hydra.mode is None, extra
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("command", [
    ["train", "trainer=debug", "trainer.steps=3", "optim.lr=0.2"],
    ["sweep", "trainer=debug", "trainer.steps=3", "optim.lr=0.1,0.2"],
])
def test_hydras_files_are_the_same_through_lean_main(isolated: Path, command: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`bnexp train` and `bnexp sweep` through jobs.lean_main (bnexp's run_job for a single
    run, no composition to read hydra.mode) write the .hydra files Hydra's own main writes."""
    import contextlib

    from hydra_plugins.bnexp_sweeper import jobs

    written = {}
    for way in ("lean", "hydra"):
        if way == "hydra":
            monkeypatch.setattr(jobs, "lean_main", lambda argv: contextlib.nullcontext())
        where = isolated / way
        args = [*command, "device=cpu", "trainer.progress=none"]
        args += [f"hydra.run.dir={where}"] if command[0] == "train" else ["--name", way]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        root = where if command[0] == "train" else isolated / "outputs" / "sweeps" / way
        files = sorted(root.rglob(".hydra/*.yaml"))
        assert len(files) == (3 if command[0] == "train" else 6)
        written[way] = {str(f.relative_to(root)): f.read_text().replace(str(root), "ROOT")
                        .replace(f"name={way}", "name=NAME") for f in files}
    assert written["lean"] == written["hydra"]
    assert "hydra.mode=" in "".join(written["lean"].values())


def test_a_rerun_with_another_config_never_deletes_results(isolated: Path) -> None:
    """Same --name, same job names, another optim.lr: the sweep stops before running anything
    and names what differs; --move-aside moves the old runs beside the sweep, intact."""
    first = runner.invoke(app, ["sweep", "--name", "mine", "seed=0,1", *TINY])
    assert first.exit_code == 0, first.output
    sweep_dir = isolated / "outputs" / "sweeps" / "mine"
    before = {p.parent.name: p.read_bytes() for p in sweep_dir.glob("*/summary.json")}
    assert len(before) == 2

    refused = runner.invoke(app, ["sweep", "--name", "mine", "seed=0,1", "optim.lr=0.5", *TINY])
    assert refused.exit_code == 2
    message = " ".join(refused.output.split())
    assert "optim.lr: 0.1 -> 0.5" in message and "--move-aside" in message
    assert "nothing was run" in message and "Traceback" not in refused.output
    assert {p.parent.name: p.read_bytes() for p in sweep_dir.glob("*/summary.json")} == before

    dry = runner.invoke(app, ["sweep", "--name", "mine", "seed=0,1", "optim.lr=0.5", *TINY,
                              "--dry-run"])
    assert dry.exit_code == 0 and "another config's run is there" in dry.output

    moved = runner.invoke(app, ["sweep", "--name", "mine", "seed=0,1", "optim.lr=0.5", *TINY,
                                "--move-aside"])
    assert moved.exit_code == 0, moved.output
    [aside] = (isolated / "outputs" / "sweeps").glob("mine.replaced-*")
    assert {p.parent.name: p.read_bytes() for p in aside.glob("*/summary.json")} == before
    assert {s["config"]["optim"]["lr"] for s in summaries(sweep_dir).values()} == {0.5}


def test_a_study_rerun_with_extra_overrides_gets_its_own_directory(isolated: Path) -> None:
    base = ["reproduce", "train_eval_modes", "seed=0,1", "trainer.steps=10",
            "trainer.mode_batch_sizes=[2,100]", "trainer.progress=none", "device=cpu"]
    assert runner.invoke(app, base).exit_code == 0
    studies_dir = isolated / "outputs" / "studies"
    [first] = list(studies_dir.iterdir())
    before = {p: p.read_bytes() for p in first.glob("*/summary.json")}
    again = runner.invoke(app, [*base, "optim.lr=0.05"])
    assert again.exit_code == 0, again.output
    assert {p: p.read_bytes() for p in first.glob("*/summary.json")} == before
    assert len(list(studies_dir.iterdir())) == 2
    # narrowing the study's own grid (its seeds) stays in the same directory
    # and under the same job names: the finished seed=1 run is skipped, not trained again
    narrow = runner.invoke(app, [*base[:2], "seed=1", *base[3:]])
    assert narrow.exit_code == 0 and len(list(studies_dir.iterdir())) == 2
    assert sorted(p.parent.name for p in first.glob("*/summary.json")) == ["seed=0", "seed=1"]
    assert {p: p.read_bytes() for p in first.glob("*/summary.json")} == before


def test_a_sweep_never_clears_a_finished_run(tmp_path: Path) -> None:
    run = tmp_path / "job"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "completed", "config_hash": "a"}))
    for expected in ("a", "b"):  # finished, or another config's: both refused
        with pytest.raises(RuntimeError, match="refusing"):
            sweep.clear_run_dir(run, expected)
    assert (run / "summary.json").is_file()
