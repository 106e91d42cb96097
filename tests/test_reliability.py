"""Faults: interruption and resume, hard kills, concurrent runs and sweeps, full disks, and
random override strings. Nothing finished is lost and every error is a clear one."""

from __future__ import annotations

import errno
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from bnexp.cli import app, study_name
from bnexp.config import ConfigError, compose
from bnexp.interrupt import workers_of

runner = CliRunner()
RUN = ["trainer.steps=1000", "trainer.eval_every=50", "trainer.log_every=10",
       "trainer.checkpoint_every=50", "trainer.diagnostics_every=50", "trainer.progress=none",
       "device=cpu"]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bnexp", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=os.environ.copy(),
                            start_new_session=True)


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)


def comparable(run_dir: Path) -> dict:
    m = json.loads((run_dir / "summary.json").read_text())["metrics"]
    return {k: v for k, v in m.items() if "second" not in k and k != "samples_per_second"}


def same_weights(a: Path, b: Path) -> bool:
    sa = torch.load(a / "checkpoints" / "final.pt", weights_only=False)["model"]
    sb = torch.load(b / "checkpoints" / "final.pt", weights_only=False)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    result = runner.invoke(app, ["train", *RUN, f"hydra.run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_interrupt_at_a_random_step_then_resume_is_bit_identical(
        how: signal.Signals, reference: Path, isolated: Path) -> None:
    run_dir = isolated / "run"
    proc = start(["train", *RUN, f"hydra.run.dir={run_dir}"])
    # SIGKILL can only resume from a periodic checkpoint, and a signal before the first step
    # rolls the run back to nothing (by design): wait for the first checkpoint either way.
    wait_for(run_dir / "checkpoints/last.pt")
    time.sleep(random.uniform(0.0, 0.3))
    os.killpg(proc.pid, how)
    code = proc.wait(timeout=60)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] != "completed", "the run ended before the signal: make it longer"
    command = ["resume", str(run_dir)]
    if how == signal.SIGINT:
        assert code == 130 and summary["status"] == "interrupted"
        # It says how to continue, as a command to paste: the one resumed with below.
        said = [line for line in proc.stdout.read().decode().splitlines()
                if line.startswith("resume:")]
        assert len(said) == 1, said
        bnexp, *command = shlex.split(said[0].removeprefix("resume:"))
        assert bnexp == "bnexp" and command == ["resume", str(run_dir)]
    else:
        assert summary["status"] == "running"  # no chance to write more: still valid JSON
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert comparable(run_dir) == comparable(reference)
    assert same_weights(run_dir, reference)
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 1000  # appended, no step twice


def test_resume_errors(isolated: Path, reference: Path) -> None:
    not_a_run = runner.invoke(app, ["train", f"resume={isolated}"])
    assert not_a_run.exit_code == 2 and "resume" in not_a_run.output
    assert runner.invoke(app, ["resume", str(isolated)]).exit_code == 2
    # A run directory whose checkpoint came from another config.
    run_dir = isolated / "other"
    proc = start(["train", *RUN, f"hydra.run.dir={run_dir}"])
    wait_for(run_dir / "summary.json")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    mismatch = runner.invoke(app, ["train", *RUN, "optim.lr=0.5", f"resume={run_dir}"])
    assert mismatch.exit_code == 2
    assert "does not match" in mismatch.output and "optim.lr" in mismatch.output


def test_hard_kills_never_leave_a_half_written_file(isolated: Path) -> None:
    run_dir = isolated / "kill"
    # 3000 steps: the second start resumes where the first was killed and must still be
    # training when its own kill comes (with 1000 it sometimes finished first, and the
    # final resume found a completed run).
    args = [a for a in RUN if not a.startswith("trainer.steps=")]
    for _ in range(2):
        proc = start(["train", *args, "trainer.steps=3000", "trainer.checkpoint_every=20",
                      f"hydra.run.dir={run_dir}"])
        wait_for(run_dir / "summary.json")
        time.sleep(random.uniform(0.2, 2.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        for path in run_dir.rglob("*"):
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".pt":
                torch.load(path, weights_only=False)
    # A kill in the middle of a write can leave a temporary file (never one under a real
    # name); the next start in that directory removes it.
    (run_dir / "checkpoints" / ".last.pt.killed.tmp").write_bytes(b"half")
    result = runner.invoke(app, ["resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.parametrize("signals,delays", [
    (("SIGINT",), (1.5, 4.5)), (("SIGTERM",), (3.0,)), (("SIGINT", "SIGINT"), (5.0,))])
def test_a_signal_at_any_moment_of_start_up_ends_the_run(
        isolated: Path, signals: tuple[str, ...], delays: tuple[float, ...]) -> None:
    """Hydra's composition once swallowed a Ctrl-C and a 100-epoch run trained to the end."""
    runs = isolated / "outputs" / "runs"
    for delay in delays:
        proc = start(["train", "trainer.epochs=100", "trainer.progress=none", "device=cpu"])
        time.sleep(delay)
        for name in signals:
            os.killpg(proc.pid, getattr(signal, name))
            time.sleep(0.01)
        out = proc.communicate(timeout=120)[0].decode()
        # Before bnexp's handlers exist (Python's own imports), the signal's default action
        # ends the process: killed by it (-2, -15), which a shell reports as 130 / 143 too.
        number = getattr(signal, signals[0])
        assert proc.returncode in (128 + number, -number), out
        assert "Traceback" not in out, out
        # Nothing, or an interrupted run: never a directory without a summary, or `running`.
        for run in runs.iterdir() if runs.is_dir() else []:
            left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
            assert (run / "summary.json").is_file(), (left, out)
            assert json.loads((run / "summary.json").read_text())["status"] == "interrupted", out


def test_runs_started_together_get_their_own_directories(isolated: Path) -> None:
    procs = [start(["train", "trainer=debug", "trainer.progress=none"]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    dirs = list((isolated / "outputs" / "runs").iterdir())
    assert len(dirs) == 2
    assert all(json.loads((d / "summary.json").read_text())["status"] == "completed"
               for d in dirs)


def test_two_processes_resuming_one_sweep_never_run_a_job_twice(isolated: Path) -> None:
    args = ["sweep", "--name", "both", "seed=0,1,2,3", "trainer.steps=60",
            "trainer.progress=none", "trainer.checkpoint=false", "device=cpu"]
    procs = [start(args) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    sweep_dir = isolated / "outputs" / "sweeps" / "both"
    for job in sweep_dir.glob("seed=*"):
        assert len(list(job.glob("events.out.tfevents.*"))) == 1, job  # ran exactly once
        assert json.loads((job / "summary.json").read_text())["status"] == "completed"
    ran = sum(len([ln for ln in out.splitlines() if ": completed" in ln]) for out in outputs)
    assert ran == 4
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert {j["status"] for j in manifest["jobs"].values()} == {"completed"}


def test_a_full_disk_fails_clearly_and_keeps_earlier_results(
        isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bnexp import record

    first = isolated / "first"
    assert runner.invoke(app, ["train", "trainer=debug", "device=cpu",
                               f"hydra.run.dir={first}"]).exit_code == 0
    before = (first / "summary.json").read_bytes()
    calls = {"n": 0}
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > 1:  # the "running" summary fits, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(record.os, "fsync", full_disk)
    second = isolated / "second"
    result = runner.invoke(app, ["train", "trainer=debug", "device=cpu",
                                 f"hydra.run.dir={second}"])
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "disk" in result.output
    assert (first / "summary.json").read_bytes() == before
    json.loads((second / "summary.json").read_text())  # the earlier write is intact
    assert not list(second.rglob("*.tmp"))


def test_a_disk_that_fills_while_training_gives_one_paragraph_and_a_failed_run(
        isolated: Path) -> None:
    # A real limit on file size (RLIMIT_FSIZE, as a full disk: the write fails with an
    # OSError): the first checkpoint, mid-training, no longer fits; the events file does.
    import resource

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    run_dir = isolated / "full"
    done = subprocess.run(
        [sys.executable, "-m", "bnexp", "train", "trainer.steps=300",
         "trainer.checkpoint_every=100", "trainer.progress=none", "device=cpu",
         f"hydra.run.dir={run_dir}"], capture_output=True, text=True, preexec_fn=small_files)
    assert done.returncode == 1, done.stderr
    said = done.stdout + done.stderr
    assert said.count("bnexp: error:") == 1, said  # not one per failed write
    assert "File too large" in said and "Traceback" not in said
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "File too large" in summary["error"]
    assert not list(run_dir.rglob("*.tmp"))


def test_a_finish_that_fails_after_a_stop_signal_keeps_what_the_run_wrote(
        isolated: Path) -> None:
    """Ctrl-C mid-training, then the interrupted run's checkpoint does not fit (RLIMIT_FSIZE):
    the error is reported as itself, and the run's directory stays. (It was once taken for a
    stop during set-up, and the whole run directory was removed.)"""
    import resource

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    run_dir = isolated / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnexp", "train", "trainer.steps=1000000",
         "trainer.checkpoint_every=0", "trainer.eval_every=500", "trainer.progress=none",
         "device=cpu", f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, preexec_fn=small_files, start_new_session=True)
    deadline = time.time() + 120
    events = []
    while time.time() < deadline and not events:  # training: its first evaluation is logged
        events = [p for p in run_dir.glob("events.out.tfevents.*") if p.stat().st_size > 2000]
        time.sleep(0.2)
    assert events, "the run did not start training"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out  # stopped by Ctrl-C, as the user asked
    assert "File too large" in out and "Traceback" not in out
    assert events[0].exists() and (run_dir / "train.log").is_file()  # nothing removed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "File too large" in summary["error"]


def test_unwritable_outputs_is_a_clear_error(isolated: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = isolated / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BNEXP_OUTPUTS", str(blocker / "outputs"))
    result = runner.invoke(app, ["train", "trainer=debug"])
    assert result.exit_code == 2
    assert "cannot write" in result.output and str(blocker) in result.output


def test_nan_in_bn_running_statistics_does_not_crash_evaluation() -> None:
    from bnexp.data import Inputs
    from bnexp.models import build, norm_layers
    from bnexp.run import evaluate

    model = build(compose([]).model, (1, 28, 28), 10)
    for _, bn in norm_layers(model):
        bn.running_mean.fill_(float("nan"))

    class Fake:
        mean, std, in_shape = torch.zeros(1), torch.ones(1), (1, 28, 28)

    x = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    loss, acc = evaluate(model, x, torch.zeros(20, dtype=torch.long), Inputs(Fake), 8)
    assert loss != loss and 0 <= acc <= 1  # NaN loss, still a number for accuracy


KEYS = ["model.norm", "model.nrom", "optim.lr", "trainer.batch_size", "seed", "device",
        "model", "data", "trainer.threads", "model.affine", "hydra.run.dir", "+x", "~seed"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.text(max_size=20),
    st.tuples(st.sampled_from(KEYS), st.text(max_size=8)).map(lambda kv: f"{kv[0]}={kv[1]}"),
), max_size=3))
def test_random_overrides_give_a_config_or_a_clear_error(overrides: list[str]) -> None:
    try:
        compose(overrides)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip()


@pytest.mark.parametrize("override,key", [
    ("trainer.steps=1000000000000", "trainer.steps"), ("trainer.steps=1e12", "trainer.steps"),
    ("seed=18446744073709551616", "seed"), ("model=cnn model.depth=10", "model.depth")])
def test_values_that_cannot_work_are_refused_before_anything_is_written(
        isolated: Path, override: str, key: str) -> None:
    result = runner.invoke(app, ["train", *override.split(), "device=cpu"])
    assert result.exit_code == 2
    assert key in result.output and "Traceback" not in result.output
    assert not list((isolated / "outputs").rglob("summary.json"))


HUGE = "model.width=1000000000000"  # 3 PB of weights: beyond any address space, fails at once


def test_a_set_up_failure_is_a_failed_run_with_its_error(isolated: Path) -> None:
    result = runner.invoke(app, ["train", HUGE, "trainer.progress=none", "device=cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [summary] = (isolated / "outputs").rglob("summary.json")
    body = json.loads(summary.read_text())
    assert body["status"] == "failed" and "allocate" in body["error"]
    assert "failed while setting up" in (summary.parent / "train.log").read_text()


def test_a_crash_inside_a_sweep_is_failed_recorded_and_exit_3(isolated: Path) -> None:
    result = runner.invoke(app, ["sweep", "trainer=debug", f"model.width=16,{HUGE[12:]}",
                                 "trainer.progress=none", "device=cpu"])
    assert result.exit_code == 3, result.output
    [sweep_dir] = (isolated / "outputs" / "sweeps").iterdir()
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert sorted(j["status"] for j in manifest["jobs"].values()) == ["completed", "failed"]
    [crashed] = [p for p in sweep_dir.glob("*/summary.json") if "1000000000000" in str(p)]
    assert json.loads(crashed.read_text())["error"].startswith("RuntimeError")
    assert "failed while setting up" in (crashed.parent / "train.log").read_text()


def test_run_and_job_names_are_single_bounded_path_components(isolated: Path) -> None:
    sizes = "[" + ",".join(f"{0.001 * i:.3f}" for i in range(1, 80)) + "]"  # ~500 characters
    long = [f"trainer.probe_step_sizes={sizes}", "data.root=/tmp/some/dir"]
    result = runner.invoke(app, ["train", *long, "trainer=debug", "trainer.progress=none",
                                 "device=cpu"])
    assert result.exit_code == 0, result.output
    [run] = (isolated / "outputs" / "runs").iterdir()  # one level: no nesting on `/`
    assert (run / "summary.json").is_file() and len(run.name.encode()) <= 120
    assert sizes in (run / ".hydra" / "overrides.yaml").read_text()  # the full overrides
    swept = runner.invoke(app, ["sweep", "--name", "../../escape", "seed=0,1", *long,
                                "trainer=debug", "trainer.progress=none", "device=cpu"])
    assert swept.exit_code == 0, swept.output
    [sweep_dir] = (isolated / "outputs" / "sweeps").iterdir()
    assert sweep_dir.name == ".._.._escape" and not (isolated / "escape").exists()
    assert len(list(sweep_dir.glob("*/summary.json"))) == 2


def test_killing_a_parallel_sweep_leaves_no_orphan_and_no_job_runs_twice(isolated: Path) -> None:
    args = ["sweep", "--name", "orphans", "--jobs", "2", "seed=0,1,2", "trainer.epochs=40",
            "trainer.progress=none", "trainer.checkpoint_every=50", "device=cpu"]
    parent = start(args)
    sweep_dir = isolated / "outputs" / "sweeps" / "orphans"
    deadline = time.time() + 120
    while time.time() < deadline and not any(
            json.loads(p.read_text()).get("status") == "running"
            for p in sweep_dir.glob("seed=*/summary.json") if p.stat().st_size):
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(parent.pid, signal.SIGKILL)  # the parent alone: its workers are not signalled
    parent.wait(timeout=30)
    deadline = time.time() + 30
    while workers_of(parent.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not workers_of(parent.pid), "workers trained on after their sweep was killed"
    statuses = [json.loads(p.read_text())["status"] for p in sweep_dir.glob("seed=*/summary.json")]
    assert "running" not in statuses and "interrupted" in statuses, statuses
    rerun = start(args)
    out = rerun.communicate(timeout=600)[0].decode()
    assert rerun.returncode == 0, out
    for job in sweep_dir.glob("seed=*"):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "completed", job
        events = EventAccumulator(str(job), size_guidance={"scalars": 0})
        events.Reload()
        steps = [e.step for e in events.Scalars("train/loss")]
        assert steps == sorted(set(steps)), job  # resumed where it stopped, no step twice


def test_sigterm_to_a_parallel_sweep_stops_its_workers_at_once(isolated: Path) -> None:
    """`kill PID` of the sweep alone (as a scheduler or `timeout` does): the workers get the
    signal too, so the sweep ends 143 now, not after its jobs have trained to the end."""
    args = ["sweep", "--name", "term", "--jobs", "2", "seed=0,1", "trainer.epochs=200",
            "trainer.progress=none", "trainer.checkpoint_every=50", "device=cpu"]
    parent = start(args)
    sweep_dir = isolated / "outputs" / "sweeps" / "term"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(sweep_dir.glob("seed=*/checkpoints/last.pt"))) < 2:
        time.sleep(0.1)  # both are training (a signal in set-up leaves no run at all)
    os.kill(parent.pid, signal.SIGTERM)
    out = parent.communicate(timeout=60)[0].decode()
    assert parent.returncode == 143, out
    assert "Traceback" not in out, out
    assert not workers_of(parent.pid)
    statuses = [json.loads(p.read_text())["status"] for p in sweep_dir.glob("seed=*/summary.json")]
    assert statuses == ["interrupted", "interrupted"], (statuses, out)
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert {j["status"] for j in manifest["jobs"].values()} == {"interrupted"}, manifest


@pytest.mark.parametrize("content", ["", "\x00\x01garbage", "{host} {sleeper} 1"])
def test_a_claim_that_names_no_live_bnexp_process_is_taken_over(
        isolated: Path, content: str) -> None:
    """Empty, unreadable, or naming a live process that is not its writer (PID reuse)."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        claims = isolated / "outputs" / "sweeps" / "claimed" / ".claims"
        claims.mkdir(parents=True)
        path = claims / "seed=0.claim"
        path.write_text(content.format(host=os.uname().nodename, sleeper=sleeper.pid))
        old = time.time() - 60  # not a claim being written this moment
        os.utime(path, (old, old))
        result = runner.invoke(app, ["sweep", "--name", "claimed", "seed=0,1", "trainer=debug",
                                     "trainer.progress=none"])
        assert result.exit_code == 0, result.output
        summary = json.loads((claims.parent / "seed=0" / "summary.json").read_text())
        assert summary["status"] == "completed"
    finally:
        sleeper.kill()


@pytest.mark.parametrize("command", ["sweep", "reproduce"])
def test_ctrl_c_on_a_sweep_or_study_says_how_it_resumes_and_writes_no_partial_report(
        isolated: Path, command: str) -> None:
    """A stopped sweep once exited silently with its stopped job `running` in the manifest,
    and a stopped study went on to write a report of its unfinished runs, exiting 0."""
    overrides = ["trainer.steps=3000", "trainer.checkpoint_every=20", "trainer.progress=none",
                 "device=cpu"]
    if command == "sweep":
        args = ["sweep", "--name", "stop", "seed=0,1", *overrides]
        sweep_dir = isolated / "outputs" / "sweeps" / "stop"
    else:
        args = ["reproduce", "ioffe2015_fig1", "seed=0", *overrides]
        sweep_dir = (isolated / "outputs" / "studies"
                     / study_name("ioffe2015_fig1", ["seed=0", *overrides]))
    if command == "reproduce":  # a report of an earlier, finished run of the study
        sweep_dir.mkdir(parents=True)
        (sweep_dir / "report.md").write_text("the last finished study")
    proc = start(args)
    deadline = time.time() + 120
    while not list(sweep_dir.glob("*/checkpoints/last.pt")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, out
    assert "Traceback" not in out, out
    statuses = {name: job["status"] for name, job in
                json.loads((sweep_dir / "manifest.json").read_text())["jobs"].items()}
    assert "interrupted" in statuses.values() and "running" not in statuses.values(), statuses
    for name, status in statuses.items():  # the manifest agrees with each job's own record
        if status == "interrupted":
            summary = json.loads((sweep_dir / name / "summary.json").read_text())
            assert summary["status"] == "interrupted", (name, summary["status"])
    assert "interrupted" in out and "resume:" in out, out
    if command == "reproduce":
        assert (sweep_dir / "report.md").read_text() == "the last finished study"
        assert not (sweep_dir / "verdicts.json").exists()
        assert "report:" in out and "not written" in out, out


def test_two_resumes_of_one_run_at_once_one_refuses(isolated: Path) -> None:
    run_dir = isolated / "twice"
    first = start(["train", "trainer.epochs=30", "trainer.progress=none",
                   "trainer.checkpoint_every=50", f"hydra.run.dir={run_dir}"])
    wait_for(run_dir / "checkpoints" / "last.pt")
    os.killpg(first.pid, signal.SIGINT)
    first.wait(timeout=60)
    again = start(["resume", str(run_dir)])
    deadline = time.time() + 120
    while json.loads((run_dir / "summary.json").read_text())["status"] != "running" \
            and time.time() < deadline:
        time.sleep(0.05)
    second = runner.invoke(app, ["resume", str(run_dir)])
    assert second.exit_code == 2, second.output
    assert "in use" in second.output and str(run_dir) in second.output
    out = again.communicate(timeout=300)[0].decode()
    assert again.returncode == 0, out
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


BAD_COMMANDS = [
    (["sweep", "--dry-run", "optim.lr=0.1,,0.2"], "optim.lr=0.1,,0.2"),
    (["sweep", "--dry-run", "optim.lr=range(1,"], "range(1,"),
    (["sweep", "--bogus"], "--bogus"),
    (["sweep", "--dry-run", "foo=1,2"], "foo"),
    (["sweep", "--dry-run", "model=nope,mlp"], "model=nope"),
    (["sweep", "--dry-run", "+trainer.epoch=3", "seed=0,1"], "trainer.epochs"),
    (["sweep", "--dry-run", "optim.lr=${nope}", "seed=0,1"], "optim.lr"),
    (["sweep", "device=cuda:99", "seed=0,1"], "device"),
    (["sweep", "trainer.batch_size=100000", "seed=0,1"], "trainer.batch_size"),
    (["train", "+trainer.epoch=3"], "trainer.epochs"),
    (["train", "--bogus"], "--bogus"),
    (["train", "optim.lr=${nope}"], "optim.lr"),
    (["train", "-m", "optim.lr=0.1,-1"], "optim.lr"),
    (["train", "data.val_fraction=0.0001"], "data.val_fraction"),
]


@pytest.mark.parametrize("args,named", BAD_COMMANDS)
def test_bad_input_in_any_command_is_one_paragraph_before_anything_runs(
        isolated: Path, args: list[str], named: str) -> None:
    result = runner.invoke(app, [*args, "trainer=debug"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and named in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("bnexp: error:"), result.output
    assert not list(isolated.rglob("summary.json")) and not list(isolated.rglob("events.*"))


def test_outputs_root_that_is_a_file_is_bad_input_for_a_sweep(
        isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (isolated / "a_file").write_text("")
    monkeypatch.setenv("BNEXP_OUTPUTS", str(isolated / "a_file"))
    result = runner.invoke(app, ["sweep", "seed=0,1", "trainer=debug"])
    assert result.exit_code == 2 and "BNEXP_OUTPUTS" in result.output, result.output


def test_hydra_flags_and_run_directories_with_equals_signs(isolated: Path) -> None:
    shown = runner.invoke(app, ["train", "--cfg", "job", "optim.lr=0.3", "trainer=debug"])
    assert shown.exit_code == 0 and "lr: 0.3" in shown.output, shown.output
    assert not (isolated / "outputs").exists()  # --cfg prints, runs nothing
    run_dir = isolated / "lr=0.1,seed=0"  # a sweep job's directory name
    first = runner.invoke(app, ["train", "trainer=debug", "trainer.checkpoint_every=10",
                                f"hydra.run.dir={run_dir}"])
    assert first.exit_code == 0, first.output
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    # Resuming a finished run changes nothing and says so.
    before = (run_dir / "summary.json").read_bytes()
    again = runner.invoke(app, ["train", "trainer=debug", "trainer.checkpoint_every=10",
                                f"resume={run_dir}"])
    assert again.exit_code == 2 and "already completed" in again.output, again.output
    assert (run_dir / "summary.json").read_bytes() == before
    # So does `bnexp resume` of a finished run that never wrote a last checkpoint.
    short = isolated / "short"
    assert runner.invoke(app, ["train", "trainer=debug", f"hydra.run.dir={short}"]).exit_code == 0
    assert not (short / "checkpoints" / "last.pt").exists()
    done = runner.invoke(app, ["resume", str(short)])
    assert done.exit_code == 2 and "already completed" in done.output, done.output


def _interrupted_run(root: Path) -> Path:
    run_dir = root / "stopped"
    proc = start(["train", *RUN, "trainer.checkpoint_every=20", f"hydra.run.dir={run_dir}"])
    wait_for(run_dir / "checkpoints" / "last.pt")
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    return run_dir


def test_corrupt_files_give_one_paragraph_and_nothing_is_overwritten(isolated: Path) -> None:
    run_dir = _interrupted_run(isolated)
    summary = (run_dir / "summary.json").read_bytes()
    last = run_dir / "checkpoints" / "last.pt"
    good = last.read_bytes()
    ckpt = torch.load(last, weights_only=False)
    del ckpt["history"]
    torch.save(ckpt, last)
    for damage in ("missing keys", "garbage", "overrides"):
        if damage == "garbage":
            last.write_bytes(b"\x00not a checkpoint" * 10)
        if damage == "overrides":
            last.write_bytes(good)
            (run_dir / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
        result = runner.invoke(app, ["resume", str(run_dir)])
        assert result.exit_code == 2, (damage, result.output)
        assert "Traceback" not in result.output, result.output
        named = "overrides.yaml" if damage == "overrides" else "last.pt"
        assert named in result.output, (damage, result.output)
        assert (run_dir / "summary.json").read_bytes() == summary  # the interrupted record


def test_unreadable_manifest_and_summaries_are_kept_and_reported(isolated: Path) -> None:
    args = ["sweep", "--name", "damaged", "seed=0,1,2", "trainer=debug", "trainer.progress=none"]
    assert runner.invoke(app, args).exit_code == 0
    sweep_dir = isolated / "outputs" / "sweeps" / "damaged"
    (sweep_dir / "manifest.json").write_bytes(b'{"jobs": {"seed=0": ')  # truncated
    (sweep_dir / "seed=1" / "summary.json").write_bytes(b"\xff\xfe\x00binary")
    (sweep_dir / "seed=2" / "summary.json").write_text("[]")
    compared = runner.invoke(app, ["compare", str(sweep_dir)])
    assert compared.exit_code == 0, compared.output
    assert "seed=1" in compared.output and "seed=2" in compared.output  # named in warnings
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 2, rerun.output  # the damaged jobs are never cleared
    assert "cannot be read" in rerun.output and "Traceback" not in rerun.output
    assert (sweep_dir / "seed=1" / "summary.json").read_bytes().startswith(b"\xff\xfe")
    moved = runner.invoke(app, [*args, "--move-aside"])
    assert moved.exit_code == 0, moved.output
    assert list(sweep_dir.glob("manifest.json.unreadable-*"))  # kept, not overwritten
    aside = list(sweep_dir.parent.glob("damaged.replaced-*/seed=1/summary.json"))
    assert aside and aside[0].read_bytes().startswith(b"\xff\xfe")
    assert all(json.loads((sweep_dir / f"seed={i}" / "summary.json").read_text())["status"]
               == "completed" for i in range(3))


def _two_runs(root: Path) -> Path:
    from conftest import write_summary

    for seed in (0, 1):
        write_summary(root / "runs" / f"s{seed}", **{"optim.lr": 0.1, "seed": seed},
                      final_val_acc=0.9 + seed / 100, best_val_acc=0.92)
    return root / "runs"


@pytest.mark.parametrize("args,named", [
    (["sweep", "--dry-run", "--lr-grid", "1e-3:10:100000"], "--lr-grid"),
    (["sweep", "--dry-run", "--lr-grid", "1:1.0005:6"], "distinct"),
    (["board", "{runs}", "--port", "99999"], "--port"),
    (["board", "{runs}", "--host", "no-such-host.invalid"], "--host"),
    (["plot", "{runs}", "--out", "{runs}/s0/summary.json"], "--out"),
    (["plot", "{runs}", "--metric", "nope_acc"], "--metric"),
    (["compare", "{runs}", "-m", "nope"], "--metric"),
    (["compare", "{runs}", "--sort", "nope"], "--sort"),
])
def test_bad_options_are_one_paragraph(isolated: Path, args: list[str], named: str) -> None:
    runs = _two_runs(isolated)
    result = runner.invoke(app, [a.format(runs=runs) for a in args])
    assert result.exit_code == 2, result.output
    assert named in result.output and "Traceback" not in result.output, result.output
    assert [ln for ln in result.output.splitlines() if ln.strip()][0].startswith("bnexp: error:")


def test_a_sweep_job_with_a_garbage_checkpoint_reruns_from_the_start(isolated: Path) -> None:
    args = ["sweep", "--name", "garbage", "seed=0,1", "trainer=debug", "trainer.progress=none"]
    assert runner.invoke(app, args).exit_code == 0
    job = isolated / "outputs" / "sweeps" / "garbage" / "seed=1"
    summary = json.loads((job / "summary.json").read_text())
    (job / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    (job / "checkpoints").mkdir(exist_ok=True)
    (job / "checkpoints" / "last.pt").write_bytes(b"\x00not a checkpoint" * 10)
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert json.loads((job / "summary.json").read_text())["status"] == "completed"
