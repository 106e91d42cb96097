"""SLURM, as bnexp's launcher and claims ask it: which partition and node sizes there are,
the resources a sweep's jobs need, which jobs are alive and how they ended. Each function runs
one SLURM client command (sinfo, squeue, sacct) and turns a failure into one paragraph.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from typing import Any

# Pending reasons that no amount of waiting resolves: the partition (or the account's limits)
# can never give the job what it asks for.
IMPOSSIBLE = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "ReqNodeNotAvail",
              "BadConstraints", "InvalidAccount", "InvalidQOS", "QOSMaxCpuPerJobLimit",
              "QOSMaxMemoryPerJob", "QOSMaxGRESPerJob", "AssocMaxCpuPerJobLimit",
              "AssocMaxMemPerJobLimit", "AssocMaxGRESPerJob", "MaxCpuPerAccount"}
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED",
         "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


class SlurmError(Exception):
    """The cluster refused the sweep or cannot be reached: one paragraph for the user; `key`
    names the setting at fault when there is one (exit code 2: bad input; else 4)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _slurm(*command: str, timeout: float = 30) -> str:
    """A SLURM client command's output; SlurmError when it cannot run or fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{command[0]} is not on PATH: bnexp's SLURM launcher needs SLURM's "
                         "client commands (sbatch, squeue, sacct, scancel) where `bnexp "
                         "sweep` runs.") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{shlex.join(command)}` got no answer in {timeout:.0f} s: is "
                         "slurmctld up (scontrol ping)?") from None
    if done.returncode != 0:
        said = " ".join(done.stderr.split())
        hint = (" The SLURM controller cannot be reached: check `scontrol ping` and SLURM_CONF."
                if "Unable to contact" in said else "")
        raise SlurmError(f"`{shlex.join(command)}` failed: {said}.{hint}")
    return done.stdout


def partition_info(partition: str | None) -> dict:
    """CPUs and memory (MB) of the partition's largest node, and whether it has GPUs."""
    args = ["sinfo", "-h", "-o", "%P|%c|%m|%G"]
    rows = [line.split("|") for line in _slurm(*args).splitlines() if line.strip()]
    if not rows:
        raise SlurmError("sinfo lists no partition: the cluster has no nodes configured.")
    names = [r[0].rstrip("*") for r in rows]
    if partition is None:
        default = [r[0].rstrip("*") for r in rows if r[0].endswith("*")]
        partition = default[0] if default else names[0]
    mine = [r for r in rows if r[0].rstrip("*") == partition]
    if not mine:
        raise SlurmError(
            f"Invalid value for hydra.launcher.partition: {partition!r}. This cluster has the "
            f"partitions {', '.join(sorted(set(names)))} (sinfo). Pass one with "
            "hydra.launcher.partition=NAME or set BNEXP_SLURM_PARTITION.",
            key="hydra.launcher.partition")
    number = lambda v: int("".join(c for c in v if c.isdigit()) or 0)  # "2+" -> 2 # noqa: E731
    return {"partition": partition, "cpus": max(number(r[1]) for r in mine),
            "mem_mb": max(number(r[2]) for r in mine),
            "gpus": any("gpu" in r[3] for r in mine)}


def size(params: dict, jobs: Sequence[Any], part: dict) -> dict:
    """The "auto" resources for these jobs on this partition (see the module's docstring)."""
    out = dict(params)
    devices = {str(j.device) for j in jobs}
    if out.get("gpus_per_node") == "auto":
        wants = any(d.startswith("cuda") for d in devices) or ("auto" in devices
                                                               and part["gpus"])
        out["gpus_per_node"] = 1 if wants else 0
    if out.get("cpus_per_task") == "auto":
        threads = [str(j.trainer.threads) for j in jobs]
        given = [int(t) for t in threads if t.isdigit()]
        if given:
            want = max(given)
        elif out["gpus_per_node"]:
            want = 4  # feeding a GPU
        else:  # a CPU run: MLPs train fastest on one thread, conv nets use two
            want = 1 if all(str(j.model.name) == "mlp" for j in jobs) else 2
        out["cpus_per_task"] = max(1, min(want, part["cpus"] or want))
    if out.get("mem_gb") == "auto":
        big = any(str(j.data.name).startswith("cifar") for j in jobs)
        want = (4 if big else 2) + (2 if out["gpus_per_node"] else 0)
        have = part["mem_mb"] // 1024
        out["mem_gb"] = max(1, min(want, have)) if have else want
    if not out.get("gpus_per_node"):
        out.pop("gpus_per_node", None)  # asking for 0 GPUs is a GRES request too
    return out


def states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} of the live ones among these jobs (squeue)."""
    if not job_ids:
        return {}
    # -r: one line per array task (pending ones are otherwise folded into "12_[3-7]").
    text = _slurm("squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%r")
    found = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            found[parts[0]] = (parts[1], parts[2])
    return found


def ended_state(job_id: str) -> str:
    """How SLURM says a job ended (sacct), e.g. 'CANCELLED by 0', 'TIMEOUT', 'NODE_FAIL'."""
    try:
        text = _slurm("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode,Reason")
    except SlurmError:
        return "unknown (sacct failed)"
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "unknown (not in sacct)"
    state, code, reason = (lines[-1].split("|") + ["", ""])[:3]
    extra = f", reason {reason}" if reason and reason != "None" else ""
    return f"{state} (exit code {code}{extra})"


def cancel(job_ids: Sequence[str]) -> None:
    _slurm("scancel", *job_ids)


def alive(job_id: str) -> bool:
    """Whether SLURM still has the job (pending, running, requeued...); True when SLURM
    cannot be asked, so that a claim is trusted rather than a job run twice."""
    try:
        return job_id in states([job_id])
    except SlurmError as exc:
        return "Invalid job id" not in str(exc)
