"""The run directory: the one place that writes a run's files.

Layout of a run directory (Hydra writes `.hydra/` and `train.log` itself):

    .hydra/config.yaml, overrides.yaml, hydra.yaml   resolved config and the overrides given
    events.out.tfevents.*                            TensorBoard scalars
    summary.json                                     status, config, metrics, env
    checkpoints/final.pt                             model + optimizer state, config, step

Every file is written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
FINAL_CHECKPOINT = "final.pt"
STATUSES = ("running", "completed", "diverged", "failed", "interrupted")
SCHEMA_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    # NaN/inf are not JSON; a diverged run's loss is recorded as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_summary(run_dir: Path, status: str, config: dict, metrics: dict, env: dict,
                  **extra: Any) -> Path:
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    body = {"schema": SCHEMA_VERSION, "status": status, **extra, "config": config,
            "metrics": metrics, "env": env}
    path = Path(run_dir) / SUMMARY
    text = json.dumps(_jsonable(body), indent=2, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())
    return path


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def save_checkpoint(run_dir: Path, state: dict, name: str = FINAL_CHECKPOINT) -> Path:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(run_dir) / CHECKPOINTS / name
    atomic_write_bytes(path, buffer.getvalue())
    return path


class Scalars:
    """TensorBoard event writer for one run, writing into the run directory itself so that
    `tensorboard --logdir outputs` lists each run under its own readable name."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), flush_secs=30)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
