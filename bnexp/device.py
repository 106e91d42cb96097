"""Where a run computes: the device, the CPU thread policy, seeding, and the environment record."""

from __future__ import annotations

import functools
import os
import platform
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from bnexp.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto = cuda, else mps, else cpu. An explicit accelerator that is absent is an error:
    a silent CPU fallback would turn a GPU benchmark into a misleading CPU one."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"Invalid value for device: {name!r}. No CUDA device is available on this "
                f"machine (torch {torch.__version__}, CUDA build: {torch.version.cuda}). "
                f"Use device=cpu or device=auto."
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"Invalid value for device: {name!r}. This machine has "
                f"{torch.cuda.device_count()} CUDA device(s): cuda:0..cuda:"
                f"{torch.cuda.device_count() - 1}."
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("Invalid value for device: 'mps'. MPS is not available here; "
                          "use device=cpu or device=auto.")
    return torch.device(name)


def _busy_cores(window: float = 0.05) -> float:
    """Cores kept busy by other processes, sampled from /proc/stat over a short window."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(window)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def usable_cores() -> int:
    """The CPUs this process may use: SLURM's allocation (SLURM_CPUS_PER_TASK), else the
    process's CPU affinity (taskset, cgroups' cpusets), else every CPU of the machine."""
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if allocated.isdigit() and int(allocated) > 0:
        return int(allocated)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform (macOS)
        return os.cpu_count() or 1


def slurm_environment() -> dict | None:
    """The SLURM job this process runs in (job id, array index, node), or None outside one."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    get = os.environ.get
    return {"job_id": get("SLURM_JOB_ID"), "array_job_id": get("SLURM_ARRAY_JOB_ID"),
            "array_task_id": get("SLURM_ARRAY_TASK_ID"), "node": get("SLURMD_NODENAME"),
            "partition": get("SLURM_JOB_PARTITION"), "cpus_per_task": get("SLURM_CPUS_PER_TASK"),
            "restart_count": get("SLURM_RESTART_COUNT", "0")}


def choose_threads(setting: str, model_name: str, models: int = 1) -> int:
    """The CPU thread count for a run.

    Measured on 2 cores (docs/performance.md): a 784-100-100-100-10 MLP step at batch 64 takes
    1.7 ms with 1 thread vs 3.0 ms with 2 on an idle machine, and 1.6 vs 13.7 ms beside a busy
    process; the small CNN gains from 2 threads only when the other core is idle (55 vs 72 ms;
    157 vs 97 ms when it is busy). So: MLPs use 1 thread, conv nets use the idle cores, and
    so does a vectorized stack of `models` MLPs, whose batched kernels are large enough to split
    (a 32-MLP stack: 22 vs 28 ms a step idle, 58 vs 28 ms beside a busy process).

    "steady" is auto's choice on an idle machine, whatever the load: the thread count changes
    the order of floating-point sums, so only a count that does not follow the load lets a
    rerun repeat a result exactly (`bnexp reproduce` and scripts/results.py).
    """
    if setting not in ("auto", "steady"):
        return int(setting)
    cores = usable_cores()
    if (model_name == "mlp" and models == 1) or cores == 1:
        return 1
    if cores < (os.cpu_count() or 1) or setting == "steady":
        return cores  # an allocation (SLURM, taskset) is this run's own: use all of it
    return max(1, min(cores, round(cores - _busy_cores())))


# A CPU evaluates fastest in batches whose largest activation stays cache-sized: a conv net is
# faster in small batches, an MLP in one large one (docs/performance.md, measured choices).
EVAL_CHUNK_BYTES = 8 << 20
EVAL_BATCH_MAX = 1000


def choose_eval_batch_size(setting: str, model: torch.nn.Module, example: torch.Tensor,
                           device: torch.device) -> int:
    """The evaluation batch size: an explicit setting, or for "auto" EVAL_BATCH_MAX on an
    accelerator and, on a CPU, as many samples as keep the largest activation within
    EVAL_CHUNK_BYTES (measured by one forward pass of `example`, a batch of model inputs)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cpu":
        return EVAL_BATCH_MAX
    largest = [example[0].numel() * example.element_size()]

    def track(_m: torch.nn.Module, _args: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out[0].numel() * out.element_size())

    handles = [m.register_forward_hook(track) for m in model.modules()]
    was = model.training
    try:
        model.eval()  # running statistics: nothing changes, and one sample is enough
        with torch.inference_mode():
            model(example[:1])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return max(16, min(EVAL_BATCH_MAX, EVAL_CHUNK_BYTES // largest[0]))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        # Only if an earlier run in this process asked for determinism: the call imports
        # torch._inductor and with it torch._dynamo (1.7 s).
        if torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(False)
        # A run's shapes are fixed: let cuDNN time its conv algorithms once and keep the best.
        torch.backends.cudnn.benchmark = True


@functools.cache  # the code this process runs was imported once: one `git` per process
def git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device, threads: int) -> dict:
    """What a reader needs to reproduce or compare a run's numbers."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "device": str(device),
        "device_name": name,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "slurm": slurm_environment(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }
