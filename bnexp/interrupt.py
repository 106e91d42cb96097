"""Ctrl-C and SIGTERM: the first stop signal of a command, remembered for the whole process.

A signal normally raises KeyboardInterrupt wherever Python happens to be. Raised inside an
import it can be swallowed (OmegaConf's composition once let a 100-epoch run train to the end)
or land in a weakref callback of the import lock, which prints a traceback; raised inside C++
code that runs Python it leaves CPython's "unhandled Ctrl-C" flag set, so the process later
kills itself with SIGINT (exit -2) whatever bnexp returns. So while a command runs, a signal is
only recorded here, and the points that start or continue work (after composing, a task's
start, between training steps, before writing results) read the record and stop cleanly; a
second Ctrl-C cannot cut a summary in half. Only `immediate()` (reading or downloading a
dataset, which can take minutes and imports nothing) raises at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report


@dataclass
class StopFlag:
    signal: str | None = None


STOP = StopFlag()  # this process's record
_state = {"installed": 0, "immediate": 0}


def _handler(signum: int, frame: object) -> None:
    if STOP.signal is None:
        STOP.signal = signal.Signals(signum).name
        if os.environ.get(PARENT_VARIABLE) == _me():  # a sweep: its workers stop with it
            for pid in workers_of(os.getpid(), trackers=False):
                with contextlib.suppress(OSError):
                    os.kill(pid, signum)
    if _state["immediate"]:
        raise KeyboardInterrupt(STOP.signal)


def requested() -> str | None:
    """The stop signal received so far in this command ('SIGINT', 'SIGTERM'), or None."""
    return STOP.signal


def exit_code(name: str | None = None) -> int:
    return EXIT_CODES.get(name or STOP.signal or "SIGINT", 130)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handled() -> Iterator[StopFlag]:
    """Record stop signals for the duration of a command (a fresh record for each command
    run in this process), raising nothing; the previous handlers come back afterwards."""
    if not _main_thread() or _state["installed"]:
        yield STOP
        return
    STOP.signal = None
    with _blocked():  # no signal between installing one handler and the other
        previous = {s: signal.signal(s, _handler) for s in SIGNALS}
        _state["installed"] += 1
    try:
        yield STOP
    finally:
        with _blocked():
            _state["installed"] -= 1
            for s, h in previous.items():
                signal.signal(s, h)


@contextlib.contextmanager
def _blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for a moment; one that came meanwhile is delivered after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def deferred() -> Iterator[StopFlag]:
    """Inside, a stop signal only sets the flag, even within immediate(): the caller polls it
    where stopping is safe. Installs the handlers if no command did (a launcher's worker)."""
    with handled() if not _state["installed"] else contextlib.nullcontext(STOP):
        saved, _state["immediate"] = _state["immediate"], 0
        try:
            yield STOP
        finally:
            _state["immediate"] = saved


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """Inside (reading or downloading data: long, and no imports), a signal raises
    KeyboardInterrupt at once; one already recorded raises now."""
    check()
    _state["immediate"] += 1
    try:
        yield
    finally:
        _state["immediate"] -= 1


def check() -> None:
    """Raise KeyboardInterrupt if a stop signal was recorded: where work may stop cleanly."""
    if STOP.signal:
        raise KeyboardInterrupt(STOP.signal)


def ignore_further() -> None:
    """The process is ending after a stop signal: later ones (a second Ctrl-C while Python
    shuts down) are ignored rather than shown as a traceback from an exit handler."""
    if _main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


_orphaned = threading.Event()


def watch_parent(parent: int, every: float = 0.2) -> None:
    """In a launcher's worker process: if the parent (the sweep) dies, even by SIGKILL, stop
    as if SIGTERM had come, so that the run ends interrupted, with its checkpoint, and no
    orphan trains on while a rerun of the sweep takes the job."""
    if os.getppid() != parent:
        return

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                _orphaned.set()
                STOP.signal = STOP.signal or "SIGTERM"
            time.sleep(every)

    threading.Thread(target=watch, name="bnexp-parent-watch", daemon=True).start()


def orphaned() -> bool:
    return _orphaned.is_set()


PARENT_VARIABLE = "BNEXP_SWEEP_PARENT"  # host:pid of the sweep that launched a worker


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def in_worker() -> bool:
    """This process is a worker that a sweep launched (a pool's, or a cluster job)."""
    return os.environ.get(PARENT_VARIABLE, _me()) != _me()


def workers_of(parent: int, trackers: bool = True) -> list[int]:
    """Live processes that the sweep process `parent` launched on this host, found by the
    variable it passes them (Linux /proc; empty where there is none). trackers=False leaves
    out the pool's resource trackers, which clean up after the workers and must outlive them."""
    from pathlib import Path

    mark = f"{PARENT_VARIABLE}={socket.gethostname()}:{parent}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0") and (
                    trackers or b"resource_tracker" not in (proc / "cmdline").read_bytes()):
                found.append(int(proc.name))
        except OSError:
            continue
    return [p for p in found if p != parent]
