"""One run: its directory, data, model, records and state, from set-up to its summary.

A `Run` is built completely by its constructor (checks, data and model on the device, the
`running` summary, the TensorBoard writer, a resumed run's state) and then only answers to the
loop: the next batch, a log window, an evaluation, diagnostics, a checkpoint, the finish. How
its steps are taken is not its business (bnexp.steps); it reads the step's results as the loop
hands them over.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bnexp import catalog, data, interrupt, metrics, models, probes, record
from bnexp.config import UNHASHED, ConfigError, config_hash, diagnostics_level, resolved
from bnexp.device import choose_eval_batch_size, environment, resolve_device, seed_everything
from bnexp.steps import effective_lr, full_precision

log = logging.getLogger("bnexp")
RESIDENT_FLOAT_BYTES = 2**31  # a standardized float copy of the training set up to this size
RESUME_KEYS = frozenset({
    "model", "optimizer", "config", "config_hash", "step", "epoch", "perm", "pos",
    "generator", "torch_rng", "cuda_rng", "numpy_rng", "python_rng", "window", "grad_norms",
    "history", "elapsed"})  # what a resumed Run reads


# ----------------------------------------------------------------------------- checks


def preflight(cfg: DictConfig) -> tuple[torch.device, data.Dataset]:
    """Everything that can be wrong before training starts: device, dataset, sizes."""
    device = resolve_device(cfg.device)
    ds = data.load(cfg.data)
    n = len(ds.y_train)
    if cfg.trainer.batch_size > n:
        raise ConfigError(
            f"Invalid value for trainer.batch_size: {cfg.trainer.batch_size}. Allowed: at most "
            f"the training set size of data={cfg.data.name}, {n} samples."
        )
    resume_checkpoint(cfg)  # a bad resume path or a changed config stops here too
    if cfg.trainer.compile == "graph" and device.type != "cuda":
        raise ConfigError(
            f"Invalid value for trainer.compile: graph (device={cfg.device} is {device}). "
            "Allowed: graph needs a CUDA device (it captures the training step in a CUDA "
            "graph); on a CPU use auto, on or off."
        )
    return device, ds


def resume_checkpoint(cfg: DictConfig) -> dict | None:
    """The checkpoint to continue from when cfg.resume is set, after checking that it is a
    run directory of this very config; None when not resuming."""
    if not cfg.resume:
        return None
    path = Path(str(cfg.resume))
    last = record.last_checkpoint(path)
    try:
        status = record.read_summary(path).get("status")
    except (OSError, ValueError, AttributeError):
        status = None  # missing or unreadable: the checkpoint decides
    if status in record.FINISHED:  # its last checkpoint is gone or stale: say why
        raise ConfigError(
            f"resume={path}: this run is already {status}; there is nothing to resume and it "
            "was left as it is. To train longer, start a new run with more trainer.epochs.")
    if not (path / record.SUMMARY).is_file() or not last.is_file():
        raise ConfigError(
            f"Invalid value for resume: {str(path)!r}. Allowed: a run directory with "
            f"{record.SUMMARY} and {record.CHECKPOINTS}/{record.LAST_CHECKPOINT} (written every "
            f"trainer.checkpoint_every steps and when a run is interrupted)."
        )
    try:
        ckpt = record.load_checkpoint(last)
    except FileNotFoundError as exc:
        raise ConfigError(f"resume={path}: {exc} The run was left as it is; rerun it from "
                          "the start in a new directory (drop resume=).") from None
    missing = sorted(RESUME_KEYS - set(ckpt))
    if missing:
        raise ConfigError(
            f"resume={path}: {last} lacks {', '.join(missing)}, so the run cannot continue "
            "exactly where it stopped (a checkpoint of an older bnexp, or not a resume "
            "checkpoint). The run was left as it is; rerun it from the start (drop resume=).")
    if ckpt.get("config_hash") != config_hash(cfg):
        from bnexp.runs import flatten

        now, then = flatten(resolved(cfg)), flatten(ckpt.get("config_raw", {}))
        diff = [f"{k}: {then.get(k)!r} in the checkpoint, {now.get(k)!r} now"
                for k in sorted(set(now) | set(then))
                if now.get(k) != then.get(k) and k not in UNHASHED]
        raise ConfigError(
            f"resume={path}: the config does not match the checkpoint's ("
            + "; ".join(diff[:5]) + "). Resume with the run's own overrides: "
            f"`bnexp resume {path}`."
        )
    return ckpt


# ----------------------------------------------------------------------------- the run


@dataclass
class History:
    """What the loop observed; `summarize` turns it into the summary's metrics."""

    val_acc: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    val_wall: list[tuple[int, float]] = field(default_factory=list)  # seconds since start
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    train_acc: list[tuple[int, float]] = field(default_factory=list)
    landscape: list[tuple[int, dict]] = field(default_factory=list)
    diagnostics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # every step
    train_seconds: float = 0.0
    eval_seconds: float = 0.0  # evaluation's share of wall_seconds (off the training clock)
    samples: int = 0
    diverged_at_step: int | None = None
    diverged_reason: str | None = None

    @classmethod
    def restored(cls, saved: dict) -> History:
        """A History from its dataclasses.asdict() form (in a checkpoint)."""
        return cls(**{k: [tuple(x) if isinstance(x, list) else x for x in v]
                      if isinstance(v, list) and k != "grad_norms" else v
                      for k, v in saved.items()})


@dataclass
class StepState:
    """What a run's checkpoint needs from its step and the loop (see Eager / Stack)."""

    optimizer: dict
    loss_sum: torch.Tensor
    correct: torch.Tensor
    window_steps: int
    grad_norms: torch.Tensor  # every step's, of the whole budget


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, inputs: data.Inputs | None,
             batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy over (x, y) in eval mode, i.e. with BN's running statistics.
    inputs turns raw uint8 batches into model inputs; None when x already is model input."""
    was_training = model.training
    model.eval()
    dtype = inputs.dtype if inputs is not None else x.dtype
    loss_sum = torch.zeros((), device=x.device, dtype=dtype)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for s in data.eval_batches(len(y), batch_size):
        logits = full_precision(model(inputs(x[s]) if inputs is not None else x[s]))
        loss_sum += F.cross_entropy(logits, y[s], reduction="sum")
        correct += (logits.argmax(1) == y[s]).sum()
    model.train(was_training)
    return loss_sum.item() / len(y), correct.item() / len(y)


class Run:
    """One configured run in run_dir. threads: the process's CPU threads (chosen by the loop
    for its group); shared: another run of the same stack, whose standardized data this one
    reads instead of making its own copy; stacked: the number of runs in the stack."""

    def __init__(self, cfg: DictConfig, run_dir: Path, threads: int,
                 shared: Run | None = None, stacked: int = 1):
        run_dir = Path(run_dir)
        started = time.perf_counter()
        # A stack's runs share the data, batch size and device (steps.group_key) and are never
        # resumed (steps.stackable): the first run's checks hold for the others.
        device, ds = (shared.device, shared.ds) if shared is not None else preflight(cfg)
        ckpt = resume_checkpoint(cfg)
        if ckpt and Path(str(cfg.resume)).resolve() != run_dir.resolve():
            raise ConfigError(f"resume={cfg.resume} must continue in its own directory; "
                              f"drop hydra.run.dir or set it to {cfg.resume}.")
        # A plain dataclass: DictConfig attribute reads cost ~50 us each, many per step.
        self.cfg, self.trainer, self.run_dir = cfg, OmegaConf.to_object(cfg.trainer), run_dir
        self.config_raw = resolved(cfg)
        self.config_hash = config_hash(self.config_raw)
        config = copy.deepcopy(self.config_raw)
        # Record the values that ran, not the "auto" placeholders.
        config["model"]["affine"] = models.Knobs.from_config(cfg.model).affine
        self.target = cfg.trainer.target_acc or catalog.DATASETS[cfg.data.name].target_acc
        config["trainer"]["target_acc"] = self.target
        self.trainer.diagnostics = diagnostics_level(
            self.trainer.diagnostics, in_sweep=record.sweep_manifest(run_dir) is not None)
        config["trainer"]["diagnostics"] = self.trainer.diagnostics
        self.env = environment(device, threads)
        if stacked > 1:
            self.env["vectorized_models"] = stacked
        seed_everything(cfg.seed, cfg.trainer.deterministic)
        self.device, self.ds = device, ds if shared is not None else ds.to(device)
        ds = self.ds
        model = models.build(cfg.model, ds.in_shape, ds.num_classes).to(device)
        if cfg.trainer.precision == "fp64":
            model = model.double()
        self.model = model
        record.discard_partial_writes(run_dir)
        record.write_summary(run_dir, "running", config, {}, self.env,
                             config_hash=self.config_hash)

        self.augment = bool(cfg.data.augment)
        if shared is not None:  # the data config is common to a stack
            self.inputs, self.x_train, self.x_val = shared.inputs, shared.x_train, shared.x_val
        else:
            self.inputs = data.Inputs(ds, cfg.data.inputs, next(model.parameters()).dtype)
            # Standardize the training set once when no batch is augmented: converting and
            # scaling each uint8 batch is a visible share of an MLP step (docs/performance.md).
            resident = not self.augment and ds.x_train.numel() * 4 <= RESIDENT_FLOAT_BYTES
            self.x_train = self.inputs(ds.x_train) if resident else None
            # The validation set is never augmented: standardize it once when it fits too.
            self.x_val = (self.inputs(ds.x_val) if ds.x_val.numel() * 4 <= RESIDENT_FLOAT_BYTES
                          else None)
        self.lr = effective_lr(cfg)
        self.steps_per_epoch = len(ds.y_train) // self.trainer.batch_size
        self.total_steps = self.trainer.steps or self.trainer.epochs * self.steps_per_epoch
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.autocast = self.trainer.precision == "bf16"
        # channels_last: the layout cuDNN's fastest conv kernels (and bf16 tensor cores) use.
        self.channels_last = device.type == "cuda" and cfg.model.name != "mlp"
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.activation = str(cfg.model.activation)
        setting = str(self.trainer.eval_batch_size)
        if shared is not None and setting == str(shared.trainer.eval_batch_size):
            self.eval_batch_size = shared.eval_batch_size  # the same network and data
        else:
            example = self.x_val[:2] if self.x_val is not None else self.inputs(ds.x_val[:2])
            self.eval_batch_size = choose_eval_batch_size(setting, model, example, device)
        config["trainer"]["eval_batch_size"] = self.eval_batch_size  # the value that ran
        self.config = config
        self.events = record.Events(run_dir, ckpt["step"] + 1 if ckpt else None)
        self.progress = Progress(self.trainer.progress if stacked == 1 else "none",
                                 self.total_steps, self.steps_per_epoch)
        self.divergence_bound = self.trainer.divergence_factor * metrics.chance_loss(ds.num_classes)
        if shared is not None:  # probe_batch_size is common to a stack (steps.group_key)
            self.probe_x, self.probe_y = shared.probe_x, shared.probe_y
        else:
            n_probe = min(self.trainer.probe_batch_size, len(ds.y_train))
            self.probe_x = self.inputs(ds.x_train[:n_probe])  # fixed: the same at every probe
            self.probe_y = ds.y_train[:n_probe]
        # Where the run stands: its step and data order (this epoch's permutation and the
        # position of the next batch in it), and what it observed.
        self.step, self.epoch, self.perm, self.pos = 0, 0, None, 0
        self.history = History()
        self.checkpoint = ckpt  # a resumed run's: the step (bnexp.steps) reads its part
        self.resumed = ckpt is not None
        if ckpt:
            self._restore(ckpt)
            started = time.perf_counter() - ckpt["elapsed"]
        self.started = started
        self.setup_seconds = time.perf_counter() - started  # imports excluded (paid above)
        log.info("bnexp: %s, %s (norm=%s, activation=%s), %s lr=%g, %d steps on %s, "
                 "threads=%d%s", cfg.data.name, cfg.model.name, cfg.model.norm,
                 cfg.model.activation, cfg.optim.name, self.lr, self.total_steps, device,
                 threads, f", resuming at step {self.step}" if ckpt else "")

    def _restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint: weights, data order, every RNG, the history (the
        optimizer state, log window and gradient norms are the step's: see bnexp.steps)."""
        import numpy as np

        self.model.load_state_dict(ckpt["model"])
        self.step, self.epoch, self.pos = ckpt["step"], ckpt["epoch"], ckpt["pos"]
        self.perm = None if ckpt["perm"] is None else ckpt["perm"].to(self.device)
        self.generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        np.random.set_state(ckpt["numpy_rng"])
        random.setstate(ckpt["python_rng"])
        self.history = History.restored(ckpt["history"])

    # ------------------------------------------------------------------ data order

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """The model inputs of a batch of training indices."""
        # index_select, not x[idx]: much faster on a CPU (docs/performance.md, measured choices).
        if self.x_train is not None:
            x = self.x_train.index_select(0, idx)
        else:
            x = self.ds.x_train.index_select(0, idx)
            if self.augment:
                x = data.augment(x, self.generator)
            x = self.inputs(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def epoch_used_up(self) -> bool:
        """Whether the next batch starts a new epoch (none yet, or no full batch left)."""
        return self.perm is None or (self.pos + 1) * self.trainer.batch_size > len(self.perm)

    def new_epoch(self) -> None:
        """A new shuffled order of the training set (its last partial batch is dropped: a BN
        batch of one or two samples is meaningless)."""
        self.epoch += 1
        self.perm = torch.randperm(len(self.ds.y_train), generator=self.generator,
                                   device=self.device)
        self.pos = 0

    # ------------------------------------------------------------------ records

    def log_window(self, loss_sum: torch.Tensor, correct: torch.Tensor, steps: int,
                   seconds: float, grad_norms: torch.Tensor, lr: float) -> bool:
        """Read a log window's sums (the only host sync of the window), log them, and check
        for divergence; False if the run diverged. grad_norms: the window's steps'."""
        h, samples = self.history, steps * self.trainer.batch_size
        # one read-back for the three (on a GPU each read waits for the queued steps)
        loss_total, hits, grad_max = torch.stack([
            loss_sum.double(), correct.double(), grad_norms.max().double()]).tolist()
        mean_loss = loss_total / steps
        acc = hits / samples
        h.train_seconds += seconds
        h.samples += samples
        h.train_loss.append((self.step, mean_loss))
        h.train_acc.append((self.step, acc))
        sps = samples / max(seconds, 1e-9)
        self.events.scalars(self.step, {
            "train/loss": mean_loss, "train/acc": acc, "train/lr": lr,
            "train/grad_norm": grad_max, "train/samples_per_sec": sps,
        })
        self.progress.update(self.step, self.epoch, loss=mean_loss, sps=sps)
        patience = self.trainer.divergence_patience
        at, why = metrics.divergence(h.train_loss[-patience:], self.divergence_bound, patience)
        if at is not None:
            h.diverged_at_step, h.diverged_reason = at, why
            log.info("bnexp: diverged at step %d (%s)", at, why)
            return False
        return True

    def evaluate_and_log(self, found: tuple[float, float, float] | None = None) -> None:
        """Evaluate and record; found: (loss, accuracy, seconds) of an evaluation the run's
        stack did for all its models at once."""
        if found is None:
            ready = self.x_val is not None
            start = time.perf_counter()
            loss, acc = evaluate(self.model, self.x_val if ready else self.ds.x_val,
                                 self.ds.y_val, None if ready else self.inputs,
                                 self.eval_batch_size)
            seconds = time.perf_counter() - start
        else:
            loss, acc, seconds = found
        h = self.history
        h.eval_seconds += seconds
        h.val_loss.append((self.step, loss))
        h.val_acc.append((self.step, acc))
        h.val_wall.append((self.step, time.perf_counter() - self.started))
        self.events.scalars(self.step, {"val/loss": loss, "val/acc": acc})
        self.progress.update(self.step, self.epoch, val_acc=acc)

    def final_eval_acc(self) -> float | None:
        """The eval-mode accuracy of the weights as they are now, when the last evaluation
        measured them (at this step): the final mode comparison need not measure it again
        (~3 ms of an MLP run's ~10 ms comparison)."""
        h = self.history
        return h.val_acc[-1][1] if h.val_acc and h.val_acc[-1][0] == self.step else None

    def diagnose(self, last: bool = False) -> None:
        """Diagnostics at their cadences (step 0 included, as the baseline)."""
        trainer, step = self.trainer, self.step
        if trainer.diagnostics != "off" and (step % trainer.diagnostics_every == 0 or last):
            inputs = probes.activation_inputs(self.model, self.probe_x)
            values = probes.activation_scalars(inputs, self.activation)
            if step > 0:
                values.update(probes.layer_norms(self.model))
            self.history.diagnostics.append((step, values))
            if trainer.diagnostics in ("full", "scalars"):
                self.events.scalars(step, values)
            if trainer.diagnostics == "full" and (step % trainer.histogram_every == 0 or last):
                self.events.histograms(step, {f"act_input/{k}": v for k, v in inputs.items()})
                self.events.histograms(step, probes.norm_tensors(self.model))
        if trainer.probe_every and (step % trainer.probe_every == 0 or last):
            found = probes.landscape(self.model, self.probe_x, self.probe_y,
                                     tuple(r * self.lr for r in trainer.probe_step_sizes))
            self.history.landscape.append((step, found))
            self.events.scalars(step, {f"landscape/{k}": v for k, v in found.items()})

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self, state: StepState) -> dict:
        """Everything needed to continue exactly: weights, optimizer, the data order (this
        epoch's permutation and position), every RNG, the open log window and the history."""
        import numpy as np

        # Copies: a stacked model's tensors are views into all the stack's models, and
        # torch.save writes a view's whole storage (K models' weights in every checkpoint).
        weights = {k: v.detach().clone(memory_format=torch.contiguous_format)
                   for k, v in self.model.state_dict().items()}
        return {
            "model": weights, "optimizer": state.optimizer,
            "config": self.config, "config_raw": self.config_raw,
            "config_hash": self.config_hash, "step": self.step, "epoch": self.epoch,
            "perm": None if self.perm is None else self.perm.cpu(), "pos": self.pos,
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
            "window": (state.loss_sum.cpu(), state.correct.cpu(), state.window_steps),
            "grad_norms": state.grad_norms.cpu(), "history": dataclasses.asdict(self.history),
            "elapsed": time.perf_counter() - self.started,
            "in_shape": list(self.ds.in_shape), "num_classes": self.ds.num_classes,
        }

    def save(self, name: str, state: StepState) -> None:
        record.save_checkpoint(self.run_dir, self.checkpoint_state(state), name)

    # ------------------------------------------------------------------ the end

    def finish(self, status: str, state: StepState | None, error: str | None = None,
               notes: dict | None = None, modes: tuple[dict, dict] | None = None) -> dict:
        """Write what a run ends with: checkpoint, summary metrics, final evaluations in both
        BN modes, HParams, summary.json. Returns the summary as read back from disk. state:
        the step's, None when the step never existed (its set-up failed); modes: the
        train/eval-mode comparison its stack made for all its models at once."""
        with interrupt.deferred():  # a second Ctrl-C must not cut the results in half
            return self._finish(status, state, error, dict(notes or {}), modes)

    def _finish(self, status: str, state: StepState | None, error: str | None,
                notes: dict, modes: tuple[dict, dict] | None) -> dict:
        cfg, run_dir = self.cfg, self.run_dir
        if state is not None and (status == "interrupted"
                                  or (status == "failed" and cfg.trainer.checkpoint_every)):
            self.save(record.LAST_CHECKPOINT, state)  # what `bnexp resume` continues from
        if state is not None:
            self.history.grad_norms = state.grad_norms[: self.step].tolist()
        summary = summarize(self.history, cfg.trainer, self.step, self.total_steps,
                            self.steps_per_epoch, self.target,
                            time.perf_counter() - self.started)
        summary["lr"] = self.lr
        summary["train_samples"], summary["val_samples"] = (len(self.ds.y_train),
                                                            len(self.ds.y_val))
        summary["num_classes"] = self.ds.num_classes
        summary["total_steps"] = self.total_steps  # the budget; `steps` stops at divergence
        summary["setup_seconds"] = None if self.resumed else self.setup_seconds
        if status in record.FINISHED:
            ds = self.ds
            compared, found = modes or probes.mode_comparison(
                self.model, ds.x_val, ds.y_val, self.inputs, cfg.trainer.batch_size,
                bs1_samples=100 if self.trainer.diagnostics != "off" else 0,
                eval_acc=self.final_eval_acc())
            summary.update(compared)
            notes.update(found)
            if cfg.trainer.mode_batch_sizes:
                study, found = probes.mode_study(self.model, ds.x_val, ds.y_val, self.inputs,
                                                 list(cfg.trainer.mode_batch_sizes))
                summary.update(study)
                notes.update(found)
                summary.update(probes.population_statistics(self.model, ds.x_train,
                                                            self.inputs))
        self.events.hparams(self.step, self.config, summary, status)
        self.events.close()
        if cfg.trainer.checkpoint and status in record.FINISHED and state is not None:
            self.save(record.FINAL_CHECKPOINT, state)
        extra = {"error": error} if error else {}
        if notes:
            extra["notes"] = notes
        extra["config_hash"] = self.config_hash
        # The curves a verdict compares across runs (steps to a level both variants reach,
        # area under the accuracy curve), so that every number of a report traces here.
        h = self.history
        extra["curves"] = {"val_acc": h.val_acc, "val_loss": h.val_loss,
                           "train_loss": h.train_loss, "train_acc": h.train_acc}
        path = record.write_summary(run_dir, status, self.config, summary, self.env, **extra)
        return record.read_summary(path.parent)


# ----------------------------------------------------------------------------- summary


def diagnostic_summary(points: list[tuple[int, dict[str, float]]]) -> dict:
    """Per-run numbers from the diagnostics: how far the last hidden activation's input
    distribution drifted, how much smaller the first layer's gradient is than the last
    hidden layer's, and the final fraction of saturated units."""
    if not points:
        return {"act_input_drift": None, "grad_norm_first_over_last": None,
                "saturation_final": None}
    acts = sorted({k.split("/")[1] for k in points[0][1] if k.startswith("act_input/")},
                  key=lambda name: int(name[3:]))
    last = acts[-1] if acts else None
    drift = metrics.percentile_drift(
        [[v[f"act_input/{last}/p{q}"] for q in metrics.PERCENTILES] for _, v in points]
    ) if last else None
    layers = sorted({k for _, v in points for k in v if k.startswith("grad_norm/layer")},
                    key=lambda k: int(k.rsplit("layer", 1)[1]))
    ratios = [v[layers[0]] / v[layers[-2]] for _, v in points
              if len(layers) > 2 and layers[0] in v and v.get(layers[-2], 0) > 0]
    saturation = [v for k, v in points[-1][1].items() if k.startswith("saturation/")]
    return {
        "act_input_drift": drift,
        "grad_norm_first_over_last": metrics.median(ratios),
        "saturation_final": sum(saturation) / len(saturation) if saturation else None,
    }


def summarize(h: History, trainer: DictConfig, steps: int, total_steps: int, steps_per_epoch: int,
              target: float, wall: float) -> dict:
    """The summary's metrics from the history (all arithmetic lives in bnexp.metrics)."""
    last = lambda seq: seq[-1][1] if seq else None  # noqa: E731
    reached = metrics.steps_to_target(h.val_acc, target)
    landscape = {}
    for key in ("loss_range", "grad_change_max", "beta_smoothness"):
        values = [found[key] for _, found in h.landscape]
        landscape[f"landscape_{key}"] = max(values) if values else None  # worst over probes
    return {
        "final_val_acc": last(h.val_acc),
        "best_val_acc": max((a for _, a in h.val_acc), default=None),
        "final_val_loss": last(h.val_loss),
        "final_train_loss": last(h.train_loss),
        "final_train_acc": last(h.train_acc),
        "steps": steps,
        "target_acc": target,
        "steps_to_target": reached,
        "epochs_to_target": reached / steps_per_epoch if reached is not None else None,
        "seconds_to_target": dict(h.val_wall).get(reached) if reached is not None else None,
        "train_loss_auc": metrics.mean_value(h.train_loss),
        "val_acc_at_25pct": metrics.value_at_fraction(h.val_acc, total_steps, 0.25),
        "val_acc_at_50pct": metrics.value_at_fraction(h.val_acc, total_steps, 0.5),
        "val_acc_at_100pct": metrics.value_at_fraction(h.val_acc, total_steps, 1.0),
        "diverged": h.diverged_at_step is not None,
        "diverged_at_step": h.diverged_at_step,
        "diverged_reason": h.diverged_reason,
        "loss_spikes": metrics.loss_spikes(h.train_loss, trainer.spike_ratio),
        "loss_std_tail": metrics.tail_std(h.train_loss, 0.1),
        "grad_norm_max": max(h.grad_norms) if h.grad_norms else None,
        "grad_norm_median": metrics.median(h.grad_norms),
        **landscape,
        **diagnostic_summary(h.diagnostics),
        "wall_seconds": wall,
        "train_seconds": h.train_seconds,
        "eval_seconds": h.eval_seconds,
        "samples_per_second": h.samples / h.train_seconds if h.train_seconds else None,
    }


def load_model(path: Path) -> tuple[nn.Module, dict]:
    """The trained model of a run directory or checkpoint file, and its checkpoint."""
    ckpt = record.load_checkpoint(path)
    model = models.build(OmegaConf.create(ckpt["config"]["model"]), tuple(ckpt["in_shape"]),
                         ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


# ----------------------------------------------------------------------------- console


class Progress:
    """A rich progress bar on a terminal; plain lines at each evaluation otherwise."""

    def __init__(self, mode: str, total: int, steps_per_epoch: int):
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode, self.total, self.spe = mode, total, steps_per_epoch
        self.fields = {"loss": float("nan"), "val_acc": float("nan"), "sps": 0.0}
        self.bar = None

    def __enter__(self) -> Progress:
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("{task.fields[text]}"),
                                TimeElapsedColumn(), transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, epoch=1, text="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, epoch: int, **values: float) -> None:
        self.fields.update(values)
        f = self.fields
        text = (f"loss {f['loss']:.4f}  val_acc {f['val_acc']:.4f}  "
                f"{f['sps']:,.0f} samples/s")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, epoch=epoch, text=text)
        elif self.mode == "plain" and "val_acc" in values:
            log.info("step %d/%d  epoch %d  %s", step, self.total, epoch, text)

