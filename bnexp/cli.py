"""The `bnexp` command: a thin shell that turns argv into Hydra overrides and exit codes.

torch is imported only by the commands that train; `bnexp --help`, `bnexp list` and
`bnexp config` answer without it.

Exit codes: 0 completed (a diverged run is a result, so 0 too), 1 a run failed,
2 bad input (config, override, device, dataset), 3 a sweep finished with failed jobs,
130 interrupted by Ctrl-C, 143 by SIGTERM (the run records status "interrupted" either way).
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from typer.core import TyperGroup

from bnexp import interrupt
from bnexp.config import GROUPS, default_options, describe_option, group_options

if TYPE_CHECKING:
    from bnexp.task import Task

EXIT_BAD_INPUT = 2  # 3 (a sweep had failed jobs) is bnexp.sweep.EXIT_SOME_FAILED


def _error(message: str) -> None:
    typer.echo(f"bnexp: error: {message}", err=True)


def _option_names(param: object) -> str:
    return "/".join([*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])])


def _given(param: object, args: list[str]) -> str | None:
    """The text typed for an option (`--jobs x` or `--jobs=x`), if it is in args."""
    for opt in getattr(param, "opts", []):
        for i, arg in enumerate(args):
            if arg == opt and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(opt + "="):
                return arg[len(opt) + 1:]
    return None


def _about(param: object, style: str = "()") -> str:
    """A parameter's help, after what it qualifies: ' (the run directory to continue)'."""
    text = (getattr(param, "help", None) or "").strip().rstrip(".")
    text = text[:1].lower() + text[1:]
    return "" if not text else f" {text}" if style == " " else f" ({text})"


def usage_error(exc: typer.TyperException, args: list[str]) -> str:
    """Typer's own refusal of a command line (an unknown option or command, a missing or
    mistyped value) as bnexp's one paragraph: what was wrong, with the value typed, what is
    allowed, and where the help is."""
    ctx = getattr(exc, "ctx", None)
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    if ctx is not None:
        command, sub = ctx.command, ctx.parent is not None
    else:  # an error before the command's context (an option without its value)
        command = commands.get(next((a for a in args if not a.startswith("-")), ""))
        sub = command is not None
        command = command or group
    # Named "bnexp" whatever the program's name (a test runner's "root", `python -m bnexp`).
    path = f"bnexp {command.name}" if sub else "bnexp"
    options = [o for p in command.params if getattr(p, "param_type_name", "") == "option"
               for o in p.opts] + ["--help"]
    param = getattr(exc, "param", None)
    if param is None and getattr(exc, "option_name", None):
        param = next((p for p in command.params if exc.option_name in p.opts), None)
    kind = type(exc).__name__
    message = " ".join(str(getattr(exc, "message", exc)).split()).rstrip(".")
    if kind == "MissingParameter" and param is not None:
        what = param.name.upper() if getattr(param, "param_type_name", "") == "argument" \
            else _option_names(param)
        text = f"`{path}` needs {what}{_about(param)}"
    elif kind == "BadParameter" and param is not None:
        value = _given(param, args)
        reason = (message[:1].lower() + message[1:]).replace("input should", "it should")
        text = (f"{_option_names(param)}{'' if value is None else ' ' + repr(value)}: "
                f"{reason or 'not allowed'}. {_option_names(param)}:{_about(param, ' ')}")
    elif kind == "BadOptionUsage" and param is not None:  # an option without its value
        text = f"{_option_names(param)} needs a value:{_about(param, ' ')}"
    elif kind == "NoSuchOption":
        hint = f" (did you mean {' or '.join(exc.possibilities)}?)" \
            if getattr(exc, "possibilities", None) else ""
        text = f"unknown option {exc.option_name!r}{hint}. `{path}` takes " + ", ".join(options)
    elif message.startswith("No such command"):
        unknown, _, hint = message.partition(". Did you mean ")
        text = (f"{unknown[:1].lower()}{unknown[1:]}"
                + (f" (did you mean {hint.rstrip('?')}?)" if hint else "")
                + ". The commands: " + ", ".join(commands))
    elif message.startswith("Got unexpected extra argument"):
        extra = message.rpartition(" (")[2].rstrip(")")
        takes = [p.name.upper() for p in command.params
                 if getattr(p, "param_type_name", "") == "argument"]
        text = (f"unexpected argument(s) {extra}: `{path}` takes "
                + (" ".join(takes) + ", then" if takes else "only") + " its options ("
                + ", ".join(options) + ")")
        if path == "bnexp resume" and "=" in extra:
            text += (". A resumed run keeps the config it started with; a changed config is a "
                     "new run (`bnexp train ...`)")
    else:
        text = message
    return f"{text.rstrip('.')}. See `{path} --help`."


class Commands(TyperGroup):
    """bnexp's commands, with Typer's usage errors (exit code 2) said as bnexp says its own."""

    def invoke(self, ctx: Any) -> None:
        super().invoke(ctx)  # the exit status comes from typer.Exit, never a return value

    def main(self, args: Any = None, prog_name: str | None = None,  # type: ignore[override]
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        args = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except typer.TyperException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `bnexp`: its help
                typer.echo(exc.format_message())
            else:
                _error(usage_error(exc, args))
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code or 0)


app = typer.Typer(
    cls=Commands,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="bnexp: a command-line lab for Batch Normalization. Train BN ablations, record "
    "convergence and stability, and open them in TensorBoard.",
)
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _groups_text() -> str:
    defaults = default_options()
    return "\n".join(f"  {g}={'|'.join(group_options(g))}  (default: {defaults[g] or 'none'})"
                     for g in GROUPS)


TRAIN_HELP = f"""Train one model, recorded to its own run directory under outputs/runs/.

OVERRIDES use Hydra's grammar: group=option or key=value, e.g.

  bnexp train model.norm=none model.activation=sigmoid optim.lr=0.5 device=cpu seed=3

[bold]Config groups[/bold]:

{_groups_text()}

[bold]Main knobs[/bold]:

  model.norm=batch|layer|group|instance|none  model.norm_groups  model.affine=true|false
  model.activation=relu|sigmoid|tanh  model.norm_position=before_act|after_act
  model.bn_momentum  model.bn_eps
  model.init=default|normal  model.init_std  model.depth  model.width
  optim.lr  optim.momentum  optim.weight_decay  optim.schedule=constant|cosine|step
  trainer.epochs  trainer.steps  trainer.batch_size  trainer.eval_every
  trainer.precision=fp32|bf16|fp64  trainer.threads=auto|steady|N  data.augment
  data.inputs=standardized|unit|raw|mismatched  trainer.mode_batch_sizes=[1,2,...]
  device=auto|cpu|cuda|cuda:N|mps  seed=N  hydra.run.dir=PATH

Hydra flags pass through: -m/--multirun, --cfg job. See every key: bnexp config."""


def register_plugins() -> None:
    """Our sweeper and launchers, registered with Hydra by hand: an editable install's import
    hook hides them from Hydra's scan of the hydra_plugins namespace. The CLI does it, the
    one module above both: the plugins import bnexp, and nothing else in bnexp imports them."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.bnexp_sweeper.bnexp_sweeper import BnexpSweeper
    from hydra_plugins.bnexp_sweeper.bnexp_vectorized_launcher import VectorizedLauncher
    from hydra_plugins.bnexp_sweeper.jobs import SequentialLauncher
    from hydra_plugins.bnexp_sweeper.slurm import SlurmLauncher

    for plugin in (BnexpSweeper, VectorizedLauncher, SequentialLauncher, SlurmLauncher):
        Plugins.instance().register(plugin)


def _hydra(argv: list[str], task: Task | None = None) -> int:
    """Run Hydra's main with our config and task on argv (overrides and Hydra flags)."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from bnexp.config import config_dir, register
    from bnexp.task import Task
    from hydra_plugins.bnexp_sweeper.jobs import lean_main

    if _ONE_COMMAND_PROCESS:
        # What the imports made (torch: ~10^6 objects) lives as long as the process: frozen,
        # the collector's passes skip it; and a pass every 20,000 allocations rather than
        # 700 (Hydra and OmegaConf allocate many small objects per job). GC time of a 32-job
        # sweep: 0.6 -> 0.15 s (docs/performance.md). Not in a process that runs many
        # commands (tests): freezing would keep their garbage too.
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
    register()
    register_plugins()
    GlobalHydra.instance().clear()
    main = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    saved, sys.argv = sys.argv, ["bnexp", *argv]
    try:
        # signals are recorded, and the task reads the record
        with interrupt.handled(), lean_main(argv):
            main(task if task is not None else Task())()
    except KeyboardInterrupt:
        pass  # before any task began: nothing was written
    except SystemExit as exc:  # Hydra reports its own errors, then exits; 130/143: interrupted
        if not interrupt.requested():
            # 130/143 signals, 4 the cluster (sweep.EXIT_CLUSTER); any other is Hydra's
            # report of bad input.
            return exc.code if exc.code in (130, 143, 4) else EXIT_BAD_INPUT if exc.code else 0
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    # A signal that a library turned into another error is still a signal.
    return interrupt.exit_code() if interrupt.requested() else 0


def _check_writable(overrides: list[str]) -> None:
    """The run's directory must be creatable: say so now rather than as Hydra's traceback."""
    import tempfile

    from bnexp.config import ConfigError, outputs_root

    given = [o.split("=", 1)[1].strip("'\"") for o in overrides
             if o.startswith("hydra.run.dir=")]
    target = Path(given[-1]) if given else outputs_root() / "runs"
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        key = "hydra.run.dir" if given else "BNEXP_OUTPUTS (the outputs root)"
        raise ConfigError(
            f"Invalid value for {key}: {str(target)!r}. bnexp cannot write there ({exc}). "
            f"Allowed: a directory you can write to, or one that can be created."
        ) from None


def _run_hydra(overrides: list[str]) -> int:
    """`bnexp train` and `bnexp resume`: check, run, report. A stop signal at any moment ends
    with 130/143 and leaves nothing or an interrupted run (see bnexp.interrupt)."""
    with interrupt.handled():
        try:
            return _check_and_run(overrides)
        except KeyboardInterrupt:
            return interrupt.exit_code()


# Hydra's flags that `bnexp train` passes on, and whether each takes a value.
HYDRA_FLAGS = {"-m": False, "--multirun": False, "--cfg": True, "-c": True, "--resolve": False,
               "--package": True, "-p": True, "--info": True, "-i": True}


def _split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides); an unknown flag is bad input."""
    from bnexp.config import ConfigError

    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and not arg.startswith("~"):
            name = arg.split("=", 1)[0]
            if name not in HYDRA_FLAGS:
                raise ConfigError(
                    f"unknown option {arg!r}. Allowed here: overrides (key=value, group=option) "
                    f"and Hydra's flags {', '.join(HYDRA_FLAGS)}; see `bnexp train --help`.")
            takes = HYDRA_FLAGS[name] and "=" not in arg and i + 1 < len(args) \
                and not args[i + 1].startswith("-") and "=" not in args[i + 1]
            flags += args[i : i + 1 + takes]
            i += 1 + takes
        else:
            overrides.append(arg)
            i += 1
    return flags, overrides


def _check_and_run(overrides: list[str]) -> int:
    from bnexp.config import ConfigError, check_overrides, compose

    try:
        flags, plain = _split_flags(overrides)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    multirun = any(a in ("-m", "--multirun") for a in flags)
    try:
        if any(f in ("--cfg", "-c", "--info", "-i") for f in flags):
            check_overrides(plain)
            return _hydra(overrides)  # Hydra prints the config or its info, runs nothing
        if multirun:  # every job checked as a single run is, before any runs (our sweeper)
            check_overrides(plain)
            if not any(o.startswith("hydra/sweeper=") for o in plain):
                overrides = [*overrides, "hydra/sweeper=bnexp"]
        if not multirun:  # bad input stops here, before any directory exists
            cfg = compose(plain)
            interrupt.check()
            from bnexp.data import DataError
            from bnexp.run import preflight  # torch only once the config is known good

            try:
                preflight(cfg)
            except DataError as exc:
                raise ConfigError(str(exc)) from None
            _check_writable(plain)
            interrupt.check()
    except ConfigError as exc:
        if interrupt.requested():  # a Ctrl-C that a library turned into an error
            return interrupt.exit_code()
        _error(str(exc))
        return EXIT_BAD_INPUT
    from bnexp.record import last_checkpoint
    from bnexp.task import Task

    task = Task()
    code = _hydra(overrides, task)
    for run_dir, summary, _ in ((r.run_dir, r.summary, r.code) for r in task.results):
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
        if summary["status"] == "interrupted" and last_checkpoint(run_dir).is_file():
            typer.echo(f"resume:      bnexp resume {shlex.quote(str(run_dir))}")
    return max([code, *(r.code for r in task.results)])


def _quote_path(override: str) -> str:
    """`resume=DIR` and `hydra.run.dir=DIR` as one quoted value: a sweep job's directory
    (`lr=0.1,seed=0`) would otherwise read as Hydra's grammar."""
    key, value = override.split("=", 1)
    if value[:1] in ("'", '"'):
        return override
    return f"{key}='" + value.replace("'", "\\'") + "'"


@app.command(context_settings=PASSTHROUGH, help=TRAIN_HELP)
def train(ctx: typer.Context) -> None:
    overrides = [_quote_path(o) if o.startswith(("resume=", "hydra.run.dir=")) else o
                 for o in ctx.args]
    resume_at = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if resume_at and not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides.append(f"hydra.run.dir={resume_at[-1]}")  # continue in the same directory
    raise typer.Exit(_run_hydra(overrides))


@app.command()
def resume(run: Path = typer.Argument(..., help="The run directory to continue.")) -> None:
    """Continue an interrupted run from its last checkpoint, with its own overrides."""
    import yaml

    overrides_file = run / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        _error(f"{run} is not a run directory: it has no .hydra/overrides.yaml. Allowed: a "
               "directory that `bnexp train` wrote.")
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        given = yaml.safe_load(overrides_file.read_text()) or []
        if not isinstance(given, list) or not all(isinstance(o, str) for o in given):
            raise ValueError("not a list of overrides")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        _error(f"{overrides_file} cannot be read ({' '.join(str(exc).split())}), so the run's "
               "overrides are unknown. Resume with them given by hand: `bnexp train "
               f"OVERRIDES resume={run}`.")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    given = [o for o in given if not o.startswith("resume=")]
    raise typer.Exit(_run_hydra([*given, _quote_path(f"resume={run}"),
                                 _quote_path(f"hydra.run.dir={run}")]))


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
        if g not in GROUPS:
            _error(f"unknown config group {g!r}. Allowed: {', '.join(GROUPS)}.")
            raise typer.Exit(EXIT_BAD_INPUT)
        typer.echo(f"{g}:")
        for option in group_options(g):
            mark = "*" if option == defaults.get(g) else " "
            typer.echo(f"  {mark} {option:<14} {describe_option(g, option)}")


MOVE_ASIDE_HELP = ("Where a job's directory holds a run of another config, move those runs "
                   "into <sweep>.replaced-<time>/ beside the sweep and run; without it the "
                   "sweep stops before running anything. Nothing is ever deleted.")


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
    vectorize: bool = typer.Option(False, "--vectorize",
                                   help="Train jobs that differ only in lr, seed, momentum, "
                                        "weight decay, betas or init std as one stack of "
                                        "models in one process (torch.func.vmap)."),
    move_aside: bool = typer.Option(False, "--move-aside", help=MOVE_ASIDE_HELP),
) -> None:
    """Run a grid of trainings (Hydra multirun), resumable: finished jobs are skipped.

    OVERRIDES use Hydra's sweep grammar: optim.lr=0.01,0.1,1 model.norm=batch,none seed=0,1,2,
    range(...), choice(...). Jobs land in outputs/sweeps/NAME/<swept key=value,...>, with a
    manifest.json of each job's status. Launchers: --jobs N (local processes), or
    hydra/launcher=bnexp_slurm (SLURM via submitit) or submitit_local. --vectorize trains
    compatible jobs as one stack (several times the throughput of one by one for small nets;
    each job still gets its own run directory). Exit code 3 if a job failed; diverged runs are
    results, not failures.
    """
    from bnexp import sweep as sweeps

    overrides = list(ctx.args)
    if lr_grid:
        try:
            grid = sweeps.log_grid(lr_grid)
        except ValueError as exc:
            _error(str(exc))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        overrides.insert(0, "optim.lr=" + ",".join(f"{v:g}" for v in grid))
    code, sweep_dir = _launch_sweep(overrides, name, "sweeps", jobs, dry_run, vectorize,
                                    move_aside)
    if code in interrupt.EXIT_CODES.values():
        _sweep_summary(sweep_dir, stopped=True)
    if code or dry_run:
        raise typer.Exit(code)
    raise typer.Exit(_sweep_summary(sweep_dir))


def _launch_sweep(overrides: list[str], name: str | None, kind: str, jobs: int,
                  dry_run: bool, vectorize: bool = False,
                  move_aside: bool = False) -> tuple[int, Path]:
    """Run a multirun through our sweeper into outputs/<kind>/<name>; (exit code, sweep dir)."""
    from bnexp import sweep as sweeps
    from bnexp.config import ConfigError, check_overrides, compose, outputs_root, path_component

    if vectorize and (jobs > 1 or any(o.startswith("hydra/launcher=") for o in overrides)):
        _error("--vectorize trains in one process with its own launcher: it cannot be "
               "combined with --jobs N or hydra/launcher=...; drop one of them.")
        return EXIT_BAD_INPUT, Path()
    try:
        flags = [o for o in overrides if o.startswith("-")]
        if flags:
            command = "sweep" if kind == "sweeps" else "reproduce"
            raise ConfigError(
                f"unknown option {flags[0]!r}. `bnexp {command}` takes the options listed by "
                f"`bnexp {command} --help`, then overrides (key=value, key=a,b,c).")
        check_overrides(overrides, keys=False)  # grammar and group options, swept included
        fixed, swept = sweeps.split_overrides(overrides)
        common = compose(fixed)  # must be valid; each job is validated before launch
        check_overrides(overrides, composed=common)  # keys, swept ones included
        _check_writable([])  # the outputs root (BNEXP_OUTPUTS)
    except (ConfigError, ValueError) as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT, Path()
    # One directory under outputs/<kind>/, whatever was typed (`--name ../../x` stays inside).
    name = path_component(name) if name else sweeps.sweep_name(fixed, swept)
    if name in (".", ".."):
        name = name.replace(".", "_")
    sweep_dir = outputs_root() / kind / name
    argv = ["-m", *overrides, "hydra/sweeper=bnexp", f"hydra.sweep.dir='{sweep_dir}'"]
    if dry_run:
        argv.append("hydra.sweeper.dry_run=true")
    if move_aside:
        argv.append("hydra.sweeper.move_aside=true")
    if vectorize:
        argv.append("hydra/launcher=bnexp_vectorized")
    if jobs > 1 and not any(o.startswith("hydra/launcher=") for o in overrides):
        threads = max(1, (os.cpu_count() or 1) // jobs)  # 2 jobs x 1 thread on 2 cores
        argv += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}",
                 f"trainer.threads={threads}"]
    elif not vectorize and not any(o.startswith("hydra/launcher=") for o in overrides):
        argv.append("hydra/launcher=bnexp_basic")  # Hydra's basic launcher, leaner per job
    os.environ["BNEXP_SWEEP_COMMAND"] = "bnexp " + " ".join(sys.argv[1:])
    return _hydra(argv), sweep_dir


def _sweep_summary(sweep_dir: Path, stopped: bool = False) -> int:
    """Print where a sweep stands (after a stop signal too: stopped); its exit code."""
    from bnexp import sweep as sweeps

    if stopped and not (sweep_dir / sweeps.MANIFEST).is_file():
        return 0  # stopped before any job was planned: nothing to report
    counts = sweeps.counts(sweeps.read_manifest(sweep_dir))
    typer.echo(f"\nsweep {sweep_dir.name}: "
               + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    typer.echo(f"outputs:     {sweep_dir}")
    typer.echo(f"compare:     bnexp compare {sweep_dir}")
    if counts.get("interrupted"):  # stopped from outside (a cancelled SLURM job, a kill)
        typer.echo(f"resume:      {counts['interrupted']} interrupted job(s) continue from their "
                   "checkpoints when the same command runs again")
    elif stopped:
        typer.echo("resume:      the same command runs the jobs left; finished ones are skipped")
    return sweeps.EXIT_SOME_FAILED if counts.get("failed") or counts.get("interrupted") else 0


def study_name(experiment: str, overrides: list[str]) -> str:
    """A study's directory: its name, plus the overrides that change what it trains beyond
    narrowing its own grid (`seed=0` stays in the study; `optim.lr=0.05` gets its own), so
    that runs of another config never land where a study's results are."""
    from bnexp.config import UNHASHED, experiment_grid_keys, path_component, short_keys

    grid = experiment_grid_keys(experiment)
    extra = [o for o in overrides if "=" in o and not o.startswith("hydra")
             and (key := o.split("=", 1)[0].lstrip("+~")) not in grid and key not in UNHASHED]
    if not extra:
        return experiment
    pairs = sorted(o.lstrip("+~").split("=", 1) for o in extra)
    names = short_keys([k for k, _ in pairs])
    return path_component(f"{experiment}__" + ",".join(f"{names[k]}={v}" for k, v in pairs))


@app.command(context_settings=PASSTHROUGH)
def reproduce(
    ctx: typer.Context,
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Parallel local jobs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the jobs; run none."),
    list_studies: bool = typer.Option(False, "--list", help="Show the studies and claims."),
    report_only: bool = typer.Option(False, "--report-only",
                                     help="Write the report from the runs already there."),
    vectorize: bool = typer.Option(True, "--vectorize/--no-vectorize",
                                   help="Train the seeds and LRs of a variant as one stack "
                                        "(see sweep); on by default."),
    move_aside: bool = typer.Option(False, "--move-aside", help=MOVE_ASIDE_HELP),
) -> None:
    """Run a classic BN study and write report.md and verdicts.json with a verdict per claim.

    bnexp reproduce NAME [OVERRIDES]: runs configs/experiment/NAME.yaml as a resumable sweep
    into outputs/studies/NAME (NAME__<overrides> when overrides change what the study trains
    beyond its own grid), then writes report.md, verdicts.json and figures there; each
    verdict comes from paired seeds with a 95% interval. `scale=paper` runs the
    paper-sized version (full datasets; a GPU is advised). `bnexp reproduce --list` shows the
    studies and the claims each tests.
    """
    from bnexp import reproduce as rep
    from bnexp import sweep as sweeps
    from bnexp.config import group_options
    from bnexp.runs import find
    from bnexp.studies import STUDIES

    args = list(ctx.args)
    if list_studies or not args:
        for name, study in STUDIES.items():
            typer.echo(f"{name}: {study.title}")
            for claim in study.claim_texts:
                typer.echo(f"    - {claim}")
        raise typer.Exit(0 if list_studies else EXIT_BAD_INPUT)
    name, overrides = args[0], args[1:]
    if name not in STUDIES:
        _error(f"unknown study {name!r}. Allowed: {', '.join(STUDIES)} (see --list).")
        raise typer.Exit(EXIT_BAD_INPUT)
    scale = [o for o in overrides if o.startswith("scale=")]
    overrides = [o for o in overrides if not o.startswith("scale=")]
    if scale and scale[-1] not in ("scale=cpu", "scale=paper"):
        _error(f"{scale[-1]}: allowed scale=cpu (default) or scale=paper.")
        raise typer.Exit(EXIT_BAD_INPUT)
    experiment = f"{name}_paper" if scale and scale[-1] == "scale=paper" else name
    if experiment not in group_options("experiment"):
        _error(f"study {name} has no configs/experiment/{experiment}.yaml.")
        raise typer.Exit(EXIT_BAD_INPUT)
    if not any(o.lstrip("+").startswith("trainer.threads=") for o in overrides):
        # A rerun must repeat the verdicts: thread counts that follow the load would change
        # the order of floating-point sums (device.choose_threads). Not part of the study's
        # name or hash, so finished runs stay the study's.
        overrides = [*overrides, "trainer.threads=steady"]
    code, sweep_dir = 0, None
    study_dir = study_name(experiment, overrides)
    if not report_only:
        code, sweep_dir = _launch_sweep([f"experiment={experiment}", *overrides], study_dir,
                                        "studies", jobs, dry_run, vectorize, move_aside)
        if code == EXIT_BAD_INPUT or dry_run:
            raise typer.Exit(code)
        if code in interrupt.EXIT_CODES.values():
            # A report of the runs a stop left would replace the study's last one.
            _sweep_summary(sweep_dir, stopped=True)
            typer.echo("report:      not written, since the study was stopped: the same "
                       "command resumes it, then writes the report")
            raise typer.Exit(code)
        code = _sweep_summary(sweep_dir)
    from bnexp.config import outputs_root

    sweep_dir = sweep_dir or outputs_root() / "studies" / study_dir
    runs = find([sweep_dir]) if sweep_dir.exists() else []
    if not runs:
        _error(f"no runs under {sweep_dir}: run `bnexp reproduce {name}` first.")
        raise typer.Exit(EXIT_BAD_INPUT)
    manifest = sweeps.read_manifest(sweep_dir)
    path, verdicts = rep.report(experiment, runs, sweep_dir,
                                manifest.get("command", f"bnexp reproduce {name}"), manifest)
    typer.echo("")
    for v in verdicts:
        typer.echo(f"{v.verdict:>14}  {v.claim}\n{'':>16}{v.measured}"
                   + (f"\n{'':>16}{v.reason}" if v.reason else ""))
    typer.echo(f"\nreport: {path}\nverdicts: {path.parent / rep.VERDICTS}")
    raise typer.Exit(code)


@app.command()
def compare(
    paths: list[Path] = typer.Argument(None, help="Run or sweep directories (default: outputs)."),
    metric: list[str] = typer.Option(None, "--metric", "-m",
                                     help="Metrics to show (repeatable); default a useful few."),
    sort: str = typer.Option(None, help="Sort rows by this metric or key."),
    ascending: bool = typer.Option(False, "--ascending", help="Sort ascending (default: "
                                                              "descending)."),
    where: list[str] = typer.Option(None, "--where", "-w",
                                    help="Keep runs with KEY=VALUE (repeatable; norm=batch)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv, markdown or json."),
    per_run: bool = typer.Option(False, "--per-run", help="One row per run, seeds apart."),
    lr_metric: str = typer.Option("final_val_acc", help="Metric that ranks learning rates."),
    tolerance: float = typer.Option(0.01, help="Good-LR range: mean within this of the best."),
    lr_only: bool = typer.Option(False, "--lr", help="Only the learning-rate table."),
) -> None:
    """Compare runs: varying config keys against metrics, seeds aggregated.

    Rows show mean ± std and n over seeds. With an LR sweep, also best LR, max stable LR and
    good-LR range per variant.
    """
    from bnexp import compare as cmp
    from bnexp.config import outputs_root
    from bnexp.runs import find

    if fmt not in ("table", "csv", "markdown", "json"):
        _error(f"--format {fmt!r}: allowed table, csv, markdown, json.")
        raise typer.Exit(EXIT_BAD_INPUT)
    paths = paths or [outputs_root()]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        _error(f"no such path: {', '.join(missing)}.")
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        runs = cmp.select(find(paths), where or [])
    except ValueError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if not runs:
        _error(f"no runs (directories with summary.json) under {', '.join(map(str, paths))}"
               + (f" matching {' '.join(where)}" if where else "") + ".")
        raise typer.Exit(EXIT_BAD_INPUT)
    recorded = sorted(set().union(*(r.metrics for r in runs)))
    for option, names in (("--metric", metric or []), ("--lr-metric", [lr_metric])):
        unknown = [m for m in names if m not in recorded]
        if unknown:
            _error(f"Invalid value for {option}: {unknown[0]!r}: no run records it. Allowed: "
                   f"{', '.join(recorded)}.")
            raise typer.Exit(EXIT_BAD_INPUT)
    result = cmp.compare(runs, metric or cmp.DEFAULT_METRICS, per_run, lr_metric, tolerance)
    columns = list(dict.fromkeys(k for row in result["rows"] for k in row))
    if sort and sort not in columns:
        _error(f"Invalid value for --sort: {sort!r} is not a column of this comparison. "
               f"Allowed: {', '.join(columns)} (add a metric with --metric to sort by it).")
        raise typer.Exit(EXIT_BAD_INPUT)
    rows = cmp.sort_rows(result["rows"], sort, not ascending)
    lr_rows = cmp.sort_rows(result["lr"], None, True)
    if fmt == "json":
        typer.echo(json.dumps({"runs": result["runs"], "varying": result["keys"],
                               "rows": rows, "lr": lr_rows, "skipped": result["skipped"],
                               "repeats": result["repeats"]}, indent=2, default=str))
        return
    if not lr_only:
        typer.echo(cmp.render(rows, fmt, f"{len(runs)} runs, varying: "
                                         f"{', '.join(result['keys']) or 'nothing'}"), nl=False)
    if lr_only and not lr_rows:
        _error("--lr: optim.lr does not vary between these runs.")
        raise typer.Exit(EXIT_BAD_INPUT)
    if lr_rows and (lr_only or fmt != "csv"):  # one CSV table per call
        if not lr_only:
            typer.echo("")
        typer.echo(cmp.render(lr_rows, fmt, f"learning rates (by {lr_metric}; stable = no seed "
                                            f"diverged and every seed reached the target)"),
                   nl=False)
    notes = []  # under a table for people (csv and json carry no prose)
    if result["skipped"]:
        notes.append("not compared: " + ", ".join(f"{n} {s}" for s, n in
                                                  result["skipped"].items()))
    if result["repeats"]:
        notes.append(_repeats_note(result["repeats"]))
    if notes and fmt in ("table", "markdown"):  # markdown: a paragraph each
        typer.echo("\n" + "\n\n".join(notes) if fmt == "markdown" else "\n".join(notes))


def _repeats_note(repeats: list[dict]) -> str:
    """Which runs repeat one already counted (one sample, not another seed), a few by name."""
    shown = [f"{r['run']} (as {r['same_as']})" for r in repeats[:3]]
    more = f" and {len(repeats) - 3} more" if len(repeats) > 3 else ""
    return (f"counted once: {len(repeats)} run(s) trained the same config and seed as a run "
            f"shown (they differ only in what was recorded or where it ran): "
            f"{'; '.join(shown)}{more}")


@app.command()
def plot(
    path: Path = typer.Argument(None, help="A sweep or outputs directory (default: outputs)."),
    out: Path = typer.Option(None, help="Where the figures go (default: PATH/plots)."),
    metric: str = typer.Option("final_val_acc", help="Accuracy metric for the LR figures and "
                                                     "the best LR (compare ranks by it too)."),
    fmt: str = typer.Option("png", "--format", help="png, svg or pdf."),
    tensorboard: bool = typer.Option(True, help="Also write seed-aggregated TensorBoard runs "
                                                "under PATH/_aggregate."),
) -> None:
    """Figures over runs, and seed-aggregated TensorBoard runs.

    Accuracy and steps-to-target vs LR with seed bands, val-accuracy curves per variant, the
    share of seeds that diverged or stayed at chance (variant x LR).
    """
    from bnexp import plots
    from bnexp.config import outputs_root
    from bnexp.runs import find

    if fmt not in plots.FORMATS:
        _error(f"Invalid value for --format: {fmt!r}. Allowed: {', '.join(plots.FORMATS)}.")
        raise typer.Exit(EXIT_BAD_INPUT)
    path = path or outputs_root()
    runs = find([path]) if path.exists() else []
    if not runs:
        _error(f"no runs (directories with summary.json) under {path}.")
        raise typer.Exit(EXIT_BAD_INPUT)
    target = out or path / "plots"
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        _error(f"Invalid value for --out: {str(target)!r}: {existing} is a file. Allowed: a "
               "directory (it is created if missing).")
        raise typer.Exit(EXIT_BAD_INPUT)
    recorded = sorted(set().union(*(r.metrics for r in runs)))
    if metric not in recorded:
        _error(f"Invalid value for --metric: {metric!r}: no run records it. Allowed: "
               f"{', '.join(m for m in recorded if 'acc' in m)}.")
        raise typer.Exit(EXIT_BAD_INPUT)
    notes: list[str] = []
    for figure in plots.save(plots.make_figures(runs, metric, notes), target, fmt):
        typer.echo(f"wrote {figure}")
    for note in notes:
        typer.echo(note)
    if tensorboard:
        base = plots.tensorboard_runs(runs, path)
        typer.echo(f"wrote seed-aggregated TensorBoard runs under {base}")
        typer.echo(f"open:  bnexp board {path}")


@app.command()
def board(
    path: Path = typer.Argument(None, help="Outputs or sweep directory (default: outputs)."),
    host: str = typer.Option("localhost", help="Interface to serve on."),
    port: int = typer.Option(0, help="Port (0 = a free one)."),
) -> None:
    """Start TensorBoard on the runs and print its URL; Ctrl-C stops it."""
    import socket
    import time

    from bnexp.config import outputs_root

    path = path or outputs_root()
    if not path.exists():
        _error(f"no such directory: {path}. Train or sweep first, or pass a path.")
        raise typer.Exit(EXIT_BAD_INPUT)
    if not 0 <= port <= 65535:
        _error(f"Invalid value for --port: {port}. Allowed: 1..65535, or 0 for a free one.")
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        with socket.socket() as sock:  # the host resolves and the port is free: say so now
            sock.bind((host, port))
            port = sock.getsockname()[1]
    except OSError as exc:
        key, value = ("--host", host) if isinstance(exc, socket.gaierror) else ("--port", port)
        _error(f"Invalid value for {key}: {value!r}. TensorBoard cannot serve on {host}:{port} "
               f"({exc.strerror or exc}). Allowed: a local interface name or address, and a "
               "free port (0 picks one).")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    from tensorboard import program

    tb = program.TensorBoard()
    tb.configure(argv=[None, "--logdir", str(path), "--host", host, "--port", str(port),
                       "--reload_interval", "5", "--load_fast", "true"])
    url = tb.launch()
    typer.echo(f"TensorBoard on {path}: {url}  (Ctrl-C to stop)", err=False)
    sys.stdout.flush()
    try:
        # Short sleeps: a Ctrl-C that the kernel hands to one of TensorBoard's gRPC threads
        # only runs Python's handler once the main thread wakes up (a long sleep hung here).
        while True:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass


@app.command()
def inspect(run: Path = typer.Argument(..., help="A run directory or a checkpoint file."),
            json_out: bool = typer.Option(False, "--json",
                                          help="Print the norm-layer report as JSON."),
            ) -> None:
    """Print a trained model and, for each norm layer (batch, layer, group or instance norm),
    its settings and statistics: running mean/var where the layer keeps them, gamma/beta."""

    from rich.console import Console
    from rich.table import Table

    from bnexp.probes import norm_report
    from bnexp.run import load_model

    try:
        model, ckpt = load_model(run)
    except FileNotFoundError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    rows = norm_report(model)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    console = Console()
    console.print(f"[bold]{run}[/bold]  step {ckpt['step']}")
    console.print(model)
    if not rows:
        console.print("No norm layers (model.norm=none).")
        return
    def fmt(st: dict | None) -> str:
        return "—" if st is None else " / ".join(f"{st[k]:.3g}" for k in
                                                 ("mean", "std", "min", "max"))

    def text(v: object) -> str:
        return "—" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    # Only the columns some layer has: running statistics are BN's, groups GroupNorm's.
    columns = {"layer": "layer", "type": "type", "features": "num_features",
               "groups": "groups", "eps": "eps", "momentum": "momentum", "affine": "affine",
               "batches": "num_batches_tracked", "running_mean": "running_mean",
               "running_var": "running_var", "gamma": "gamma", "beta": "beta"}
    columns = {c: k for c, k in columns.items() if any(r[k] is not None for r in rows)}
    table = Table(title="Norm layers: settings, and mean / std / min / max of each tensor")
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(*(fmt(r[k]) if isinstance(r[k], dict) or k in (
            "running_mean", "running_var", "gamma", "beta") else text(r[k])
            for k in columns.values()))
    console.print(table)


_ONE_COMMAND_PROCESS = False  # set by main(): this process runs one command, then exits


def main() -> None:
    global _ONE_COMMAND_PROCESS
    _ONE_COMMAND_PROCESS = True
    try:
        code = _command()
    except KeyboardInterrupt:  # a second stop signal while the command was ending
        code = interrupt.exit_code()
    leave(code)


def _command() -> int | str | None:
    """The command's exit status (SystemExit's code)."""
    try:
        app()
    except KeyboardInterrupt:  # one that escaped every command's own handling: still 130/143
        return interrupt.exit_code()
    except SystemExit as exc:
        return exc.code
    finally:
        # The command is over (on a signal, or a Ctrl-C that arrives as it ends): another one
        # must not print a trace.
        interrupt.ignore_further()
        # The interpreter's exit collects garbage over every object torch created at import:
        # ~0.6 s of each process here. Frozen objects are skipped (docs/performance.md).
        gc.freeze()
    return 0


def leave(code: int | str | None) -> NoReturn:
    """End the process as the interpreter would (non-daemon threads joined, atexit handlers
    run, streams flushed) less its last step, tearing down every module's objects one by
    one: ~0.1 s after `import torch` here, ~4 % of a `bnexp train` (docs/performance.md). A
    process with a thread still running exits the usual way."""
    import atexit
    import signal
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops the wait
        raise SystemExit(code)
    threading._shutdown()  # what the interpreter's exit does first: threading's own atexits
    atexit._run_exitfuncs()  # logging's flush and close, multiprocessing's, torch's...
    if isinstance(code, str):  # SystemExit's message: to stderr, status 1
        print(code, file=sys.stderr)
        code = 1
    status = 0 if code is None else code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`bnexp ... | head`): nothing to add
            status = status or 120  # the status the interpreter gives a failed flush
    os._exit(status)
