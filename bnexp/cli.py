"""The `bnexp` command: a thin shell that turns argv into Hydra overrides and exit codes.

torch is imported only by the commands that train; `bnexp --help`, `bnexp list` and
`bnexp config` answer without it.

Exit codes: 0 completed (a diverged run is a result, so 0 too), 1 a run failed,
2 bad input (config, override, device, dataset), 130 interrupted.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import typer

from bnexp.config import GROUPS, default_options, describe_option, group_options

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
EXIT_BY_STATUS = {"completed": 0, "diverged": 0, "failed": EXIT_FAILED,
                  "interrupted": EXIT_INTERRUPTED}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="bnexp: a command-line lab for Batch Normalization. Train BN ablations, record "
    "convergence and stability, and open them in TensorBoard.",
)
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _groups_text() -> str:
    defaults = default_options()
    return "\n".join(f"  {g}={'|'.join(group_options(g))}  (default: {defaults[g]})"
                     for g in GROUPS)


TRAIN_HELP = f"""Train one model, recorded to its own run directory under outputs/runs/.

OVERRIDES use Hydra's grammar: group=option or key=value, e.g.

  bnexp train model.norm=none model.activation=sigmoid optim.lr=0.5 device=cpu seed=3

[bold]Config groups[/bold]:

{_groups_text()}

[bold]Main knobs[/bold]:

  model.norm=batch|none  model.affine=true|false  model.activation=relu|sigmoid|tanh
  model.norm_position=before_act|after_act  model.bn_momentum  model.bn_eps
  model.init=default|normal  model.init_std  model.depth  model.width
  optim.lr  optim.momentum  optim.weight_decay  optim.schedule=constant|cosine|step
  trainer.epochs  trainer.steps  trainer.batch_size  trainer.eval_every
  trainer.precision=fp32|bf16  trainer.threads=auto|N  data.normalize  data.augment
  device=auto|cpu|cuda|cuda:N|mps  seed=N  hydra.run.dir=PATH

Hydra flags pass through: -m/--multirun, --cfg job. See every key: bnexp config."""


def _error(message: str) -> None:
    typer.echo(f"bnexp: error: {message}", err=True)


def _remove_hydra_files(run_dir: Path) -> None:
    """Undo what Hydra wrote for a run that never started, so bad input leaves nothing."""
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    (run_dir / "train.log").unlink(missing_ok=True)
    for d in (run_dir, *run_dir.parents):
        try:
            d.rmdir()  # only succeeds while empty
        except OSError:
            break


def _run_hydra(overrides: list[str]) -> int:
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from bnexp.config import ConfigError, compose, config_dir, register, validate
    from bnexp.data import DataError

    multirun = any(a in ("-m", "--multirun") for a in overrides)
    try:
        if not multirun:  # bad input stops here, before any directory exists
            cfg = compose(overrides)
            from bnexp.train import preflight  # torch only once the config is known good

            preflight(cfg)
    except (ConfigError, DataError) as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT

    results: list[tuple[Path, dict | None, int]] = []

    def task(cfg):  # noqa: ANN001 - Hydra passes a DictConfig
        from bnexp import train

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            validate(cfg)
            summary = train.run(cfg, run_dir)
        except (ConfigError, DataError) as exc:
            _error(str(exc))
            _remove_hydra_files(run_dir)
            results.append((run_dir, None, EXIT_BAD_INPUT))
            return
        results.append((run_dir, summary, EXIT_BY_STATUS[summary["status"]]))

    register()
    GlobalHydra.instance().clear()
    main = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    argv = sys.argv
    sys.argv = ["bnexp-train", *overrides]
    try:
        main(task)()
    except SystemExit as exc:  # Hydra reports its own errors and exits
        return int(exc.code or 0) and EXIT_BAD_INPUT
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    for run_dir, summary, _ in results:
        if summary is None:
            continue
        m = summary["metrics"]
        acc = f"{m['final_val_acc']:.4f}" if m.get("final_val_acc") is not None else "n/a"
        typer.echo(f"\n{summary['status']}: val_acc {acc} after {m['steps']} steps "
                   f"in {m['wall_seconds']:.1f} s")
        typer.echo(f"outputs:     {run_dir}")
        typer.echo(f"tensorboard: tensorboard --logdir {run_dir.parent}")
        if summary.get("error"):
            typer.echo(f"error:       {summary['error']}")
    return max((code for *_, code in results), default=0)


@app.command(context_settings=PASSTHROUGH, help=TRAIN_HELP)
def train(ctx: typer.Context) -> None:
    raise typer.Exit(_run_hydra(list(ctx.args)))


@app.command(context_settings=PASSTHROUGH)
def config(ctx: typer.Context,
           resolve: bool = typer.Option(True, help="Resolve ${...} interpolations.")) -> None:
    """Print the config that `bnexp train OVERRIDES` would run with."""
    from omegaconf import OmegaConf

    from bnexp.config import ConfigError, compose

    try:
        cfg = compose(list(ctx.args))
    except ConfigError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    typer.echo(OmegaConf.to_yaml(cfg, resolve=resolve), nl=False)


@app.command(name="list")
def list_(group: str = typer.Argument(None, help="Only this group: data, model, optim, "
                                                 "trainer.")) -> None:
    """Show what each config group offers (the default is marked *)."""
    defaults = default_options()
    for g in [group] if group else GROUPS:
        if g not in defaults:
            _error(f"unknown config group {g!r}. Allowed: {', '.join(GROUPS)}.")
            raise typer.Exit(EXIT_BAD_INPUT)
        typer.echo(f"{g}:")
        for option in group_options(g):
            mark = "*" if option == defaults[g] else " "
            typer.echo(f"  {mark} {option:<14} {describe_option(g, option)}")


@app.command()
def inspect(run: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
            json_out: bool = typer.Option(False, "--json", help="Print the BN report as JSON."),
            ) -> None:
    """Print a trained model and, for each BN layer, its settings and statistics."""
    import json

    from rich.console import Console
    from rich.table import Table

    from bnexp.probes import bn_report
    from bnexp.train import load_model

    try:
        model, ckpt = load_model(run)
    except FileNotFoundError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    rows = bn_report(model)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = Console()
    console.print(f"[bold]{run}[/bold]  step {ckpt['step']}")
    console.print(model)
    if not rows:
        console.print("No BatchNorm layers (model.norm=none).")
        return
    table = Table(title="BatchNorm layers: settings, and mean / std / min / max of each tensor")
    for col in ("layer", "features", "eps", "momentum", "affine", "tracks", "batches",
                "running_mean", "running_var", "gamma", "beta"):
        table.add_column(col)

    def fmt(st: dict | None) -> str:
        return "—" if st is None else " / ".join(f"{st[k]:.3g}" for k in
                                                 ("mean", "std", "min", "max"))

    for r in rows:
        table.add_row(r["layer"], str(r["num_features"]), f"{r['eps']:g}", str(r["momentum"]),
                      str(r["affine"]), str(r["track_running_stats"]),
                      str(r["num_batches_tracked"]), fmt(r["running_mean"]),
                      fmt(r["running_var"]), fmt(r["gamma"]), fmt(r["beta"]))
    console.print(table)


def main() -> None:
    app()
