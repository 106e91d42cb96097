"""K models of one architecture trained at once (`bnexp sweep --vectorize`).

Sweep jobs that differ only in per-model scalars (VECTORIZABLE: learning rate, seed, momentum,
weight decay, Adam's betas, init std) train as one stack: every parameter and BN buffer gets a
leading model dimension, `torch.func.vmap` runs the K forward and backward passes as batched
kernels, and a hand-written SGD/Adam applies each model's own learning rate, momentum and weight
decay. Small nets are dominated by per-operation overhead, which the stack pays once for K models.

Each model is still a full `train.Trainer` with its own data order, run directory, TensorBoard run,
checkpoints and summary.json. Its nn.Module's parameters and buffers are views into the stacked
tensors, so evaluation, diagnostics, checkpoints and the summary are the single-run code itself;
only the training step differs. A model that diverges is recorded as diverged (as if it had run
alone) and retired: its weights are copied out, its slot is zeroed and no longer updated.

The step reads and advances its own loop state on the device (batch position, step count, the
LR schedule as a table, the log window's sums, the gradient-norm record), so the host does
nothing between steps but launch them. On a GPU a run of steps is captured once in a CUDA graph
(forward, backward, gradient norm and update, several steps unrolled) and replayed: small nets
there are bound by kernel launches and host overhead, not arithmetic. That is also how a single
GPU run trains by default (`trainer.compile=auto|graph`): as a stack of one (`capturable`,
called from `train.run`), which calls the model directly rather than through vmap.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from bnexp import interrupt, record, train
from bnexp.config import UNHASHED, TrainerConfig, resolved
from bnexp.device import choose_threads

log = logging.getLogger("bnexp")

VECTORIZABLE = ("optim.lr", "optim.momentum", "optim.weight_decay", "optim.beta1",
                "optim.beta2", "seed", "model.init_std")
ADAM_EPS = 1e-8  # torch.optim.Adam's default, which the single runs use
GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before a CUDA graph capture
# Steps unrolled into one CUDA graph: one replay then launches them all, so the host's own
# per-step cost (~0.2 ms on the H100 machine measured) is paid once per GRAPH_STEPS.
GRAPH_STEPS = 16


def stackable(cfg: DictConfig, device: torch.device) -> bool:
    """Whether a run can share a stack with others. Not bf16 on a GPU: there, vmap's
    batch-norm backward rejects bf16 activations with float32 running statistics (seen on an
    H100 with torch 2.11, docs/performance.md); such runs train alone (a stack of one needs
    no vmap)."""
    return not (device.type == "cuda" and cfg.trainer.precision == "bf16")


def capturable(cfg: DictConfig, device: torch.device) -> bool:
    """Whether a single run's step is captured in a CUDA graph (it then trains as a stack of
    one): on a GPU, unless trainer.compile=off. With compile=on the graph replays
    torch.compile's kernels; a vectorized stack captures its step uncompiled."""
    return device.type == "cuda" and cfg.trainer.compile != "off"


def graph_steps(log_every: int) -> int:
    """Steps per CUDA graph: the largest divisor of the log cadence up to GRAPH_STEPS, so
    that the runs of steps between log windows are whole graphs."""
    return max(n for n in range(1, GRAPH_STEPS + 1) if log_every % n == 0)


def steps_to_event(step: int, total: int, t: TrainerConfig, epoch_left: int) -> int:
    """Steps from `step` to the next one after which the loop has something to do: a log
    window, evaluation, diagnostics, probe, checkpoint, an epoch's end or the last step."""
    n = min(total - step, epoch_left)
    for every in (t.log_every, t.eval_every, t.diagnostics_every if t.diagnostics else 0,
                  t.probe_every, t.checkpoint_every):
        if every:
            n = min(n, every - step % every)
    return n


def group_key(cfg: DictConfig) -> str:
    """Configs with equal keys can share a stack: everything but the per-model scalars."""
    from bnexp.runs import flatten

    flat = flatten(resolved(cfg))
    return json.dumps({k: v for k, v in sorted(flat.items())
                       if k not in VECTORIZABLE and k not in UNHASHED}, default=str)


def groups(cfgs: Sequence[DictConfig]) -> list[list[int]]:
    """Indices of cfgs, grouped by group_key, in first-seen order. A run being resumed trains
    alone (its state lives in its own checkpoint), and so does one that cannot be stacked."""
    from bnexp.config import ConfigError
    from bnexp.device import resolve_device

    found: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        try:
            device = resolve_device(cfg.device)
        except ConfigError:  # (e.g. cuda without a GPU) the run itself reports it
            device = None
        alone = cfg.resume or device is None or not stackable(cfg, device)
        key = f"alone:{i}" if alone else group_key(cfg)
        found.setdefault(key, []).append(i)
    return list(found.values())


def _per_model(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


class Stack:
    """The K trainers' models as stacked tensors, with a vectorized step."""

    def __init__(self, trainers: list[train.Trainer]):
        self.trainers = trainers
        self.k = len(trainers)
        models = [t.model for t in trainers]
        t0 = trainers[0]
        self.names = [n for n, _ in models[0].named_parameters()]
        self.buffer_names = [n for n, _ in models[0].named_buffers()]
        # All parameters of a model in one row of a K x N matrix: the optimizer then updates
        # every model in a few passes over one tensor, not per parameter and per model.
        first = dict(models[0].named_parameters())
        self.shapes = [first[n].shape for n in self.names]
        # Conv weights of channels_last models are laid out channels-last inside the row too,
        # so that their views keep the layout cuDNN's fast kernels want.
        self.last = [t0.channels_last and len(shape) == 4 for shape in self.shapes]
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
        self.compiled = self.k == 1 and t0.t.compile == "on"
        if self.compiled:
            self.forward = torch.compile(alone)
        o = [t.cfg.optim for t in trainers]
        like = self.flat
        self.adam = o[0].name == "adam"
        self.nesterov = bool(o[0].nesterov)
        self.base_lr = _per_model([t.lr for t in trainers], like)
        self.momentum = _per_model([c.momentum for c in o], like)
        self.weight_decay = _per_model([c.weight_decay for c in o], like)
        self.beta1 = _per_model([c.beta1 for c in o], like)
        self.beta2 = _per_model([c.beta2 for c in o], like)
        self.active = torch.ones(self.k, dtype=like.dtype, device=like.device)
        self.m = torch.zeros_like(self.flat)
        self.v = torch.zeros_like(self.flat) if self.adam else None
        self.updates = self.import_optimizer_state()
        self.any_weight_decay = bool(self.weight_decay.any())
        self.x_train = t0.x_train  # standardized once, shared: the data config is common
        self.y_train = t0.ds.y_train
        self.autocast, self.device = t0.autocast, t0.device
        self.grad = torch.zeros_like(self.flat, requires_grad=False)  # the last step's
        # The loop state the step reads and advances itself, in tensors at fixed addresses:
        # a captured step reads them at every replay, and the host need not touch them
        # between steps. The trainers' own step, epoch and position follow on the host.
        dev, total = self.device, t0.total_steps
        self.perms = torch.zeros(self.k, t0.steps_per_epoch, t0.t.batch_size,
                                 dtype=torch.long, device=dev)
        self.position = torch.full((1,), t0.pos, dtype=torch.long, device=dev)
        self.step_count = torch.full((1,), t0.step, dtype=torch.long, device=dev)
        factor = train.lr_factor(t0.cfg.optim, total)
        self.lr_factors = torch.tensor([factor(s) for s in range(total)], dtype=like.dtype,
                                       device=dev)
        # Adam's step t, a tensor so that a captured step reads it at every replay
        self.count = torch.full((), float(self.updates), dtype=like.dtype, device=dev)
        if t0.perm is not None:  # a resumed run is inside an epoch already
            self.set_perms([tr.perm for tr in trainers], t0.pos)
        # The log window's sums and the per-step gradient norms; each trainer's own are views.
        self.grad_norms = torch.stack([tr.grad_norms for tr in trainers], dim=1)
        self.loss_sum = torch.stack([tr.loss_sum for tr in trainers]).to(like.dtype)
        self.correct = torch.stack([tr.correct for tr in trainers])
        for k, tr in enumerate(trainers):
            tr.grad_norms = self.grad_norms[:, k]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.eager_steps = 0
        # Small nets on a GPU spend most of a step launching kernels; a graph launches whole
        # runs of steps at once.
        self.capture = capturable(t0.cfg, self.device)
        self.graph_steps = graph_steps(t0.t.log_every)

    # ------------------------------------------------------------------ the step

    def row(self, params: list[torch.Tensor]) -> torch.Tensor:
        """One model's parameters as one row of the flat matrix (see views)."""
        return torch.cat([(p.permute(0, 2, 3, 1) if last else p).reshape(-1)
                          for p, last in zip(params, self.last)])

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The K-stacked parameter tensors inside rows of flat (K x N)."""
        out = []
        for a, b, shape, last in zip(self.offsets, self.offsets[1:], self.shapes, self.last):
            if last:
                o, c, h, w = shape
                out.append(flat[:, a:b].view(-1, o, h, w, c).permute(0, 1, 4, 2, 3))
            else:
                out.append(flat[:, a:b].view(-1, *shape))
        return out

    def set_perms(self, perms: list[torch.Tensor], position: int) -> None:
        """The epoch's data order for every model (its batches as rows), and the position of
        the next batch in it."""
        n = self.perms.shape[1] * self.perms.shape[2]  # the partial last batch is dropped
        self.perms.copy_(torch.stack([p[:n] for p in perms]).view_as(self.perms))
        self.position.fill_(position)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self.k == 1:  # the trainer's own batch, in its layout (channels_last on a GPU)
            return self.trainers[0].batch(idx[0])[None]
        if self.x_train is not None:
            flat = self.x_train.index_select(0, idx.flatten())
            return flat.view(*idx.shape, *flat.shape[1:])
        return torch.stack([t.batch(i) for t, i in zip(self.trainers, idx)])

    def steps(self, n: int) -> None:
        """n steps of every model, each on its own next batch. Their losses, correct
        predictions and gradient norms accumulate on the device (loss_sum, correct,
        grad_norms); nothing is read back."""
        while n > 0:
            done = self.replay(n) if self.capture else 0
            if not done:
                self.eager_step()
                done = 1
            n -= done
            self.updates += done

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
                if self.x_train is None:  # augmentation draws from each trainer's generator
                    for t in self.trainers:
                        graph.register_generator_state(t.generator)
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
        losses = F.cross_entropy(train.full_precision(logits.flatten(0, 1)), y,
                                 reduction="none")
        losses = losses.view(idx.shape).mean(1)
        # Each model's loss depends on its own slice only, so the gradient of the sum is every
        # model's own gradient.
        # Gradients of the views, then one concatenation: asking for the flat tensor's own
        # gradient would make autograd zero-fill and add a K x N tensor per parameter.
        grads = torch.autograd.grad(losses.sum(), list(params.values()))
        with torch.no_grad():
            grad = torch.cat([(g.permute(0, 1, 3, 4, 2) if last else g).reshape(self.k, -1)
                              for g, last in zip(grads, self.last)], dim=1, out=self.grad)
            norms = torch.linalg.vector_norm(grad, dim=1)
            factor = self.lr_factors.index_select(0, self.step_count)
            self.update(grad, (self.base_lr * factor * self.active)[:, None])
            hits = (logits.detach().argmax(-1) == y.view(idx.shape)).sum(1)
            self.grad_norms.index_copy_(0, self.step_count,
                                        norms.to(self.grad_norms.dtype)[None])
            self.loss_sum.add_(losses)
            self.correct.add_(hits)
            self.step_count.add_(1)
            self.position.add_(1)

    @torch.no_grad()
    def update(self, g: torch.Tensor, lr: torch.Tensor) -> None:
        """torch.optim.SGD / Adam's update rules (as the single runs use them) on all models'
        parameters at once, every hyperparameter a per-model column."""
        p = self.flat
        if self.any_weight_decay:
            g = g.addcmul(p, self.weight_decay[:, None])  # L2, as torch's weight_decay
        if self.adam:
            t = self.count.add_(1)  # a tensor: a captured step reads it at every replay
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

    # ------------------------------------------------------------------ bookkeeping

    @torch.no_grad()
    def import_optimizer_state(self) -> int:
        """The trainers' optimizer state (a resumed run's, from its checkpoint) into the
        stack's buffers; the number of updates done so far (0 for a new run)."""
        updates = 0
        for k, t in enumerate(self.trainers):
            state = t.optimizer.state
            m = self.views(self.m[k : k + 1])
            v = self.views(self.v[k : k + 1]) if self.adam else m
            for i, p in enumerate(t.model.parameters()):
                if p not in state:
                    continue
                if self.adam:
                    m[i][0].copy_(state[p]["exp_avg"])
                    v[i][0].copy_(state[p]["exp_avg_sq"])
                    updates = int(state[p]["step"])
                elif "momentum_buffer" in state[p] and state[p]["momentum_buffer"] is not None:
                    m[i][0].copy_(state[p]["momentum_buffer"])
        return updates or self.trainers[0].step

    def export_optimizer_state(self, k: int) -> None:
        """Model k's slice of the optimizer state, in torch.optim's format on its trainer's
        own optimizer: its checkpoint then resumes as a single run."""
        t = self.trainers[k]
        opt = t.optimizer
        momentum = float(self.momentum[k])
        m = self.views(self.m[k : k + 1])
        v = self.views(self.v[k : k + 1]) if self.adam else m
        for i, p in enumerate(t.model.parameters()):
            if self.adam:
                opt.state[p] = {"step": torch.tensor(float(self.updates)),
                                "exp_avg": m[i][0].clone(), "exp_avg_sq": v[i][0].clone()}
            elif momentum and self.updates:
                opt.state[p] = {"momentum_buffer": m[i][0].clone()}

    def expose_grads(self, k: int) -> None:
        """Model k's gradients of the last step as its parameters' .grad, for diagnostics."""
        for p, g in zip(self.trainers[k].model.parameters(), self.views(self.grad[k : k + 1])):
            p.grad = g[0]

    @torch.no_grad()
    def retire(self, k: int) -> None:
        """Model k stops training: its trainer keeps a copy of the weights, its slot is zeroed
        (a NaN there would only cost time) and its learning rate set to 0."""
        model = self.trainers[k].model
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


def fit(stack: Stack, stop: interrupt.StopFlag) -> None:
    """Train.Trainer.fit for K models at once: the same cadences, the same records. The loop
    hands the stack runs of steps up to the next step with something to do (see
    steps_to_event); between them the step needs nothing from the host."""
    trainers = stack.trainers
    t0 = trainers[0]
    t, total = t0.t, t0.total_steps
    live = [True] * stack.k
    # A resumed run (trained alone: see groups) continues from its checkpoint's step, with
    # its recorded gradient norms and its open log window.
    step = t0.step
    loss_sum, correct = stack.loss_sum, stack.correct
    window_steps = t0.window_steps
    # A run of steps is at most one graph long (or as long, eagerly): the host's loop costs
    # little per run, and stop signals are seen between runs.
    longest = stack.graph_steps if stack.capture else GRAPH_STEPS
    off_clock = 0.0

    def off(fn: object, *args: object) -> None:
        nonlocal off_clock
        start = time.perf_counter()
        fn(*args)
        off_clock += time.perf_counter() - start

    if step == 0:
        for tr in trainers:
            tr.diagnose()  # the step-0 baseline, before the first window opens
    window_start = time.perf_counter()
    while step < total and any(live):
        lead = next(tr for k, tr in enumerate(trainers) if live[k])
        if lead.epoch_used_up():
            for k, tr in enumerate(trainers):
                if live[k]:
                    tr.new_epoch()  # draws its own permutation, as alone
            # A retired model's row repeats a live one's (its slot is zero and unused).
            stack.set_perms([tr.perm if live[k] else lead.perm
                             for k, tr in enumerate(trainers)], 0)
        n = min(longest, steps_to_event(step, total, t, t0.steps_per_epoch - lead.pos))
        stack.steps(n)
        window_steps += n
        step += n
        for k, tr in enumerate(trainers):
            if live[k]:
                tr.step = step
                tr.pos += n
        last = step == total
        if step % t.log_every == 0 or last or stop.signal or (
                t.checkpoint_every and step % t.checkpoint_every == 0):
            _catch_up_schedules(trainers, live, step)  # train/lr and checkpoints read them
        if step % t.log_every == 0 or last:
            seconds = time.perf_counter() - window_start - off_clock
            for k, tr in enumerate(trainers):
                if live[k] and not tr.log_window(tr.epoch, loss_sum[k], correct[k],
                                                 window_steps, seconds):
                    tr.evaluate_and_log(tr.epoch)  # what a diverged net scores
                    stack.retire(k)
                    live[k] = False
            loss_sum.zero_()
            correct.zero_()
            window_steps, window_start, off_clock = 0, time.perf_counter(), 0.0
        if step % t.eval_every == 0 or last:
            for k, tr in enumerate(trainers):
                if live[k]:
                    off(tr.evaluate_and_log, tr.epoch)
            best = max((tr.history.val_acc[-1][1] for k, tr in enumerate(trainers)
                        if live[k] and tr.history.val_acc), default=float("nan"))
            if stack.k > 1:
                log.info("bnexp: step %d/%d, %d of %d models training, best val_acc %.4f",
                         step, total, sum(live), stack.k, best)
        if step % t.diagnostics_every == 0 or last:
            for k in range(stack.k):
                if live[k]:
                    stack.expose_grads(k)
        for k, tr in enumerate(trainers):
            if live[k]:
                off(tr.diagnose, last)
        if t.checkpoint_every and step % t.checkpoint_every == 0 and not last:
            for k, tr in enumerate(trainers):
                if live[k]:
                    tr.loss_sum, tr.correct, tr.window_steps = (loss_sum[k], correct[k],
                                                                window_steps)
                    stack.export_optimizer_state(k)
                    off(tr.save, record.LAST_CHECKPOINT)
        if stop.signal:
            _catch_up_schedules(trainers, live, step)
            for k, tr in enumerate(trainers):
                tr.loss_sum, tr.correct, tr.window_steps = loss_sum[k], correct[k], window_steps
            raise KeyboardInterrupt(stop.signal)


def _catch_up_schedules(trainers: list[train.Trainer], live: list[bool], step: int) -> None:
    """Bring the live trainers' LR schedulers to `step` (the stack applies the learning rates
    itself; only train/lr and the checkpoints read the schedulers). LambdaLR's rate is a
    function of its step count alone, so one step from step - 1 equals `step` steps."""
    for k, tr in enumerate(trainers):
        if live[k] and tr.scheduler.last_epoch != step:
            tr.scheduler.last_epoch = step - 1
            tr.scheduler.step()


def run(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path]) -> list[dict]:
    """Train every config, stacking the ones that can share a stack; the summaries, in order.
    A group of one, or a run being resumed, trains as a single run."""
    summaries: list[dict | None] = [None] * len(cfgs)
    for members in groups(cfgs):
        if len(members) == 1:
            i = members[0]
            summaries[i] = train.run(cfgs[i], run_dirs[i])
            continue
        found = run_group([cfgs[i] for i in members], [run_dirs[i] for i in members])
        for i, summary in zip(members, found):
            summaries[i] = summary
    return summaries


def run_group(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path]) -> list[dict]:
    """Train one stack of compatible configs (see group_key) and record every model's run."""
    trainers: list[train.Trainer] = []
    for cfg, run_dir in zip(cfgs, run_dirs):
        with interrupt.immediate():
            tr = train.prepare(cfg, run_dir)
        if trainers:  # one standardized copy of the data for all (the data config is common)
            tr.x_train, tr.x_val = trainers[0].x_train, trainers[0].x_val
        if len(cfgs) > 1:
            tr.progress.mode = "none"  # one log line per evaluation for the whole stack instead
            tr.env["vectorized_models"] = len(cfgs)
        trainers.append(tr)
    threads = choose_threads(str(cfgs[0].trainer.threads), cfgs[0].model.name, len(cfgs))
    torch.set_num_threads(threads)
    for tr in trainers:
        tr.env["threads"] = threads
    if len(trainers) > 1:
        log.info("bnexp: training %d models as one stack (vectorized), threads=%d",
                 len(trainers), threads)
    statuses, error, notes = ["completed"] * len(trainers), None, {}
    stack = None
    try:
        stack = Stack(trainers)
        with contextlib.ExitStack() as scope, interrupt.deferred() as stop, \
                warnings.catch_warnings():
            if len(trainers) == 1:  # a single run (see capturable) keeps its progress display
                scope.enter_context(trainers[0].progress)
            # The trainers' schedulers only count steps (the stack applies the LR itself).
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            fit(stack, stop)
        statuses = ["diverged" if tr.history.diverged_at_step is not None else "completed"
                    for tr in trainers]
    except KeyboardInterrupt:
        notes["interrupted_by"] = interrupt.requested() or "SIGINT"
        statuses = ["diverged" if tr.history.diverged_at_step is not None else "interrupted"
                    for tr in trainers]
        for k, status in enumerate(statuses):
            if status == "interrupted":
                stack.export_optimizer_state(k)
    except Exception as exc:  # every model of the stack failed with it
        error = f"{type(exc).__name__}: {exc}"
        train.report_failure(error, list(run_dirs))
        statuses = ["failed"] * len(trainers)
    for tr in trainers:  # how the stack's step ran: captured in a CUDA graph, or eagerly
        step = "cuda graph" if stack is not None and stack.graphs else "eager"
        tr.env["training_step"] = (f"torch.compile + {step}" if stack is not None
                                   and stack.compiled else step)
    return [train.finish(tr, status, error, notes if status == "interrupted" else {})
            for tr, status in zip(trainers, statuses)]


def hydra_group(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path]) -> list[int]:
    """train.hydra_task for a stack of sweep jobs (see the bnexp_vectorized launcher): trains
    them, logs into every job's train.log, and returns their exit codes."""
    import sys

    handlers = [logging.FileHandler(Path(d) / "train.log") for d in run_dirs]
    for h in handlers:
        h.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
        log.addHandler(h)
    try:
        if interrupt.requested():
            raise SystemExit(interrupt.exit_code())
        before = [train.StartSnapshot.take(Path(d)) for d in run_dirs]
        with contextlib.ExitStack() as scope:
            held = [record.hold(Path(d)) for d in run_dirs]
            for f in held:
                if f is not None:
                    scope.enter_context(f)
            busy = [str(d) for d, f in zip(run_dirs, held) if f is None]
            if busy:
                print(f"bnexp: error: {', '.join(busy)}: in use by another bnexp process; "
                      "nothing was changed there. Wait for it to end, then rerun.",
                      file=sys.stderr)
                return [train.EXIT_BAD_INPUT] * len(cfgs)
            summaries = _train_stack(cfgs, run_dirs, before)
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
    if summaries is None:
        return [1] * len(cfgs)
    codes = []
    for run_dir, summary in zip(run_dirs, summaries):
        code = train.EXIT_BY_STATUS[summary["status"]]
        if summary["status"] == "interrupted":
            code = 143 if summary.get("notes", {}).get("interrupted_by") == "SIGTERM" else 130
        train.finished.append((Path(run_dir), summary, code))
        codes.append(code)
    interrupted = [c for c in codes if c in (130, 143)]
    if interrupted:
        raise SystemExit(interrupted[0])  # stop the sweep, as a single interrupted job does
    return codes


def _train_stack(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path],
                 before: list[train.StartSnapshot]) -> list[dict] | None:
    """The stack's runs, or None when set-up failed (each run then recorded as failed)."""
    import sys

    from bnexp import data
    from bnexp.config import ConfigError, config_hash, validate

    try:
        try:
            for cfg in cfgs:
                validate(cfg)
            return run_group(cfgs, run_dirs)
        except Exception:
            if interrupt.requested():  # a Ctrl-C that a library turned into another error
                raise KeyboardInterrupt from None
            raise
    except KeyboardInterrupt:  # during set-up: no run of the stack started
        with interrupt.deferred():
            for snapshot, cfg in zip(before, cfgs):
                snapshot.restore(bool(cfg.resume))
        raise SystemExit(interrupt.exit_code()) from None
    except (ConfigError, data.DataError, OSError) as exc:
        print(f"bnexp: error: {exc}", file=sys.stderr)
        for cfg, run_dir in zip(cfgs, run_dirs):
            record.write_summary(run_dir, "failed", resolved(cfg), {}, {}, error=str(exc),
                                 config_hash=config_hash(cfg))
            train.finished.append((Path(run_dir), None, 1))
        return None
