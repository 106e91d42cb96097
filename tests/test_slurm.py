"""Sweeps on SLURM. The tests marked `slurm` run real sweeps on the one-node cluster that
scripts/slurm_local.sh starts on this machine (CI starts it; by hand: `scripts/slurm_local.sh
install && scripts/slurm_local.sh start`, then `pytest -m slurm`). The others need no cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("BNEXP_SLURM_STATE", "/tmp/bnexp-slurm"))
BNEXP = str(Path(sys.executable).with_name("bnexp"))
FAST = ["trainer.steps=20", "device=cpu", "hydra/launcher=bnexp_slurm",
        "hydra.launcher.poll_s=0.5"]


# ------------------------------------------------------------------------ without a cluster


@pytest.mark.parametrize(("env", "taskset", "expected"), [
    ({"SLURM_CPUS_PER_TASK": "1"}, None, 1),
    ({}, "0", 1),
    ({}, None, os.cpu_count()),
])
def test_auto_threads_respect_the_allocation(env: dict, taskset: str | None,
                                             expected: int) -> None:
    """trainer.threads=auto counts the CPUs this process may use: SLURM's allocation, else
    its CPU affinity, not the machine's CPUs (a conv net uses all it is given)."""
    if taskset and not shutil.which("taskset"):
        pytest.skip("taskset is not installed")
    code = ("from bnexp.device import choose_threads, usable_cores; "
            "print(usable_cores(), choose_threads('auto', 'cnn') if usable_cores() < "
            "__import__('os').cpu_count() else '-')")
    command = [sys.executable, "-c", code]
    if taskset:
        command = ["taskset", "-c", taskset, *command]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(command, env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert int(out[0]) == expected
    if out[1] != "-":
        assert int(out[1]) == expected


def test_auto_resources_fit_the_jobs_and_the_partition() -> None:
    """GPUs only when a job's device asks for one; CPUs from trainer.threads or the model;
    memory from the dataset; never more than one node of the partition has."""
    from omegaconf import OmegaConf

    from bnexp.cluster import size
    from bnexp.config import compose

    auto = {"gpus_per_node": "auto", "cpus_per_task": "auto", "mem_gb": "auto"}
    cpu_part = {"partition": "debug", "cpus": 2, "mem_mb": 4096, "gpus": False}
    gpu_part = {"partition": "gpu", "cpus": 32, "mem_mb": 256_000, "gpus": True}
    mlp = compose(["device=cpu"])
    cnn = compose(["model=cnn", "data=cifar10", "device=auto"])
    assert size(auto, [mlp], cpu_part) == {"cpus_per_task": 1, "mem_gb": 2}
    assert size(auto, [mlp, cnn], cpu_part) == {"cpus_per_task": 2, "mem_gb": 4}
    on_gpu = size(auto, [cnn], gpu_part)  # device=auto on a partition with GPUs
    assert on_gpu == {"gpus_per_node": 1, "cpus_per_task": 4, "mem_gb": 6}
    assert size(auto, [mlp], gpu_part) == {"cpus_per_task": 1, "mem_gb": 2}  # device=cpu
    threads = OmegaConf.merge(mlp, {"trainer": {"threads": "8"}})
    assert size(auto, [threads], cpu_part)["cpus_per_task"] == 2  # capped at the node
    given = {"gpus_per_node": 0, "cpus_per_task": 3, "mem_gb": 5}
    assert size(given, [cnn], gpu_part) == {"cpus_per_task": 3, "mem_gb": 5}  # as asked


def test_a_claim_handed_to_slurm_is_held_while_slurm_cannot_say(tmp_path: Path,
                                                                monkeypatch) -> None:
    """A claim that names a SLURM job is trusted when squeue cannot be asked (no job runs
    twice), and the sweep's own release leaves it in place."""
    from bnexp import sweep

    assert sweep.claim(tmp_path, "job")
    sweep.hand_over(tmp_path, "job", "123_4")
    assert sweep.claim_holder(tmp_path, "job") == "slurm 123_4"
    sweep.release(tmp_path, "job", keep_slurm=True)
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue here
    assert not sweep.claim(tmp_path, "job")
    sweep.release(tmp_path, "job")
    assert sweep.claim(tmp_path, "job")


# ------------------------------------------------------------------------ a real cluster


def _cluster_env() -> dict:
    return {**os.environ, "SLURM_CONF": str(STATE / "slurm.conf")}


def _cluster_up() -> bool:
    if not shutil.which("sbatch") or not (STATE / "slurm.conf").is_file():
        return False
    done = subprocess.run(["sinfo", "-h", "-o", "%t"], env=_cluster_env(),
                          capture_output=True, text=True)
    return done.returncode == 0 and any(s in done.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch) -> Path:
    """The outputs root of a test on the local cluster (on a disk the node shares: this one)."""
    if not _cluster_up():
        pytest.fail("no local SLURM cluster: run scripts/slurm_local.sh install && "
                    "scripts/slurm_local.sh start first (pytest -m slurm needs it)")
    monkeypatch.setenv("SLURM_CONF", str(STATE / "slurm.conf"))
    yield tmp_path
    mine = subprocess.run(["squeue", "-h", "-o", "%i %o"], capture_output=True, text=True)
    left = [line.split()[0] for line in mine.stdout.splitlines() if str(tmp_path) in line]
    if left:  # never leave a test's jobs on the cluster
        subprocess.run(["scancel", *left], capture_output=True)


def _sweep(outputs: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**_cluster_env(), "BNEXP_OUTPUTS": str(outputs)}
    return subprocess.run([BNEXP, "sweep", "--name", "s", *args], env=env, cwd=outputs,
                          capture_output=True, text=True, timeout=timeout)


def _start(outputs: Path, *args: str) -> subprocess.Popen:
    env = {**_cluster_env(), "BNEXP_OUTPUTS": str(outputs)}
    return subprocess.Popen([BNEXP, "sweep", "--name", "s", *args], env=env, cwd=outputs,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _summaries(outputs: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in (outputs / "sweeps" / "s").glob("*/summary.json")}


def _manifest(outputs: Path) -> dict:
    return json.loads((outputs / "sweeps" / "s" / "manifest.json").read_text())["jobs"]


def _running(outputs: Path, count: int, seconds: float = 60) -> list[str]:
    """Wait until `count` of this sweep's SLURM jobs run and have begun training; their ids."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        jobs = _manifest_ids(outputs)
        out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True,
                             text=True).stdout.split()
        live = [j for j in out if j in jobs]
        training = [n for n, s in _summaries(outputs).items() if s["status"] == "running"]
        if len(live) >= count and len(training) >= count:
            return live
        time.sleep(0.5)
    raise AssertionError(f"fewer than {count} jobs ran within {seconds} s")


def _trained(outputs: Path, count: int, seconds: float = 60) -> None:
    """Wait until `count` runs have passed their first checkpoint. A job stopped before its
    first step rolls back by design and stays queued; "running" in a summary is written as
    set-up begins, so it does not say the job got that far."""
    deadline = time.monotonic() + seconds
    while len(list((outputs / "sweeps" / "s").glob("*/checkpoints/last.pt"))) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {count} runs reached a checkpoint in {seconds} s")
        time.sleep(0.25)


def _manifest_ids(outputs: Path) -> set[str]:
    try:
        return {j.get("slurm_job_id") for j in _manifest(outputs).values()} - {None}
    except (OSError, ValueError):
        return set()


def _events(outputs: Path, name: str) -> list[Path]:
    return sorted((outputs / "sweeps" / "s" / name).glob("events.out.tfevents.*"))


@pytest.mark.slurm
def test_a_sweep_runs_as_a_slurm_array_and_records_its_jobs(cluster: Path) -> None:
    done = _sweep(cluster, "seed=0,1", *FAST)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitting 2 job(s) to SLURM partition debug (cpus_per_task=1, mem_gb=2" in done.stdout
    assert "[2/2]" in done.stdout and "Traceback" not in done.stdout + done.stderr
    runs = _summaries(cluster)
    assert {n: s["status"] for n, s in runs.items()} == {"seed=0": "completed",
                                                         "seed=1": "completed"}
    manifest = _manifest(cluster)
    for name, summary in runs.items():
        slurm = summary["env"]["slurm"]
        assert slurm["cpus_per_task"] == "1" and summary["env"]["threads"] == 1
        assert f"{slurm['array_job_id']}_{slurm['array_task_id']}" == manifest[name][
            "slurm_job_id"]
        assert manifest[name]["status"] == "completed"
    assert not list((cluster / "sweeps" / "s" / ".claims").glob("*.claim"))
    again = _sweep(cluster, "seed=0,1", *FAST)  # everything finished: nothing submitted
    assert again.returncode == 0 and "0 to run, 2 finished before" in again.stdout


@pytest.mark.slurm
def test_a_cancelled_job_is_recorded_and_the_others_go_on(cluster: Path) -> None:
    sweep = _start(cluster, "seed=0,1,2", *FAST, "trainer.steps=6000", "trainer.eval_every=200",
                   "trainer.checkpoint_every=500")
    _running(cluster, 1)
    deadline = time.monotonic() + 60  # cancel a job that has trained: past its first checkpoint
    while time.monotonic() < deadline and not list(
            (cluster / "sweeps" / "s").glob("*/checkpoints/last.pt")):
        time.sleep(0.25)
    trained = next((cluster / "sweeps" / "s").glob("*/checkpoints/last.pt")).parent.parent.name
    victim = _manifest(cluster)[trained]["slurm_job_id"]
    subprocess.run(["scancel", victim], check=True)
    out, _ = sweep.communicate(timeout=240)
    assert sweep.returncode == 3, out  # not every job completed
    assert "Traceback" not in out and "UncompletedJobError" not in out
    manifest = _manifest(cluster)
    [name] = [n for n, j in manifest.items() if j["slurm_job_id"] == victim]
    assert manifest[name]["status"] == "interrupted" and "CANCELLED" in manifest[name][
        "slurm_state"]
    assert f"{name}: interrupted (SLURM: CANCELLED" in out
    others = {n: j["status"] for n, j in manifest.items() if n != name}
    assert set(others.values()) == {"completed"} and len(others) == 2
    steps = _summaries(cluster)[name]["metrics"]["steps"]
    assert 0 < steps < 6000
    again = _sweep(cluster, "seed=0,1,2", *FAST, "trainer.steps=6000",
                   "trainer.eval_every=200", "trainer.checkpoint_every=500")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{name}: resuming from its last checkpoint" in again.stdout
    assert _summaries(cluster)[name]["status"] == "completed"


@pytest.mark.slurm
def test_a_rerun_while_the_jobs_still_run_trains_none_twice(cluster: Path) -> None:
    """The sweep process dies (SIGKILL) with its jobs in SLURM; a rerun at once sees that
    SLURM holds them and skips them; each job trains once, into one event file."""
    args = ["seed=0,1", *FAST, "trainer.steps=4000"]
    first = _start(cluster, *args)
    ids = _running(cluster, 2)
    first.kill()
    first.wait()
    again = _sweep(cluster, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    for job in ids:
        assert f"SLURM job {job} has it, skipped" in again.stdout
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(
            s["status"] == "running" for s in _summaries(cluster).values()):
        time.sleep(1)
    runs = _summaries(cluster)
    assert {s["status"] for s in runs.values()} == {"completed"}
    for name in runs:
        assert len(_events(cluster, name)) == 1, name
    third = _sweep(cluster, *args)
    assert "0 to run, 2 finished before" in third.stdout


@pytest.mark.slurm
def test_a_preempted_or_timed_out_job_checkpoints_and_requeues(cluster: Path) -> None:
    """USR2 (SLURM's signal before the time limit, and at a preemption) stops the run at its
    next step with a checkpoint; submitit requeues the job, which resumes and completes."""
    sweep = _start(cluster, "seed=0", *FAST, "trainer.steps=5000", "trainer.eval_every=250")
    [job] = _running(cluster, 1)
    time.sleep(2)
    subprocess.run(["scancel", "--signal=USR2", "--full", job], check=True)
    out, _ = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, out
    [summary] = _summaries(cluster).values()
    assert summary["status"] == "completed" and summary["metrics"]["steps"] == 5000
    assert summary["env"]["slurm"]["restart_count"] == "1"  # the requeued run
    [run_dir] = [p.parent for p in (cluster / "sweeps" / "s").glob("*/summary.json")]
    log = (run_dir / "train.log").read_text()
    assert "resuming at step" in log  # the requeued job continued from the checkpoint


@pytest.mark.slurm
def test_a_job_at_its_time_limit_with_no_requeue_left_ends_interrupted(cluster: Path) -> None:
    """A real time limit: SLURM itself signals USR2 (signal_delay_s before timeout_min) and,
    with no requeue left (max_num_timeout=0), submitit does not requeue ("timed-out too many
    times"); the run stopped at its next step with a checkpoint, and a rerun resumes it."""
    sweep = _sweep(cluster, "seed=0", *FAST, "trainer.steps=200000", "trainer.eval_every=1000",
                   "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=40",
                   "hydra.launcher.max_num_timeout=0", timeout=240)
    assert sweep.returncode == 3, sweep.stdout + sweep.stderr
    [(name, summary)] = _summaries(cluster).items()
    assert summary["status"] == "interrupted"
    assert summary["notes"]["interrupted_by"] == "SIGUSR2"
    assert 0 < summary["metrics"]["steps"] < 200000
    run_dir = cluster / "sweeps" / "s" / name
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert _manifest(cluster)[name]["status"] == "interrupted"
    logs = "".join(p.read_text() for p in (cluster / "sweeps" / "s").glob(".submitit/*/*.out"))
    assert "timed-out too many times" in logs
    assert "resume:" in sweep.stdout  # the sweep says how to continue


@pytest.mark.slurm
def test_a_sweep_on_a_gpu_partition_asks_for_a_gpu_per_job(cluster: Path) -> None:
    """device=auto on a partition whose nodes have GPUs: each job asks for one GPU, and SLURM
    schedules and accounts for it (the local cluster's GPU is a GRES with no CUDA device
    behind it, so the jobs themselves train on the CPU, as device=auto falls back)."""
    done = _sweep(cluster, "seed=0,1", "trainer.steps=20", "hydra/launcher=bnexp_slurm",
                  "hydra.launcher.poll_s=0.5", "hydra.launcher.partition=gpu")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitting 2 job(s) to SLURM partition gpu (" in done.stdout
    assert "gpus_per_node=1" in done.stdout
    runs = _summaries(cluster)
    assert {s["status"] for s in runs.values()} == {"completed"}
    assert {s["env"]["slurm"]["partition"] for s in runs.values()} == {"gpu"}
    ids = [j["slurm_job_id"] for j in _manifest(cluster).values()]
    tres = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "AllocTRES", "-j", ",".join(ids)],
                          capture_output=True, text=True).stdout.split()
    assert len(tres) == 2 and all("gres/gpu=1" in t for t in tres), tres


@pytest.mark.slurm
def test_a_partition_that_does_not_exist_is_one_paragraph(cluster: Path) -> None:
    done = _sweep(cluster, "seed=0,1", *FAST, "hydra.launcher.partition=nosuch")
    assert done.returncode == 2
    assert "Invalid value for hydra.launcher.partition: 'nosuch'" in done.stderr
    assert "debug" in done.stderr and "Traceback" not in done.stdout + done.stderr
    assert _manifest_ids(cluster) == set()  # nothing was submitted


@pytest.mark.slurm
def test_a_job_no_node_can_run_stops_the_sweep_instead_of_waiting(cluster: Path) -> None:
    nodes = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True)
    too_many = int(nodes.stdout.split()[0].rstrip("+")) + 2
    done = _sweep(cluster, "seed=0", *FAST, f"hydra.launcher.cpus_per_task={too_many}",
                  "hydra.launcher.pending_grace_s=1", timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr  # the settings asked too much
    assert "Traceback" not in done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    assert "bnexp: error:" in message and ("cpus_per_task" in message or "pending" in message)
    queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
    assert not (_manifest_ids(cluster) & set(queue.stdout.split()))  # none left behind


@pytest.mark.slurm
def test_ctrl_c_cancels_the_sweeps_slurm_jobs(cluster: Path) -> None:
    sweep = _start(cluster, "seed=0,1,2", *FAST, "trainer.steps=6000")
    _running(cluster, 2)
    _trained(cluster, 2)  # both have trained: each must end interrupted, not rolled back
    sweep.send_signal(signal.SIGINT)
    out, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, out
    assert "cancelling the sweep's" in out and "Traceback" not in out
    queue = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
    assert not (_manifest_ids(cluster) & set(queue.stdout.split()))
    statuses = sorted(j["status"] for j in _manifest(cluster).values())
    assert statuses in (["interrupted", "interrupted", "queued"],
                        ["interrupted", "interrupted", "interrupted"]), statuses
