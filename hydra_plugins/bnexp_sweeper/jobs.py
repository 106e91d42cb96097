"""One sweep job run as Hydra's `run_job` runs it, at a third of the cost, and the `bnexp_basic`
launcher that runs a sweep's jobs one after the other through it.

Hydra's `run_job` copies a job's config four times (two masked copies of its Hydra node for
`HydraConfig`, a deep copy of the whole config to drop that node, a deep copy of the node for
the job's return) and renders `.hydra/*.yaml` with PyYAML's pure-Python emitter: ~22 ms a job
on this machine, a visible share of a short sweep job (docs/performance.md, issue 17). Here
HydraConfig and the job's return share the job's own Hydra node, the task config is copied
without it, and the same YAML is emitted by libyaml when PyYAML has it. What a job sees and
leaves behind is the same: its directory, the three `.hydra` files byte for byte,
`HydraConfig`, logging, `env_set`, callbacks, chdir (tests/test_sweep.py compares them with
Hydra's own run_job).
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it
# is in sys.modules, where dataclasses cannot resolve string annotations.

import contextlib
import copy
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    _flush_loggers,
    configure_log,
    env_override,
    filter_overrides,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf._utils import OmegaConfDumper

log = logging.getLogger(__name__)


class _Dumper(getattr(yaml, "CDumper", yaml.Dumper)):  # type: ignore[misc]
    """OmegaConf's YAML dumper (its one addition: strings that read as numbers or booleans
    are quoted) on libyaml's emitter."""


_Dumper.add_representer(str, OmegaConfDumper.str_representer)


def to_yaml(cfg: Any) -> str:
    """OmegaConf.to_yaml(cfg), the same text."""
    return yaml.dump(OmegaConf.to_container(cfg, enum_to_str=True), default_flow_style=False,
                     allow_unicode=True, sort_keys=False, Dumper=_Dumper)


def without_hydra(config: DictConfig) -> DictConfig:
    """copy.deepcopy(config) less its `hydra` key, without copying that node first."""
    content = config.__dict__["_content"]
    hydra = content.pop("hydra")
    try:
        return copy.deepcopy(config)
    finally:
        content["hydra"] = hydra


def hydra_view(config: DictConfig) -> DictConfig:
    """What HydraConfig.set_config(config) stores, without copying Hydra's node: a container
    holding the job's own node (made read-only, its parent still the job's config, as there).
    set_config's masked copy of the node cost ~3.5 ms a job here; a job's config is composed
    for that job alone, so nothing else changes the node it shares."""
    OmegaConf.set_readonly(config.hydra, True)
    view = DictConfig({})
    view.__dict__["_content"]["hydra"] = config._get_node("hydra")
    return view


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


def run_job(task_function: Any, config: DictConfig, hydra_context: Any,
            job_dir_key: str = "hydra.sweep.dir",
            job_subdir_key: str | None = "hydra.sweep.subdir",
            configure_logging: bool = True) -> JobReturn:
    """hydra.core.utils.run_job with fewer copies; `config` is the job's own (it is changed).
    configure_logging: as Hydra's single run passes it (lean_main puts this in its place)."""
    callbacks = hydra_context.callbacks
    old_cwd = os.getcwd()
    hydra_config = HydraConfig.instance()
    orig_hydra_cfg = hydra_config.cfg
    hydra_config.cfg = hydra_view(config)  # the directory keys may read ${hydra:...}
    output_dir = str(OmegaConf.select(config, job_dir_key))
    if job_subdir_key is not None:
        output_dir = os.path.join(output_dir, str(OmegaConf.select(config, job_subdir_key)))
    output_dir = os.path.abspath(output_dir)
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = output_dir
    chdir = False
    try:
        ret = JobReturn()
        task_cfg = without_hydra(config)
        ret.cfg = task_cfg
        ret.hydra_cfg = hydra_config.cfg  # replaced, not changed, by the next set_config
        ret.overrides = OmegaConf.to_container(config.hydra.overrides.task)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # bnexp's config says chdir: false; a None would mean false too (version_base 1.3).
        chdir = bool(config.hydra.job.chdir)
        if chdir:
            os.chdir(output_dir)
        ret.working_dir = os.getcwd()
        if configure_logging:
            configure_log(config.hydra.job_logging, config.hydra.verbose)
        if config.hydra.output_subdir is not None:
            out = Path(output_dir) / str(config.hydra.output_subdir)
            out.mkdir(parents=True, exist_ok=True)
            _write(out / "config.yaml", to_yaml(task_cfg))
            _write(out / "hydra.yaml", to_yaml(hydra_config.cfg))
            _write(out / "overrides.yaml", to_yaml(config.hydra.overrides.task))
        with env_override(config.hydra.job.env_set):
            callbacks.on_job_start(config=config, task_function=task_function)
            try:
                ret.return_value = task_function(task_cfg)
                ret.status = JobStatus.COMPLETED
            except Exception as e:  # as Hydra: the job failed, the sweep goes on
                ret.return_value = e
                ret.status = JobStatus.FAILED
        ret.task_name = JobRuntime.instance().get("name")
        _flush_loggers()
        callbacks.on_job_end(config=config, job_return=ret)
        return ret
    finally:
        hydra_config.cfg = orig_hydra_cfg
        if chdir:
            os.chdir(old_cwd)


@contextlib.contextmanager
def lean_main(argv: Sequence[str]) -> Iterator[None]:
    """Hydra's main, as bnexp runs it: its single run (`bnexp train`) through run_job above,
    and without the composition Hydra makes only to read `hydra.mode` before composing the
    config again to run it (~60 ms a command here). bnexp's configs never set hydra.mode
    (tests/test_sweep.py holds it), so that read gives None, and Hydra then takes the mode
    from -m as it does now; a command that sets hydra.mode itself keeps Hydra's read."""
    from hydra._internal import hydra as internal

    saved = internal.run_job, internal.Hydra.get_mode
    internal.run_job = run_job
    if not any(a.lstrip("+~").startswith("hydra.mode") for a in argv):
        internal.Hydra.get_mode = lambda self, config_name, overrides: None
    try:
        yield
    finally:
        internal.run_job, internal.Hydra.get_mode = saved


def job_config(launcher: Any, overrides: Sequence[str], idx: int) -> DictConfig:
    """A job's config as Hydra's launchers compose it, numbered."""
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config,
                                                                 list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = idx
        cfg.hydra.job.num = idx
    return cfg


@dataclass
class SequentialLauncherConf:
    _target_: str = "hydra_plugins.bnexp_sweeper.jobs.SequentialLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="bnexp_basic",
                             node=SequentialLauncherConf, provider="bnexp")


class SequentialLauncher(Launcher):
    """Hydra's basic launcher (jobs one after the other in this process) on the run_job above:
    the launcher of `bnexp sweep` and `bnexp reproduce` unless another is chosen."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: Any = None
        self.task_function: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        runs = []
        for i, overrides in enumerate(job_overrides):
            log.debug("#%d : %s", initial_job_idx + i, " ".join(filter_overrides(overrides)))
            runs.append(run_job(self.task_function,
                                job_config(self, overrides, initial_job_idx + i),
                                self.hydra_context))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs

