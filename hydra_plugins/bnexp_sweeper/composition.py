"""Job configs composed once per set of config-group choices.

Hydra composes every sweep job from the YAML files again (`load_sweep_config`, ~0.2 s a job: a
large share of a short job). Jobs of a sweep usually differ only in plain values (`optim.lr=`,
`seed=`), so `ComposeOnce` composes with Hydra once per set of group choices and applies the
plain values as Hydra applies them after composing, then fills in the parts of Hydra's node
that depend on the overrides (their lists and `override_dirname`). Anything else (`+key`,
`~key`, hydra settings beyond the output directories) is composed by Hydra itself. The sweeper
hands it to every launcher, so the basic, joblib, submitit and vectorized launchers all use it.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it
# is in sys.modules.

import copy
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf, open_dict

# Hydra settings a sweep sets per job that do not change what is composed.
PLAIN_HYDRA_KEYS = ("hydra.sweep.dir", "hydra.sweep.subdir", "hydra.run.dir")


class ComposeOnce:
    """A ConfigLoader whose load_sweep_config reuses compositions; the rest is delegated."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.bases: dict = {}

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "bases"):  # not set yet (while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _plain(self, o: Override) -> bool:
        if o.type != OverrideType.CHANGE or o.package is not None or o.is_sweep_override():
            return False
        if o.is_hydra_override():
            return o.key_or_group in PLAIN_HYDRA_KEYS
        return not self.loader.repository.group_exists(o.key_or_group.replace(".", "/"))

    def _base(self, master_config: DictConfig, ours: list) -> tuple | None:
        """(the composition for the overrides' group choices, their plain overrides), or None
        when Hydra must compose these overrides itself."""
        choices = [o for o in ours if o.type == OverrideType.CHANGE and not self._plain(o)]
        plain = [o for o in ours if self._plain(o)]
        if len(choices) + len(plain) < len(ours) or any(
                o.is_hydra_override() for o in choices):
            return None
        key = tuple(o.input_line for o in choices)
        if key not in self.bases:
            self.bases[key] = self.loader.load_sweep_config(master_config, list(key))
        return self.bases[key], plain

    def load_sweep_config(self, master_config: DictConfig,
                          sweep_overrides: list[str]) -> DictConfig:
        parser = OverridesParser.create(config_loader=self.loader)
        master = list(OmegaConf.to_container(master_config.hydra.overrides.hydra))
        ours = parser.parse_overrides(list(sweep_overrides))
        found = self._base(master_config, ours)
        if found is None:
            return self.loader.load_sweep_config(master_config, list(sweep_overrides))
        base, plain = found
        cfg = copy.deepcopy(base)
        ConfigLoaderImpl._apply_overrides_to_config(plain, cfg)
        everything = parser.parse_overrides(master) + ours
        app = [o for o in everything if not o.is_hydra_override()]
        cfg.hydra.overrides.hydra = [o.input_line for o in everything if o.is_hydra_override()]
        cfg.hydra.overrides.task = [o.input_line for o in app]
        dirname = cfg.hydra.job.config.override_dirname
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=app, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep,
            exclude_keys=dirname.exclude_keys)
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
        return cfg

    def load_task_config(self, master_config: DictConfig,
                         sweep_overrides: list[str]) -> DictConfig:
        """The job's config without Hydra's node, for planning: its values are those of
        load_sweep_config's, and Hydra's node (two thirds of the copying) is not copied."""
        parser = OverridesParser.create(config_loader=self.loader)
        found = self._base(master_config, parser.parse_overrides(list(sweep_overrides)))
        if found is None:
            cfg = self.load_sweep_config(master_config, list(sweep_overrides))
            with open_dict(cfg):
                del cfg["hydra"]
            return cfg
        base, plain = found
        cfg = OmegaConf.masked_copy(base, [k for k in base if k != "hydra"])
        OmegaConf.set_struct(cfg, OmegaConf.is_struct(base))
        ConfigLoaderImpl._apply_overrides_to_config(
            [o for o in plain if not o.is_hydra_override()], cfg)
        return cfg
