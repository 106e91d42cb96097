"""What Hydra runs: `bnexp train` and every sweep job, alone or as a stack.

A `Task` is the one entry from Hydra. It takes the run directory (a lock: never two processes in
one run), validates, trains through bnexp.loop, and turns the outcome into an exit code, the one
place where statuses become exit codes. Bad input leaves nothing behind; a stop signal during
set-up leaves the directory as it was; a failure is recorded in the run's summary.json.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from bnexp import data, interrupt, loop, record
from bnexp.config import ConfigError, config_hash, resolved, validate

log = logging.getLogger("bnexp")

STATUSES = ("running", "completed", "diverged", "failed", "interrupted")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def exit_code(summary: dict | None) -> int:
    """A run's exit code from its summary: 0 completed or diverged (divergence is a result),
    1 failed, 130 / 143 interrupted by SIGINT / SIGTERM."""
    if summary is None:
        return EXIT_FAILED
    status = summary["status"]
    if status == "interrupted":
        return 143 if summary.get("notes", {}).get("interrupted_by") == "SIGTERM" else 130
    return {"completed": EXIT_OK, "diverged": EXIT_OK}.get(status, EXIT_FAILED)


@dataclass
class Result:
    run_dir: Path
    summary: dict | None  # None: the run never trained (bad input, set-up failed, stopped)
    code: int


@dataclass
class Task:
    """Hydra's task function (picklable, for launchers that run jobs elsewhere). results:
    what finished in this process, for the CLI to report."""

    results: list[Result] = field(default_factory=list)

    def __call__(self, cfg: DictConfig) -> int:
        with interrupt.handled():  # in a launcher's worker too: signals only recorded
            try:
                return self._job(cfg)
            except SystemExit as exc:  # stopped: the sweep must not go on to its next job,
                return self._worker_stopped(int(exc.code))  # but a pool reads exits as crashes

    def _job(self, cfg: DictConfig) -> int:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        if interrupt.requested():  # a Ctrl-C that start-up swallowed (see bnexp.interrupt)
            if not cfg.resume:
                remove_hydra_files(run_dir)
            self.results.append(Result(run_dir, None, interrupt.exit_code()))
            raise SystemExit(interrupt.exit_code())
        before = StartSnapshot.take(run_dir)
        if cfg.device == "auto" and hc.mode.name == "MULTIRUN" and \
                torch.cuda.device_count() > 1:
            cfg.device = f"cuda:{hc.job.num % torch.cuda.device_count()}"  # jobs over GPUs
        held = record.hold(run_dir)
        if held is None:  # two `bnexp resume` of one run, or a job an orphan still trains
            print(f"bnexp: error: {run_dir} is in use: a bnexp process "
                  f"({record.holder(run_dir)}) is training there now. Nothing was changed; "
                  "wait for it to end or stop it, then run the command again.",
                  file=sys.stderr)
            self.results.append(Result(run_dir, None, EXIT_BAD_INPUT))
            return EXIT_BAD_INPUT
        with held:
            watch_the_sweep()
            sweep_job = hc.mode.name == "MULTIRUN"
            [code] = self._train([cfg], [run_dir], [before], sweep_job)
            return code

    def group(self, cfgs: Sequence[DictConfig], run_dirs: Sequence[Path]) -> list[int]:
        """The task for a stack of sweep jobs (the bnexp_vectorized launcher): trains them as
        one, logs into every job's train.log, and returns their exit codes."""
        handlers = [logging.FileHandler(Path(d) / "train.log") for d in run_dirs]
        for h in handlers:
            h.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
            log.addHandler(h)
        try:
            with interrupt.handled():
                try:
                    return self._group(cfgs, run_dirs)
                except SystemExit as exc:  # as in __call__
                    return [self._worker_stopped(int(exc.code))] * len(cfgs)
        finally:
            for h in handlers:
                log.removeHandler(h)
                h.close()

    @staticmethod
    def _worker_stopped(code: int) -> int:
        """A stop in a pool's worker returns its code (the sweep stops by its own signal); an
        orphan, whose sweep is gone, ends its process so that it waits for no next job."""
        if interrupt.orphaned():
            logging.shutdown()
            os._exit(code)
        if interrupt.in_worker():
            return code
        raise SystemExit(code)

    def _group(self, cfgs: Sequence[DictConfig], run_dirs: Sequence[Path]) -> list[int]:
        if interrupt.requested():
            raise SystemExit(interrupt.exit_code())
        before = [StartSnapshot.take(Path(d)) for d in run_dirs]
        with contextlib.ExitStack() as scope:
            held = [record.hold(Path(d)) for d in run_dirs]
            for f in held:
                if f is not None:
                    scope.enter_context(f)
            busy = [str(d) for d, f in zip(run_dirs, held) if f is None]
            if busy:
                print(f"bnexp: error: {', '.join(busy)}: in use by another bnexp "
                      "process; nothing was changed there. Wait for it to end, then "
                      "rerun.", file=sys.stderr)
                return [EXIT_BAD_INPUT] * len(cfgs)
            return self._train(list(cfgs), [Path(d) for d in run_dirs], before, True)

    def _train(self, cfgs: list[DictConfig], run_dirs: list[Path],
               before: list[StartSnapshot], sweep_job: bool) -> list[int]:
        """Validate and train a group whose directories this process holds; exit codes."""
        try:
            try:
                for cfg in cfgs:
                    validate(cfg)
                summaries = loop.train(cfgs, run_dirs)
            except Exception as exc:
                # A Ctrl-C that a library turned into an error, during set-up (an error in
                # the finish of runs that trained is reported as itself: see loop.train).
                if interrupt.requested() and not getattr(exc, "bnexp_after_training", False):
                    raise KeyboardInterrupt from None
                raise
        except KeyboardInterrupt:  # during set-up: no run started
            with interrupt.deferred():
                for snapshot, cfg in zip(before, cfgs):
                    snapshot.restore(bool(cfg.resume))
            for run_dir in run_dirs:
                self.results.append(Result(run_dir, None, interrupt.exit_code()))
            raise SystemExit(interrupt.exit_code()) from None
        except (ConfigError, data.DataError) as exc:
            print(f"bnexp: error: {exc}", file=sys.stderr)
            if sweep_job:  # leave a record of why the job failed
                for cfg, run_dir in zip(cfgs, run_dirs):
                    record_failure(cfg, run_dir, str(exc))
                return self._codes(run_dirs, EXIT_FAILED)
            if not cfgs[0].resume:  # never touch the files of a run being resumed
                remove_hydra_files(run_dirs[0])
            return self._codes(run_dirs, EXIT_BAD_INPUT)
        except OSError as exc:  # the disk filled up, or the directory went away
            recorded = all(record_failure(cfg, d, f"{type(exc).__name__}: {exc}")
                           for cfg, d in zip(cfgs, run_dirs))
            where = run_dirs[0] if len(run_dirs) == 1 else run_dirs[0].parent
            again = ("run `bnexp resume " + str(where) + "`" if len(run_dirs) == 1 and
                     record.last_checkpoint(where).is_file()
                     else "rerun the command")
            print(f"bnexp: error: could not write the run's files in {where}: {exc}. If the "
                  f"disk is full, free space and {again} (a sweep reruns what is missing). "
                  "Results written earlier are intact: every file is written to a temporary "
                  "name first." + ("" if recorded else " (Its summary.json could not be "
                                   "updated either.)"), file=sys.stderr)
            return self._codes(run_dirs, EXIT_FAILED)
        except Exception as exc:  # set-up failed for a valid config (e.g. out of memory)
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            for cfg, run_dir in zip(cfgs, run_dirs):
                record_failure(cfg, run_dir, error)
            # One paragraph, to the console and (through Hydra's job logging) train.log.
            log.error("bnexp: error: the run failed while setting up: %s. Recorded as failed "
                      "in %s.", error, run_dirs[0] / record.SUMMARY)
            return self._codes(run_dirs, EXIT_FAILED)
        codes = []
        for run_dir, summary in zip(run_dirs, summaries):
            codes.append(exit_code(summary))
            self.results.append(Result(run_dir, summary, codes[-1]))
        stopped = [c for c in codes if c in (130, 143)]
        if stopped:
            if interrupt.orphaned():  # the sweep that launched this worker is gone
                logging.shutdown()
                os._exit(stopped[0])
            raise SystemExit(stopped[0])  # a sweep must not go on to its next job
        return codes

    def _codes(self, run_dirs: list[Path], code: int) -> list[int]:
        self.results.extend(Result(d, None, code) for d in run_dirs)
        return [code] * len(run_dirs)


def watch_the_sweep() -> None:
    """A sweep's worker process dies with the sweep that launched it (see bnexp.interrupt)."""
    parent = os.environ.get(interrupt.PARENT_VARIABLE, "")
    if parent.startswith(f"{socket.gethostname()}:"):
        interrupt.watch_parent(int(parent.rsplit(":", 1)[1]))


@dataclass
class StartSnapshot:
    """A run directory as it was when a task began, so that a stop signal during set-up can
    leave it as it was: nothing for a new run, the interrupted run it held for a resume."""

    run_dir: Path
    files: set[Path]
    summary: bytes | None

    @classmethod
    def take(cls, run_dir: Path) -> StartSnapshot:
        summary = run_dir / record.SUMMARY
        return cls(run_dir, set(run_dir.rglob("*")) if run_dir.is_dir() else set(),
                   summary.read_bytes() if summary.is_file() else None)

    def restore(self, resuming: bool) -> None:
        for path in sorted(self.run_dir.rglob("*"), reverse=True):  # children first
            if path not in self.files and path.name != "train.log":
                with contextlib.suppress(OSError):
                    path.rmdir() if path.is_dir() else path.unlink()
        if self.summary is not None:
            record.atomic_write_bytes(self.run_dir / record.SUMMARY, self.summary)
        elif not resuming:
            remove_hydra_files(self.run_dir)


def record_failure(cfg: DictConfig, run_dir: Path, error: str) -> bool:
    """Leave a `failed` summary with the error (never over a finished run's); False when it
    cannot be written (a full disk)."""
    try:
        previous = record.read_summary(run_dir).get("status")
    except (OSError, ValueError):
        previous = None
    if previous in record.FINISHED:
        return True
    try:
        record.write_summary(run_dir, "failed", resolved(cfg), {}, {}, error=error,
                             config_hash=config_hash(cfg))
    except OSError:
        return False
    return True


def remove_hydra_files(run_dir: Path) -> None:
    """Undo what Hydra wrote for a run that never started, so bad input leaves nothing."""
    import shutil

    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    (run_dir / "train.log").unlink(missing_ok=True)
    for d in (run_dir, *run_dir.parents):
        try:
            d.rmdir()  # only succeeds while empty
        except OSError:
            break

