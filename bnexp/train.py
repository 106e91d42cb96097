"""The training loop: one configured model on one dataset, recorded to its run directory.

Read top to bottom: `run` sets up (device, data, model, optimizer), `train_one_epoch` is the hot
loop, `evaluate` measures the validation split in eval mode (BN's running statistics, as at test
time). The step never synchronizes with the host: loss and accuracy accumulate on the device and
are read at the log cadence.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bnexp import data, models, record
from bnexp.config import ConfigError, resolved
from bnexp.device import choose_threads, environment, resolve_device, seed_everything

log = logging.getLogger("bnexp")


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
    return device, ds


def build_optimizer(o: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                               nesterov=o.nesterov, weight_decay=o.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                            weight_decay=o.weight_decay)


def lr_factor(o: DictConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of optim.lr at a step: linear warmup, then constant, cosine or step decay."""
    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            span = max(total_steps - o.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - o.warmup_steps, span) / span))
        if o.schedule == "step":
            return o.gamma ** ((step - o.warmup_steps) // o.step_size)
        return 1.0

    return factor


# ----------------------------------------------------------------------------- loop


@dataclass
class History:
    """What the loop observed, read back by the summary (and by later metrics)."""

    val_acc: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    train_acc: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    samples: int = 0
    diverged_at_step: int | None = None


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, inputs: data.Inputs,
             batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy over (x, y) in eval mode, i.e. with BN's running statistics."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for s in data.eval_batches(len(y), batch_size):
        logits = model(inputs(x[s])).float()
        loss_sum += F.cross_entropy(logits, y[s], reduction="sum")
        correct += (logits.argmax(1) == y[s]).sum()
    model.train(was_training)
    return loss_sum.item() / len(y), correct.item() / len(y)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, ds: data.Dataset,
                 model: nn.Module):
        self.cfg, self.t = cfg, cfg.trainer
        self.device, self.ds, self.model = device, ds, model
        self.inputs = data.Inputs(ds, cfg.data.normalize)
        self.optimizer = build_optimizer(cfg.optim, model)
        self.steps_per_epoch = len(ds.y_train) // self.t.batch_size
        self.total_steps = self.t.steps or self.t.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg.optim, self.total_steps))
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.autocast = self.t.precision == "bf16"
        self.scalars = record.Scalars(run_dir)
        self.history = History()
        self.step = 0
        self.progress = Progress(self.t.progress, self.total_steps, self.steps_per_epoch)

    def train_step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.ds.x_train[idx]
        if self.cfg.data.augment:
            x = data.augment(x, self.generator)
        y = self.ds.y_train[idx]
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            logits = self.model(self.inputs(x))
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), (logits.argmax(1) == y).sum()

    def train_one_epoch(self, epoch: int) -> bool:
        """One pass over the shuffled training set; False once the run must stop."""
        t = self.t
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        window_steps, window_start = 0, time.perf_counter()
        for idx in data.epoch_batches(len(self.ds.y_train), t.batch_size, self.generator,
                                      self.device):
            loss, hits = self.train_step(idx)
            loss_sum += loss
            correct += hits
            window_steps += 1
            self.step += 1
            last = self.step == self.total_steps
            if self.step % t.log_every == 0 or last:
                seconds = time.perf_counter() - window_start
                mean_loss = loss_sum.item() / window_steps  # the only host sync per window
                samples = window_steps * t.batch_size
                self.history.train_seconds += seconds
                self.history.samples += samples
                acc = correct.item() / samples
                self.history.train_loss.append((self.step, mean_loss))
                self.history.train_acc.append((self.step, acc))
                self.scalars.log(self.step, {
                    "train/loss": mean_loss, "train/acc": acc,
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "perf/samples_per_sec": samples / max(seconds, 1e-9),
                })
                self.progress.update(self.step, epoch, loss=mean_loss,
                                     sps=samples / max(seconds, 1e-9))
                if not math.isfinite(mean_loss):
                    self.history.diverged_at_step = self.step
                    return False
                loss_sum.zero_()
                correct.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if self.step % t.eval_every == 0 or last:
                eval_start = time.perf_counter()
                self.evaluate_and_log(epoch)
                window_start += time.perf_counter() - eval_start  # eval is not training time
            if last:
                return False
        return True

    def evaluate_and_log(self, epoch: int) -> None:
        loss, acc = evaluate(self.model, self.ds.x_val, self.ds.y_val, self.inputs,
                             self.t.eval_batch_size)
        self.history.val_loss.append((self.step, loss))
        self.history.val_acc.append((self.step, acc))
        self.scalars.log(self.step, {"val/loss": loss, "val/acc": acc})
        self.progress.update(self.step, epoch, val_acc=acc)

    def fit(self) -> None:
        epoch = 0
        while self.train_one_epoch(epoch + 1):
            epoch += 1

    def checkpoint_state(self, config: dict) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "config": config, "step": self.step}


def metrics_of(h: History, steps: int, wall: float) -> dict:
    last = lambda seq: seq[-1][1] if seq else None  # noqa: E731
    return {
        "final_val_acc": last(h.val_acc),
        "best_val_acc": max((a for _, a in h.val_acc), default=None),
        "final_val_loss": last(h.val_loss),
        "final_train_loss": last(h.train_loss),
        "final_train_acc": last(h.train_acc),
        "steps": steps,
        "diverged_at_step": h.diverged_at_step,
        "wall_seconds": wall,
        "train_seconds": h.train_seconds,
        "samples_per_second": h.samples / h.train_seconds if h.train_seconds else None,
    }


# ----------------------------------------------------------------------------- entry


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train as configured, record into run_dir and return the summary (also on failure)."""
    run_dir = Path(run_dir)
    # The first optimizer built in a process imports torch._dynamo (~3 s here): pay that before
    # the clock starts, so that wall_seconds measures the run and not Python's imports.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    started = time.perf_counter()
    config = resolved(cfg)
    device, ds = preflight(cfg)
    threads = choose_threads(str(cfg.trainer.threads), cfg.model.name)
    torch.set_num_threads(threads)
    env = environment(device, threads)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    ds = ds.to(device)
    model = models.build(cfg.model, ds.in_shape, ds.num_classes).to(device)
    record.write_summary(run_dir, "running", config, {}, env)
    trainer = Trainer(cfg, run_dir, device, ds, model)
    log.info("bnexp: %s, %s (norm=%s, activation=%s), %s lr=%g, %d steps on %s, threads=%d",
             cfg.data.name, cfg.model.name, cfg.model.norm, cfg.model.activation,
             cfg.optim.name, cfg.optim.lr, trainer.total_steps, device, threads)
    status, error = "completed", None
    try:
        with trainer.progress:
            trainer.fit()
        if trainer.history.diverged_at_step is not None:
            status = "diverged"
    except KeyboardInterrupt:
        status = "interrupted"
    except Exception as exc:  # recorded, then reported by the CLI with exit code 1
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        log.exception("bnexp: run failed")
    finally:
        trainer.scalars.close()
    metrics = metrics_of(trainer.history, trainer.step, time.perf_counter() - started)
    if cfg.trainer.checkpoint and status != "failed":
        record.save_checkpoint(run_dir, trainer.checkpoint_state(config))
    extra = {"error": error} if error else {}
    path = record.write_summary(run_dir, status, config, metrics, env, **extra)
    return record.read_summary(path.parent)


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
