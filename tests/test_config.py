"""Config composition and validation, through the real Hydra configs and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnexp.cli import app
from bnexp.config import GROUPS, ConfigError, compose, default_options, group_options

runner = CliRunner()


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    extra = ["model.depth=20"] if (group, option) == ("model", "resnet") else []
    cfg = compose([f"{group}={option}", *extra])
    if group in ("data", "model", "optim"):
        assert cfg[group].name == option
    if group == "experiment":  # a study: its own settings on top of the defaults
        assert cfg != compose([])


def test_defaults_are_the_offline_dataset_and_the_paper_knobs() -> None:
    cfg = compose([])
    assert default_options() == {"data": "mnist5k", "model": "mlp", "optim": "sgd",
                                 "trainer": "default", "experiment": None}
    assert cfg.model.norm == "batch" and cfg.model.norm_position == "before_act"


BAD = [
    (["model=foo"], "model=foo", "cnn, mlp, resnet, vgg"),
    (["model.nrom=batch"], "model.nrom", "Did you mean model.norm?"),
    (["optim.lr=abc"], "optim.lr", "abc"),
    (["optim.lr=-1"], "optim.lr", "> 0"),
    (["optim.lr=0"], "optim.lr", "> 0"),
    (["model.norm=weight"], "model.norm", "batch, layer, group, instance, none"),
    (["model.norm=instance"], "model.norm", "for model=mlp"),
    (["model.norm=group"], "model.norm_groups", "one of 1, 2, 4, 5, 10, 20, 25, 50. "),
    (["model.norm=group", "model.norm_groups=100"], "model.norm_groups", "variance is zero"),
    (["model.norm=group", "model.norm_groups=0"], "model.norm_groups", ">= 1"),
    (["model=cnn", "model.width=6", "model.norm=group", "model.norm_groups=4"],
     "model.norm_groups", "one of 1, 2, 3, 6, 12 (or more than 12"),
    (["model.activation=gelu"], "model.activation", "relu, sigmoid, tanh"),
    (["model.norm=none", "model.affine=true"], "model.affine", "model.norm=none"),
    (["trainer.batch_size=1"], "trainer.batch_size", "variance of one sample"),
    (["trainer.threads=lots"], "trainer.threads", "auto, steady or an integer"),
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size", "auto or an integer >= 1"),
    (["device=tpu"], "device", "cuda:N"),
    (["model=resnet", "model.depth=21"], "model.depth", "6n+2"),
    (["trainer.epochs=0"], "trainer.epochs", ">= 1"),
    (["optim.lr=[1"], "optim.lr=[1", "grammar"),
]


@pytest.mark.parametrize("overrides,key,allowed", BAD)
def test_bad_override_is_a_config_error_naming_key_and_allowed(overrides, key, allowed) -> None:
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    message = str(info.value)
    assert key in message and allowed in message
    assert "\n" not in message  # one paragraph


@pytest.mark.parametrize("overrides,key,allowed", BAD)
def test_bad_override_exits_2_and_writes_nothing(overrides, key, allowed, isolated: Path) -> None:
    result = runner.invoke(app, ["train", *overrides])
    assert result.exit_code == 2, result.output
    assert key in result.output
    assert not (isolated / "outputs").exists()


# Typer's own refusals of a command line, each with what its paragraph must name: the option
# or argument, the value typed, and what is allowed.
USAGE = [
    (["sweep", "--jobs", "x"], ["--jobs", "'x'", "integer", "parallel local jobs"]),
    (["sweep", "--jobs=0"], ["--jobs", "'0'", "greater than or equal to 1"]),
    (["board", "--port", "abc"], ["--port", "'abc'", "integer"]),
    (["compare", "--metric"], ["--metric", "needs a value", "metrics to show"]),
    (["compare", "--formt", "csv"], ["'--formt'", "did you mean --format", "--where"]),
    (["trian"], ["'trian'", "did you mean 'train'", "reproduce"]),
    (["resume"], ["RUN", "the run directory"]),
    (["resume", "somewhere", "optim.lr=0.1"], ["optim.lr=0.1", "RUN", "new run"]),
]


@pytest.mark.parametrize("argv,named", USAGE)
def test_usage_errors_are_one_paragraph_naming_the_value_and_what_is_allowed(
        argv: list[str], named: list[str], isolated: Path) -> None:
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("bnexp: error: ") and "\n" not in text and "╭" not in text, text
    assert all(n in text for n in named), (named, text)
    command = "bnexp" if argv[0] == "trian" else f"bnexp {argv[0]}"
    assert text.endswith(f"See `{command} --help`."), text
    assert not (isolated / "outputs").exists()


def test_usage_error_of_the_installed_command_is_one_line_on_stderr(isolated: Path) -> None:
    """The `bnexp` process itself (not the test runner) says it, with exit code 2."""
    done = subprocess.run([sys.executable, "-m", "bnexp", "sweep", "--jobs", "x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr.startswith("bnexp: error: --jobs/-j 'x': ") \
        and done.stderr.count("\n") == 1, done.stderr


def test_norms_of_each_sample_alone_train_at_batch_size_one() -> None:
    for norm in ("layer", "none"):
        assert compose([f"model.norm={norm}", "trainer.batch_size=1"]).trainer.batch_size == 1
    assert compose(["model=cnn", "model.norm=instance", "trainer.batch_size=1"]).model.norm \
        == "instance"
    # a conv net's group norm with fewer channels than groups: one group per channel
    assert compose(["model=cnn", "model.width=8", "model.norm=group"]).model.norm_groups == 32


def test_norm_groups_enter_the_hash_only_for_group_norm() -> None:
    """Runs from before model.norm_groups existed keep their hash (a rerun finds them), and
    two group-norm runs with other groups are other runs."""
    from bnexp.config import config_hash, resolved

    base = compose([])
    old = resolved(base)
    del old["model"]["norm_groups"]  # a config written before the key existed
    assert config_hash(old) == config_hash(base)
    assert config_hash(compose(["model.norm_groups=4"])) == config_hash(base)
    g10, g20 = (compose(["model.norm=group", f"model.norm_groups={g}"]) for g in (10, 20))
    assert config_hash(g10) != config_hash(g20)


def test_cuda_without_a_gpu_is_an_error_not_a_cpu_run(isolated: Path) -> None:
    import torch

    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or cuda:0 on CPU
    result = runner.invoke(app, ["train", f"device={device}"])
    assert result.exit_code == 2
    assert "device" in result.output and "CUDA" in result.output
    assert not (isolated / "outputs").exists()


def test_batch_larger_than_training_set_is_an_error(isolated: Path) -> None:
    result = runner.invoke(app, ["train", "trainer.batch_size=100000"])
    assert result.exit_code == 2
    assert "trainer.batch_size" in result.output and "4000" in result.output
    assert not (isolated / "outputs").exists()


def test_config_command_prints_the_resolved_config_with_overrides() -> None:
    result = runner.invoke(app, ["config", "model.norm=none", "optim.lr=0.5", "seed=3"])
    assert result.exit_code == 0, result.output
    assert "norm: none" in result.output and "lr: 0.5" in result.output
    assert "seed: 3" in result.output and "${" not in result.output


def test_list_shows_every_group_option_and_marks_defaults() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for group in GROUPS:
        for option in group_options(group):
            assert option in result.output
    assert "* mnist5k" in result.output and "* mlp" in result.output


def test_train_help_lists_groups_options_and_knobs() -> None:
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    text = result.output
    for needle in ("data=", "mnist5k", "model=", "resnet", "model.norm", "optim.lr",
                   "trainer.batch_size", "hydra.run.dir"):
        assert needle in text


def test_each_default_is_stated_once_in_the_schema_not_again_in_a_yaml_file() -> None:
    """A group option's YAML sets only what differs from the schema's default (its name
    aside): a default written twice drifts apart the first time one of them changes."""
    import dataclasses

    import yaml

    from bnexp import config

    schema = {"data": config.DataConfig(), "model": config.ModelConfig(),
              "optim": config.OptimConfig(), "trainer": config.TrainerConfig()}
    repeated = []
    for group, default in schema.items():
        values = dataclasses.asdict(default)
        for path in sorted((config.config_dir() / group).glob("*.yaml")):
            for key, value in (yaml.safe_load(path.read_text()) or {}).items():
                if key != "name" and key in values and values[key] == value:
                    repeated.append(f"{group}/{path.name}: {key}={value}")
    primary = yaml.safe_load((config.config_dir() / "config.yaml").read_text())
    top = config.Config()
    repeated += [f"config.yaml: {k}" for k in ("device", "seed", "resume")
                 if k in primary and primary[k] == getattr(top, k)]
    assert repeated == []


def test_one_list_of_keys_that_do_not_define_a_variant() -> None:
    """Run directory names, compare's variants and stacking leave out the same keys; the
    hash leaves out those of them that earlier versions left out."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bnexp import config, runs

    config.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config.config_dir()), version_base="1.3"):
        hydra_cfg = hydra_compose("config", return_hydra_config=True)
    GlobalHydra.instance().clear()
    excluded = list(hydra_cfg.hydra.job.config.override_dirname.exclude_keys)
    assert excluded == list(config.NOT_A_VARIANT)
    assert set(config.UNHASHED) <= set(config.NOT_A_VARIANT)
    assert runs.NOT_A_VARIANT is config.NOT_A_VARIANT
