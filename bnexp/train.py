"""The training loop: one configured model on one dataset, recorded to its run directory.

Read top to bottom: `run` sets up (device, data, model, optimizer), `train_one_epoch` is the hot
loop, `evaluate` measures the validation split in eval mode (BN's running statistics, as at test
time). The step never synchronizes with the host: loss and accuracy accumulate on the device and
are read at the log cadence.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bnexp import data, interrupt, metrics, models, probes, record
from bnexp.config import UNHASHED, ConfigError, config_hash, resolved
from bnexp.device import (
    choose_eval_batch_size,
    choose_threads,
    environment,
    resolve_device,
    seed_everything,
)
from bnexp.interrupt import StopFlag

log = logging.getLogger("bnexp")
RESIDENT_FLOAT_BYTES = 2**31  # a standardized float copy of the training set up to this size
def should_compile(device: torch.device, setting: str) -> bool:
    """Whether the Trainer's own forward runs through torch.compile: trainer.compile=on on a
    CPU. (On a GPU, every setting but off trains as a stack of one, whose captured step
    compiles with on: see vectorized.capturable.) auto stays eager on a CPU: there the
    compile took longer than the whole default run (docs/performance.md)."""
    return setting == "on" and device.type != "cuda"


def loss_and_hits(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The training step's forward: mean cross-entropy and the number of correct predictions."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        logits = model(x)
    loss = F.cross_entropy(full_precision(logits), y)
    return loss, (logits.detach().argmax(1) == y).sum()


def loss_function(model: nn.Module, autocast: bool, compiled: bool,
                  backend: str = "inductor") -> Callable[[torch.Tensor, torch.Tensor],
                                                         tuple[torch.Tensor, torch.Tensor]]:
    """loss_and_hits on the model, eager or torch.compile'd. Compiled, the forward, the loss
    and the accuracy count are one graph (fewer, fused kernels). Evaluation and probes always
    run the eager model, with its hooks."""
    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_and_hits(model, x, y, autocast)

    return torch.compile(step, backend=backend) if compiled else step


# ----------------------------------------------------------------------------- set-up


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


def effective_lr(cfg: DictConfig) -> float:
    """optim.lr, scaled linearly with the batch size if optim.lr_reference_batch_size is set."""
    o = cfg.optim
    if o.lr_reference_batch_size:
        return o.lr * cfg.trainer.batch_size / o.lr_reference_batch_size
    return o.lr


def build_optimizer(o: DictConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass: on CPU it took 0.16 ms per MLP step
    # here against 0.29 ms for torch's default per-parameter loop.
    device = next(model.parameters()).device.type
    fast = {"fused": True} if device in ("cpu", "cuda") else {"foreach": True}
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=o.momentum,
                               nesterov=o.nesterov, weight_decay=o.weight_decay, **fast)
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(o.beta1, o.beta2),
                            weight_decay=o.weight_decay, **fast)


def lr_factor(o: DictConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of optim.lr at a step: linear warmup, then constant, cosine or step decay."""
    # Plain values: reading a DictConfig costs ~0.1 ms per key, too much once per step.
    warmup, schedule, gamma, size = o.warmup_steps, o.schedule, o.gamma, o.step_size

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            span = max(total_steps - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))
        if schedule == "step":
            return gamma ** ((step - warmup) // size)
        return 1.0

    return factor


# ----------------------------------------------------------------------------- loop


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: bf16 (autocast) upcast to fp32; fp32 and fp64 as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


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
    samples: int = 0
    diverged_at_step: int | None = None
    diverged_reason: str | None = None


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


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, ds: data.Dataset,
                 model: nn.Module, config: dict, purge_step: int | None = None):
        # A plain dataclass: DictConfig attribute reads cost ~50 us each, many per step.
        self.cfg, self.t = cfg, OmegaConf.to_object(cfg.trainer)
        self.device, self.ds, self.model = device, ds, model
        self.inputs = data.Inputs(ds, cfg.data.inputs, next(model.parameters()).dtype)
        self.augment = bool(cfg.data.augment)
        # Standardize the training set once when no batch is augmented: converting and scaling
        # each uint8 batch cost ~0.4 ms of a ~4 ms MLP step here.
        resident = not self.augment and ds.x_train.numel() * 4 <= RESIDENT_FLOAT_BYTES
        self.x_train = self.inputs(ds.x_train) if resident else None
        # The validation set is never augmented: standardize it once when it fits too.
        self.x_val = (self.inputs(ds.x_val) if ds.x_val.numel() * 4 <= RESIDENT_FLOAT_BYTES
                      else None)
        self.lr = effective_lr(cfg)
        self.optimizer = build_optimizer(cfg.optim, model, self.lr)
        self.steps_per_epoch = len(ds.y_train) // self.t.batch_size
        self.total_steps = self.t.steps or self.t.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg.optim, self.total_steps))
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.autocast = self.t.precision == "bf16"
        # channels_last: the layout cuDNN's fastest conv kernels (and bf16 tensor cores) use.
        self.channels_last = device.type == "cuda" and cfg.model.name != "mlp"
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.compiled = should_compile(device, self.t.compile)
        self.loss_and_hits = loss_function(model, self.autocast, self.compiled)
        self.activation = str(cfg.model.activation)
        example = self.x_val[:2] if self.x_val is not None else self.inputs(ds.x_val[:2])
        self.eval_batch_size = choose_eval_batch_size(str(self.t.eval_batch_size), model,
                                                      example, device)
        self.params = list(model.parameters())
        self.run_dir, self.config = run_dir, config
        self.events = record.Events(run_dir, purge_step)
        self.history = History()
        self.step = 0
        self.progress = Progress(self.t.progress, self.total_steps, self.steps_per_epoch)
        self.divergence_bound = self.t.divergence_factor * metrics.chance_loss(ds.num_classes)
        n_probe = min(self.t.probe_batch_size, len(ds.y_train))
        self.probe_x = self.inputs(ds.x_train[:n_probe])  # fixed: same samples at every probe
        self.probe_y = ds.y_train[:n_probe]
        self.grad_norms = torch.zeros(self.total_steps, device=device, dtype=self.params[0].dtype)
        self.started = time.perf_counter()
        self.off_clock = 0.0  # seconds spent on eval and probes inside the current log window
        # Loop state (see fit): the data order and the open log window.
        self.epoch, self.perm, self.pos = 0, None, 0
        self.loss_sum = torch.zeros((), device=device, dtype=self.inputs.dtype)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.window_steps, self.window_start = 0, time.perf_counter()

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """The model inputs of a batch of training indices."""
        # index_select, not x[idx]: 0.03 vs 0.18 ms for a 128-row MNIST batch on CPU here.
        if self.x_train is not None:
            x = self.x_train.index_select(0, idx)
        else:
            x = self.ds.x_train.index_select(0, idx)
            if self.augment:
                x = data.augment(x, self.generator)
            x = self.inputs(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(idx), self.ds.y_train.index_select(0, idx)
        loss, hits = self.loss_and_hits(x, y)
        # What zero_grad(set_to_none=True) does, without its profiler and dynamo wrappers
        # (14 vs 1 us here, every step).
        for p in self.params:
            p.grad = None
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        # Global gradient norm, kept on the device (written in place: one op fewer per step);
        # read back once per log window.
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)),
                                 out=self.grad_norms[self.step])
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), hits

    def epoch_used_up(self) -> bool:
        """Whether the next batch starts a new epoch (none yet, or no full batch left)."""
        return self.perm is None or (self.pos + 1) * self.t.batch_size > len(self.perm)

    def new_epoch(self) -> None:
        """A new shuffled order of the training set (its last partial batch is dropped: a BN
        batch of one or two samples is meaningless)."""
        self.epoch += 1
        self.perm = torch.randperm(len(self.ds.y_train), generator=self.generator,
                                   device=self.device)
        self.pos = 0

    def next_batch(self) -> torch.Tensor:
        """Indices of the next batch; a new epoch when the current one is used up."""
        bs = self.t.batch_size
        if self.epoch_used_up():
            self.new_epoch()
        self.pos += 1
        return self.perm[(self.pos - 1) * bs : self.pos * bs]

    def fit(self, stop: StopFlag) -> None:
        """Train to the step budget, or until divergence or a stop signal. All loop state lives
        on the trainer, so that a checkpoint taken between steps resumes exactly."""
        t = self.t
        if self.step == 0:
            self.diagnose()
        self.window_start = time.perf_counter()
        while self.step < self.total_steps:
            loss, hits = self.train_step(self.next_batch())
            self.loss_sum += loss
            self.correct += hits
            self.window_steps += 1
            self.step += 1
            last = self.step == self.total_steps
            if self.step % t.log_every == 0 or last:
                seconds = time.perf_counter() - self.window_start - self.off_clock
                if not self.log_window(self.epoch, self.loss_sum, self.correct,
                                       self.window_steps, seconds):
                    self.evaluate_and_log(self.epoch)  # what a diverged net scores
                    return
                self.loss_sum.zero_()
                self.correct.zero_()
                self.window_steps, self.window_start, self.off_clock = 0, time.perf_counter(), 0.0
            if self.step % t.eval_every == 0 or last:
                self.timed_off_clock(self.evaluate_and_log, self.epoch)
            self.timed_off_clock(self.diagnose, last)
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and not last:
                self.timed_off_clock(self.save, record.LAST_CHECKPOINT)
            if stop.signal:  # between steps: the state is consistent here
                raise KeyboardInterrupt(stop.signal)

    def log_window(self, epoch: int, loss_sum: torch.Tensor, correct: torch.Tensor,
                   steps: int, seconds: float) -> bool:
        """Read the window's accumulators (the only host sync of the window), log them, and
        check for divergence; False if the run diverged."""
        h, samples = self.history, steps * self.t.batch_size
        window_grads = self.grad_norms[self.step - steps : self.step]
        # one read-back for the three (on a GPU each read waits for the queued steps)
        loss_total, hits, grad_max = torch.stack([
            loss_sum.double(), correct.double(), window_grads.max().double()]).tolist()
        mean_loss = loss_total / steps
        acc = hits / samples
        h.train_seconds += seconds
        h.samples += samples
        h.train_loss.append((self.step, mean_loss))
        h.train_acc.append((self.step, acc))
        sps = samples / max(seconds, 1e-9)
        self.events.scalars(self.step, {
            "train/loss": mean_loss, "train/acc": acc,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": grad_max,
            "perf/samples_per_sec": sps,
        })
        self.progress.update(self.step, epoch, loss=mean_loss, sps=sps)
        patience = self.t.divergence_patience
        at, why = metrics.divergence(h.train_loss[-patience:], self.divergence_bound, patience)
        if at is not None:
            h.diverged_at_step, h.diverged_reason = at, why
            log.info("bnexp: diverged at step %d (%s)", at, why)
            return False
        return True

    def timed_off_clock(self, fn: Callable, *args: object) -> None:
        start = time.perf_counter()
        fn(*args)
        self.off_clock += time.perf_counter() - start  # evaluation is not training time

    def evaluate_and_log(self, epoch: int) -> None:
        ready = self.x_val is not None
        loss, acc = evaluate(self.model, self.x_val if ready else self.ds.x_val, self.ds.y_val,
                             None if ready else self.inputs,
                             self.eval_batch_size)
        h = self.history
        h.val_loss.append((self.step, loss))
        h.val_acc.append((self.step, acc))
        h.val_wall.append((self.step, time.perf_counter() - self.started))
        self.events.scalars(self.step, {"val/loss": loss, "val/acc": acc})
        self.progress.update(self.step, epoch, val_acc=acc)

    def diagnose(self, last: bool = False) -> None:
        """Diagnostics at their cadences (step 0 included, as the baseline)."""
        t, step = self.t, self.step
        if t.diagnostics and (step % t.diagnostics_every == 0 or last):
            inputs = probes.activation_inputs(self.model, self.probe_x)
            values = probes.activation_scalars(inputs, self.activation)
            if step > 0:
                values.update(probes.layer_norms(self.model))
            self.events.scalars(step, values)
            self.history.diagnostics.append((step, values))
            if step % t.histogram_every == 0 or last:
                self.events.histograms(step, {f"act_input/{k}": v for k, v in inputs.items()})
                self.events.histograms(step, probes.bn_tensors(self.model))
        if t.probe_every and (step % t.probe_every == 0 or last):
            found = probes.landscape(self.model, self.probe_x, self.probe_y,
                                     tuple(r * self.lr for r in t.probe_step_sizes))
            self.history.landscape.append((step, found))
            self.events.scalars(step, {f"landscape/{k}": v for k, v in found.items()})

    def checkpoint_state(self) -> dict:
        """Everything needed to continue exactly: weights, optimizer and schedule, the
        data order (this epoch's permutation and position), every RNG, the open log window
        and the history so far."""
        import dataclasses
        import random

        import numpy as np

        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "config": self.config,
            "config_raw": getattr(self, "config_raw", None),
            "config_hash": config_hash(self.cfg), "step": self.step, "epoch": self.epoch,
            "perm": None if self.perm is None else self.perm.cpu(), "pos": self.pos,
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
            "window": (self.loss_sum.cpu(), self.correct.cpu(), self.window_steps),
            "grad_norms": self.grad_norms.cpu(), "history": dataclasses.asdict(self.history),
            "elapsed": time.perf_counter() - self.started,
            "in_shape": list(self.ds.in_shape), "num_classes": self.ds.num_classes,
        }

    def save(self, name: str) -> None:
        record.save_checkpoint(self.run_dir, self.checkpoint_state(), name)

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint_state()."""
        import random

        import numpy as np

        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.epoch, self.pos = ckpt["step"], ckpt["epoch"], ckpt["pos"]
        self.perm = None if ckpt["perm"] is None else ckpt["perm"].to(self.device)
        self.generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        np.random.set_state(ckpt["numpy_rng"])
        random.setstate(ckpt["python_rng"])
        loss_sum, correct, self.window_steps = ckpt["window"]
        self.loss_sum, self.correct = loss_sum.to(self.device), correct.to(self.device)
        self.grad_norms = ckpt["grad_norms"].to(self.device, self.grad_norms.dtype)
        h = ckpt["history"]
        self.history = History(**{k: [tuple(x) if isinstance(x, list) else x for x in v]
                                  if isinstance(v, list) and k != "grad_norms" else v
                                  for k, v in h.items()})
        self.started = time.perf_counter() - ckpt["elapsed"]


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


def summarize(h: History, t: DictConfig, steps: int, total_steps: int, steps_per_epoch: int,
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
        "loss_spikes": metrics.loss_spikes(h.train_loss, t.spike_ratio),
        "loss_std_tail": metrics.tail_std(h.train_loss, 0.1),
        "grad_norm_max": max(h.grad_norms) if h.grad_norms else None,
        "grad_norm_median": metrics.median(h.grad_norms),
        **landscape,
        **diagnostic_summary(h.diagnostics),
        "wall_seconds": wall,
        "train_seconds": h.train_seconds,
        "samples_per_second": h.samples / h.train_seconds if h.train_seconds else None,
    }


# ----------------------------------------------------------------------------- entry


RESUME_KEYS = frozenset({
    "model", "optimizer", "scheduler", "config", "config_hash", "step", "epoch", "perm", "pos",
    "generator", "torch_rng", "cuda_rng", "numpy_rng", "python_rng", "window", "grad_norms",
    "history", "elapsed"})  # what Trainer.restore reads


def resume_checkpoint(cfg: DictConfig) -> dict | None:
    """The checkpoint to continue from when cfg.resume is set, after checking that it is a
    run directory of this very config; None when not resuming."""
    if not cfg.resume:
        return None
    path = Path(str(cfg.resume))
    last = path / record.CHECKPOINTS / record.LAST_CHECKPOINT
    if not (path / record.SUMMARY).is_file() or not last.is_file():
        raise ConfigError(
            f"Invalid value for resume: {str(path)!r}. Allowed: a run directory with "
            f"{record.SUMMARY} and {record.CHECKPOINTS}/{record.LAST_CHECKPOINT} (written every "
            f"trainer.checkpoint_every steps and when a run is interrupted)."
        )
    try:
        status = record.read_summary(path).get("status")
    except (OSError, ValueError, AttributeError):
        status = None  # unreadable: the checkpoint decides
    if status in ("completed", "diverged"):
        raise ConfigError(
            f"resume={path}: this run is already {status}; there is nothing to resume and it "
            "was left as it is. To train longer, start a new run with more trainer.epochs.")
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


def prepare(cfg: DictConfig, run_dir: Path) -> Trainer:
    """Everything before the first step: checks, data and model on the device, the trainer,
    the `running` summary, and the state of a checkpoint when resuming."""
    run_dir = Path(run_dir)
    # The first optimizer built in a process imports torch._dynamo (~3 s here): pay that before
    # the clock starts, so that wall_seconds measures the run and not Python's imports.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    started = time.perf_counter()
    device, ds = preflight(cfg)
    ckpt = resume_checkpoint(cfg)
    if ckpt and Path(str(cfg.resume)).resolve() != run_dir.resolve():
        raise ConfigError(f"resume={cfg.resume} must continue in its own directory; "
                          f"drop hydra.run.dir or set it to {cfg.resume}.")
    config = resolved(cfg)
    # Record the values that ran, not the "auto" placeholders.
    config["model"]["affine"] = models.Knobs.from_config(cfg.model).affine
    target = cfg.trainer.target_acc or data.SPECS[cfg.data.name].target_acc
    config["trainer"]["target_acc"] = target
    threads = choose_threads(str(cfg.trainer.threads), cfg.model.name)
    torch.set_num_threads(threads)
    env = environment(device, threads)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    ds = ds.to(device)
    model = models.build(cfg.model, ds.in_shape, ds.num_classes).to(device)
    if cfg.trainer.precision == "fp64":
        model = model.double()
    record.discard_partial_writes(run_dir)
    record.write_summary(run_dir, "running", config, {}, env, config_hash=config_hash(cfg))
    trainer = Trainer(cfg, run_dir, device, ds, model, config,
                      purge_step=ckpt["step"] + 1 if ckpt else None)
    trainer.config_raw = resolved(cfg)
    config["trainer"]["eval_batch_size"] = trainer.eval_batch_size  # the value that ran
    trainer.env, trainer.target, trainer.resumed = env, target, ckpt is not None
    env["training_step"] = "torch.compile" if trainer.compiled else "eager"
    if ckpt:
        trainer.restore(ckpt)
        started = time.perf_counter() - ckpt["elapsed"]
    trainer.run_started = started
    trainer.setup_seconds = time.perf_counter() - started  # imports excluded (paid above)
    log.info("bnexp: %s, %s (norm=%s, activation=%s), %s lr=%g, %d steps on %s, threads=%d%s",
             cfg.data.name, cfg.model.name, cfg.model.norm, cfg.model.activation,
             cfg.optim.name, trainer.lr, trainer.total_steps, device, threads,
             f", resuming at step {trainer.step}" if ckpt else "")
    return trainer


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train as configured, record into run_dir and return the summary (also on failure)."""
    from bnexp import vectorized

    if vectorized.capturable(cfg, resolve_device(cfg.device)):
        # A stack of one: its step (forward, backward, update) is captured in a CUDA graph.
        return vectorized.run_group([cfg], [run_dir])[0]
    with interrupt.immediate():
        trainer = prepare(cfg, run_dir)
    status, error, notes = "completed", None, {}
    try:
        with trainer.progress, interrupt.deferred() as stop:
            trainer.fit(stop)
        if trainer.history.diverged_at_step is not None:
            status = "diverged"
    except KeyboardInterrupt:  # a stop signal, seen between two steps (see bnexp.interrupt)
        status = "interrupted"
        notes["interrupted_by"] = interrupt.requested() or "SIGINT"
    except Exception as exc:  # recorded, then reported by the CLI with exit code 1
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        report_failure(error, [run_dir])
    return finish(trainer, status, error, notes)


def report_failure(error: str, run_dirs: list[Path]) -> None:
    """A run that failed while training: one paragraph on the console (and in train.log, via
    Hydra's job logging), the traceback only in train.log, for a bug report."""
    import traceback

    log.error("bnexp: error: the run failed while training: %s. Recorded as failed in its "
              "summary.json; the traceback is in its train.log.", " ".join(error.split()))
    for run_dir in run_dirs:
        try:
            with open(Path(run_dir) / "train.log", "a") as f:
                f.write(traceback.format_exc())
        except OSError:
            pass  # a full disk: the paragraph above is what there is


def finish(trainer: Trainer, status: str, error: str | None = None,
           notes: dict | None = None) -> dict:
    """Write what a run ends with: checkpoint, summary metrics, final evaluations in both BN
    modes, HParams, summary.json. Returns the summary as read back from disk."""
    with interrupt.deferred():  # a second Ctrl-C must not cut the results in half
        return _finish(trainer, status, error, notes)


def _finish(trainer: Trainer, status: str, error: str | None, notes: dict | None) -> dict:
    cfg, run_dir, notes = trainer.cfg, trainer.run_dir, dict(notes or {})
    if status == "interrupted" or (status == "failed" and cfg.trainer.checkpoint_every):
        trainer.save(record.LAST_CHECKPOINT)  # what `bnexp resume` continues from
    trainer.history.grad_norms = trainer.grad_norms[: trainer.step].tolist()
    summary = summarize(trainer.history, cfg.trainer, trainer.step, trainer.total_steps,
                        trainer.steps_per_epoch, trainer.target,
                        time.perf_counter() - trainer.run_started)
    summary["lr"] = trainer.lr
    summary["train_samples"], summary["val_samples"] = len(trainer.ds.y_train), len(
        trainer.ds.y_val)
    summary["num_classes"] = trainer.ds.num_classes
    summary["total_steps"] = trainer.total_steps  # the budget; `steps` stops early on divergence
    summary["setup_seconds"] = None if trainer.resumed else trainer.setup_seconds
    if status in ("completed", "diverged"):
        modes, found = probes.mode_comparison(
            trainer.model, trainer.ds.x_val, trainer.ds.y_val, trainer.inputs,
            cfg.trainer.batch_size, bs1_samples=100 if cfg.trainer.diagnostics else 0)
        summary.update(modes)
        notes.update(found)
        if cfg.trainer.mode_batch_sizes:
            ds = trainer.ds
            modes, found = probes.mode_study(trainer.model, ds.x_val, ds.y_val, trainer.inputs,
                                             list(cfg.trainer.mode_batch_sizes))
            summary.update(modes)
            notes.update(found)
            summary.update(probes.population_statistics(trainer.model, ds.x_train,
                                                        trainer.inputs))
    trainer.events.hparams(trainer.step, trainer.config, summary)
    trainer.events.close()
    if cfg.trainer.checkpoint and status in ("completed", "diverged"):
        trainer.save(record.FINAL_CHECKPOINT)
    extra = {"error": error} if error else {}
    if notes:
        extra["notes"] = notes
    extra["config_hash"] = config_hash(cfg)
    # The curves a verdict compares across runs (steps to a level both variants reach, area
    # under the accuracy curve), so that every number of a report traces to summary.json.
    h = trainer.history
    extra["curves"] = {"val_acc": h.val_acc, "val_loss": h.val_loss, "train_loss": h.train_loss,
                       "train_acc": h.train_acc}
    path = record.write_summary(run_dir, status, trainer.config, summary, trainer.env, **extra)
    return record.read_summary(path.parent)


# Runs finished in this process by hydra_task: (run_dir, summary or None, exit code).
finished: list[tuple[Path, dict | None, int]] = []
EXIT_BY_STATUS = {"completed": 0, "diverged": 0, "failed": 1, "interrupted": 130}
EXIT_BAD_INPUT = 2


def hydra_task(cfg: DictConfig) -> int:
    """The task Hydra runs for `bnexp train` and for each sweep job (module-level, so that
    launchers can pickle it). Returns the run's exit code."""
    from hydra.core.hydra_config import HydraConfig


    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if interrupt.requested():  # a Ctrl-C that start-up swallowed (see bnexp.interrupt)
        if not cfg.resume:
            remove_hydra_files(run_dir)
        finished.append((run_dir, None, interrupt.exit_code()))
        raise SystemExit(interrupt.exit_code())
    before = StartSnapshot.take(run_dir)
    if cfg.device == "auto" and hc.mode.name == "MULTIRUN" and torch.cuda.device_count() > 1:
        cfg.device = f"cuda:{hc.job.num % torch.cuda.device_count()}"  # spread jobs over GPUs
    held = record.hold(run_dir)
    if held is None:  # two `bnexp resume` of one run, or a sweep job an orphan still trains
        print(f"bnexp: error: {run_dir} is in use: a bnexp process ({record.holder(run_dir)}) "
              "is training there now. Nothing was changed; wait for it to end or stop it, "
              "then run the command again.", file=sys.stderr)
        finished.append((run_dir, None, EXIT_BAD_INPUT))
        return EXIT_BAD_INPUT
    with held:
        return _task(cfg, hc, run_dir, before)


def _task(cfg: DictConfig, hc: Any, run_dir: Path, before: StartSnapshot) -> int:
    """hydra_task once the run directory is this process's: train, record, exit code."""
    from bnexp.config import ConfigError, validate

    parent = os.environ.get(interrupt.PARENT_VARIABLE, "")
    if parent.startswith(f"{socket.gethostname()}:"):
        interrupt.watch_parent(int(parent.rsplit(":", 1)[1]))
    try:
        try:
            validate(cfg)
            summary = run(cfg, run_dir)
        except Exception:
            if interrupt.requested():  # a Ctrl-C that a library turned into another error
                raise KeyboardInterrupt from None
            raise
    except KeyboardInterrupt:  # during set-up: the run never started
        with interrupt.deferred():
            before.restore(bool(cfg.resume))
        finished.append((run_dir, None, interrupt.exit_code()))
        raise SystemExit(interrupt.exit_code()) from None
    except (ConfigError, data.DataError) as exc:
        print(f"bnexp: error: {exc}", file=sys.stderr)
        if hc.mode.name == "MULTIRUN":  # a sweep job: leave a record of why it failed
            record.write_summary(run_dir, "failed", resolved(cfg), {}, {}, error=str(exc),
                                 config_hash=config_hash(cfg))
            finished.append((run_dir, None, 1))
            return 1
        if not cfg.resume:  # never touch the files of a run being resumed
            remove_hydra_files(run_dir)
        finished.append((run_dir, None, EXIT_BAD_INPUT))
        return EXIT_BAD_INPUT
    except OSError as exc:  # the disk filled up, or the directory went away
        recorded = record_failure(cfg, run_dir, f"{type(exc).__name__}: {exc}")
        again = ("run `bnexp resume " + str(run_dir) + "`"
                 if (run_dir / record.LAST_CHECKPOINT).is_file() else "rerun the command")
        print(f"bnexp: error: could not write the run's files in {run_dir}: {exc}. If the disk "
              f"is full, free space and {again} (a sweep reruns what is missing). Results "
              "written earlier are intact: every file is written to a temporary name first."
              + ("" if recorded else " (Its summary.json could not be updated either.)"),
              file=sys.stderr)
        finished.append((run_dir, None, 1))
        return 1
    except Exception as exc:  # set-up failed for a valid config (e.g. out of memory)
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        record_failure(cfg, run_dir, error)
        # One paragraph, to the console and (through Hydra's job logging) train.log.
        log.error("bnexp: error: the run failed while setting up: %s. Recorded as failed in "
                  "%s.", error, run_dir / "summary.json")
        finished.append((run_dir, None, 1))
        return 1
    code = EXIT_BY_STATUS[summary["status"]]
    if summary["status"] == "interrupted":
        code = 143 if summary.get("notes", {}).get("interrupted_by") == "SIGTERM" else 130
        finished.append((run_dir, summary, code))
        if interrupt.orphaned():  # the sweep that launched this worker is gone
            logging.shutdown()
            os._exit(code)
        raise SystemExit(code)  # stop here: a sweep must not go on to its next job
    finished.append((run_dir, summary, code))
    return code


@dataclass
class StartSnapshot:
    """A run directory as it was when a task began, so that a stop signal during set-up can
    leave it as it was: nothing for a new run, the interrupted run it held for a resume."""

    run_dir: Path
    files: set[Path]
    summary: bytes | None

    @classmethod
    def take(cls, run_dir: Path) -> StartSnapshot:
        summary = run_dir / record.SUMMARY
        return cls(run_dir, set(run_dir.rglob("*")) if run_dir.is_dir() else set(),
                   summary.read_bytes() if summary.is_file() else None)

    def restore(self, resuming: bool) -> None:
        for path in sorted(self.run_dir.rglob("*"), reverse=True):  # children first
            if path not in self.files and path.name != "train.log":
                with contextlib.suppress(OSError):
                    path.rmdir() if path.is_dir() else path.unlink()
        if self.summary is not None:
            record.atomic_write_bytes(self.run_dir / record.SUMMARY, self.summary)
        elif not resuming:
            remove_hydra_files(self.run_dir)


def record_failure(cfg: DictConfig, run_dir: Path, error: str) -> bool:
    """Leave a `failed` summary with the error (never over a finished run's); False when it
    cannot be written (a full disk)."""
    try:
        previous = record.read_summary(run_dir).get("status")
    except (OSError, ValueError):
        previous = None
    if previous in ("completed", "diverged"):
        return True
    try:
        record.write_summary(run_dir, "failed", resolved(cfg), {}, {}, error=error,
                             config_hash=config_hash(cfg))
    except OSError:
        return False
    return True


def remove_hydra_files(run_dir: Path) -> None:
    """Undo what Hydra wrote for a run that never started, so bad input leaves nothing."""
    import shutil

    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    (run_dir / "train.log").unlink(missing_ok=True)
    for d in (run_dir, *run_dir.parents):
        try:
            d.rmdir()  # only succeeds while empty
        except OSError:
            break


def load_model(path: Path) -> tuple[nn.Module, dict]:
    """The trained model of a run directory or checkpoint file, and its checkpoint."""
    from omegaconf import OmegaConf

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
