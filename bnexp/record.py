"""The run directory: the one place that writes a run's files.

Layout of a run directory (Hydra writes `.hydra/` and `train.log` itself):

    .hydra/config.yaml, overrides.yaml, hydra.yaml   resolved config and the overrides given
    events.out.tfevents.*                            TensorBoard scalars
    summary.json                                     status, config, metrics, env
    checkpoints/final.pt                             model + optimizer state, config, step

Every file is written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
FINAL_CHECKPOINT = "final.pt"
LAST_CHECKPOINT = "last.pt"  # every trainer.checkpoint_every steps, and on interruption
STATUSES = ("running", "completed", "diverged", "failed", "interrupted")
# A result: compared, skipped by a rerun of its sweep, never written over.
FINISHED = ("completed", "diverged")
SCHEMA_VERSION = 1


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run's last checkpoint lies: what `bnexp resume` continues from."""
    return Path(run_dir) / CHECKPOINTS / LAST_CHECKPOINT


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


LOCK = ".lock"


def hold(run_dir: Path) -> Any:
    """This process's exclusive hold on a run directory while it trains there (an flock on
    `.lock`, which the kernel releases when the process ends, even by SIGKILL), or None when
    another process holds it. Close the returned file to release it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")  # noqa: SIM115 - held for the run's life, closed by callers
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{socket.gethostname()} {os.getpid()}\n")
    f.flush()
    return f


def holder(run_dir: Path) -> str | None:
    """'host pid' of the process that trains in run_dir now, or None when none does."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
    return None


def discard_partial_writes(run_dir: Path) -> list[Path]:
    """Remove the temporary files a hard-killed writer left (SIGKILL cannot be caught, so
    atomic_write_bytes cannot clean up after it). They were never renamed into place, so
    nothing ever read them; only the process that owns run_dir may call this."""
    left = [p for p in Path(run_dir).rglob(".*.tmp") if p.is_file()]
    for path in left:
        path.unlink(missing_ok=True)
    return left


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


# One fixed set of hparam keys for every run, so that all runs share one HParams table (a
# sweep adds the keys it sweeps, when they are not among these).
HPARAM_KEYS = (
    "data.name", "model.name", "model.depth", "model.width", "model.norm", "model.affine",
    "model.activation", "model.norm_position", "model.init", "optim.name", "optim.lr",
    "optim.momentum", "optim.weight_decay", "optim.schedule", "trainer.batch_size",
    "trainer.epochs", "trainer.precision", "seed",
)
# Metric tags live under METRIC_GROUP so they never clash with the curves (train/loss, val/acc)
# and sort after them: TensorBoard's Time Series orders its groups by character code and opens
# the first two, which are then train/ and val/.
# TensorBoard shows the first five by default, and its parallel-coordinates view drops a run
# that lacks any shown value: those five are finite for every finished run, diverged or not.
# Steps to target is missing for a run that never reached it, so `reached_target` (0/1) is
# shown and the step count stays further down.
HPARAM_METRICS = (
    "final_val_acc", "best_val_acc", "reached_target", "diverged", "train_eval_gap",
    "final_train_loss", "train_loss_auc", "steps_to_target", "loss_spikes", "grad_norm_max",
    "val_acc_eval_mode", "val_acc_train_mode",
)
METRIC_GROUP = "~summary"
SWEEP_MANIFEST = "manifest.json"  # in a sweep's directory, beside its runs' directories
LAYOUT = {
    "bnexp (all runs overlaid)": {
        "train loss": ["Multiline", [r"^train/loss$"]],
        "val accuracy": ["Multiline", [r"^val/acc$"]],
        "activation-input percentiles (15/50/85)": ["Multiline", [r"^act_input/.*/p\d+$"]],
        "saturated fraction": ["Multiline", [r"^saturation/"]],
        "gradient norm": ["Multiline", [r"^train/grad_norm$"]],
    },
}


def hparam_values(config: dict, extra: Sequence[str] = ()) -> dict[str, Any]:
    """The HPARAM_KEYS (and `extra` keys) of a resolved config with their own types: bools,
    ints, floats, strings; None as the string 'none' and lists as their text (TensorBoard's
    hparams hold numbers, strings and booleans only)."""
    out: dict[str, Any] = {}
    for key in (*HPARAM_KEYS, *(k for k in extra if k not in HPARAM_KEYS)):
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[key] = ("none" if value is None else value
                    if isinstance(value, (bool, int, float, str)) else str(value))
    return out


def sweep_manifest(run_dir: Path) -> dict | None:
    """The manifest of the sweep a run belongs to (beside the run's directory, naming it), or
    None for a run outside a sweep."""
    try:
        manifest = json.loads((Path(run_dir).parent / SWEEP_MANIFEST).read_text())
        return manifest if Path(run_dir).name in manifest["jobs"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sweep_grid(run_dir: Path) -> dict[str, list[str]]:
    """The values each swept key takes across the sweep a run belongs to, as the overrides
    wrote them; {} for a run outside a sweep. Every run of a sweep reads the same grid, so all
    describe the same HParams experiment whichever one TensorBoard reads it from."""
    manifest = sweep_manifest(run_dir)
    if manifest is None:
        return {}
    grid: dict[str, list[str]] = {key: [] for key in manifest.get("swept", [])}
    for job in manifest["jobs"].values():
        for override in job.get("overrides", []):
            key, _, value = override.lstrip("+~").partition("=")
            value = value.strip("'\"")
            if key in grid and value not in grid[key]:
                grid[key].append(value)
    return {k: v for k, v in grid.items() if v}


def _as_type_of(text: str, like: Any) -> Any:
    """An override's text as a value of the run's own type (the text itself when it is not)."""
    try:
        if isinstance(like, bool):
            return {"true": True, "false": False}[text.lower()]
        if isinstance(like, int):
            return int(text) if text.lstrip("-").isdigit() else float(text)
        if isinstance(like, float):
            return float(text)
    except (KeyError, ValueError):
        return text
    return "none" if text == "null" else text


def experiment(values: Mapping[str, Any], grid: Mapping[str, Sequence[str]]) -> Any:
    """The HParams experiment of a run's sweep (api_pb2.Experiment): each hparam with its type
    and the discrete set of values the sweep gives it, and `differs` for the keys the sweep
    varies, which TensorBoard then shows first. Then the metrics, in HPARAM_METRICS order.
    TensorBoard has no integer type and prints its numbers with four decimals (seed 0.0000),
    so integers are written as their text, their domain in numeric order."""
    from google.protobuf.struct_pb2 import ListValue
    from tensorboard.plugins.hparams import api_pb2

    infos = []
    for key in sorted(values, key=lambda k: k not in grid):  # swept keys first, stable
        own = values[key]
        domain = sorted({own, *(_as_type_of(t, own) for t in grid.get(key, ()))},
                        key=lambda v: (str(type(v)), v))
        kinds = {type(v) for v in domain}
        if kinds == {float} or kinds == {int, float}:
            kind = api_pb2.DATA_TYPE_FLOAT64
        elif kinds == {bool}:
            kind = api_pb2.DATA_TYPE_BOOL
        else:  # strings, integers, or values a sweep gave in another type than the run's
            kind, domain = api_pb2.DATA_TYPE_STRING, list(dict.fromkeys(map(str, domain)))
        listed = ListValue()
        listed.extend(domain)
        infos.append(api_pb2.HParamInfo(name=key, type=kind, domain_discrete=listed,
                                        differs=len(domain) > 1))
    return api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=f"{METRIC_GROUP}/{k}"), display_name=k)
        for k in HPARAM_METRICS])


# A run's status as an HParams session status (TensorBoard has no "stopped": an interrupted
# run, which may be resumed, is unknown).
SESSION_STATUS = {"completed": "STATUS_SUCCESS", "diverged": "STATUS_SUCCESS",
                  "failed": "STATUS_FAILURE"}


def hparams_summaries(values: Mapping[str, Any], grid: Mapping[str, Sequence[str]],
                      status: str) -> list[Any]:
    """The experiment, session-start and session-end summaries of one run."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    described = experiment(values, grid)
    start = plugin_data_pb2.SessionStartInfo()
    for info in described.hparam_infos:  # each value as the type the experiment gives it
        value = values[info.name]
        if info.type == api_pb2.DATA_TYPE_BOOL:
            start.hparams[info.name].bool_value = value
        elif info.type == api_pb2.DATA_TYPE_FLOAT64:
            start.hparams[info.name].number_value = value
        else:
            start.hparams[info.name].string_value = str(value)
    end = plugin_data_pb2.SessionEndInfo(
        status=api_pb2.Status.Value(SESSION_STATUS.get(status, "STATUS_UNKNOWN")))
    out = []
    for tag, data in ((metadata.EXPERIMENT_TAG, {"experiment": described}),
                      (metadata.SESSION_START_INFO_TAG, {"session_start_info": start}),
                      (metadata.SESSION_END_INFO_TAG, {"session_end_info": end})):
        content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION,
                                                    **data)
        out.append(Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                   content=content.SerializeToString())))]))
    return out


def hparam_metrics(summary_metrics: Mapping[str, Any]) -> dict[str, float]:
    """The HPARAM_METRICS values a run has (numbers and flags as 0/1)."""
    values = dict(summary_metrics)
    values["reached_target"] = values.get("steps_to_target") is not None
    return {k: float(values[k]) for k in HPARAM_METRICS
            if isinstance(values.get(k), (int, float))}


def load_checkpoint(path: Path) -> dict:
    """A checkpoint from its file or from a run directory (its final checkpoint)."""
    import torch

    path = Path(path)
    file = path
    if path.is_dir():  # the final checkpoint, else the last one of an unfinished run
        file = path / CHECKPOINTS / FINAL_CHECKPOINT
        if not file.is_file():
            file = last_checkpoint(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is neither a checkpoint file nor a run directory with "
            f"{CHECKPOINTS}/{FINAL_CHECKPOINT} (runs with trainer.checkpoint=false keep none)."
        )
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise FileNotFoundError(f"{file} could not be read as a checkpoint: {exc}") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise FileNotFoundError(f"{file} is not a bnexp checkpoint (no model or config).")
    return ckpt


# ----------------------------------------------------------------------------- CRC-32C
# TensorBoard frames every event with CRC-32C checksums that its writer computes in pure Python,
# a byte at a time, on a background thread that holds the GIL meanwhile: while it checksums a
# histogram event, every torch op on the training thread waits up to Python's switch interval to
# get the GIL back. The same checksum in numpy, a 256-byte block at a time (the CRC is linear
# over GF(2)), is an order of magnitude faster (docs/performance.md, measured choices).

_CRC_POLY, _CRC_BLOCK = 0x82F63B78, 256
_crc_tables: tuple | None = None


def _crc_build() -> tuple:
    import numpy as np

    def zero_byte(v: np.ndarray) -> np.ndarray:  # one zero byte through the register
        return byte[v & 0xFF] ^ (v >> 8)

    byte = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        byte = np.where(byte & 1, (byte >> 1) ^ np.uint32(_CRC_POLY), byte >> 1)
    byte = byte.astype(np.uint32)
    # at[k][b]: the register at the end of a block whose only non-zero byte is b at offset k
    at = [byte]
    for _ in range(_CRC_BLOCK - 1):
        at.append(zero_byte(at[-1]))
    at = np.stack(at[::-1])
    # A register s carried through a block of zeros equals a block that starts with the bytes
    # of s (little-endian) from a zero register: at[0..3] carry it.
    carry = [at[j].tolist() for j in range(4)]
    return byte.tolist(), at, np.arange(_CRC_BLOCK)[None, :], carry


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of data, as TFRecord framing uses it."""
    global _crc_tables
    import numpy as np

    if _crc_tables is None:
        _crc_tables = _crc_build()
    byte, at, offsets, carry = _crc_tables
    if len(data) < _CRC_BLOCK:  # a plain table loop is as fast for short records
        crc = 0xFFFFFFFF
        for b in data:
            crc = byte[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    # The initial register 0xFFFFFFFF is the same as XOR-ing the first 4 bytes with it and
    # starting from 0; from 0, leading zero bytes change nothing, so pad to whole blocks.
    buf = np.zeros(-len(data) % _CRC_BLOCK + len(data), dtype=np.uint8)
    buf[len(buf) - len(data):] = np.frombuffer(data, dtype=np.uint8)
    buf[len(buf) - len(data):][:4] ^= np.uint8(0xFF)
    blocks = np.bitwise_xor.reduce(at[offsets, buf.reshape(-1, _CRC_BLOCK)], axis=1).tolist()
    c0, c1, c2, c3 = carry
    crc = 0
    for r in blocks:
        crc = c0[crc & 0xFF] ^ c1[(crc >> 8) & 0xFF] ^ c2[(crc >> 16) & 0xFF] ^ c3[crc >> 24] ^ r
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _quiet_writer_errors() -> None:
    """TensorBoard's writer thread re-raises a write error (a full disk) after storing it, and
    Python prints that as a traceback; the run's own thread raises the same error at its
    next write and records the run as failed in one paragraph, so the thread stays silent."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "bnexp", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(
                args.exc_value, OSError):
            return
        previous(args)

    hook.bnexp = True  # type: ignore[attr-defined]
    threading.excepthook = hook


EVENT_PREFIX = "events.out.tfevents."


def _sort_after_earlier_files(run_dir: Path, max_wait: float = 5.0) -> None:
    """TensorBoard reads a run's event files in name order, and a name begins with the second
    it was created, then the host and the PID. A resumed run whose file is created in the same
    second as the killed run's can sort first; TensorBoard then reads the old events last and
    takes them for a restart, dropping the new ones (a resume 0.4 s after a kill showed steps
    0..K instead of 0..1000). Waiting for the next second orders the files (skew beyond
    max_wait, from another host's clock, is left as it is)."""
    seconds = []
    for path in run_dir.glob(EVENT_PREFIX + "*"):
        stamp = path.name[len(EVENT_PREFIX):].split(".", 1)[0]
        if stamp.isdigit():
            seconds.append(int(stamp))
    if seconds:
        wait = max(seconds) + 1 - time.time()
        if 0 < wait <= max_wait:
            time.sleep(wait)


class Events:
    """TensorBoard event writer for one run, writing into the run directory itself so that
    `tensorboard --logdir outputs` lists each run under its own readable name."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        from tensorboard.summary.writer import record_writer
        from torch.utils.tensorboard import SummaryWriter

        _quiet_writer_errors()

        crc32c(b"")  # its tables, built here rather than on the writer's thread
        record_writer.masked_crc32c = masked_crc32c  # the writer's checksum (see crc32c)
        # purge_step: a resumed run tells TensorBoard to drop what an earlier process logged
        # from that step on, so no step appears twice.
        if purge_step is not None:
            _sort_after_earlier_files(run_dir)
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(run_dir), flush_secs=30, purge_step=purge_step)
        self.writer.add_custom_scalars(LAYOUT)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """All of a step's values in one event (TensorBoard reads every tag of it):
        add_scalar builds and queues an event per value, ~0.13 ms each here."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.writer.file_writer.add_summary(Summary(value=[
            Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()]), step)

    def histograms(self, step: int, tensors: Mapping[str, Any]) -> None:
        """64-bin histograms, binned by torch (add_histogram's numpy path cost ~1 ms per
        tensor here); of a fixed random subset of 65,536 values for larger tensors, such as a
        conv layer's activation inputs (metrics.sample)."""
        import torch
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        from bnexp.metrics import sample

        found = []  # one event for all of them, as for scalars
        for tag, tensor in tensors.items():
            x = sample(tensor).double().cpu()
            lo, hi = (x.min().item(), x.max().item()) if x.numel() else (0.0, 0.0)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                continue  # TensorBoard rejects NaN bins; the NaN shows in the scalars
            counts, edges = torch.histogram(x, bins=64, range=(lo, hi if hi > lo else lo + 1))
            found.append(Summary.Value(tag=tag, histo=HistogramProto(
                min=lo, max=hi, num=x.numel(), sum=x.sum().item(), sum_squares=x.dot(x).item(),
                bucket_limit=edges[1:].tolist(), bucket=counts.tolist())))
        if found:
            self.writer.file_writer.add_summary(Summary(value=found), step)

    def hparams(self, step: int, config: dict, metrics: Mapping[str, Any],
                status: str = "completed") -> None:
        """One HParams session in this run's own event file (SummaryWriter.add_hparams would
        make a timestamped sub-run instead), described as part of its sweep
        (sweep_grid), plus the metric values as METRIC_GROUP scalars."""
        grid = sweep_grid(self.run_dir)
        for summary in hparams_summaries(hparam_values(config, extra=list(grid)), grid,
                                         status):
            self.writer.file_writer.add_summary(summary)
        self.scalars(step, {f"{METRIC_GROUP}/{k}": v
                           for k, v in hparam_metrics(metrics).items()})

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
