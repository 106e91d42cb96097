"""The training step: how one or several runs take their next n steps.

The loop (bnexp.loop) owns everything around the step; this module owns the step itself, in two
implementations of one interface:

- `Eager`: one model, torch.optim's fused SGD/Adam, the forward eager or torch.compile'd. A lone
  run on a CPU trains this way (a stack of one is slower there: docs/performance.md).
- `Stack`: K models of one architecture as stacked tensors (`bnexp sweep --vectorize`): every
  parameter and BN buffer gets a leading model dimension, `torch.func.vmap` runs the K forward
  and backward passes as batched kernels, and a hand-written SGD/Adam applies each model's own
  learning rate, momentum and weight decay. On a GPU a run of steps is captured once in a CUDA
  graph and replayed; a lone GPU run trains as a stack of one for that.

Both take their learning rates from one table (`lr_table`), keep the log window's sums and every
step's gradient norm on the device (read by the loop at its cadence), and hand a model's
optimizer state out in torch.optim's format, so that any checkpoint resumes either way.
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

from bnexp.config import NOT_A_VARIANT, TrainerConfig, resolved

if TYPE_CHECKING:
    from bnexp.run import Run

log = logging.getLogger("bnexp")

VECTORIZABLE = ("optim.lr", "optim.momentum", "optim.weight_decay", "optim.beta1",
                "optim.beta2", "seed", "model.init_std")
ADAM_EPS = 1e-8  # torch.optim.Adam's default, which the eager step uses
GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before a CUDA graph capture
# Steps unrolled into one CUDA graph: one replay launches them all, so the host's own per-step
# cost is paid once per GRAPH_STEPS (docs/performance.md).
GRAPH_STEPS = 16


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
    """Whether a run can share a stack with others. Not bf16 on a GPU: there vmap's batch-norm
    backward rejects bf16 activations with float32 running statistics (docs/performance.md);
    such runs train alone (a stack of one needs no vmap). Nor a run being resumed: its state
    lives in its own checkpoint."""
    return not cfg.resume and not (device.type == "cuda" and cfg.trainer.precision == "bf16")


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
        found.setdefault(f"alone:{i}" if alone else group_key(cfg), []).append(i)
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


def build_optimizer(o: DictConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass (docs/performance.md).
    device = next(model.parameters()).device.type
    fast = {"fused": True} if device in ("cpu", "cuda") else {"foreach": True}
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=o.momentum,
                               nesterov=o.nesterov, weight_decay=o.weight_decay, **fast)
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(o.beta1, o.beta2),
                            weight_decay=o.weight_decay, **fast)


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
                  trainer.diagnostics_every if trainer.diagnostics else 0,
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
    """One model's steps with torch.optim: the usual PyTorch step, nothing hidden."""

    def __init__(self, run: Run):
        self.run, self.k = run, 1
        model = run.model
        self.params = list(model.parameters())
        self.lrs = lr_table(run.cfg, run.total_steps)
        self.optimizer = build_optimizer(run.cfg.optim, model, self.lrs[run.step])
        if run.checkpoint is not None:
            self.optimizer.load_state_dict(run.checkpoint["optimizer"])
        self.group = self.optimizer.param_groups[0]
        self.compiled = should_compile(run.device, run.trainer.compile)
        self.loss_and_hits = loss_function(model, run.autocast, self.compiled)
        self.loss_sum, self.correct, self.grad_norms = _restored_window(
            [run], self.params[0].dtype, run.device)
        self.step = run.step
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
            # What zero_grad(set_to_none=True) does, without its profiler and dynamo wrappers.
            for p in self.params:
                p.grad = None
            loss.backward()
            grads = [p.grad for p in self.params if p.grad is not None]
            # The global gradient norm, written in place on the device; read per log window.
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)),
                                     out=self.grad_norms[self.step, 0])
            self.group["lr"] = self.lrs[self.step]
            self.optimizer.step()
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
        return self.optimizer.state_dict()


# ----------------------------------------------------------------------------- stack


def _per_model(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


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
        first = dict(models[0].named_parameters())
        self.shapes = [first[n].shape for n in self.names]
        # Conv weights of channels_last models are laid out channels-last inside the row too,
        # so that their views keep the layout cuDNN's fast kernels want.
        self.channels_last = [r0.channels_last and len(shape) == 4 for shape in self.shapes]
        sizes = [first[n].numel() for n in self.names]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        with torch.no_grad():
            self.flat = torch.stack([self.row(list(m.parameters())) for m in models]
                                    ).requires_grad_()
            self.buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models])
                            for n in self.buffer_names}
        for k, m in enumerate(models):  # each model now reads and writes its slice
            for p, view in zip(m.parameters(), self.views(self.flat.detach()[k : k + 1])):
                p.data = view[0]
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

        self.forward = alone if self.k == 1 else torch.func.vmap(forward)
        # trainer.compile=on: torch.compile fuses the forward's kernels, and so its backward's
        # (inside the captured graph on a GPU). Stacks of several models stay uncompiled.
        self.compiled = self.k == 1 and r0.trainer.compile == "on"
        if self.compiled:
            self.forward = torch.compile(alone)
        o = [r.cfg.optim for r in runs]
        like = self.flat
        self.adam = o[0].name == "adam"
        self.nesterov = bool(o[0].nesterov)
        tables = [lr_table(r.cfg, r.total_steps) for r in runs]
        self.lrs = torch.tensor(tables, dtype=like.dtype, device=like.device).T.contiguous()
        self.host_lrs = tables
        self.momentum = _per_model([c.momentum for c in o], like)
        self.weight_decay = _per_model([c.weight_decay for c in o], like)
        self.beta1 = _per_model([c.beta1 for c in o], like)
        self.beta2 = _per_model([c.beta2 for c in o], like)
        self.active = torch.ones(self.k, dtype=like.dtype, device=like.device)
        self.m = torch.zeros_like(self.flat)
        self.v = torch.zeros_like(self.flat) if self.adam else None
        self.import_optimizer_state()
        self.any_weight_decay = bool(self.weight_decay.any())
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

    @property
    def description(self) -> str:
        """How the step ran: captured in a CUDA graph or eagerly, compiled or not."""
        how = "cuda graph" if self.graphs else "eager"
        return f"torch.compile + {how}" if self.compiled else how

    # ------------------------------------------------------------------ the step

    def row(self, params: list[torch.Tensor]) -> torch.Tensor:
        """One model's parameters as one row of the flat matrix (see views)."""
        return torch.cat([(p.permute(0, 2, 3, 1) if last else p).reshape(-1)
                          for p, last in zip(params, self.channels_last)])

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The K-stacked parameter tensors inside rows of flat (K x N)."""
        out = []
        for a, b, shape, last in zip(self.offsets, self.offsets[1:], self.shapes,
                                     self.channels_last):
            if last:
                o, c, h, w = shape
                out.append(flat[:, a:b].view(-1, o, h, w, c).permute(0, 1, 4, 2, 3))
            else:
                out.append(flat[:, a:b].view(-1, *shape))
        return out

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
            grad = torch.cat([(g.permute(0, 1, 3, 4, 2) if last else g).reshape(self.k, -1)
                              for g, last in zip(grads, self.channels_last)], dim=1,
                             out=self.grad)
            norms = torch.linalg.vector_norm(grad, dim=1)
            lr = self.lrs.index_select(0, self.step_on_device)[0]
            self.update(grad, (lr * self.active)[:, None])
            hits = (logits.detach().argmax(-1) == y.view(idx.shape)).sum(1)
            self.grad_norms.index_copy_(0, self.step_on_device,
                                        norms.to(self.grad_norms.dtype)[None])
            self.loss_sum.add_(losses)
            self.correct.add_(hits)
            self.step_on_device.add_(1)
            self.position.add_(1)

    @torch.no_grad()
    def update(self, g: torch.Tensor, lr: torch.Tensor) -> None:
        """torch.optim.SGD / Adam's update rules (as the eager step uses them) on all models'
        parameters at once, every hyperparameter a per-model column."""
        p = self.flat
        if self.any_weight_decay:
            g = g.addcmul(p, self.weight_decay[:, None])  # L2, as torch's weight_decay
        if self.adam:
            # Adam's t, this update's number; read on the device, as a captured step must.
            t = (self.step_on_device[0] + 1).to(p.dtype)
            b1, b2 = self.beta1[:, None], self.beta2[:, None]
            self.m.lerp_(g, 1 - b1)
            self.v.mul_(b2).addcmul_(g, g * (1 - b2))
            denom = (self.v.sqrt() / (1 - b2 ** t).sqrt()).add_(ADAM_EPS)
            p.addcdiv_(self.m * (-lr / (1 - b1 ** t)), denom)
            return
        mom = self.momentum[:, None]
        # torch starts the momentum buffer at the first gradient: from zero, mom * 0 + g is
        # exactly that, with no branch on the step number.
        self.m.mul_(mom).add_(g)
        d = g.addcmul(self.m, mom) if self.nesterov else self.m
        p.addcmul_(d, -lr)

    # ------------------------------------------------------------------ one model

    def lr(self, k: int) -> float:
        """Model k's learning rate of the next step."""
        return self.host_lrs[k][self.step]

    def _torch_optimizer(self, k: int) -> torch.optim.Optimizer:
        run = self.runs[k]
        return build_optimizer(run.cfg.optim, run.model, self.host_lrs[k][run.step])

    @torch.no_grad()
    def import_optimizer_state(self) -> None:
        """A resumed run's optimizer state (torch.optim's format, from its checkpoint) into
        the stack's buffers (Adam's own step count is the run's step)."""
        for k, run in enumerate(self.runs):
            if run.checkpoint is None:
                continue
            opt = self._torch_optimizer(k)
            opt.load_state_dict(run.checkpoint["optimizer"])
            m = self.views(self.m[k : k + 1])
            v = self.views(self.v[k : k + 1]) if self.adam else m
            for i, p in enumerate(run.model.parameters()):
                state = opt.state.get(p)
                if not state:
                    continue
                if self.adam:
                    m[i][0].copy_(state["exp_avg"])
                    v[i][0].copy_(state["exp_avg_sq"])
                elif state.get("momentum_buffer") is not None:
                    m[i][0].copy_(state["momentum_buffer"])

    def optimizer_state(self, k: int) -> dict:
        """Model k's slice of the optimizer state, in torch.optim's format: its checkpoint
        resumes as a single run."""
        run = self.runs[k]
        opt = self._torch_optimizer(k)
        momentum = float(self.momentum[k])
        m = self.views(self.m[k : k + 1])
        v = self.views(self.v[k : k + 1]) if self.adam else m
        for i, p in enumerate(run.model.parameters()):
            if self.adam:
                opt.state[p] = {"step": torch.tensor(float(self.step)),
                                "exp_avg": m[i][0].clone(), "exp_avg_sq": v[i][0].clone()}
            elif momentum and self.step:
                opt.state[p] = {"momentum_buffer": m[i][0].clone()}
        return opt.state_dict()

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
        self.m[k].zero_()
        if self.adam:
            self.v[k].zero_()
        for n in self.buffer_names:
            self.buffers[n][k].fill_(1.0 if n.endswith("running_var") else 0)
        self.active[k] = 0
