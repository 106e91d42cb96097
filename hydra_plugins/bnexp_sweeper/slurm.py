"""The `bnexp_slurm` launcher: a sweep's jobs as one SLURM job array through submitit, each job
followed on its own.

hydra-submitit-launcher submits the array and waits for every result at once: one dead job
raises out of the whole sweep while the others still run, and nothing is known of any job until
all have ended. Here the jobs are polled: each one that ends is reported to the sweeper at once
(its manifest line, `[k/N]`), a cancelled or killed one is recorded with SLURM's state and the
others go on, a job that stays pending for a reason SLURM will not resolve (no node of the
partition can ever run it) stops the sweep with one paragraph, and a stop signal cancels the
sweep's SLURM jobs, which end `interrupted` with their checkpoints. On the node, a timeout or
preemption signal (USR2) stops the run at its next step with a checkpoint, and the job is
requeued (submitit's checkpointing protocol) to resume from it, up to `max_num_timeout` times.

Resources left at "auto" are sized from the jobs: a GPU only when a job's device asks for one
(cuda, or auto on a partition that has GPUs), CPUs from trainer.threads or the model, memory
from the dataset; all capped at what one node of the partition has.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it
# is in sys.modules, where dataclasses cannot resolve string annotations.

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _Submitit

from bnexp.cluster import (
    ALIVE,
    IMPOSSIBLE,
    SlurmError,
    cancel,
    ended_state,
    partition_info,
    size,
    states,
)

log = logging.getLogger("bnexp")

@dataclass
class BnexpSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.bnexp_sweeper.slurm.SlurmLauncher"
    partition: Any = "${oc.env:BNEXP_SLURM_PARTITION,null}"  # null: the cluster's default
    timeout_min: int = 60
    gpus_per_node: Any = "auto"
    cpus_per_task: Any = "auto"
    mem_gb: Any = "auto"
    # A timed-out or preempted job is requeued from its checkpoint up to this many times.
    max_num_timeout: int = 3
    poll_s: float = 2.0  # how often the jobs' states are read
    # A job pending for an impossible reason this long stops the sweep (SLURM may take a
    # moment to settle a reason after submission).
    pending_grace_s: float = 10.0


ConfigStore.instance().store(group="hydra/launcher", name="bnexp_slurm", node=BnexpSlurmConf,
                             provider="bnexp")
OURS = ("poll_s", "pending_grace_s")  # our fields: not passed on to submitit


class SlurmLauncher(_Submitit):
    """Submitit's SLURM launcher with jobs followed one by one (see the module's docstring).
    The sweeper may set `submitted(index, job_id)` and `ended(index, JobReturn, slurm_state)`
    before each launch."""

    def __init__(self, **params: Any) -> None:
        mine = {k: params.pop(k) for k in OURS if k in params}
        super().__init__(**params)
        self.poll_s = float(mine.get("poll_s", 2.0))
        self.pending_grace_s = float(mine.get("pending_grace_s", 10.0))
        self._asked: dict = {}
        self.submitted: Callable[[int, str], None] | None = None
        self.ended: Callable[[int, JobReturn, str | None], None] | None = None

    # -------------------------------------------------------------- on the node

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int,
                 job_id: str, singleton_state: dict) -> JobReturn:
        """Run the job; a USR2 (SLURM's warning before the time limit, or a preemption) stops
        the run at its next step with a checkpoint, then submitit's handler requeues it."""
        from bnexp import interrupt

        usr = signal.SIGUSR2
        submitits = signal.getsignal(usr)
        caught: list[int] = []

        def note(signum: int, frame: Any) -> None:
            caught.append(signum)
            interrupt.STOP.signal = interrupt.STOP.signal or "SIGUSR2"

        signal.signal(usr, note)
        try:
            ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id,
                                   singleton_state)
        finally:
            signal.signal(usr, submitits)
        if caught and callable(submitits):
            submitits(usr, None)  # checkpoint() below, requeue, exit; or UncompletedJobError
        return ret

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        """The requeued job resumes from the checkpoint the stopped run left."""
        import submitit

        from bnexp import record

        run_dir = Path(str(self.config.hydra.sweep.dir)) / _subdir(sweep_overrides)
        again = [o for o in sweep_overrides if not o.startswith("resume=")]
        last = record.last_checkpoint(run_dir)
        if last.is_file() and (run_dir / record.SUMMARY).is_file():
            again.append(f"resume='{run_dir}'")
        return submitit.helpers.DelayedSubmission(self, again, *args, **kwargs)

    # -------------------------------------------------------------- on the submitting host

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from bnexp import interrupt

        setup_globals()
        loader = self.hydra_context.config_loader
        compose = getattr(loader, "load_task_config", loader.load_sweep_config)
        configs = [compose(self.config, list(o)) for o in job_overrides]
        part = partition_info(self.params.get("partition"))
        params = size(self.params, configs, part)
        params["partition"] = part["partition"]
        self._asked = params
        executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"),
                                         cluster="slurm",
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb",
                "nodes", "name", "stderr_to_stdout"}
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v
                                      for k, v in params.items()})
        log.info("bnexp sweep: submitting %d job(s) to SLURM partition %s (%s)",
                 len(job_overrides), part["partition"], ", ".join(
                     f"{k}={params[k]}" for k in ("cpus_per_task", "mem_gb", "gpus_per_node",
                                                  "timeout_min") if k in params))
        args = [(list(o), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{i}",
                 Singleton.get_state()) for i, o in enumerate(job_overrides)]
        try:
            jobs = executor.map_array(self, *zip(*args))
        except Exception as exc:  # sbatch refused: its own words
            message = " ".join(str(exc).split())
            if "partition" in message.lower():
                raise SlurmError(f"SLURM refused the jobs for hydra.launcher.partition="
                                 f"{part['partition']}: {message[-600:]}",
                                 key="hydra.launcher.partition") from None
            raise SlurmError(f"sbatch refused the sweep's jobs: {message[-600:]}") from None
        for i, job in enumerate(jobs):
            if self.submitted:
                self.submitted(i, job.job_id)
        return self._follow(jobs, interrupt)

    def _follow(self, jobs: list, interrupt: Any) -> list[JobReturn]:
        """Poll until every job has ended, reporting each as it ends."""
        returns: list[JobReturn | None] = [None] * len(jobs)
        waiting = dict(enumerate(jobs))
        impossible: dict[str, float] = {}
        cancelled = False
        while waiting:
            if interrupt.requested() and not cancelled:
                ids = [j.job_id for j in waiting.values()]
                log.info("bnexp sweep: stop signal: cancelling the sweep's %d SLURM job(s) "
                         "(scancel %s). Each running job stops at its next step and keeps "
                         "its checkpoint; rerun the same `bnexp sweep` to resume them.",
                         len(ids), " ".join(ids))
                try:
                    cancel(ids)
                except SlurmError as exc:
                    log.error("bnexp sweep: %s. The jobs may still run: scancel them by "
                              "hand.", exc)
                cancelled = True
            live = states([j.job_id for j in waiting.values()])
            for i, job in list(waiting.items()):
                state, reason = live.get(job.job_id, ("", ""))
                if state in ALIVE:
                    if state == "PENDING" and reason in IMPOSSIBLE:
                        first = impossible.setdefault(job.job_id, time.monotonic())
                        if time.monotonic() - first >= self.pending_grace_s:
                            self._give_up(waiting, job.job_id, reason)
                    continue
                if not job.done():  # not in squeue yet or any more; sacct decides
                    continue
                returns[i] = ret = self._result(job)
                clean = ret.status == JobStatus.COMPLETED and ret.return_value in (0, None)
                if self.ended:
                    self.ended(i, ret, None if clean else ended_state(job.job_id))
                del waiting[i]
            if waiting:
                time.sleep(self.poll_s)
        return returns

    @staticmethod
    def _result(job: Any) -> JobReturn:
        """The job's JobReturn; a job that ended without one (cancelled, killed, out of
        time) is a failed JobReturn carrying submitit's error."""
        try:
            return job.results()[0]
        except Exception as exc:  # UncompletedJobError, FailedJobError, a lost result
            ret = JobReturn()
            ret.status, ret.return_value = JobStatus.FAILED, exc
            return ret

    def _give_up(self, waiting: dict, job_id: str, reason: str) -> None:
        ids = [j.job_id for j in waiting.values()]
        with contextlib.suppress(SlurmError):  # the paragraph below says what to do
            cancel(ids)
        asked = ", ".join(f"{k}={self._asked.get(k)}" for k in
                          ("cpus_per_task", "mem_gb", "gpus_per_node", "timeout_min")
                          if self._asked.get(k) is not None)
        raise SlurmError(
            f"SLURM job {job_id} stays pending with reason {reason}: the partition can never "
            f"run it as asked ({asked or 'the launcher settings'}). The sweep's {len(ids)} "
            "waiting job(s) were cancelled. Ask for what one node has (sinfo -o '%P %c %m "
            "%G'), e.g. hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=2 "
            "hydra.launcher.gpus_per_node=0, or choose another hydra.launcher.partition.",
            key="hydra.launcher")


def _subdir(overrides: Sequence[str]) -> str:
    for o in overrides:
        if o.startswith("hydra.sweep.subdir="):
            return o.split("=", 1)[1].strip("'\"")
    raise ValueError("a bnexp sweep job always names its hydra.sweep.subdir")

