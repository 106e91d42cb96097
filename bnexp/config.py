"""Config schema, composition and validation.

The dataclasses below are the single source of truth for every key, its type and its default;
the YAML files under configs/ only pick group options and per-option values. Validation turns
every bad input into a `ConfigError` that names the key, the value and what is allowed.
This module never imports torch: the CLI uses it at start-up.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexp import catalog

if TYPE_CHECKING:  # omegaconf is imported where used: `bnexp --help` stays fast
    from omegaconf import DictConfig

GROUPS = ("data", "model", "optim", "trainer", "experiment")

DATASETS = tuple(catalog.DATASETS)
INPUTS = ("standardized", "unit", "raw", "mismatched")  # data.inputs, see data.Inputs
# A run keeps one float per step (its gradient-norm record): beyond this it cannot be held.
MAX_STEPS = 100_000_000
MODELS = catalog.NETWORKS
NORMS = catalog.NORMS
ACTIVATIONS = catalog.ACTIVATIONS
NORM_POSITIONS = catalog.NORM_POSITIONS
INITS = catalog.INITS
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = ("fp32", "bf16", "fp64")
COMPILE = ("off", "auto", "graph", "on")
PROGRESS = ("auto", "rich", "plain", "none")
VGG_DEPTHS = tuple(catalog.VGG_STAGES)


@dataclass
class DataConfig:
    name: str = "mnist5k"
    # Where torchvision datasets are downloaded once and read from.
    root: str = "${oc.env:BNEXP_DATA,data}"
    download: bool = True
    # What the model is fed: standardized (per-channel mean/std of the training split), unit
    # (pixels / 255), raw (pixels 0-255) or mismatched (standardized, then each feature scaled
    # by a fixed factor between 0.01 and 100): the input-normalization ablations.
    inputs: str = "standardized"
    # Random crop (padding 4) + horizontal flip, batched on the device.
    augment: bool = False
    # mnist5k only: held-out fraction of the stratified split, and the split's own seed, fixed
    # apart from the run seed so that runs with different seeds share one validation set.
    val_fraction: float = 0.2
    split_seed: int = 0
    # Optional seeded subset of the training set (None = all of it).
    train_size: int | None = None


@dataclass
class ModelConfig:
    """Architecture plus the ablation knobs every model shares (one definition, all models)."""

    name: str = "mlp"
    # mlp: hidden layers; cnn: conv stages; vgg: 11/13/16/19; resnet: 6n+2.
    depth: int = 3
    # mlp: hidden units; cnn/vgg/resnet: channels of the first stage.
    width: int = 100
    # batch, layer, group, instance (conv nets) or none: see bnexp/models.py norm_layer.
    norm: str = "batch"
    # The norm's learnable gamma/beta. None = on when there is a norm layer; true with
    # norm=none is an error.
    affine: bool | None = None
    activation: str = "relu"
    norm_position: str = "before_act"
    # momentum of BN's running statistics (BN only); eps of every norm.
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    # norm=group: groups per layer (a layer with fewer channels: one group per channel).
    norm_groups: int = catalog.NORM_GROUPS
    # default = PyTorch's init; normal = N(0, init_std^2) weights and zero biases, as in the paper.
    init: str = "default"
    init_std: float = 0.1


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    # Linear scaling rule: if set, the LR used is lr * batch_size / lr_reference_batch_size.
    lr_reference_batch_size: int | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    # step schedule: multiply the LR by gamma every step_size steps.
    step_size: int = 1000
    gamma: float = 0.1


@dataclass
class TrainerConfig:
    epochs: int = 5
    # If set, train for exactly this many steps (overrides epochs).
    steps: int | None = None
    batch_size: int = 64
    eval_every: int = 50
    # auto: 1000 on a GPU; on a CPU, batches whose largest activation is cache-sized (fastest
    # there: see bnexp/device.py). Results do not depend on it (eval mode).
    eval_batch_size: str = "auto"
    log_every: int = 10
    # fp32; bf16 = autocast (faster on GPUs, slower on CPUs without bf16 units: see
    # docs/performance.md); fp64 = parameters and inputs in double, for numerical checks.
    precision: str = "fp32"
    # How the training step runs. graph: whole runs of steps (forward, backward, update)
    # captured in CUDA graphs and replayed (GPU only); on: torch.compile of the forward (on a
    # GPU, inside the captured graph); off: eager. auto: graph on a GPU, eager on a CPU.
    compile: str = "auto"
    # "auto", "steady" or a positive integer. auto picks what measured fastest, from the
    # machine's load too; steady picks what auto picks on an idle machine, whatever the load,
    # so that a rerun repeats its numbers (bnexp/device.py).
    threads: str = "auto"
    deterministic: bool = False
    checkpoint: bool = True
    # Save checkpoints/last.pt every N steps (0 = only when interrupted), for `bnexp resume`.
    checkpoint_every: int = 500
    progress: str = "auto"
    # Convergence target for steps_to_target; None = the dataset's default (0.9 for mnist5k).
    target_acc: float | None = None
    # Divergence: a non-finite loss, or a loss above factor x chance loss for patience log points.
    divergence_factor: float = 1.5
    divergence_patience: int = 3
    # A loss spike is a logged loss above spike_ratio x the median of the 10 before it.
    spike_ratio: float = 2.0
    # How much of the per-layer diagnostics (norms, activation percentiles and saturation,
    # histograms of activation inputs and BN parameters, batch-size-1 evaluation) a run
    # measures and writes. full: all of it into the events; scalars: the same without
    # histograms; summary: measured into summary.json only, so that TensorBoard shows the
    # curves; off: none. auto: full for `bnexp train`, summary for the runs of a sweep.
    # true and false (earlier versions) read as full and off.
    diagnostics: Any = "auto"
    diagnostics_every: int = 100
    histogram_every: int = 500
    probe_batch_size: int = 256
    # Loss-landscape probes (Santurkar et al. 2018) every N steps; 0 = off.
    probe_every: int = 0
    probe_step_sizes: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    # After training: validation accuracy in BN's eval and train modes at each of these eval
    # batch sizes, and each BN layer's running statistics against its input's statistics over
    # the whole training set (the train_eval_modes study); empty = off.
    mode_batch_sizes: list[int] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    device: str = "auto"
    seed: int = 0
    # A run directory to continue from its last checkpoint (see `bnexp resume`).
    resume: str | None = None


class ConfigError(ValueError):
    """A bad config value or override; its message is meant for people, one paragraph."""


def config_dir() -> Path:
    """The configs/ directory: inside the installed package, or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"bnexp configs not found next to {here}")


def group_options(group: str) -> list[str]:
    """The options a config group offers: the YAML files in configs/<group>/."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def experiment_grid_keys(name: str) -> set[str]:
    """The keys an experiment sweeps (hydra.sweeper.params), its parent experiments' too."""
    import yaml

    path = config_dir() / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return set()
    body = yaml.safe_load(path.read_text()) or {}
    keys = set(((body.get("hydra") or {}).get("sweeper") or {}).get("params") or {})
    for entry in body.get("defaults") or []:
        if isinstance(entry, str) and not entry.startswith(("override", "_self_", "/")):
            keys |= experiment_grid_keys(entry)
    return keys


def default_options() -> dict[str, str]:
    """Each group's default option, as the primary config's defaults list names it."""
    import yaml

    entries = yaml.safe_load((config_dir() / "config.yaml").read_text())["defaults"]
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items()}


def describe_option(group: str, option: str) -> str:
    """The first comment line of an option's YAML file (Hydra's @package line aside)."""
    for line in (config_dir() / group / f"{option}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            return line.lstrip("# ").strip()
    return ""


def path_component(text: str, limit: int = 120) -> str:
    """text as one directory name: no separators (`data.root=/x/y` must not nest), and at most
    `limit` characters (file systems stop at 255 bytes), the rest replaced by a hash of the
    whole so that different texts keep different names. The full overrides of a run stay in
    its .hydra/overrides.yaml."""
    import hashlib

    name = text.replace("/", "_").replace("\\", "_").replace("\0", "_")
    if len(name.encode()) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        name = name.encode()[: limit - 9].decode(errors="ignore") + "-" + digest
    return name


def run_name(override_dirname: str) -> str:
    """Run directory name: a timestamp to the microsecond, then the overrides that were given."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
    return path_component(f"{stamp}_{override_dirname}" if override_dirname else stamp)


def make_run_dir(root: str, override_dirname: str) -> str:
    """Create a new run directory under root and return its path. mkdir is exclusive, so
    processes started at the same moment still get directories of their own."""
    base = Path(root) / run_name(override_dirname)
    for i in range(1000):
        candidate = base if i == 0 else base.with_name(f"{base.name}-{i}")
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run directory name next to {base}")


_registered = False


def register() -> None:
    """Register the schema with Hydra's ConfigStore and our resolvers (idempotent)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="bnexp_schema", node=Config)
    # Cached: the run directory is made once per process.
    OmegaConf.register_new_resolver("bnexp_run_dir", make_run_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("bnexp_not_a_variant", lambda: list(NOT_A_VARIANT),
                                    replace=True)
    _registered = True


# ----------------------------------------------------------------------------- overrides


# Keys that were renamed, with what to write instead.
RENAMED = {"data.normalize": "data.inputs: data.normalize=true is data.inputs=standardized, "
                             "data.normalize=false is data.inputs=unit"}


def _suggest(word: str, choices: Sequence[str]) -> str:
    if word in RENAMED:
        return f" It was renamed to {RENAMED[word]}."
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""


def _keys(node: Any, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    out = []
    for key in node:
        full = f"{prefix}{key}"
        out.append(full)
        if isinstance(node[key], DictConfig):
            out.extend(_keys(node[key], full + "."))
    return out


def check_overrides(overrides: Sequence[str], keys: bool = True,
                    composed: DictConfig | None = None) -> None:
    """Check the override strings' grammar, group options and (keys=True) keys before Hydra
    sees them; the key check composes the config's groups once, or reads the keys of
    `composed` (a composition of the same group choices) when given."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as exc:
            raise ConfigError(
                f"Could not parse the override {text!r}: {str(exc).splitlines()[0]} "
                "Overrides use Hydra's grammar: key=value (e.g. optim.lr=0.5), group=option "
                "(e.g. model=cnn), +key=value to add a key, ~key to remove one."
            ) from None

    choices = {}
    for ov in parsed:
        key = ov.key_or_group
        if key.startswith("hydra") or ov.package is not None:
            continue
        if key in GROUPS:
            options = group_options(key)
            values = ov.sweep_string_iterator() if ov.is_sweep_override() else [ov.value()]
            for value in values:
                if str(value) not in options:
                    raise ConfigError(
                        f"{key}={value}: unknown option for config group '{key}'. "
                        f"Allowed: {', '.join(options)}.{_suggest(str(value), options)}"
                    )
            if not ov.is_sweep_override():
                choices[key] = str(ov.value())
    if not keys:
        return
    if not any(ov.key_or_group not in GROUPS and not ov.key_or_group.startswith("hydra")
               for ov in parsed):
        return
    if composed is None:
        composed = compose([f"{g}={o}" for g, o in choices.items()], check=False)
    known = _keys(composed)
    for ov in parsed:
        key = ov.key_or_group
        if key in GROUPS or key.startswith("hydra"):
            continue
        if key not in known and (ov.is_add() or ov.is_force_add()):
            raise ConfigError(
                f"{ov.input_line}: bnexp's config has no key {key}, and a key added with '+' "
                f"is read by nothing, so this would change nothing.{_suggest(key, known)} "
                "Run `bnexp config` to see every key."
            )
        if key not in known:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            siblings = [k for k in known if k.rsplit(".", 1)[0] == parent and "." in k] if parent \
                else [k for k in known if "." not in k]
            where = f"in '{parent}'" if parent else "at the top level"
            listing = ", ".join(s.rsplit(".", 1)[-1] for s in siblings if s != "hydra")
            raise ConfigError(
                f"{key}: unknown config key. Keys {where}: {listing}."
                f"{_suggest(key, known)} Run `bnexp config` to see the whole config."
            )


def _omegaconf_error(exc: BaseException) -> ConfigError | None:
    """Translate OmegaConf's type errors (found anywhere in the cause chain) into a ConfigError."""
    from omegaconf.errors import OmegaConfBaseException

    seen = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException) and getattr(seen, "full_key", None):
            value = getattr(seen, "value", None)
            msg = str(getattr(seen, "msg", seen)).splitlines()[0]
            shown = seen.full_key if value is None else f"{seen.full_key}={value}"
            return ConfigError(f"{shown}: {msg}.")
        seen = seen.__cause__ or seen.__context__
    return None


def compose(overrides: Sequence[str] = (), check: bool = True) -> DictConfig:
    """Compose the config as Hydra would for `bnexp train`, without running anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register()
    overrides = [o for o in overrides if not o.startswith("hydra.") and not o.startswith("-")]
    if check:  # grammar and group options; keys only when they matter (below)
        check_overrides(overrides, keys=False)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = hydra_compose("config", overrides=list(overrides))
    except HydraException as exc:
        GlobalHydra.instance().clear()
        if check:  # an unknown key: say so in bnexp's words, with the keys that exist
            check_overrides(overrides)
        raise _omegaconf_error(exc) or ConfigError(" ".join(str(exc).split())) from None
    except Exception as exc:
        GlobalHydra.instance().clear()
        if check:
            check_overrides(overrides)
        translated = _omegaconf_error(exc)
        if translated is None:
            raise
        raise translated from None
    finally:
        GlobalHydra.instance().clear()
    if check and any(o.startswith("+") for o in overrides):
        # Hydra accepts '+key' for any key; one that nothing reads is refused. (Composing
        # the groups for this check costs as much as the composition itself, so it runs
        # only here.)
        check_overrides(overrides)
    if check:
        try:
            validate(cfg)
        except ConfigError:
            raise
        except Exception as exc:  # an interpolation that cannot resolve (optim.lr=${nope})
            translated = _omegaconf_error(exc)
            if translated is None:
                raise
            raise translated from None
    return cfg


# ----------------------------------------------------------------------------- validation


DIAGNOSTICS = ("auto", "full", "scalars", "summary", "off")


def diagnostics_level(value: Any, in_sweep: bool) -> str:
    """trainer.diagnostics as the level that runs: full, scalars, summary or off."""
    if isinstance(value, bool):
        return "full" if value else "off"
    if value == "auto":
        return "summary" if in_sweep else "full"
    return str(value)


def _one_of(choices: Sequence[Any]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.name": _one_of(DATASETS),
    "data.val_fraction": (lambda v: 0 < v < 1, "a fraction strictly between 0 and 1"),
    "data.train_size": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "data.inputs": _one_of(INPUTS),
    "model.name": _one_of(MODELS),
    "model.depth": (_positive_int, "an integer >= 1"),
    "model.width": (_positive_int, "an integer >= 1"),
    "model.norm": _one_of(NORMS),
    "model.activation": _one_of(ACTIVATIONS),
    "model.norm_position": _one_of(NORM_POSITIONS),
    "model.bn_momentum": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "model.bn_eps": (lambda v: v > 0, "a number > 0"),
    "model.norm_groups": (_positive_int, "an integer >= 1"),
    "model.init": _one_of(INITS),
    "model.init_std": (lambda v: v > 0, "a number > 0"),
    "optim.name": _one_of(OPTIMIZERS),
    "optim.lr": (lambda v: v > 0 and v == v and v != float("inf"), "a finite number > 0"),
    "optim.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optim.beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.schedule": _one_of(SCHEDULES),
    "optim.lr_reference_batch_size": (lambda v: v is None or _positive_int(v),
                                      "null or an integer >= 1"),
    "optim.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "optim.step_size": (_positive_int, "an integer >= 1"),
    "optim.gamma": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "trainer.epochs": (_positive_int, "an integer >= 1"),
    "trainer.steps": (lambda v: v is None or (_positive_int(v) and v <= MAX_STEPS),
                      f"null or an integer from 1 to {MAX_STEPS:,}"),
    "trainer.batch_size": (_positive_int, "an integer >= 1"),
    "trainer.eval_every": (_positive_int, "an integer >= 1 (steps)"),
    "trainer.eval_batch_size": (
        lambda v: v == "auto" or (str(v).isdigit() and int(v) >= 1),
        "auto or an integer >= 1",
    ),
    "trainer.log_every": (_positive_int, "an integer >= 1 (steps)"),
    "trainer.precision": _one_of(PRECISIONS),
    "trainer.compile": _one_of(COMPILE),
    "trainer.threads": (
        lambda v: v in ("auto", "steady") or (str(v).isdigit() and int(v) >= 1),
        "auto, steady or an integer >= 1",
    ),
    "trainer.progress": _one_of(PROGRESS),
    "trainer.checkpoint_every": (lambda v: isinstance(v, int) and v >= 0,
                                 "0 (only on interruption) or steps >= 1"),
    "trainer.target_acc": (lambda v: v is None or 0 < v <= 1, "null or a fraction in (0, 1]"),
    "trainer.divergence_factor": (lambda v: v > 1, "a number > 1"),
    "trainer.divergence_patience": (_positive_int, "an integer >= 1"),
    "trainer.spike_ratio": (lambda v: v > 1, "a number > 1"),
    "trainer.diagnostics": (lambda v: isinstance(v, bool) or v in DIAGNOSTICS,
                            "one of " + ", ".join(DIAGNOSTICS) + " (or true/false)"),
    "trainer.diagnostics_every": (_positive_int, "an integer >= 1 (steps)"),
    "trainer.histogram_every": (_positive_int, "an integer >= 1 (steps)"),
    "trainer.probe_batch_size": (lambda v: _positive_int(v) and v >= 2, "an integer >= 2"),
    "trainer.probe_every": (lambda v: isinstance(v, int) and v >= 0, "0 (off) or steps >= 1"),
    "trainer.mode_batch_sizes": (
        lambda v: all(_positive_int(x) for x in v), "a list of integers >= 1 (may be empty)"),
    "trainer.probe_step_sizes": (
        lambda v: len(v) > 0 and all(x > 0 for x in v), "a non-empty list of numbers > 0"),
    "device": (
        lambda v: v in ("auto", "cpu", "cuda", "mps")
        or (v.startswith("cuda:") and v[5:].isdigit()),
        "auto, cpu, cuda, cuda:N or mps",
    ),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
             "an integer from 0 to 2**63 - 1 (what torch.manual_seed takes)"),
}


def fail(key: str, value: Any, allowed: str, why: str = "") -> ConfigError:
    text = f"Invalid value for {key}: {value!r}. Allowed: {allowed}."
    return ConfigError(f"{text} {why}".strip())


def validate(cfg: DictConfig) -> None:
    """Check every value against RULES and the cross-key rules; raise the first ConfigError."""
    from omegaconf import OmegaConf

    for key, (ok, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key)
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise fail(key, value, allowed)
    m = cfg.model
    if m.affine and m.norm == "none":
        raise fail(
            "model.affine", True, "false or null when model.norm=none",
            "Affine gamma/beta belong to the norm layer; with model.norm=none there is none. "
            "Drop model.affine or set model.norm to one of "
            + ", ".join(n for n in NORMS if n != "none") + ".",
        )
    if m.name == "resnet" and (m.depth - 2) % 6:
        raise fail("model.depth", m.depth, "6n+2 for model=resnet (20, 32, 44, 56, 110)")
    side = catalog.DATASETS[cfg.data.name].image_side
    if m.name == "cnn" and 2**m.depth > side:
        deepest = side.bit_length() - 1
        raise fail("model.depth", m.depth, f"1 to {deepest} for model=cnn on data="
                   f"{cfg.data.name}", f"Each CNN stage halves the {side}x{side} image with a "
                   f"2x2 max-pool, so after {deepest} stages nothing is left to pool.")
    if m.name == "vgg" and m.depth not in VGG_DEPTHS:
        raise fail("model.depth", m.depth,
                   f"one of {', '.join(map(str, VGG_DEPTHS))} for model=vgg")
    _check_norm(m, side)
    if m.norm == "batch" and cfg.trainer.batch_size == 1:
        raise fail(
            "trainer.batch_size", 1, "an integer >= 2 with model.norm=batch",
            "BatchNorm in training normalizes each feature over the batch, and the variance of "
            "one sample is zero. Use trainer.batch_size=2 or more, or a norm of each sample "
            "alone (model.norm=layer or group), or model.norm=none.",
        )
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise fail("optim.nesterov", True, "false when optim.momentum=0",
                   "Nesterov momentum needs optim.momentum > 0.")


def _check_norm(m: DictConfig, side: int) -> None:
    """Norms that cannot be built on this network: instance norm of an MLP, groups that do not
    divide a layer's channels, a group of one value (zero variance: the layer outputs beta)."""
    if m.norm in ("batch", "none"):
        return
    if m.norm == "instance" and m.name == "mlp":
        raise fail("model.norm", "instance", "batch, layer, group or none for model=mlp",
                   "Instance norm normalizes each channel of each sample over its spatial "
                   "positions; an MLP's features have none, so every value would be its own "
                   "mean. Use a conv net (model=cnn, vgg or resnet), or model.norm=layer.")
    shapes = catalog.norm_inputs(m.name, m.depth, m.width, side)
    unit = "features" if m.name == "mlp" else "channels"

    def problem(groups: int) -> str | None:
        """Why `groups` (model.norm_groups, or the norm's own grouping) cannot be built."""
        for c, s in shapes:
            g = catalog.norm_groups(m.norm, groups, c)
            if c % g:
                return f"{c} {unit} cannot be split into {g} equal groups"
            if c // g * s * s < 2:
                where = f"{c} features" if m.name == "mlp" else f"{c} channels of {s}x{s} maps"
                return (f"a layer of {where} in {g} groups normalizes each value by itself: "
                        "its variance is zero and the layer would output beta alone")
        return None

    why = problem(m.norm_groups)
    if why is None:
        return
    layers = ", ".join(map(str, sorted({c for c, _ in shapes})))
    if m.norm != "group":
        raise fail("model.norm", m.norm, "a norm whose groups hold at least 2 values here",
                   f"model={m.name} has layers of {layers} {unit}; {why}.")
    widest = max(c for c, _ in shapes)
    fits = [g for g in range(1, widest + 1) if problem(g) is None]
    more = problem(widest + 1) is None  # one group per channel in every layer
    allowed = ("one of " + ", ".join(map(str, fits))
               + (f" (or more than {widest}: one group per channel)" if more else "")
               if fits else "none: no number of groups fits this network")
    raise fail("model.norm_groups", m.norm_groups, allowed,
               f"model={m.name} with width {m.width} has layers of {layers} {unit}; {why}.")


def resolved(cfg: DictConfig) -> dict:
    """The config as plain data, without Hydra's own node."""
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    out.pop("hydra", None)
    return out


# Keys that change how or where a run is carried out, never what it computes: they are left
# out of a run's directory name (Hydra's override_dirname), of what tells variants apart in
# compare and of what decides whether runs can share a stack.
NOT_A_VARIANT = ("device", "trainer.threads", "trainer.eval_batch_size", "trainer.progress",
                 "resume", "data.root", "data.download")
# ...and of the config hash (and so of sweep job and study names, which must differ where the
# hash does), except the dataset's location: hashes recorded by earlier bnexp versions include
# it, and a changed hash would make every finished run look like another config's to a rerun.
UNHASHED = tuple(k for k in NOT_A_VARIANT if not k.startswith("data."))


def config_hash(cfg: DictConfig | dict) -> str:
    """A short, stable hash of what a run computes: its resolved config minus UNHASHED keys.
    Sweeps match finished runs to grid points by it."""
    import hashlib
    import json

    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    data = json.loads(json.dumps(data))  # a deep copy we may edit
    data.pop("hydra", None)
    model = data.get("model", {})
    if model.get("norm") != "group":
        # Means nothing to other norms, and runs from before the key existed hash without it.
        model.pop("norm_groups", None)
    for key in UNHASHED:
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """optim.lr -> lr, unless two keys share a last component (then the full key)."""
    from collections import Counter

    last = Counter(k.rsplit(".", 1)[-1] for k in keys)
    return {k: k.rsplit(".", 1)[-1] if last[k.rsplit(".", 1)[-1]] == 1 else k for k in keys}


def outputs_root() -> Path:
    return Path(os.environ.get("BNEXP_OUTPUTS", "outputs"))
