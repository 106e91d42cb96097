"""Sweeps: job naming, config hashes, the manifest, and resume-by-skipping.

`bnexp sweep` is a Hydra multirun with our sweeper (hydra_plugins/bnexp_sweeper), which expands
the grid with Hydra's own grammar, then, before launching anything:
  * composes and validates every job's config (a bad value stops the sweep, exit 2);
  * names each job by the keys that vary (`lr=0.1,norm=batch,seed=0`);
  * skips jobs whose run directory holds a finished summary with the same config hash;
and launches the rest through whichever Hydra launcher is configured (basic, joblib, submitit).
The manifest (manifest.json in the sweep directory) records the command, the grid, and each
job's status; it is rewritten atomically after every batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnexp import record
from bnexp.config import (  # noqa: F401 - config_hash is used by the sweeper
    UNHASHED,
    config_hash,
    path_component,
    short_keys,
)

MANIFEST = record.SWEEP_MANIFEST
FINISHED = record.FINISHED  # results: a rerun skips these
EXIT_SOME_FAILED = 3


def job_name(overrides: Sequence[str], swept: Sequence[str]) -> str:
    """The job's directory name: `short_key=value` of the swept keys, in sweep order."""
    values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    names = short_keys(list(swept))
    parts = [f"{names[k]}={values[k]}" for k in swept if k in values]
    return path_component(",".join(parts) or "job")


def sweep_name(fixed: Sequence[str], swept: Sequence[str]) -> str:
    """A default sweep name that stays the same when only the grid values change, so that a
    rerun with more grid points resumes the same sweep: the fixed overrides, then the swept keys."""
    keys = "-".join(short_keys(list(swept)).values()) or "single"
    if not fixed:
        return keys
    label = ",".join(sorted(fixed)).replace("/", "_")
    if len(label) > 60:
        label = "cfg" + hashlib.sha256(label.encode()).hexdigest()[:8]
    return f"{label}__{keys}"


def split_overrides(arguments: Sequence[str]) -> tuple[list[str], list[str]]:
    """(fixed overrides, keys swept over) of a multirun command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fixed, swept = [], []
    for text, ov in zip(arguments, OverridesParser.create().parse_overrides(list(arguments))):
        if ov.key_or_group.startswith("hydra") or ov.key_or_group in UNHASHED:
            continue
        (swept.append(ov.key_or_group) if ov.is_sweep_override() else fixed.append(text))
    return fixed, swept


def log_grid(spec: str) -> list[float]:
    """`1e-3:10:9` -> 9 values from 1e-3 to 10, evenly spaced in log scale (both ends in)."""
    try:
        lo, hi, n = spec.split(":")
        lo_f, hi_f, count = float(lo), float(hi), int(n)
    except ValueError:
        raise ValueError(f"--lr-grid {spec!r}: expected LOW:HIGH:COUNT, e.g. 1e-3:10:9") from None
    if not (0 < lo_f < hi_f) or count < 2:
        raise ValueError(f"--lr-grid {spec!r}: need 0 < LOW < HIGH and COUNT >= 2")
    if count > MAX_GRID:
        raise ValueError(f"--lr-grid {spec!r}: COUNT={count} learning rates is more than a "
                         f"sweep should hold; allowed: 2..{MAX_GRID}.")
    ratio = (hi_f / lo_f) ** (1 / (count - 1))
    values = [float(f"{lo_f * ratio**i:.4g}") for i in range(count)]
    if len(set(values)) < count:  # closer than the 4 significant digits a job name shows
        raise ValueError(f"--lr-grid {spec!r}: {count} points between {lo_f:g} and {hi_f:g} "
                         f"give only {len(set(values))} distinct learning rates at 4 "
                         "significant digits; widen the range or use fewer points.")
    return values


MAX_GRID = 1000


# ----------------------------------------------------------------------------- manifest


def write_json_atomic(path: Path, body: Any) -> None:
    from bnexp.record import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(body, indent=2) + "\n").encode())


def read_manifest(sweep_dir: Path) -> dict:
    """The manifest, or an empty one. An unreadable manifest (truncated, binary) is kept as
    manifest.json.unreadable-<time> and rebuilt from the job directories, which hold the
    truth; a warning names it."""
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        return {"jobs": {}}
    try:
        body = json.loads(path.read_text())
        if not isinstance(body, dict) or not isinstance(body.get("jobs", {}), dict):
            raise ValueError("not a bnexp manifest")
        body.setdefault("jobs", {})
        return body
    except (OSError, ValueError) as exc:
        kept = path.with_name(f"{MANIFEST}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, kept)
        print(f"bnexp: warning: {path} could not be read ({' '.join(str(exc).split())[:100]});"
              f" kept as {kept.name}, and the manifest is rebuilt from the job directories.",
              file=sys.stderr)
        return {"jobs": {}}


def job_status(run_dir: Path, expected_hash: str) -> str:
    """What a job's directory says about it: a finished status, or pending/failed/..."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return "pending"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict):  # unreadable: never cleared, like another config's run
        return "stale"
    if summary.get("config_hash") != expected_hash:
        return "stale"  # the config behind this directory changed: run again
    status = summary.get("status", "pending")
    return "interrupted" if status == "running" else status


def resumable(run_dir: Path, expected_hash: str) -> bool:
    """An unfinished job of this very config with a checkpoint to continue from. A checkpoint
    that is not even a torch archive (torch.save writes a zip) cannot be: the job reruns
    from the start instead of failing on every rerun."""
    import zipfile

    last = run_dir / "checkpoints" / "last.pt"
    return (job_status(run_dir, expected_hash) in ("interrupted", "failed")
            and last.is_file() and zipfile.is_zipfile(last))


def clear_run_dir(run_dir: Path, expected_hash: str) -> None:
    """Empty a job directory before re-running it, so TensorBoard never sees two histories.
    Only an unfinished run of this very config is ever cleared: a finished result, or a run
    of another config, is never deleted (the sweeper stops before launching, see conflicts)."""
    status = job_status(run_dir, expected_hash)
    if status in FINISHED or status == "stale":
        raise RuntimeError(f"refusing to clear {run_dir}: it holds a {status} run")
    if run_dir.is_dir():
        shutil.rmtree(run_dir)


def config_differences(run_dir: Path, new_config: dict, most: int = 6) -> list[str]:
    """What differs between the config recorded in a job directory and the one a rerun would
    train, as `key: old -> new` (keys that only show how a run is shown are left out)."""
    from bnexp.runs import flatten

    try:
        old = flatten(json.loads((run_dir / "summary.json").read_text()).get("config", {}))
    except (OSError, ValueError, AttributeError):
        return ["its summary.json cannot be read"]
    new = flatten(new_config)
    out = []
    for key in sorted(old.keys() | new.keys()):
        if key in UNHASHED or key.split(".")[0] == "hydra":
            continue
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if b in (None, "auto") and key in old:
            continue  # a placeholder the run resolved when it started
        if a != b:
            out.append(f"{key}: {a} -> {b}")
    return out[:most] + ([f"... {len(out) - most} more"] if len(out) > most else [])


def move_aside(sweep_dir: Path, names: Sequence[str]) -> Path:
    """Move job directories out of the sweep, into a sibling `<sweep>.replaced-<time>/`, so a
    rerun can use their names; nothing is deleted."""
    target = sweep_dir.parent / f"{sweep_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir(parents=True, exist_ok=False)
    for name in names:
        if (sweep_dir / name).exists():
            os.replace(sweep_dir / name, target / name)
    return target


CLAIMS = ".claims"
EXIT_CLUSTER = 4  # the cluster refused the sweep or could not be reached


def claim(sweep_dir: Path, name: str) -> bool:
    """Take the job for this process (an exclusive claim file), unless a live process holds
    the claim or trains in the job's directory (a worker left by a killed sweep). A claim
    whose process is gone, or that cannot be read, is taken over."""
    from bnexp.record import holder

    folder = sweep_dir / CLAIMS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.claim"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _held_by_live_process(path):
                return False
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()} {_started(os.getpid())}\n")
        if holder(sweep_dir / name):
            path.unlink(missing_ok=True)
            return False
        return True
    return False


CLAIM_WRITE_SECONDS = 10  # an unreadable claim younger than this may be being written


def _started(pid: int) -> str:
    """When a process started (clock ticks since boot, /proc/PID/stat field 22): with the PID
    it names one process, even after the PID is reused. '-' where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "-"
    return stat.rsplit(")", 1)[1].split()[19]


def hand_over(sweep_dir: Path, name: str, slurm_job: str) -> None:
    """The job's claim passes to its SLURM job: held while SLURM has the job, whatever
    becomes of this process (a rerun meanwhile skips it rather than training it twice)."""
    path = sweep_dir / CLAIMS / f"{name}.claim"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"slurm {slurm_job}\n")
    os.replace(tmp, path)


def claim_holder(sweep_dir: Path, name: str) -> str | None:
    """What holds the job's claim ('slurm <id>' or '<host> <pid> ...'), or None."""
    try:
        return (sweep_dir / CLAIMS / f"{name}.claim").read_text().strip() or None
    except OSError:
        return None


def _held_by_live_process(path: Path) -> bool:
    try:
        text = path.read_text()
        if text.startswith("slurm ") and len(text.split()) == 2:
            from bnexp.cluster import alive

            return alive(text.split()[1])
        host, pid, *started = text.split()
        pid_number = int(pid)
    except (OSError, ValueError):
        try:  # empty or garbled: a writer that died, unless it is being written this moment
            return time.time() - path.stat().st_mtime < CLAIM_WRITE_SECONDS
        except OSError:
            return False
    if host != socket.gethostname():
        return True  # another machine's (a cluster): trust it
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _started(pid_number)
    if now == "-":
        return True  # no /proc to tell: trust the claim
    if started and started[0] != "-":
        return started[0] == now  # the same PID and start time: the same process
    try:  # a claim of an older bnexp without the start time: is that PID a bnexp at all?
        return b"bnexp" in Path(f"/proc/{pid_number}/cmdline").read_bytes()
    except OSError:
        return False


def release(sweep_dir: Path, name: str, keep_slurm: bool = False) -> None:
    """Drop the job's claim; keep_slurm: not if a SLURM job holds it (it may still run)."""
    if keep_slurm and (claim_holder(sweep_dir, name) or "").startswith("slurm "):
        return
    (sweep_dir / CLAIMS / f"{name}.claim").unlink(missing_ok=True)


def counts(manifest: dict) -> Counter:
    return Counter(job["status"] for job in manifest["jobs"].values())


def new_manifest(sweep_dir: Path, arguments: Sequence[str], swept: Sequence[str]) -> dict:
    old = read_manifest(sweep_dir)
    return {
        "command": os.environ.get("BNEXP_SWEEP_COMMAND", " ".join(arguments)),
        "arguments": list(arguments),
        "swept": list(swept),
        "started": old.get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "jobs": dict(old.get("jobs", {})),
    }
