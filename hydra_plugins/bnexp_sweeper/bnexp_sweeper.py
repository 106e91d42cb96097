"""The `bnexp` sweeper: Hydra's basic grid sweeper plus validation, stable job names, resume by
config hash and a manifest. The logic lives in bnexp.sweep; this class wires it into Hydra."""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it
# is in sys.modules, where dataclasses cannot resolve string annotations.

import copy
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("bnexp")


@dataclass
class BnexpSweeperConf:
    _target_: str = "hydra_plugins.bnexp_sweeper.bnexp_sweeper.BnexpSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None
    dry_run: bool = False
    # Jobs whose directory holds a run of another config: move those runs aside (true) or
    # stop before launching anything (false). Never deleted either way.
    move_aside: bool = False


ConfigStore.instance().store(group="hydra/sweeper", name="bnexp", node=BnexpSweeperConf,
                             provider="bnexp")


class BnexpSweeper(Sweeper):
    # Not a BasicSweeper subclass: Hydra re-imports its core plugin modules while scanning,
    # and BasicSweeper's own super(BasicSweeper, self) call then names a different class.
    def __init__(self, max_batch_size: int | None = None, params: dict | None = None,
                 dry_run: bool = False, move_aside: bool = False) -> None:
        self.max_batch_size, self.params, self.dry_run = max_batch_size, params or {}, dry_run
        self.move_aside = move_aside
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from hydra.types import HydraContext

        from hydra_plugins.bnexp_sweeper.composition import ComposeOnce

        # Planning and every launcher compose the jobs' configs through one cache.
        self.hydra_context = HydraContext(config_loader=ComposeOnce(hydra_context.config_loader),
                                          callbacks=hydra_context.callbacks)
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=self.hydra_context, task_function=task_function, config=config)

    def _plan(self, arguments: list[str]) -> tuple[list[dict], list[str]]:
        from bnexp import sweep
        from bnexp.config import UNHASHED, ConfigError, validate

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
        _, swept = sweep.split_overrides(arguments)
        # A study's grid keys name its jobs even when the command narrows one to a single
        # value (`seed=1`), in the grid's own order: the same job keeps the same directory.
        grid = [k for k in self.params if k not in UNHASHED]
        swept = grid + [k for k in swept if k not in grid]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        plan, names = [], set()
        checked: set[str] = set()
        for overrides in (job for batch in batches for job in batch):
            cfg = self._task_config(list(overrides))
            name = sweep.job_name(overrides, swept)
            try:
                validate(cfg)
                if not self.dry_run:  # a dry run lists the plan, even without the data
                    self._preflight(cfg, checked)
            except ConfigError as exc:
                print(f"bnexp: error: job {name}: {exc}", file=sys.stderr)
                sys.exit(2)  # before anything was launched
            while name in names:  # identical swept values: keep directories apart
                name += "_"
            names.add(name)
            digest = sweep.config_hash(cfg)
            status = sweep.job_status(sweep_dir / name, digest)
            plan.append({"name": name, "overrides": list(overrides), "hash": digest,
                         "status": status})
            if status == "stale":
                from bnexp.config import resolved

                plan[-1]["differences"] = sweep.config_differences(sweep_dir / name,
                                                                   resolved(cfg))
        return plan, swept

    def _preflight(self, cfg: DictConfig, checked: set[str]) -> None:
        """What `bnexp train` checks before it starts, for every job: the dataset, the batch
        size, the device (here only for launchers that train on this machine; a cluster's
        nodes have their own). Each distinct set of those values is checked once."""
        from bnexp.config import ConfigError
        from bnexp.data import DataError

        local = type(self.launcher).__name__ in ("BasicLauncher", "SequentialLauncher",
                                                 "JoblibLauncher", "VectorizedLauncher")
        # The values as written (interpolations unresolved, as to_yaml gave them), in JSON:
        # 0.2 ms a job against to_yaml's 1-2 ms.
        key = json.dumps([OmegaConf.to_container(cfg.data), cfg.trainer.batch_size,
                          cfg.trainer.compile, cfg.device if local else None],
                         sort_keys=True, default=str)
        if key in checked:
            return
        from bnexp.run import preflight

        with open_dict(cfg):
            probe = copy.deepcopy(cfg)
            probe.resume = None
            if not local:
                probe.device, probe.trainer.compile = "cpu", "off"
        try:
            preflight(probe)
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        checked.add(key)

    def _refuse_or_move(self, plan: list[dict], sweep_dir: Path) -> None:
        """Jobs whose directory holds a run of another config: bnexp never deletes a result.
        Stop with one paragraph, or (move_aside) move those runs out of the way."""
        from bnexp import sweep

        stale = [job for job in plan if job["status"] == "stale"]
        if not stale:
            return
        if not self.move_aside:
            shown = "; ".join(f"{job['name']} ({', '.join(job['differences'])})"
                              for job in stale[:3])
            more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
            print(f"bnexp: error: {sweep_dir} already holds runs of a different config under "
                  f"the names this sweep would use: {shown}{more}. bnexp never deletes "
                  "results, so nothing was run. Give this sweep its own directory (bnexp "
                  "sweep --name NEW, or other overrides), or rerun with --move-aside to move "
                  f"the {len(stale)} old run(s) into {sweep_dir.name}.replaced-<time>/ beside "
                  "it.", file=sys.stderr)
            sys.exit(2)
        target = sweep.move_aside(sweep_dir, [job["name"] for job in stale])
        log.info("bnexp sweep: moved %d run(s) of another config to %s", len(stale), target)
        for job in stale:
            job["status"] = "pending"

    def _task_config(self, overrides: list[str]) -> DictConfig:
        """A job's task config (its values as Hydra composes them: see ComposeOnce)."""
        return self.hydra_context.config_loader.load_task_config(self.config, overrides)

    def sweep(self, arguments: list[str]) -> Any:
        from bnexp import interrupt, sweep

        # The command line wins over the config's grid (hydra.sweeper.params) key by key.
        given = {a.split("=", 1)[0].lstrip("+~") for a in arguments}
        arguments = [f"{k}={v}" for k, v in self.params.items() if k not in given] + list(
            arguments)
        plan, swept = self._plan(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        todo = [job for job in plan if job["status"] not in sweep.FINISHED]
        log.info("bnexp sweep: %d jobs in %s; %d to run, %d finished before (skipped)",
                 len(plan), sweep_dir, len(todo), len(plan) - len(todo))
        if self.dry_run:
            for job in plan:
                action = "skip" if job["status"] in sweep.FINISHED else "run "
                status = job["status"] if job["status"] != "stale" else (
                    "another config's run is there: " + ", ".join(job["differences"]))
                log.info("  %s  %-40s %s  (%s)", action, job["name"], " ".join(job["overrides"]),
                         status)
            return []
        self._refuse_or_move(plan, sweep_dir)
        # A worker process that outlives this one stops itself (see interrupt.watch_parent).
        os.environ[interrupt.PARENT_VARIABLE] = f"{socket.gethostname()}:{os.getpid()}"
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        manifest = sweep.new_manifest(sweep_dir, arguments, swept)
        for job in plan:
            manifest["jobs"][job["name"]] = {
                "overrides": job["overrides"], "config_hash": job["hash"],
                "status": job["status"] if job["status"] in sweep.FINISHED else "queued"}
        sweep.write_json_atomic(sweep_dir / sweep.MANIFEST, manifest)

        one_by_one = type(self.launcher).__name__ in ("BasicLauncher", "SequentialLauncher")
        size = self.max_batch_size or (1 if one_by_one else len(todo))
        returns, done = [], len(plan) - len(todo)
        for start in range(0, len(todo), max(size, 1)):
            if interrupt.requested():  # recorded while planning or by the last batch
                break
            chunk = []
            for job in todo[start : start + size]:
                # Another process resuming the same sweep may have run or taken this job;
                # the status is read again once claimed, since a claim is released only
                # after the job's summary is written.
                if not sweep.claim(sweep_dir, job["name"]):
                    done += 1
                    holder = sweep.claim_holder(sweep_dir, job["name"]) or ""
                    where = (f"SLURM job {holder.split()[1]} has it" if holder.startswith(
                        "slurm ") else "running in another process")
                    log.info("[%d/%d] %s: %s, skipped", done, len(plan), job["name"], where)
                elif sweep.job_status(sweep_dir / job["name"], job["hash"]) in sweep.FINISHED:
                    sweep.release(sweep_dir, job["name"])
                    done += 1
                    log.info("[%d/%d] %s: finished by another process", done, len(plan),
                             job["name"])
                else:
                    chunk.append(job)
            batch = []
            for job in chunk:
                run_dir = sweep_dir / job["name"]
                extra = [f"hydra.sweep.subdir='{job['name']}'"]
                if sweep.resumable(run_dir, job["hash"]):  # continue from its checkpoint
                    extra.append(f"resume='{run_dir}'")
                    log.info("%s: resuming from its last checkpoint", job["name"])
                else:
                    sweep.clear_run_dir(run_dir, job["hash"])
                batch.append([*job["overrides"], *extra])
            ended: set[str] = set()

            def end(job: dict, slurm_state: str | None = None, write: bool = True,
                    ended: set = ended) -> None:
                """A job ended: its status as its directory says (in the manifest at once
                when its launcher reports jobs one by one)."""
                nonlocal done
                status = sweep.job_status(sweep_dir / job["name"], job["hash"])
                if status == "pending":  # it never started: stopped with the sweep, or failed
                    status = "queued" if interrupt.requested() else "failed"
                entry = manifest["jobs"][job["name"]]
                entry["status"] = status
                if slurm_state:
                    entry["slurm_state"] = slurm_state
                ended.add(job["name"])
                sweep.release(sweep_dir, job["name"])
                done += 1
                log.info("[%d/%d] %s: %s%s", done, len(plan), job["name"], status,
                         f" (SLURM: {slurm_state})" if slurm_state else "")
                if write:
                    self._write_manifest(sweep_dir, manifest, plan)

            self._hear_each_job(chunk, end, sweep_dir, manifest)
            launched = False
            try:
                if batch:
                    returns.append(self.launcher.launch(batch, initial_job_idx=start))
                launched = True
            except Exception as exc:  # (a stop signal's KeyboardInterrupt passes through)
                from bnexp.cluster import SlurmError

                if isinstance(exc, SlurmError):  # one paragraph, and what ran is recorded
                    print(f"bnexp: error: {exc}", file=sys.stderr)
                    # A setting at fault is bad input (2); an unreachable cluster is 4.
                    raise SystemExit(2 if exc.key else sweep.EXIT_CLUSTER) from None
                if not interrupt.requested():
                    raise
                # The signal reached the workers too (a pool reports them as killed).
                raise SystemExit(interrupt.exit_code()) from None
            finally:
                for job in chunk:  # a SLURM job's claim stays while SLURM has the job
                    sweep.release(sweep_dir, job["name"], keep_slurm=True)
                if not launched:
                    # After the release: a job this process stopped reads "interrupted",
                    # not "running" as a job another process still holds would.
                    self._write_manifest(sweep_dir, manifest, plan)
            for job in chunk:
                if job["name"] not in ended:
                    end(job, write=False)
            self._write_manifest(sweep_dir, manifest, plan)
        if interrupt.requested():
            self._write_manifest(sweep_dir, manifest, plan)
            raise SystemExit(interrupt.exit_code())
        return returns

    def _hear_each_job(self, chunk: list[dict], end: Any, sweep_dir: Path,
                       manifest: dict) -> None:
        """Launchers that follow their jobs one by one (bnexp_slurm) report each job as it is
        submitted (its claim passes to the SLURM job) and as it ends."""
        from bnexp import sweep

        if not hasattr(self.launcher, "ended"):
            return

        def submitted(i: int, job_id: str) -> None:
            sweep.hand_over(sweep_dir, chunk[i]["name"], job_id)
            manifest["jobs"][chunk[i]["name"]]["slurm_job_id"] = job_id
            if i == len(chunk) - 1:  # all submitted: the manifest names their SLURM jobs
                sweep.write_json_atomic(sweep_dir / sweep.MANIFEST, manifest)

        self.launcher.submitted = submitted
        self.launcher.ended = lambda i, ret, state: end(chunk[i], state)

    @staticmethod
    def _write_manifest(sweep_dir: Path, manifest: dict, plan: list[dict]) -> None:
        """Statuses as the job directories say now (other processes may share the sweep)."""
        import time

        from bnexp import sweep

        for job in plan:
            status = sweep.job_status(sweep_dir / job["name"], job["hash"])
            if status not in ("pending", "stale"):
                manifest["jobs"][job["name"]]["status"] = (
                    "running" if status == "interrupted"
                    and (sweep_dir / sweep.CLAIMS / f"{job['name']}.claim").exists() else status)
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        sweep.write_json_atomic(sweep_dir / sweep.MANIFEST, manifest)
