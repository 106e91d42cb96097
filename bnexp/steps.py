"""The training step: how one or several runs take their next n steps.

The loop (bnexp.loop) owns everything around the step; this module owns the step itself, in two
implementations of one interface:

- `Eager`: one model, the forward eager or torch.compile'd. A lone run on a CPU trains this way
  (a stack of one is slower there: docs/performance.md).
- `Stack`: K models of one architecture as stacked tensors (`bnexp sweep --vectorize`): every
  parameter and BN buffer gets a leading model dimension, `torch.func.vmap` (or, for an MLP on
  a CPU, bnexp.stacked's layers) runs the K forward and backward passes as batched kernels,
  with each model's own learning rate, momentum and weight decay. On a GPU a run of steps is
  captured once in a CUDA graph and replayed; a lone GPU run trains as a stack of one for that.

Both update through bnexp.optim (SGD/Adam on the parameters as flat rows, without torch.optim
and the torch._dynamo import it brings), take their learning rates from one table (`lr_table`),
keep the log window's sums and every step's gradient norm on the device (read by the loop at
its cadence), and hand a model's optimizer state out in torch.optim's format, so that any
checkpoint resumes either way.
`choose` is the one place that decides which a group of runs uses.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bnexp import data, stacked
from bnexp.config import NOT_A_VARIANT, TrainerConfig, resolved
from bnexp.optim import Layout, Optimizer

if TYPE_CHECKING:
    from bnexp.run import Run

log = logging.getLogger("bnexp")

VECTORIZABLE = ("optim.lr", "optim.momentum", "optim.weight_decay", "optim.beta1",
                "optim.beta2", "seed", "model.init_std")
GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before a CUDA graph capture
# Steps unrolled into one CUDA graph: one replay launches them all, so the host's own per-step
# cost is paid once per GRAPH_STEPS (docs/performance.md).
GRAPH_STEPS = 16
# A stack evaluates all its models in one call per batch on an accelerator, where kernel
# launches dominate, and on a CPU where it runs layer by layer (bnexp.stacked: 32 MLPs, 59.5
# against 64.9 ms one model at a time; their mode comparison 88.5 against 103 ms through vmap).
# Through vmap a CPU was slower batched (32 MLPs: 100-145 ms against 81-102 ms; 8 CNNs:
# 1.4-5.7 s against 1.0 s; docs/performance.md): there each model evaluates itself, and only
# MLP stacks make their final mode comparison batched (4 CNNs: 4.2 against 2.4 s). Tests switch
# it on to check vmap's batched path against the models alone.
BATCHED_EVALUATION_ON_CPU = False
# Model-samples per call of a layered stack's batched evaluation on a CPU: 32 MLPs on 1,000
# samples took 57-59 ms in calls of 256-512 samples, 67-78 at 64, 128 or 1,000.
LAYERED_EVAL_SAMPLES = 16384


# ----------------------------------------------------------------------------- which step


def should_compile(device: torch.device, setting: str) -> bool:
    """Whether the eager step's forward runs through torch.compile: trainer.compile=on on a
    CPU. (On a GPU every setting but off trains as a captured stack of one, which compiles
    with on.) auto stays eager on a CPU: there the compile took longer than the whole default
    run (docs/performance.md)."""
    return setting == "on" and device.type != "cuda"


def capturable(cfg: DictConfig, device: torch.device) -> bool:
    """Whether a run's step is captured in a CUDA graph (a lone run then trains as a stack of
    one): on a GPU, unless trainer.compile=off."""
    return device.type == "cuda" and cfg.trainer.compile != "off"


def stackable(cfg: DictConfig, device: torch.device) -> bool:
    """Whether a run can share a stack with others. Not bf16 with batch norm: vmap's batch
    norm rejects bf16 activations with float32 running statistics, on a CPU as on a GPU
    (docs/performance.md); nor any bf16 run on a GPU. Such runs train alone (a stack of one
    needs no vmap). Nor a run being resumed: its state lives in its own checkpoint."""
    bf16 = cfg.trainer.precision == "bf16"
    return not cfg.resume and not (bf16 and (device.type == "cuda" or cfg.model.norm == "batch"))


def choose(runs: Sequence[Run], kind: str = "auto") -> Eager | Stack:
    """The step for a group of runs: a stack for several, or for one whose step is captured;
    the eager step otherwise. kind="stack" or "eager" forces one (tests, benchmarks)."""
    if kind == "auto":
        kind = "stack" if len(runs) > 1 or capturable(runs[0].cfg, runs[0].device) else "eager"
    if kind == "eager":
        if len(runs) != 1:
            raise ValueError("the eager step trains one model")
        return Eager(runs[0])
    return Stack(runs)


def group_key(cfg: DictConfig) -> str:
    """Configs with equal keys can share a stack: everything but the per-model scalars."""
    from bnexp.runs import flatten

    flat = flatten(resolved(cfg))
    return json.dumps({k: v for k, v in sorted(flat.items())
                       if k not in VECTORIZABLE and k not in NOT_A_VARIANT}, default=str)


def groups(cfgs: Sequence[DictConfig]) -> list[list[int]]:
    """Indices of cfgs that can train as one stack, in first-seen order; a run that cannot be
    stacked (see stackable) is a group of its own."""
    from bnexp.config import ConfigError
    from bnexp.device import resolve_device

    found: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        try:
            device = resolve_device(cfg.device)
        except ConfigError:  # (e.g. cuda without a GPU) the run itself reports it
            device = None
        alone = device is None or not stackable(cfg, device)
        # device is not a variant (group_key leaves it out), but a stack lives on one.
        found.setdefault(f"alone:{i}" if alone else f"{device}|{group_key(cfg)}", []).append(i)
    return list(found.values())


# ----------------------------------------------------------------------------- shared parts


def effective_lr(cfg: DictConfig) -> float:
    """optim.lr, scaled linearly with the batch size if optim.lr_reference_batch_size is set."""
    o = cfg.optim
    if o.lr_reference_batch_size:
        return o.lr * cfg.trainer.batch_size / o.lr_reference_batch_size
    return o.lr


def lr_factor(o: DictConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of optim.lr at a step: linear warmup, then constant, cosine or step decay."""
    # Plain values: the table calls this every step, and a DictConfig read is slow.
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


def lr_table(cfg: DictConfig, total_steps: int) -> list[float]:
    """The learning rate of every step, and after the last (what train/lr shows there)."""
    base, factor = effective_lr(cfg), lr_factor(cfg.optim, total_steps)
    return [base * factor(step) for step in range(total_steps + 1)]


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: bf16 (autocast) upcast to fp32; fp32 and fp64 as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def loss_and_hits(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's forward: mean cross-entropy and the number of correct predictions."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        logits = model(x)
    loss = F.cross_entropy(full_precision(logits), y)
    return loss, (logits.detach().argmax(1) == y).sum()


def loss_function(model: nn.Module, autocast: bool, compiled: bool,
                  backend: str = "inductor") -> Callable[[torch.Tensor, torch.Tensor],
                                                         tuple[torch.Tensor, torch.Tensor]]:
    """loss_and_hits on the model, eager or torch.compile'd (forward, loss and accuracy count
    as one graph). Evaluation and probes always run the eager model, with its hooks."""
    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_and_hits(model, x, y, autocast)

    return torch.compile(step, backend=backend) if compiled else step


def graph_steps(log_every: int) -> int:
    """Steps per CUDA graph: the largest divisor of the log cadence up to GRAPH_STEPS, so that
    the runs of steps between log windows are whole graphs."""
    return max(n for n in range(1, GRAPH_STEPS + 1) if log_every % n == 0)


def steps_to_event(step: int, total: int, trainer: TrainerConfig, epoch_left: int) -> int:
    """Steps from `step` to the next one after which the loop has something to do: a log
    window, evaluation, diagnostics, probe, checkpoint, an epoch's end or the last step."""
    n = min(total - step, epoch_left)
    for every in (trainer.log_every, trainer.eval_every,
                  trainer.diagnostics_every if trainer.diagnostics != "off" else 0,
                  trainer.probe_every, trainer.checkpoint_every):
        if every:
            n = min(n, every - step % every)
    return n


def _restored_window(runs: Sequence[Run], dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log window's sums and the gradient-norm record (total steps x K) the runs start
    with: zeros, or what a resumed run's checkpoint saved."""
    total = runs[0].total_steps
    norms = torch.zeros(total, len(runs), device=device, dtype=dtype)
    loss_sum = torch.zeros(len(runs), device=device, dtype=dtype)
    correct = torch.zeros(len(runs), device=device, dtype=torch.long)
    for k, run in enumerate(runs):
        if run.checkpoint is not None:
            saved_loss, saved_hits, _ = run.checkpoint["window"]
            loss_sum[k], correct[k] = saved_loss, saved_hits
            norms[:, k] = run.checkpoint["grad_norms"].to(device, dtype)
    return loss_sum, correct, norms


# ----------------------------------------------------------------------------- eager


class Eager:
    """One model's steps: the usual PyTorch step (forward, backward, update), with the update
    of bnexp.optim on the model's parameters laid out as one flat row."""

    def __init__(self, run: Run):
        self.run, self.k = run, 1
        model = run.model
        self.params = list(model.parameters())
        self.layout = Layout(model, run.channels_last)
        with torch.no_grad():
            self.flat = self.layout.row(self.params)
        self.layout.bind([model], self.flat)
        self.grad = torch.zeros_like(self.flat)
        self.lrs = lr_table(run.cfg, run.total_steps)
        self.lr_column = torch.tensor(self.lrs, dtype=self.flat.dtype,
                                      device=self.flat.device)[:, None, None]
        self.optimizer = Optimizer(self.flat, [run.cfg.optim], self.layout)
        if run.checkpoint is not None:
            self.optimizer.load_state_dict(0, run.checkpoint["optimizer"])
        self.compiled = should_compile(run.device, run.trainer.compile)
        self.loss_and_hits = loss_function(model, run.autocast, self.compiled)
        self.loss_sum, self.correct, self.grad_norms = _restored_window(
            [run], self.params[0].dtype, run.device)
        self.step = run.step
        self.step_on_device = torch.tensor(run.step, device=run.device)
        self.perm, self.position = run.perm, run.pos
        self.batch_size = run.trainer.batch_size
        self.description = "torch.compile" if self.compiled else "eager"

    def set_order(self, perms: list[torch.Tensor], position: int) -> None:
        """The epoch's data order (see Run.new_epoch) and the position of the next batch."""
        self.perm, self.position = perms[0], position

    def steps(self, n: int) -> None:
        run, bs = self.run, self.batch_size
        for _ in range(n):
            idx = self.perm[self.position * bs : (self.position + 1) * bs]
            self.position += 1
            x, y = run.batch(idx), run.ds.y_train.index_select(0, idx)
            loss, hits = self.loss_and_hits(x, y)
            for p in self.params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                self.layout.rows([(p.grad if p.grad is not None else torch.zeros_like(p))[None]
                                  for p in self.params], out=self.grad)
                # The gradient norm, written in place on the device; read per log window.
                torch.linalg.vector_norm(self.grad[0], out=self.grad_norms[self.step, 0])
                self.optimizer.update(self.grad, self.lr_column[self.step], self.step_on_device)
            self.step_on_device += 1
            self.loss_sum += loss.detach()
            self.correct += hits
            self.step += 1

    def lr(self, k: int) -> float:
        """The learning rate of the next step."""
        return self.lrs[self.step]

    def expose_grads(self, k: int) -> None:
        """The last step's gradients are the parameters' .grad already."""

    def retire(self, k: int) -> None:
        """A diverged model stops: nothing else trains here."""

    def optimizer_state(self, k: int) -> dict:
        return self.optimizer.state_dict(0, self.step, self.lrs[self.step])

    def evaluate(self, ks: Sequence[int]) -> None:
        """One model: the run evaluates itself (bnexp.run.evaluate)."""
        return None


# ----------------------------------------------------------------------------- stack


class Stack:
    """K runs' models as stacked tensors, with a vectorized step. Each run's nn.Module keeps
    views into the stacked tensors, so evaluation, diagnostics and checkpoints read it as
    they read a model trained alone. A diverged model is retired: its weights are copied out,
    its slot zeroed and no longer updated."""

    def __init__(self, runs: Sequence[Run]):
        self.runs = list(runs)
        self.k = len(runs)
        models = [r.model for r in runs]
        r0 = runs[0]
        self.names = [n for n, _ in models[0].named_parameters()]
        self.buffer_names = [n for n, _ in models[0].named_buffers()]
        # All parameters of a model in one row of a K x N matrix: the optimizer then updates
        # every model in a few passes over one tensor, not per parameter and per model.
        # Transposed linear weights where vmap computes the gradients (not a stack of one).
        self.layout = Layout(models[0], r0.channels_last, transposed=self.k > 1)
        with torch.no_grad():
            self.flat = torch.cat([self.layout.row(list(m.parameters())) for m in models]
                                  ).requires_grad_()
            self.buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models])
                            for n in self.buffer_names}
        self.layout.bind(models, self.flat)  # each model now reads and writes its slice
        for k, m in enumerate(models):
            for n, b in m.named_buffers():
                b.data = self.buffers[n][k]
        self.base = copy.deepcopy(models[0]).to("meta")

        def forward(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.base, (params, buffers), (x,))

        def alone(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
            # A stack of one calls its model directly: fewer kernels than vmap's batching
            # rules, and batch norm's bf16 kernels (which vmap rejects on a GPU).
            return forward({n: p[0] for n, p in params.items()},
                           {n: b[0] for n, b in buffers.items()}, x[0])[None]

        self.functional = forward  # one model, for the batched evaluations below
        # On a CPU an MLP stack runs layer by layer on its stacked tensors: 1.13-1.24x a
        # step against vmap (bnexp.stacked). On a GPU the captured step hides vmap's
        # host cost, and vmap stays (the layered forward is unmeasured there), as it does
        # for autocast and for every layer that forward_of does not know.
        layered = (stacked.forward_of(self.base) if self.k > 1 and r0.device.type == "cpu"
                   and not r0.autocast else None)
        self.layered = layered is not None
        self.forward = alone if self.k == 1 else layered or torch.func.vmap(forward)
        # trainer.compile=on: torch.compile fuses the forward's kernels, and so its backward's
        # (inside the captured graph on a GPU). Stacks of several models stay uncompiled.
        self.compiled = self.k == 1 and r0.trainer.compile == "on"
        if self.compiled:
            self.forward = torch.compile(alone)
        like = self.flat
        tables = [lr_table(r.cfg, r.total_steps) for r in runs]
        self.lrs = torch.tensor(tables, dtype=like.dtype, device=like.device).T.contiguous()
        self.host_lrs = tables
        self.active = torch.ones(self.k, dtype=like.dtype, device=like.device)
        self.optimizer = Optimizer(self.flat, [r.cfg.optim for r in runs], self.layout)
        for k, run in enumerate(runs):
            if run.checkpoint is not None:
                self.optimizer.load_state_dict(k, run.checkpoint["optimizer"])
        self.x_train = r0.x_train  # standardized once, shared: the data config is common
        self.y_train = r0.ds.y_train
        self.autocast, self.device = r0.autocast, r0.device
        self.grad = torch.zeros_like(self.flat, requires_grad=False)  # the last step's
        # The loop state the step reads and advances itself, in tensors at fixed addresses: a
        # captured step reads them at every replay, and the host need not touch them between
        # steps.
        dev = self.device
        self.perms = torch.zeros(self.k, r0.steps_per_epoch, r0.trainer.batch_size,
                                 dtype=torch.long, device=dev)
        self.position = torch.full((1,), r0.pos, dtype=torch.long, device=dev)
        # The steps taken: on the host for the loop, on the device for the captured step.
        self.step = r0.step
        self.step_on_device = torch.full((1,), r0.step, dtype=torch.long, device=dev)
        if r0.perm is not None:  # a resumed run is inside an epoch already
            self.set_order([r.perm for r in runs], r0.pos)
        self.loss_sum, self.correct, self.grad_norms = _restored_window(runs, like.dtype, dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.eager_steps = 0
        # Small nets on a GPU spend most of a step launching kernels; a graph launches whole
        # runs of steps at once.
        self.capture = capturable(r0.cfg, self.device)
        self.graph_steps = graph_steps(r0.trainer.log_every)
        self.batched_evaluation = self.k > 1 and (self.device.type != "cpu" or self.layered
                                                  or BATCHED_EVALUATION_ON_CPU)
        self.batched_modes = self.batched_evaluation or (self.k > 1
                                                         and r0.cfg.model.name == "mlp")

    @property
    def description(self) -> str:
        """How the step ran: captured in a CUDA graph or eagerly, compiled or not."""
        how = "cuda graph" if self.graphs else "eager"
        return f"torch.compile + {how}" if self.compiled else how

    # ------------------------------------------------------------------ the step

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return self.layout.views(flat)

    def set_order(self, perms: list[torch.Tensor], position: int) -> None:
        """The epoch's data order of every model (its batches as rows), and the position of
        the next batch in it."""
        n = self.perms.shape[1] * self.perms.shape[2]  # the partial last batch is dropped
        self.perms.copy_(torch.stack([p[:n] for p in perms]).view_as(self.perms))
        self.position.fill_(position)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self.k == 1:  # the run's own batch, in its layout (channels_last on a GPU)
            return self.runs[0].batch(idx[0])[None]
        if self.x_train is not None:
            flat = self.x_train.index_select(0, idx.flatten())
            return flat.view(*idx.shape, *flat.shape[1:])
        return torch.stack([r.batch(i) for r, i in zip(self.runs, idx)])

    def steps(self, n: int) -> None:
        """n steps of every model, each on its own next batch. Losses, correct predictions
        and gradient norms accumulate on the device; nothing is read back."""
        while n > 0:
            done = self.replay(n) if self.capture else 0
            if not done:
                self.eager_step()
                done = 1
            n -= done
            self.step += done

    def eager_step(self) -> None:
        if not self.capture:
            self.compute()
            return
        # Real steps, run on a side stream before the capture (as CUDA graphs require).
        self.eager_steps += 1
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.compute()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def replay(self, n: int) -> int:
        """Replay a captured run of up to n steps (captured on first use); the number of
        steps done, 0 while warming up or if the capture failed."""
        if self.eager_steps < GRAPH_WARMUP_STEPS:
            return 0
        length = self.graph_steps if n >= self.graph_steps else 1
        graph = self.graphs.get(length)
        if graph is None:
            try:
                graph = torch.cuda.CUDAGraph()
                if self.x_train is None:  # augmentation draws from each run's generator
                    for r in self.runs:
                        graph.register_generator_state(r.generator)
                with torch.cuda.graph(graph):  # records the steps; runs nothing yet
                    for _ in range(length):
                        self.compute()
            except Exception as exc:  # noqa: BLE001 - any failure: keep training eagerly
                log.warning("bnexp: CUDA graph capture of the training step failed (%s: %s);"
                            " it runs eagerly", type(exc).__name__, exc)
                self.capture = False
                torch.cuda.synchronize(self.device)
                return 0
            self.graphs[length] = graph
        graph.replay()
        return length

    def compute(self) -> None:
        """One step, reading and advancing the loop state on the device: forward and
        backward of every model on its next batch, then the update, then the records."""
        idx = self.perms.index_select(1, self.position).squeeze(1)  # K x B
        x = self.batch(idx)
        y = self.y_train.index_select(0, idx.flatten())
        # No autocast weight cache: a CUDA graph must not keep tensors cast outside it.
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast,
                            cache_enabled=False):
            params = dict(zip(self.names, self.views(self.flat)))
            logits = self.forward(params, self.buffers, x)
        losses = F.cross_entropy(full_precision(logits.flatten(0, 1)), y, reduction="none")
        losses = losses.view(idx.shape).mean(1)
        # Each model's loss depends on its own slice only, so the gradient of the sum is every
        # model's own gradient. Gradients of the views, then one concatenation: asking for the
        # flat tensor's own gradient would make autograd zero-fill a K x N tensor per parameter.
        grads = torch.autograd.grad(losses.sum(), list(params.values()))
        with torch.no_grad():
            grad = self.layout.rows(grads, out=self.grad)
            norms = torch.linalg.vector_norm(grad, dim=1)
            lr = self.lrs.index_select(0, self.step_on_device)[0]
            self.optimizer.update(grad, (lr * self.active)[:, None], self.step_on_device[0])
            hits = (logits.detach().argmax(-1) == y.view(idx.shape)).sum(1)
            self.grad_norms.index_copy_(0, self.step_on_device,
                                        norms.to(self.grad_norms.dtype)[None])
            self.loss_sum.add_(losses)
            self.correct.add_(hits)
            self.step_on_device.add_(1)
            self.position.add_(1)

    # ------------------------------------------------------------------ all models at once

    @torch.inference_mode()
    def evaluate(self, ks: Sequence[int]) -> dict[int, tuple[float, float]] | None:
        """Eval-mode loss and accuracy on the validation set of models ks, every model in
        each batched call (the numbers bnexp.run.evaluate gives for each model alone, up to
        summation order); None where each run evaluates itself (a stack of one, a CPU)."""
        if not self.batched_evaluation:
            return None
        r0 = self.runs[0]
        y = r0.ds.y_val
        loss = torch.zeros(self.k, dtype=torch.float64, device=y.device)
        hits = torch.zeros(self.k, dtype=torch.long, device=y.device)
        predict = StackPredictor(self, copy_buffers=False)
        try:
            for s in data.eval_batches(len(y), eval_chunk(r0.eval_batch_size, self.k,
                                                          self.device, self.layered)):
                x = r0.x_val[s] if r0.x_val is not None else r0.inputs(r0.ds.x_val[s])
                logits = full_precision(predict.logits(x, train_mode=False))
                loss += F.cross_entropy(logits.flatten(0, 1), y[s].repeat(self.k),
                                        reduction="none").view(self.k, -1).sum(1).double()
                hits += (logits.argmax(-1) == y[s]).sum(1)
        finally:
            predict.done()
        losses, correct = torch.stack([loss, hits.double()]).div_(len(y)).tolist()
        return {k: (losses[k], correct[k]) for k in ks}

    def mode_comparisons(self, ks: Sequence[int], batch_size: int,
                         bs1_samples: int, eval_acc: list[float] | None = None
                         ) -> dict[int, tuple[dict, dict]]:
        """probes.mode_comparisons of models ks, all models in each call; the running
        statistics stay as they are. eval_acc: every model's eval-mode accuracy, where the
        final evaluation measured it. {} where each run compares itself (as evaluate)."""
        from bnexp import probes

        if not self.batched_modes:
            return {}
        r0 = self.runs[0]
        predict = StackPredictor(self)
        try:
            found = probes.mode_comparisons(predict, r0.ds.x_val, r0.ds.y_val, r0.inputs,
                                            batch_size, bs1_samples, eval_acc)
        finally:
            predict.done()
        return {k: found[k] for k in ks}

    # ------------------------------------------------------------------ one model

    def lr(self, k: int) -> float:
        """Model k's learning rate of the next step."""
        return self.host_lrs[k][self.step]

    def optimizer_state(self, k: int) -> dict:
        """Model k's optimizer state, in torch.optim's format: its checkpoint resumes as a
        single run."""
        return self.optimizer.state_dict(k, self.step, self.host_lrs[k][self.step])

    def expose_grads(self, k: int) -> None:
        """Model k's gradients of the last step as its parameters' .grad, for diagnostics."""
        for p, g in zip(self.runs[k].model.parameters(), self.views(self.grad[k : k + 1])):
            p.grad = g[0]

    @torch.no_grad()
    def retire(self, k: int) -> None:
        """Model k stops training: its run keeps a copy of the weights, its slot is zeroed (a
        NaN there would only cost time) and its learning rate set to 0."""
        model = self.runs[k].model
        for p in model.parameters():
            p.data = p.data.clone()
        for b in model.buffers():
            b.data = b.data.clone()
        self.flat[k].zero_()
        self.optimizer.retire(k)
        for n in self.buffer_names:
            self.buffers[n][k].fill_(1.0 if n.endswith("running_var") else 0)
        self.active[k] = 0


def eval_chunk(batch_size: int, k: int, device: torch.device, layered: bool = False) -> int:
    """Samples per batched evaluation call of k models. An accelerator takes the run's whole
    evaluation batch. On a CPU a layered stack (bnexp.stacked) takes LAYERED_EVAL_SAMPLES
    model-samples a call, the fastest measured; through vmap (tests) the run's evaluation batch
    is shared among the models, so that one call's activations stay about one model's."""
    if device.type != "cpu":
        return batch_size
    if layered:
        return min(batch_size, max(16, LAYERED_EVAL_SAMPLES // k))
    return max(16, batch_size // k)


class StackPredictor:
    """A stack's models as one predictor (probes.mode_comparisons): each call runs all K
    models, K x B x classes. Train-mode calls update clones of the running statistics
    (copy_buffers=False: eval mode only, reading the stack's own). `done()` restores the
    stack's module to train mode."""

    def __init__(self, stack: Stack, copy_buffers: bool = True):
        from bnexp.models import depends_on_batch, norm_layers

        self.stack, self.k = stack, stack.k
        model = stack.runs[0].model
        self.has_bn, self.has_norm = depends_on_batch(model), bool(norm_layers(model))
        self.params = dict(zip(stack.names, stack.views(stack.flat.detach())))
        self.buffers = ({n: b.clone() for n, b in stack.buffers.items()} if copy_buffers
                        else stack.buffers)
        one = stack.functional
        # The same input for every model: a layered stack reads it broadcast, without copies.
        self.batched = ((lambda p, b, x: stack.forward(p, b, x.expand(self.k, *x.shape)))
                        if stack.layered else torch.func.vmap(one, in_dims=(0, 0, None)))
        self.batched_one_by_one = torch.func.vmap(torch.func.vmap(
            lambda p, b, sample: one(p, b, sample[None])[0], in_dims=(None, None, 0)),
            in_dims=(0, 0, None))

    def logits(self, x: torch.Tensor, train_mode: bool) -> torch.Tensor:
        self.stack.base.train(train_mode)
        return self.batched(self.params, self.buffers, x)

    def logits_one_by_one(self, x: torch.Tensor, train_mode: bool) -> torch.Tensor:
        self.stack.base.train(train_mode)
        return self.batched_one_by_one(self.params, self.buffers, x)

    def done(self) -> None:
        self.stack.base.train()
