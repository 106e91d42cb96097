"""The training loop: one loop for every kind of run. A lone run is a group of one.

`train` sets a group of runs up (bnexp.run), picks their step (bnexp.steps), runs `Loop.fit` and
finishes every run with its status. The loop owns the cadence (log windows, evaluation,
diagnostics, probes, checkpoints, stop signals, divergence) and the clock: it hands the step
runs of steps up to the next step with something to do, and between them the step needs
nothing from the host.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from bnexp import interrupt, record
from bnexp.device import choose_threads
from bnexp.run import Run, StepState
from bnexp.steps import GRAPH_STEPS, Eager, Stack, choose, groups, steps_to_event

log = logging.getLogger("bnexp")


class Loop:
    """The runs of one group and their step, trained together to their common budget."""

    def __init__(self, runs: Sequence[Run], steps: Eager | Stack):
        self.runs, self.steps = list(runs), steps
        self.live = [True] * len(runs)
        lead = runs[0]
        self.total, self.trainer = lead.total_steps, lead.trainer
        # A resumed run (trained alone: see steps.stackable) continues its open log window.
        self.window_steps = lead.checkpoint["window"][2] if lead.checkpoint else 0
        # A run of steps is at most one graph long (or as long, eagerly): the host's loop
        # costs little per run of steps, and stop signals are seen between them.
        self.longest = steps.graph_steps if isinstance(steps, Stack) and steps.capture \
            else GRAPH_STEPS
        self.off_clock = 0.0  # seconds of evaluation and probes inside the open window

    def live_runs(self) -> list[tuple[int, Run]]:
        return [(k, run) for k, run in enumerate(self.runs) if self.live[k]]

    def off(self, fn: Callable, *args: object) -> None:
        """fn's time is not training time."""
        start = time.perf_counter()
        fn(*args)
        self.off_clock += time.perf_counter() - start

    def state(self, k: int) -> StepState:
        """What run k's checkpoint needs from the step and the loop, as it is now."""
        s = self.steps
        return StepState(s.optimizer_state(k), s.loss_sum[k].detach().clone(),
                         s.correct[k].clone(), self.window_steps,
                         s.grad_norms[:, k].contiguous().clone())

    def evaluate(self) -> None:
        """Every live run's evaluation: a stack's in one batched pass, shared out."""
        live = self.live_runs()
        start = time.perf_counter()
        found = self.steps.evaluate([k for k, _ in live])
        seconds = time.perf_counter() - start  # each model's evaluation took this long
        for k, run in live:
            run.evaluate_and_log(None if found is None else (*found[k], seconds))

    def mode_comparisons(self, statuses: list[str]) -> dict[int, tuple[dict, dict]]:
        """The final train/eval-mode comparison of a stack's live models in one batched pass
        (the finish of each run takes its own); {} where each run compares itself."""
        ks = [k for k in range(len(self.runs)) if self.live[k] and statuses[k] == "completed"]
        if not isinstance(self.steps, Stack) or not ks:
            return {}
        lead = self.runs[ks[0]]
        # Each run's final evaluation measured its eval-mode accuracy already (as alone).
        finals = [run.final_eval_acc() for run in self.runs]
        known = all(finals[k] is not None for k in ks)
        return self.steps.mode_comparisons(
            ks, self.trainer.batch_size, 100 if lead.trainer.diagnostics != "off" else 0,
            [float("nan") if f is None else f for f in finals] if known else None)

    def fit(self, stop: interrupt.StopFlag) -> None:
        """Train to the step budget, or until every run diverged or a stop signal came."""
        trainer, s = self.trainer, self.steps
        if s.step == 0:
            for run in self.runs:
                run.diagnose()  # the step-0 baseline, before the first window opens
        window_start = time.perf_counter()
        while s.step < self.total and any(self.live):
            lead = next(run for _, run in self.live_runs())
            if lead.epoch_used_up():
                for _, run in self.live_runs():
                    run.new_epoch()  # each run draws its own order, as alone
                # A retired model's row repeats a live one's (its slot is zero and unused).
                s.set_order([run.perm if self.live[k] else lead.perm
                             for k, run in enumerate(self.runs)], 0)
            n = min(self.longest,
                    steps_to_event(s.step, self.total, trainer, lead.steps_per_epoch - lead.pos))
            s.steps(n)
            self.window_steps += n
            step = s.step
            for _, run in self.live_runs():
                run.step = step
                run.pos += n
            last = step == self.total
            if step % trainer.log_every == 0 or last:
                seconds = time.perf_counter() - window_start - self.off_clock
                for k, run in self.live_runs():
                    norms = s.grad_norms[step - self.window_steps : step, k]
                    if not run.log_window(s.loss_sum[k], s.correct[k], self.window_steps,
                                          seconds, norms, s.lr(k)):
                        run.evaluate_and_log()  # what a diverged net scores
                        s.retire(k)
                        self.live[k] = False
                s.loss_sum.zero_()
                s.correct.zero_()
                self.window_steps, self.off_clock = 0, 0.0
                window_start = time.perf_counter()
            if step % trainer.eval_every == 0 or last:
                self.off(self.evaluate)
                if len(self.runs) > 1:
                    best = max((run.history.val_acc[-1][1] for _, run in self.live_runs()
                                if run.history.val_acc), default=float("nan"))
                    log.info("bnexp: step %d/%d, %d of %d models training, best val_acc %.4f",
                             step, self.total, sum(self.live), len(self.runs), best)
            if trainer.diagnostics != "off" and (step % trainer.diagnostics_every == 0 or last):
                for k, _ in self.live_runs():
                    s.expose_grads(k)
            for _, run in self.live_runs():
                self.off(run.diagnose, last)
            if trainer.checkpoint_every and step % trainer.checkpoint_every == 0 and not last:
                for k, run in self.live_runs():
                    self.off(run.save, record.LAST_CHECKPOINT, self.state(k))
            if stop.signal:  # between runs of steps: the state is consistent here
                raise KeyboardInterrupt(stop.signal)


def train(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path],
          kind: str = "auto") -> list[dict]:
    """Train one group of runs (one run, or configs that share a stack: see steps.groups) and
    record each; their summaries, in order (also on failure). kind: see steps.choose."""
    threads = choose_threads(str(cfgs[0].trainer.threads), cfgs[0].model.name, len(cfgs))
    torch.set_num_threads(threads)
    runs: list[Run] = []
    for cfg, run_dir in zip(cfgs, run_dirs):
        interrupt.check()  # reading the data raises at once; the rest of set-up stops here
        runs.append(Run(cfg, run_dir, threads, shared=runs[0] if runs else None,
                        stacked=len(cfgs)))
    interrupt.check()
    if len(runs) > 1:
        log.info("bnexp: training %d models as one stack (vectorized), threads=%d",
                 len(runs), threads)
    loop, error, notes = None, None, {}
    try:
        loop = Loop(runs, choose(runs, kind))
        with contextlib.ExitStack() as scope, interrupt.deferred() as stop:
            if len(runs) == 1:  # a stack keeps one log line per evaluation instead
                scope.enter_context(runs[0].progress)
            loop.fit(stop)
        ended = "completed"
    except KeyboardInterrupt:  # a stop signal, seen between steps (see bnexp.interrupt)
        ended = "interrupted"
        notes["interrupted_by"] = interrupt.requested() or "SIGINT"
    except Exception as exc:  # recorded, then reported by the CLI with exit code 1
        ended, error = "failed", f"{type(exc).__name__}: {exc}"
        keep_traceback(list(run_dirs))
    summaries = []
    try:
        statuses = ["diverged" if run.history.diverged_at_step is not None else ended
                    for run in runs]
        modes = loop.mode_comparisons(statuses) if loop else {}
        for k, (run, status) in enumerate(zip(runs, statuses)):
            run.env["training_step"] = loop.steps.description if loop else "eager"
            # A finish that cannot write (a full disk) raises: the task's one paragraph says so.
            summaries.append(run.finish(status, loop.state(k) if loop else None,
                                        error if status == "failed" else None,
                                        notes if status == "interrupted" else {},
                                        modes.get(k)))
    except Exception as exc:
        # After a stop signal, the task takes an error for a stop during set-up and removes
        # what the run wrote; these runs trained, and their files must stay.
        exc.bnexp_after_training = True  # type: ignore[attr-defined]
        raise
    if error:
        log.error("bnexp: error: the run failed while training: %s. Recorded as failed in its "
                  "summary.json; the traceback is in its train.log.", " ".join(error.split()))
    return summaries


def train_all(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path]) -> list[dict]:
    """Train every config, stacking the ones that can share a stack; the summaries, in order."""
    summaries: list[dict | None] = [None] * len(cfgs)
    for members in groups(cfgs):
        found = train([cfgs[i] for i in members], [run_dirs[i] for i in members])
        for i, summary in zip(members, found):
            summaries[i] = summary
    return summaries


def keep_traceback(run_dirs: list[Path]) -> None:
    """The traceback of a failure while training goes to train.log only, for a bug report;
    the console gets one paragraph once the runs are recorded (see train)."""
    for run_dir in run_dirs:
        try:
            with open(Path(run_dir) / "train.log", "a") as f:
                f.write(traceback.format_exc())
        except OSError:
            pass  # a full disk: the console paragraph is what there is
