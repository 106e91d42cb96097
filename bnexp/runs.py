"""Finding runs on disk and reading them back into flat rows (no torch here)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnexp.config import NOT_A_VARIANT
from bnexp.record import FINISHED, SUMMARY

# Keys whose recorded value follows another's when left to their default.
DERIVED = {"model.affine": "model.norm"}
# Keys that say what a run measured and wrote, not what it trained: runs that differ only in
# these (and in NOT_A_VARIANT) trained the same model from the same seed, bit for bit
# (tests/test_record.py::test_probes_change_nothing_about_training). A lone `bnexp train`
# records diagnostics=full, a sweep's job diagnostics=summary.
RECORDING = ("trainer.diagnostics", "trainer.diagnostics_every", "trainer.histogram_every",
             "trainer.probe_batch_size", "trainer.probe_every", "trainer.probe_step_sizes",
             "trainer.mode_batch_sizes", "trainer.checkpoint", "trainer.checkpoint_every")


@dataclass
class Run:
    path: Path
    status: str
    config: dict[str, Any]  # flat: {"optim.lr": 0.1, ...}
    metrics: dict[str, Any]
    notes: dict[str, str] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> (step, v)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, full + "."))
        else:
            out[full] = tuple(value) if isinstance(value, list) else value
    return out


def find(paths: list[Path]) -> list[Run]:
    """Every run (a directory with summary.json) under the given paths, sorted by path, each
    once however many of the paths hold it (`outputs outputs/sweeps`). An unreadable summary
    is skipped with a warning that names it; the rest are read."""
    found = []
    seen: set[Path] = set()
    for root in paths:
        root = Path(root)
        files = [root / SUMMARY] if (root / SUMMARY).is_file() else sorted(root.rglob(SUMMARY))
        for file in files:
            if file.resolve() in seen:
                continue
            seen.add(file.resolve())
            try:
                body = json.loads(file.read_text())
                if not isinstance(body, dict):
                    raise ValueError(f"a JSON {type(body).__name__}, not an object")
                run = Run(file.parent, body.get("status", "unknown"),
                          flatten(body.get("config") or {}), body.get("metrics") or {},
                          body.get("notes") or {},
                          {tag: [(int(s), v) for s, v in points]
                           for tag, points in (body.get("curves") or {}).items()})
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                print(f"bnexp: warning: skipped {file}: it cannot be read as a run summary "
                      f"({' '.join(str(exc).split())[:120]}).", file=sys.stderr)
                continue
            found.append(run)
    return sorted(found, key=lambda r: str(r.path))


def trained(run: Run) -> str:
    """What a run trained (its config less the keys that change no training), as text: two
    runs with the same text are one measurement, however many times it was made."""
    return json.dumps({k: v for k, v in run.config.items()
                       if k not in NOT_A_VARIANT and k not in RECORDING},
                      sort_keys=True, default=str)


def distinct(runs: list[Run]) -> tuple[list[Run], list[tuple[Run, Run]]]:
    """One run per measurement: a config and seed trained twice (a lone `bnexp train` beside
    the same job of a sweep, a repeated command) is one sample, not two seeds. The one kept: a
    finished one, then the one that measured most, then the newest summary. (the runs kept in
    their order, [(repeat, the run kept in its place)])."""
    def rank(run: Run) -> tuple:
        try:
            written = (run.path / SUMMARY).stat().st_mtime
        except OSError:
            written = 0.0
        return (run.status in FINISHED,
                sum(v is not None for v in run.metrics.values()), written)

    keys = [trained(run) for run in runs]
    kept: dict[str, Run] = {}
    for key, run in zip(keys, runs):
        if key not in kept or rank(run) > rank(kept[key]):
            kept[key] = run
    return ([r for k, r in zip(keys, runs) if kept[k] is r],
            [(r, kept[k]) for k, r in zip(keys, runs) if kept[k] is not r])


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between runs, in config order."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.config))
    out: list[str] = []
    for key in keys:
        if key in NOT_A_VARIANT or key in RECORDING:
            continue
        values = {repr(run.config.get(key)) for run in runs}
        cause = DERIVED.get(key)
        if len(values) > 1 and not (cause in out and _determines(runs, cause, key)):
            out.append(key)
    return out


def _determines(runs: list[Run], cause: str, effect: str) -> bool:
    """Whether `effect` is a function of `cause` over these runs (model.affine of model.norm
    when affine was left to its default): such a key adds a column but no information."""
    seen: dict[str, str] = {}
    for run in runs:
        c, e = repr(run.config.get(cause)), repr(run.config.get(effect))
        if seen.setdefault(c, e) != e:
            return False
    return True


def scalar_series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """One scalar tag of a run's TensorBoard events, as (step, value)."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # "No path found after ..."
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return []
    return [(e.step, e.value) for e in events.Scalars(tag)]
