"""The `bnexp_vectorized` launcher: trains compatible sweep jobs as one stack of models
(bnexp.steps.Stack), each job keeping its own directory, .hydra files, events and summary.

Selected by `bnexp sweep --vectorize` (hydra/launcher=bnexp_vectorized). Jobs that cannot share a
stack (another architecture, batch size, dataset... or a job being resumed) run one by one as
Hydra's basic launcher would run them.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it
# is in sys.modules, where dataclasses cannot resolve string annotations.

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig

from hydra_plugins.bnexp_sweeper.jobs import job_config, run_job, without_hydra

log = logging.getLogger("bnexp")


@dataclass
class VectorizedLauncherConf:
    _target_: str = (
        "hydra_plugins.bnexp_sweeper.bnexp_vectorized_launcher.VectorizedLauncher")
    # At most this many models in one stack; larger groups are split.
    max_models: int = 64


ConfigStore.instance().store(group="hydra/launcher", name="bnexp_vectorized",
                             node=VectorizedLauncherConf, provider="bnexp")


def _collect(found: dict, i: int, cfg: DictConfig) -> int:
    """The task run for each job of a stack: note its config and directory, train nothing."""
    found[i] = (cfg, Path(HydraConfig.get().runtime.output_dir))
    return 0


class VectorizedLauncher(Launcher):
    def __init__(self, max_models: int = 64) -> None:
        self.max_models = max(1, int(max_models))
        self.config: DictConfig | None = None
        self.hydra_context: Any = None
        self.task_function: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _run_job(self, cfg: DictConfig, task: Any) -> JobReturn:
        ret = run_job(task, cfg, self.hydra_context)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from bnexp.steps import groups

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = [job_config(self, o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        # Grouping reads the task configs only: copies without Hydra's node (a copy of the
        # whole config cost ~4x as much).
        tasks = [without_hydra(cfg) for cfg in configs]
        returns: list[JobReturn | None] = [None] * len(configs)
        for members in groups(tasks):
            for start in range(0, len(members), self.max_models):
                chunk = members[start : start + self.max_models]
                if len(chunk) == 1:
                    returns[chunk[0]] = self._run_job(configs[chunk[0]], self.task_function)
                    continue
                # Let Hydra set up each job's directory and .hydra files as for any job, then
                # train the chunk as one stack.
                found: dict[int, tuple[DictConfig, Path]] = {}
                for i in chunk:
                    returns[i] = self._run_job(configs[i], partial(_collect, found, i))
                codes = self.task_function.group([found[i][0] for i in chunk],
                                                 [found[i][1] for i in chunk])
                for i, code in zip(chunk, codes):
                    returns[i].return_value = code
        return returns
