"""The `bnexp` command: a thin shell that turns argv into Hydra overrides and exit codes.

torch is imported only by the commands that train; `bnexp --help`, `bnexp list` and
`bnexp config` answer without it.

Exit codes: 0 completed (a diverged run is a result, so 0 too), 1 a run failed,
2 bad input (config, override, device, dataset), 3 a sweep finished with failed jobs,
130 interrupted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from bnexp.config import GROUPS, default_options, describe_option, group_options

EXIT_BAD_INPUT, EXIT_SOME_FAILED = 2, 3

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


def _hydra(argv: list[str]) -> int:
    """Run Hydra's main with our config and task on argv (overrides and Hydra flags)."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from bnexp.config import config_dir, register
    from bnexp.train import hydra_task

    register()
    GlobalHydra.instance().clear()
    main = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    saved, sys.argv = sys.argv, ["bnexp", *argv]
    try:
        main(hydra_task)()
    except SystemExit as exc:  # Hydra reports its own errors, then exits
        return EXIT_BAD_INPUT if exc.code else 0
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    return 0


def _run_hydra(overrides: list[str]) -> int:
    from bnexp.config import ConfigError, compose

    multirun = any(a in ("-m", "--multirun") for a in overrides)
    try:
        if not multirun:  # bad input stops here, before any directory exists
            cfg = compose(overrides)
            from bnexp.data import DataError
            from bnexp.train import preflight  # torch only once the config is known good

            try:
                preflight(cfg)
            except DataError as exc:
                raise ConfigError(str(exc)) from None
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    from bnexp import train

    train.finished.clear()
    code = _hydra(overrides)
    for run_dir, summary, _ in train.finished:
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
    return max([code, *(c for *_, c in train.finished)])


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


@app.command(context_settings=PASSTHROUGH)
def sweep(
    ctx: typer.Context,
    name: str = typer.Option(None, help="Sweep name (default: the fixed overrides and the "
                                        "swept keys, so the same command resumes)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1,
                             help="Parallel local jobs (joblib); CPU threads are shared out."),
    lr_grid: str = typer.Option(None, help="Log-spaced optim.lr grid LOW:HIGH:COUNT, "
                                           "e.g. 1e-3:10:9."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="List the jobs that would run or be skipped; run none."),
) -> None:
    """Run a grid of trainings (Hydra multirun), resumable: finished jobs are skipped.

    OVERRIDES use Hydra's sweep grammar: optim.lr=0.01,0.1,1 model.norm=batch,none seed=0,1,2,
    range(...), choice(...). Jobs land in outputs/sweeps/NAME/<swept key=value,...>, with a
    manifest.json of each job's status. Launchers: --jobs N (local processes), or
    hydra/launcher=bnexp_slurm (SLURM via submitit) or submitit_local. Exit code 3 if a job
    failed; diverged runs are results, not failures.
    """
    from bnexp import sweep as sweeps
    from bnexp.config import ConfigError, compose, outputs_root

    overrides = list(ctx.args)
    try:
        if lr_grid:
            grid = sweeps.log_grid(lr_grid)
            overrides.append("optim.lr=" + ",".join(f"{v:g}" for v in grid))
        fixed, swept = sweeps.split_overrides(overrides)
        compose(fixed)  # the common part must be valid; each job is validated before launch
    except (ConfigError, ValueError) as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    name = name or sweeps.sweep_name(fixed, swept)
    sweep_dir = outputs_root() / "sweeps" / name
    argv = ["-m", *overrides, "hydra/sweeper=bnexp", f"hydra.sweep.dir='{sweep_dir}'"]
    if dry_run:
        argv.append("hydra.sweeper.dry_run=true")
    if jobs > 1 and not any(o.startswith("hydra/launcher=") for o in overrides):
        threads = max(1, (os.cpu_count() or 1) // jobs)  # 2 jobs x 1 thread on 2 cores
        argv += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}",
                 f"trainer.threads={threads}"]
    os.environ["BNEXP_SWEEP_COMMAND"] = "bnexp sweep " + " ".join(sys.argv[2:])
    code = _hydra(argv)
    if code or dry_run:
        raise typer.Exit(code)
    counts = sweeps.counts(sweeps.read_manifest(sweep_dir))
    typer.echo(f"\nsweep {name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    typer.echo(f"outputs:     {sweep_dir}")
    typer.echo(f"compare:     bnexp compare {sweep_dir}")
    raise typer.Exit(EXIT_SOME_FAILED if counts.get("failed") else 0)


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
