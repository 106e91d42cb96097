"""How fast is bnexp, measured against the references that matter, in one process.

Every figure is a median over interleaved repeats (a shared machine drifts; interleaving makes the
drift hit every variant alike), and every claim is a ratio of two figures from this same run; where
two loops are close (bnexp's vs the minimal loop), the median of their per-round ratios, with its
quartiles, and the ratio of their fastest rounds (interference on a shared machine only ever slows
a loop down, so the fastest round is the least disturbed one):

  throughput  bnexp's training loop vs a minimal hand-written loop over resident tensors (the
              practical ceiling of eager PyTorch), vs the DataLoader loop most users write
              (torchvision dataset + ToTensor/Normalize, 0 and 2 workers), and vs the arithmetic
              limit (FLOPs per sample x samples / the matmul rate measured here);
  steady      the same comparison in steady state, robust to the machine's noise: medians of
              single loop iterations (bnexp's and the minimal loop's, taking turns step by
              step) and of single events
              (log line, evaluation, diagnostics, histograms, loss-landscape probe), projected
              to a run of 1,000 steps at the default cadences;
  threads     1 vs 2 torch threads, on an idle machine and beside a busy process, and what
              trainer.threads=auto picks;
  precision   bf16 autocast vs fp32: step time and the effect on the result;
  vectorized  K models trained at once (`bnexp sweep --vectorize`) vs K sequential runs, and
              a stack's step and evaluation against their arithmetic limits, and where the
              stack's speed-up comes from (stacking on one thread; the other cores);
  startup     `bnexp --help`, `bnexp list`, `bnexp compare` (no torch import) and a run's own
              set-up time, imports excluded;
  endtoend    the CLI as a user types it, every command a fresh process: a 32-job sweep with
              and without --vectorize (paired, alternating), the per-job overhead of sequential
              sweeps (sweep wall minus its jobs' training and evaluation, per job, and its
              slope over two sweep sizes), a study's wall vs its training, and where one
              `bnexp train` process spends its time;
  compile     torch.compile on the CPU: its one-off cost and its gain per step;
  gpu         the GPU goals (eager vs CUDA graphs, bf16 + channels_last CNN), when a GPU is
              present; on a machine without one the section says so.

    python scripts/bench.py [--quick] [--only SECTION ...] [--repeats N] [--json FILE]

--quick shrinks every size so that the whole script runs in about a minute (the test suite runs
it that way, to check that it works; its figures are not meant to be quoted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bnexp import data, loop, models
from bnexp.config import compose
from bnexp.interrupt import StopFlag
from bnexp.loop import Loop
from bnexp.run import Run
from bnexp.steps import Eager

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("throughput", "steady", "threads", "precision", "vectorized", "startup", "endtoend",
            "compile", "gpu")


# ----------------------------------------------------------------------------- helpers


def median_of(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def interleaved(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each variant's figure, the variants taking turns in every round."""
    return {name: statistics.median(v) for name, v in rounds(variants, repeats).items()}


def rounds(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each variant's figure in every round, the variants taking turns within a round."""
    values: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            values[name].append(fn())
    return values


def paired(values: list[float], reference: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios values[r] / reference[r]: two loops run
    seconds apart share the machine's state, so their ratio is steadier than the ratio of
    medians taken over minutes."""
    ratios = sorted(v / r for v, r in zip(values, reference, strict=True))
    if len(ratios) < 4:
        return statistics.median(ratios), ratios[0], ratios[-1]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q1, q3


@contextlib.contextmanager
def busy_process() -> Iterator[None]:
    """One process spinning on a core, as on a shared machine."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cfg_for(model: str, batch_size: int, steps: int, extra: list[str] = ()) -> object:
    return compose([f"model={model}", f"trainer.batch_size={batch_size}",
                    f"trainer.steps={steps}", "trainer.progress=none", "device=cpu",
                    "trainer.checkpoint=false", *extra])


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """FLOP/s of a square matmul: the arithmetic ceiling of this device at this thread count."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_flops(model: torch.nn.Module, in_shape: tuple[int, ...]) -> list[float]:
    """Forward FLOPs of one sample through each linear and conv layer, in forward order."""
    flops: list[float] = []

    def count(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Linear):
            flops.append(2 * module.in_features * module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            flops.append(2 * k * out[0].numel())

    handles = [m.register_forward_hook(count) for m in model.modules()]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *in_shape))
    model.train(was)
    for h in handles:
        h.remove()
    return flops


def train_flops_per_sample(model: torch.nn.Module, in_shape: tuple[int, ...]) -> float:
    """Forward FLOPs of the linear and conv layers x 3 (forward, and backward for inputs and
    weights): the usual estimate of one training sample's arithmetic."""
    return 3 * sum(layer_flops(model, in_shape))


def step_flops_per_sample(model: torch.nn.Module, in_shape: tuple[int, ...]) -> float:
    """The matmul FLOPs one training step spends on a sample: each layer's forward, its weight
    gradient, and its input gradient except the first layer's (the data needs none)."""
    flops = layer_flops(model, in_shape)
    return 3 * sum(flops) - flops[0]


# ----------------------------------------------------------------------------- throughput


def write_mnist_raw(ds: data.Dataset, root: Path) -> None:
    """The mnist5k training split as torchvision's MNIST raw files, for the DataLoader loop."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", ds.x_train, ds.y_train), ("t10k", ds.x_val, ds.y_val)):
        images = x[:, 0].numpy()
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, *images.shape) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, len(y)) + y.numpy().astype("uint8").tobytes())


def plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> None:
    """The training step most PyTorch users write (the reference loops' step)."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def plain_inputs(ds: data.Dataset) -> torch.Tensor:
    """The training images as the reference loops use them: scaled and standardized once."""
    return (ds.x_train.float() / 255 - 0.1307) / 0.3081


def dataloader_loop(root: Path, model_name: str, batch_size: int, steps: int,
                    workers: int) -> float:
    """Samples/s of the loop most PyTorch users write."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers,
                                         persistent_workers=False)
    model = models.build(cfg_for(model_name, batch_size, steps).model, (1, 28, 28), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    done = 0
    start = time.perf_counter()
    while done < steps:
        for x, y in loader:
            plain_step(model, opt, x, y)
            done += 1
            if done == steps:
                break
    return steps * batch_size / (time.perf_counter() - start)


# CPU seconds (this process's, time.process_time) of the last minimal or bnexp loop: on a
# shared machine wall time also counts the time the loop waited for a core; CPU time does not.
last_cpu_seconds = [0.0]


def minimal_loop(ds: data.Dataset, model_name: str, batch_size: int, steps: int,
                 device: torch.device = torch.device("cpu")) -> float:
    """Samples/s of a hand-written loop over resident, pre-normalized tensors, no logging."""
    x = plain_inputs(ds).to(device)
    y = ds.y_train.to(device)
    model = models.build(cfg_for(model_name, batch_size, steps).model, ds.in_shape,
                         ds.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    per_epoch = len(y) // batch_size
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        if step % per_epoch == 0:
            perm = torch.randperm(len(y), device=device)
        idx = perm[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]
        plain_step(model, opt, x[idx], y[idx])
    sync(device)
    last_cpu_seconds[0] = time.process_time() - cpu
    return steps * batch_size / (time.perf_counter() - start)


class FitTimer:
    """Wall time of the training loop (Loop.fit: the steps, logging, evaluation, diagnostics),
    without the run's set-up and its final evaluation and files. With `mark`, also the time
    from the end of the first run of steps that reaches step `mark` (`marked_step`) to the
    end of the loop (steady state: after a compile or capture in the first steps). The one
    place it patches is Loop.fit."""

    def __init__(self, mark: int | None = None) -> None:
        from bnexp.loop import Loop

        self.seconds, self.after_mark, self.marked_step = 0.0, 0.0, 0
        self.mark, self.loop_class, self.original = mark, Loop, Loop.fit

    def __enter__(self) -> FitTimer:
        timer, fit = self, self.original

        def timed(loop: Any, stop: Any) -> None:
            marked = [0.0]
            if timer.mark:
                steps = loop.steps.steps

                def counted(n: int) -> None:
                    steps(n)
                    if not marked[0] and loop.steps.step >= timer.mark:
                        if torch.cuda.is_available():
                            torch.cuda.synchronize()
                        marked[0] = time.perf_counter()
                        timer.marked_step = loop.steps.step

                loop.steps.steps = counted
            start, cpu = time.perf_counter(), time.process_time()
            try:
                fit(loop, stop)
            finally:
                end = time.perf_counter()  # a loop ends reading its last window: in sync
                timer.seconds = end - start
                last_cpu_seconds[0] = time.process_time() - cpu
                timer.after_mark = end - marked[0] if marked[0] else 0.0

        self.loop_class.fit = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop_class.fit = self.original


def bnexp_loop(model_name: str, batch_size: int, steps: int, tmp: Path,
               extra: list[str] = ()) -> float:
    """Samples/s of `bnexp train` over the whole training loop (Loop.fit's wall time)."""
    cfg = cfg_for(model_name, batch_size, steps, ["trainer.threads=1", *extra])
    with FitTimer() as timer:
        summary = loop.train([cfg], [Path(tempfile.mkdtemp(dir=tmp))])[0]
    assert summary["status"] == "completed", summary
    return steps * batch_size / timer.seconds


# Only the final evaluation and log line: the loop itself, against the minimal loop.
BARE = ["trainer.diagnostics=false", "trainer.eval_every=1000000", "trainer.log_every=1000000"]
# Every diagnostic switched on, at the default cadences: the loss-landscape probes (off by
# default) join the per-layer diagnostics every 100 steps.
EVERY_DIAGNOSTIC = ["trainer.probe_every=100"]
# Denser still: diagnostics every 50 steps, histograms and probes every 100.
DENSE_DIAGNOSTICS = ["trainer.diagnostics_every=50", "trainer.histogram_every=100",
                     "trainer.probe_every=100"]


def bench_throughput(args: argparse.Namespace, tmp: Path) -> list[dict]:
    ds = data.load(compose([]).data)
    raw = tmp / "torchvision"
    write_mnist_raw(ds, raw)
    rows = []
    for model_name, steps in (("mlp", args.steps_mlp), ("cnn", args.steps_cnn))[
            : 1 if args.quick else 2]:  # --quick: the conv rows only cost time
        bs = 128
        def slow(n: int, model_name: str = model_name, bs: int = bs) -> dict:
            return {  # ~10x slower than the rest, and far from their goal: fewer rounds
                "DataLoader, 0 workers": partial(dataloader_loop, raw, model_name, bs, n, 0),
                "DataLoader, 2 workers": partial(dataloader_loop, raw, model_name, bs, n, 2),
            }

        def close(n: int, model_name: str = model_name, bs: int = bs) -> dict:
            return {
                "minimal resident loop": partial(minimal_loop, ds, model_name, bs, n),
                "bnexp train (no eval, logs, diagnostics)": partial(bnexp_loop, model_name, bs,
                                                                    n, tmp, BARE),
                "bnexp train (default logging)": partial(bnexp_loop, model_name, bs, n, tmp),
                "bnexp train (every diagnostic)": partial(bnexp_loop, model_name, bs, n, tmp,
                                                          EVERY_DIAGNOSTIC),
                "bnexp train (dense diagnostics)": partial(bnexp_loop, model_name, bs, n, tmp,
                                                           DENSE_DIAGNOSTICS),
            }

        cpu_sps: dict[str, list[float]] = {}

        def cpu_timed(name: str, fn: Callable[[], float], samples: int,
                      store: dict[str, list[float]] = cpu_sps) -> Callable[[], float]:
            def run() -> float:
                wall = fn()
                store.setdefault(name, []).append(samples / last_cpu_seconds[0])
                return wall
            return run

        with threads(1):
            for fn in [*slow(2).values(), *close(2).values()] if not args.quick else ():
                fn()  # warm-up: imports, allocator, worker start-up
            # conv steps take ~0.4 s here: fewer rounds keep the section within minutes
            n_close = 3 * args.repeats if model_name == "mlp" else min(args.repeats, 3)
            sps = interleaved(slow(steps), min(args.repeats, 3))
            per_round = rounds({name: cpu_timed(name, fn, steps * bs)
                                for name, fn in close(steps).items()}, n_close)
            sps.update({name: statistics.median(v) for name, v in per_round.items()})
            net = models.build(cfg_for(model_name, bs, steps).model, (1, 28, 28), 10)
            limit = matmul_rate(torch.device("cpu")) / train_flops_per_sample(net, (1, 28, 28))
        minimal = per_round["minimal resident loop"]
        for name, value in sps.items():
            row = {"model": model_name, "loop": name, "samples/s": value,
                   "vs minimal": value / statistics.median(minimal), "quartiles": "",
                   "vs minimal, CPU time": "", "rounds": len(per_round.get(name, ())) or
                   min(args.repeats, 3)}
            if name in per_round:  # paired with the minimal loop, round by round
                ratio, q1, q3 = paired(per_round[name], minimal)
                row["vs minimal"], row["quartiles"] = ratio, f"{q1:.3f}-{q3:.3f}"
                # the fastest round of each: interference only ever slows a loop down
                row["best vs best"] = max(per_round[name]) / max(minimal)
                row["vs minimal, CPU time"] = paired(cpu_sps[name],
                                                     cpu_sps["minimal resident loop"])[0]
            row["vs DataLoader 0w"] = value / sps["DataLoader, 0 workers"]
            row["of FLOP limit"] = value / limit
            rows.append(row)
        rows.append({"model": model_name, "loop": "arithmetic limit (1 thread)",
                     "samples/s": limit, "vs minimal": limit / statistics.median(minimal),
                     "vs DataLoader 0w": limit / sps["DataLoader, 0 workers"],
                     "of FLOP limit": 1.0})
    return rows


# ----------------------------------------------------------------------------- steady


def paired_step_seconds(ds: data.Dataset, model_name: str, batch_size: int, steps: int,
                        tmp: Path) -> tuple[float, float]:
    """Median seconds of one minimal-loop step and of one whole iteration of Loop.fit (with
    no events: batch, step, accumulators, cadence checks), the two taking turns step by step
    inside one fit: this machine's speed changes within a second, so only steps that alternate
    see the same machine."""
    x, y = plain_inputs(ds), ds.y_train
    model = models.build(cfg_for(model_name, batch_size, steps).model, ds.in_shape,
                         ds.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    per_epoch, perm = len(y) // batch_size, torch.randperm(len(y))
    run = Run(cfg_for(model_name, batch_size, steps, ["trainer.threads=1", *BARE]),
              Path(tempfile.mkdtemp(dir=tmp)), threads=1)
    batch, minimal, loop, resumed = run.batch, [], [], [0.0]

    def alternating(idx: torch.Tensor) -> torch.Tensor:  # each step begins with its batch
        start = time.perf_counter()
        if resumed[0]:
            loop.append(start - resumed[0])  # the previous fit iteration, end to end
        i = len(minimal) % per_epoch  # one step of the minimal loop, as in minimal_loop
        sel = perm[i * batch_size : (i + 1) * batch_size]
        plain_step(model, opt, x[sel], y[sel])
        resumed[0] = time.perf_counter()
        minimal.append(resumed[0] - start)
        return batch(idx)

    run.batch = alternating
    Loop([run], Eager(run)).fit(StopFlag())
    run.events.close()
    return statistics.median(minimal[1:]), statistics.median(loop[1:])


def event_seconds(model_name: str, batch_size: int, repeats: int,
                  tmp: Path) -> dict[str, float]:
    """Median seconds of each event the loop adds to its steps."""
    from bnexp import probes

    run = Run(cfg_for(model_name, batch_size, 1000, ["trainer.threads=1"]),
              Path(tempfile.mkdtemp(dir=tmp)), threads=1)
    eager, t = Eager(run), run.trainer
    run.new_epoch()
    eager.set_order([run.perm], 0)
    eager.steps(3)  # gradients exist, as at any diagnostics step after the first
    run.step = t.diagnostics_every  # a diagnostics step without histograms
    assert run.step % t.histogram_every and run.step >= t.log_every
    inputs = probes.activation_inputs(run.model, run.probe_x)

    def diagnostics() -> None:
        t.diagnostics, t.probe_every = "full", 0
        run.diagnose()

    def probe() -> None:
        t.diagnostics, t.probe_every = "off", run.step
        run.diagnose()

    def histograms() -> None:
        run.events.histograms(run.step, {f"act_input/{k}": v for k, v in inputs.items()})
        run.events.histograms(run.step, probes.norm_tensors(run.model))

    events = {
        "log line": lambda: run.log_window(eager.loss_sum[0], eager.correct[0], t.log_every,
                                           0.01, eager.grad_norms[:3, 0], eager.lr(0)),
        "evaluation": run.evaluate_and_log,
        "diagnostics": diagnostics, "histograms": histograms, "landscape probe": probe,
    }
    out = {}
    for name, fn in events.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    run.events.close()
    return out


def bench_steady(args: argparse.Namespace, tmp: Path) -> list[dict]:
    from bnexp.config import TrainerConfig

    ds, n, rows = data.load(compose([]).data), 1000, []
    d = TrainerConfig()
    # events in a 1,000-step run at the default cadences (step 0 diagnosed too); every
    # diagnostic on adds a landscape probe at each diagnostics step
    counts = {"log line": n // d.log_every, "evaluation": n // d.eval_every,
              "diagnostics": n // d.diagnostics_every + 1,
              "histograms": n // d.histogram_every + 1,
              "landscape probe": n // d.diagnostics_every + 1}
    for model_name, steps, reps in (("mlp", args.steps_mlp, args.repeats + 2),
                                    ("cnn", max(args.steps_cnn // 3, 3), 2))[
            : 1 if args.quick else 2]:
        with threads(1):
            minimal, loop = paired_step_seconds(ds, model_name, 128, steps, tmp)
            events = event_seconds(model_name, 128, reps, tmp)
        default = n * loop + sum(counts[k] * events[k] for k in counts
                                 if k != "landscape probe")
        every = default + counts["landscape probe"] * events["landscape probe"]
        row = {"model": model_name, "minimal loop ms/step": minimal * 1e3,
               "bnexp loop ms/step": loop * 1e3}
        row.update({f"{k} ms": v * 1e3 for k, v in events.items()})
        # the events' share, against bnexp's own loop: free of the minimal loop's noise
        row.update({"events add, default": default / (n * loop) - 1,
                    "events add, every diagnostic": every / (n * loop) - 1})
        row.update({"default logging vs minimal": n * minimal / default,
                    "every diagnostic vs minimal": n * minimal / every,
                    "no events vs minimal": minimal / loop})
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- threads


def step_ms(model_name: str, batch_size: int, steps: int, precision: str = "fp32") -> float:
    """Median milliseconds of one bnexp training step (the eager step) on mnist5k."""
    cfg = cfg_for(model_name, batch_size, steps, [f"trainer.precision={precision}"])
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, Path(tmp), threads=torch.get_num_threads())
        eager, times = Eager(run), []
        for _ in range(steps):
            if run.epoch_used_up():
                run.new_epoch()
                eager.set_order([run.perm], 0)
            run.pos += 1
            start = time.perf_counter()
            eager.steps(1)
            times.append(time.perf_counter() - start)
        run.events.close()
    return statistics.median(times[2:]) * 1e3


def bench_threads(args: argparse.Namespace, tmp: Path) -> list[dict]:
    from bnexp.device import choose_threads

    rows = []
    for busy in (False, True):
        with busy_process() if busy else contextlib.nullcontext():
            for model_name, steps in (("mlp", args.steps_mlp), ("cnn", max(args.steps_cnn, 6))):
                figures = {}
                for n in (1, 2):
                    with threads(n):
                        figures[n] = median_of(partial(step_ms, model_name, 128, steps),
                                               args.repeats)
                auto = choose_threads("auto", model_name)
                rows.append({"model": model_name, "machine": "busy" if busy else "idle",
                             "1 thread ms": figures[1], "2 threads ms": figures[2],
                             "2 vs 1": figures[1] / figures[2], "auto picks": auto,
                             "auto is fastest": figures[auto] <= min(figures.values()) * 1.05})
    return rows


# ----------------------------------------------------------------------------- precision


def bench_precision(args: argparse.Namespace, tmp: Path) -> list[dict]:
    rows = []
    for model_name, steps in (("mlp", args.steps_mlp), ("cnn", max(args.steps_cnn, 6))):
        # bf16 conv steps take seconds on a CPU without bf16 units: a shorter run for the result
        result_steps = args.steps_result if model_name == "mlp" else args.steps_result // 10
        with threads(1 if model_name == "mlp" else os.cpu_count() or 1):
            times = interleaved({p: partial(step_ms, model_name, 128, steps, p)
                                 for p in ("fp32", "bf16")}, args.repeats)
            accs = {}
            for p in ("fp32", "bf16"):
                cfg = cfg_for(model_name, 128, result_steps, [f"trainer.precision={p}"])
                summary = loop.train([cfg], [Path(tempfile.mkdtemp(dir=tmp))])[0]
                accs[p] = summary["metrics"]["final_val_acc"]
        rows.append({"model": model_name, "fp32 step ms": times["fp32"],
                     "bf16 step ms": times["bf16"], "bf16 speed-up": times["fp32"] / times["bf16"],
                     "fp32 val acc": accs["fp32"], "bf16 val acc": accs["bf16"],
                     "steps trained": result_steps})
    return rows


# ----------------------------------------------------------------------------- vectorized


def bench_vectorized(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """K MLP variants (learning rates), every run fully recorded, as K sequential runs and as
    one stack, on the GPU when there is one, else on the CPU. `wall` is the whole sweep;
    `training` the samples/s of the training loops alone (each run's train_seconds: its
    steps, without evaluation, diagnostics and files)."""
    if torch.cuda.is_available() and not args.quick:  # the CPU figures come from a CPU run
        return vectorized_on("cuda", args.steps_vectorized_gpu, 1, args, tmp)
    return (vectorized_on("cpu", args.steps_vectorized, min(args.repeats, 3), args, tmp)
            + stack_layouts(args, tmp))


def stack_layouts(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """One stack's step with its linear weights in the flat rows as the models lay them out
    (out x in) and transposed (in x out, the layout of vmap's weight gradients: bnexp.optim
    .Layout), and the transposed stack's step through vmap instead of layer by layer
    (bnexp.stacked): three stacks of the same K models (lr grid x 2 seeds, batch 64: the sweep
    of the endtoend section), taking turns in blocks of 5 steps."""
    import bnexp.steps as steps_module

    k = args.models
    lrs = [float(f"{v:.3g}") for v in torch.logspace(-3, -0.5, max(1, k // 2)).tolist()]
    cfgs = [compose(["device=cpu", f"optim.lr={lr}", f"seed={seed}", "trainer.steps=100000",
                     "trainer.progress=none"]) for lr in lrs for seed in (0, 1)]
    from bnexp.device import choose_threads

    threads = choose_threads("auto", "mlp", len(cfgs))
    torch.set_num_threads(threads)
    made = steps_module.Layout

    def stack(transposed: bool) -> Any:
        runs: list[Run] = []
        for cfg in cfgs:
            runs.append(Run(cfg, Path(tempfile.mkdtemp(dir=tmp)), threads,
                            shared=runs[0] if runs else None, stacked=len(cfgs)))
        steps_module.Layout = lambda *a, **kw: made(*a, **{**kw, "transposed": transposed})
        try:
            st = steps_module.Stack(runs)
        finally:
            steps_module.Layout = made
        for r in runs:
            r.new_epoch()
        st.set_order([r.perm for r in runs], 0)
        st.steps(5)  # warm
        return st

    through_vmap = stack(True)
    through_vmap.forward = torch.func.vmap(through_vmap.functional)
    stacks = {"as the model (out x in)": stack(False), "transposed (in x out)": stack(True),
              "transposed, through vmap (before bnexp.stacked)": through_vmap}
    seconds: dict[str, list[float]] = {name: [] for name in stacks}
    for rnd in range(4 if args.quick else 12):
        order = list(stacks.items())
        for name, st in order if rnd % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            stack_steps(st, 5)
            seconds[name].append((time.perf_counter() - start) / 5)
    base = statistics.median(seconds["as the model (out x in)"])
    batch = cfgs[0].trainer.batch_size
    rows = [{"device": "cpu", "models": len(cfgs), "steps each": "-",
             "way": f"one stack's step (wall s: per step), linear weights {name}",
             "step": "eager",
             "wall s": statistics.median(v), "wall speed-up": base / statistics.median(v),
             "training samples/s": len(cfgs) * batch / statistics.median(v),
             "training speed-up": "-"}
            for name, v in seconds.items()]
    # How far the step is from its arithmetic: its matmuls' FLOPs at the rate of a large
    # square matmul here (the batched matmuls of a batch of 64 reach less of it).
    st = stacks["transposed (in x out)"]
    model, in_shape = st.runs[0].model, tuple(st.runs[0].ds.in_shape)
    rate = matmul_rate(torch.device("cpu"))
    flops = step_flops_per_sample(model, in_shape) * len(cfgs) * batch
    rows.append({"device": "cpu", "models": len(cfgs), "steps each": "-",
                 "way": f"one stack's step at its arithmetic limit ({flops / 1e9:.3g} GFLOP "
                        f"at {rate / 1e9:.0f} GFLOP/s, a 1024 x 1024 matmul's rate here)",
                 "step": "-", "wall s": flops / rate, "wall speed-up": base * rate / flops,
                 "training samples/s": len(cfgs) * batch * rate / flops,
                 "training speed-up": "-"})
    rows += per_core(st, cfgs, threads, 4 if args.quick else 12, tmp)
    return rows + stack_evaluations(st, 4 if args.quick else 10, rate)


def stack_steps(st: Any, n: int) -> None:
    """n steps of a stack, inside its epoch's batches (rewound to its start when too few are
    left: the timings do not depend on which batches)."""
    if st.position.item() > st.perms.shape[1] - n:
        st.position.fill_(0)
    st.steps(n)


def per_core(st: Any, cfgs: list, threads: int, rounds: int, tmp: Path) -> list[dict]:
    """Where a stack's speed-up comes from: K single-model steps on one thread (as a
    sequential sweep takes them), the stack's step on one thread (stacking alone), and on
    `threads` (stacking and the cores), taking turns. Each turn first takes 2 steps untimed:
    the one before it evicted this one's tensors from the caches, which a sweep's runs of
    hundreds of steps do not see (the first steps after a stack's were 1.4x slower)."""
    import bnexp.steps as steps_module

    one = Run(cfgs[0], Path(tempfile.mkdtemp(dir=tmp)), 1)
    one.new_epoch()
    single = steps_module.Eager(one)

    def single_steps(n: int) -> None:
        if single.position > one.steps_per_epoch - n:
            single.position = 0
        single.steps(n)

    def stacked(n: int) -> None:
        stack_steps(st, n)

    # name: (steps, threads, the models one call steps). A turn of single-model steps takes
    # 2 per model (2 K steps), a stack's 5: turns of similar length.
    ways = {f"{st.k} single-model steps, 1 thread (a sequential sweep's)": (single_steps, 1,
                                                                           1),
            "one stack's step, 1 thread (stacking alone)": (stacked, 1, st.k),
            f"one stack's step, {threads} threads (stacking and the cores)": (stacked, threads,
                                                                              st.k)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for rnd in range(rounds):
            order = list(ways.items())
            for name, (fn, n_threads, models) in order if rnd % 2 == 0 else order[::-1]:
                torch.set_num_threads(n_threads)
                n = 5 if models > 1 else 2 * st.k
                fn(2)
                start = time.perf_counter()
                fn(n)
                # seconds per step of all K models
                seconds[name].append((time.perf_counter() - start) / n * st.k / models)
    finally:
        torch.set_num_threads(threads)
    base = statistics.median(seconds[next(iter(ways))])
    batch = cfgs[0].trainer.batch_size
    return [{"device": "cpu", "models": st.k, "steps each": "-",
             "way": f"per core: {name} (wall s: per step of all {st.k})", "step": "eager",
             "wall s": statistics.median(v), "wall speed-up": base / statistics.median(v),
             "training samples/s": st.k * batch / statistics.median(v),
             "training speed-up": "-"} for name, v in seconds.items()]


def stack_evaluations(st: Any, rounds: int, rate: float) -> list[dict]:
    """A layered stack's evaluation of its K models on the validation set, all of them in
    each call (bnexp.steps.Stack.evaluate) against one model at a time (bnexp.run.evaluate,
    as a CPU stack evaluated before), taking turns; and its forward's FLOPs at `rate`."""
    from bnexp.run import evaluate

    r0, ks = st.runs[0], list(range(st.k))
    ways = {"all models in each call (layered)": lambda: st.evaluate(ks),
            "one model at a time": lambda: [evaluate(r.model, r0.x_val, r0.ds.y_val, None,
                                                     r.eval_batch_size) for r in st.runs]}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for rnd in range(rounds):
        for name, fn in ways.items() if rnd % 2 == 0 else list(ways.items())[::-1]:
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["one model at a time"])
    flops = sum(layer_flops(r0.model, tuple(r0.ds.in_shape))) * st.k * len(r0.ds.y_val)
    return [{"device": "cpu", "models": st.k, "steps each": "-",
             "way": f"a stack's evaluation on the validation set (wall s: each), {name}",
             "step": "-", "wall s": statistics.median(v),
             "wall speed-up": base / statistics.median(v), "training samples/s": "-",
             "training speed-up": "-"} for name, v in seconds.items()] + [
        {"device": "cpu", "models": st.k, "steps each": "-",
         "way": f"a stack's evaluation at its arithmetic limit ({flops / 1e9:.3g} GFLOP at "
                f"{rate / 1e9:.0f} GFLOP/s)", "step": "-", "wall s": flops / rate,
         "wall speed-up": base * rate / flops, "training samples/s": "-",
         "training speed-up": "-"}]


def vectorized_on(device: str, steps: int, repeats: int, args: argparse.Namespace,
                  tmp: Path) -> list[dict]:
    k = args.models
    lrs = [float(f"{v:.3g}") for v in torch.logspace(-3, 0.5, k).tolist()]
    base = ["trainer.progress=none", f"device={device}", "trainer.checkpoint=false",
            "trainer.batch_size=128", f"trainer.steps={steps}", "trainer.eval_every=100"]
    train_seconds: dict[str, list[float]] = {"sequential": [], "vectorized": []}
    step_kind: dict[str, str] = {}

    def sequential() -> float:
        start = time.perf_counter()
        summaries = [loop.train([compose([*base, f"optim.lr={lr}"])],
                                [Path(tempfile.mkdtemp(dir=tmp))])[0] for lr in lrs]
        seconds = time.perf_counter() - start
        train_seconds["sequential"].append(sum(s["metrics"]["train_seconds"]
                                               for s in summaries))
        step_kind["sequential"] = summaries[0]["env"]["training_step"]
        return seconds

    def stacked() -> float:
        cfgs = [compose([*base, f"optim.lr={lr}"]) for lr in lrs]
        dirs = [Path(tempfile.mkdtemp(dir=tmp)) for _ in lrs]
        start = time.perf_counter()
        summaries = loop.train_all(cfgs, dirs)
        seconds = time.perf_counter() - start
        # the stack's training loop is every model's: its train_seconds are the stack's
        train_seconds["vectorized"].append(summaries[0]["metrics"]["train_seconds"])
        step_kind["vectorized"] = summaries[0]["env"]["training_step"]
        return seconds

    seconds = interleaved({"sequential": sequential, "vectorized": stacked}, repeats)
    trained = {way: statistics.median(v) for way, v in train_seconds.items()}
    samples = k * steps * 128
    return [{"device": device, "models": k, "steps each": steps, "way": way,
             "step": step_kind[way], "wall s": s, "wall speed-up": seconds["sequential"] / s,
             "training samples/s": samples / trained[way],
             "training speed-up": trained["sequential"] / trained[way]}
            for way, s in seconds.items()]


# ----------------------------------------------------------------------------- startup


def bench_startup(args: argparse.Namespace, tmp: Path) -> list[dict]:
    exe = str(Path(sys.executable).with_name("bnexp"))
    runs = tmp / "startup_runs"
    env = {**os.environ, "BNEXP_OUTPUTS": str(runs)}
    loop.train([cfg_for("mlp", 64, 5)], [runs / "runs" / "one"])[0]  # something for compare to read
    rows = []
    for command in (["--help"], ["list"], ["compare", str(runs)]):
        def once(command: list[str] = command) -> float:
            start = time.perf_counter()
            subprocess.run([exe, *command], env=env, capture_output=True, check=True)
            return time.perf_counter() - start
        probe = subprocess.run(
            [sys.executable, "-c", "import atexit, sys; from bnexp import cli; "
             f"sys.argv = ['bnexp', *{command!r}]; "
             "import contextlib, io\n"
             # main() ends the process (cli.leave): the answer comes from an atexit handler
             "atexit.register(lambda: print('torch' in sys.modules, file=sys.__stdout__))\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    cli.main()\n"],
            env=env, capture_output=True, text=True, check=True)
        rows.append({"what": "bnexp " + " ".join(command[:1]), "seconds": median_of(
            once, args.repeats), "imports torch": probe.stdout.strip().splitlines()[-1]})
    python = median_of(lambda: _timed_run([sys.executable, "-c", "pass"]), args.repeats)
    rows.append({"what": "python -c pass (floor)", "seconds": python, "imports torch": "False"})
    setups = []
    for _ in range(args.repeats):
        summary = loop.train([cfg_for("mlp", 64, 5)], [Path(tempfile.mkdtemp(dir=tmp))])[0]
        setups.append(summary["metrics"]["setup_seconds"])
    rows.append({"what": "run set-up on mnist5k (imports excluded)",
                 "seconds": statistics.median(setups), "imports torch": "-"})
    return rows


def _timed_run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- end to end


def cli_command(args: list[str], outputs: Path) -> tuple[float, list[dict]]:
    """(wall seconds, the summaries it wrote) of one bnexp command in a fresh process, with
    its outputs in a folder of their own (nothing to skip)."""
    exe = str(Path(sys.executable).with_name("bnexp"))
    env = {**os.environ, "BNEXP_OUTPUTS": str(outputs)}
    start = time.perf_counter()
    done = subprocess.run([exe, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"bnexp {' '.join(args)} exited {done.returncode}: "
                           f"{done.stderr[-2000:]}")
    return wall, [json.loads(p.read_text()) for p in sorted(outputs.rglob("summary.json"))]


def training_seconds(summaries: list[dict]) -> float:
    """The training the summaries' runs did. A stack trains its members together for as long
    as its longest-training member (a diverged member's train_seconds stop at its divergence),
    and a stack's members share a group key (bnexp.steps.groups)."""
    from omegaconf import OmegaConf

    from bnexp.steps import group_key

    stacks: dict[str, float] = {}
    for i, s in enumerate(summaries):
        key = (group_key(OmegaConf.create(s["config"]))
               if s["env"].get("vectorized_models", 1) > 1 else f"alone {i}")
        stacks[key] = max(stacks.get(key, 0.0), s["metrics"]["train_seconds"])
    return sum(stacks.values())


def own_seconds(summaries: list[dict]) -> float:
    """Training and evaluation: the work of the runs themselves (issue 17's definition)."""
    return sum((s["metrics"]["train_seconds"] + s["metrics"]["eval_seconds"])
               / s["env"].get("vectorized_models", 1) for s in summaries)


def quartile_text(values: list[float]) -> str:
    if len(values) < 4:
        return f"{min(values):.3g}-{max(values):.3g}"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.3g}-{q3:.3g}"


def bench_endtoend(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Whole CLI commands, as the user runs them (issue 17): the figures that a user's
    stopwatch sees, start-up, composition, files and all."""
    count, seeds, epochs = (3, "0,1", 1) if args.quick else (16, "0,1", 5)
    small = 2 if args.quick else 4
    folder = iter(range(10**6))

    def sweep(n: int, vectorize: bool) -> tuple[float, list[dict]]:
        cmd = ["sweep", f"--lr-grid=1e-3:0.3:{n}", f"seed={seeds}", f"trainer.epochs={epochs}",
               "device=cpu", *(["--vectorize"] if vectorize else [])]
        return cli_command(cmd, tmp / "endtoend" / str(next(folder)))

    repeats = max(1, min(args.repeats, 3))
    walls: dict[str, list[float]] = {"sequential": [], "vectorized": [], "small": []}
    own: dict[str, list[float]] = {k: [] for k in walls}
    trained: dict[str, list[float]] = {k: [] for k in walls}
    jobs = {"sequential": 2 * count, "vectorized": 2 * count, "small": 2 * small}
    for _ in range(repeats):  # the three take turns, so that drift hits them alike
        for way, (n, vec) in {"sequential": (count, False), "vectorized": (count, True),
                              "small": (small, False)}.items():
            wall, summaries = sweep(n, vec)
            assert len(summaries) == jobs[way], (way, len(summaries))
            walls[way].append(wall)
            own[way].append(own_seconds(summaries))
            trained[way].append(training_seconds(summaries))
    speedup = [s / v for s, v in zip(walls["sequential"], walls["vectorized"])]
    # The ceiling of that ratio: the same two sweeps' training alone (their train_seconds),
    # which start-up, files and evaluations can only dilute.
    ceiling = [s / v for s, v in zip(trained["sequential"], trained["vectorized"])]
    rows = [{"what": f"sweep, {jobs['sequential']} jobs, sequential", "wall s":
             statistics.median(walls["sequential"]), "quartiles": quartile_text(
                 walls["sequential"]), "ratio": 1.0},
            {"what": f"sweep, {jobs['vectorized']} jobs, --vectorize", "wall s":
             statistics.median(walls["vectorized"]), "quartiles": quartile_text(speedup),
             "ratio": statistics.median(speedup)},
            {"what": "  the same two sweeps' training alone (train_seconds): the ceiling",
             "wall s": statistics.median(trained["vectorized"]),
             "quartiles": quartile_text(ceiling), "ratio": statistics.median(ceiling)}]
    # What a 2x end to end asks of the stack's training, round by round: the sequential
    # wall halved, less what the --vectorize command spends outside its training. Its ratio
    # is the share of today's stacked training that 2x leaves (1 or more: already met).
    outside = [w - t for w, t in zip(walls["vectorized"], trained["vectorized"])]
    needed = [s / 2 - o for s, o in zip(walls["sequential"], outside)]
    rows += [{"what": "  --vectorize outside its training (start-up, planning, files, evals)",
              "wall s": statistics.median(outside), "quartiles": quartile_text(outside),
              "ratio": "-"},
             {"what": "  for 2x, its training would have to take at most",
              "wall s": statistics.median(needed), "quartiles": quartile_text(needed),
              "ratio": statistics.median([n / t for n, t in zip(needed,
                                                                trained["vectorized"])])}]
    # Per-job overhead by the definition, and split into a fixed part (the process's
    # start-up) and a marginal part per job, from the two sweep sizes.
    per_job = [(w - o) / jobs["sequential"] for w, o in zip(walls["sequential"],
                                                              own["sequential"])]
    extra = [((w - o) - (ws - os_)) / (jobs["sequential"] - jobs["small"])
             for w, o, ws, os_ in zip(walls["sequential"], own["sequential"], walls["small"],
                                      own["small"])]
    fixed = [(ws - os_) - jobs["small"] * e for ws, os_, e in zip(walls["small"], own["small"],
                                                                  extra)]
    rows += [{"what": "per-job overhead, sequential (wall - train - eval) / jobs",
              "wall s": statistics.median(per_job), "quartiles": quartile_text(per_job),
              "ratio": "-"},
             {"what": f"  marginal per job (slope, {jobs['small']} vs {jobs['sequential']} jobs)",
              "wall s": statistics.median(extra), "quartiles": quartile_text(extra),
              "ratio": "-"},
             {"what": "  fixed per sweep process (intercept)", "wall s":
              statistics.median(fixed), "quartiles": quartile_text(fixed), "ratio": "-"}]

    # A study: its wall against the training it did.
    study = ["reproduce", "lr_stability", *(["trainer.steps=5", "optim.lr=0.1,1",
                                            "seed=0,1"] if args.quick else [])]
    ratios, study_walls = [], []
    for _ in range(1 if args.quick else min(repeats, 2)):
        wall, summaries = cli_command(study, tmp / "endtoend" / str(next(folder)))
        study_walls.append(wall)
        ratios.append(wall / training_seconds(summaries))
    rows.append({"what": f"bnexp reproduce lr_stability ({len(summaries)} runs): wall / "
                         "training", "wall s": statistics.median(study_walls),
                 "quartiles": quartile_text(ratios), "ratio": statistics.median(ratios)})
    return rows + train_startup(args, tmp)


STARTUP_PROBE = """
import sys, time, json
marks = [("python start-up", time.perf_counter())]
def mark(what):
    marks.append((what, time.perf_counter()))
import torch; mark("import torch")
import hydra, omegaconf; mark("import hydra")
import torch.utils.tensorboard; mark("import tensorboard")
from bnexp.cli import main; import bnexp.loop; mark("import bnexp, typer")
run_dir, sys.argv = sys.argv[1], ["bnexp", "train", "device=cpu", "hydra.run.dir=" + sys.argv[1]]
import atexit
@atexit.register  # main() ends the process itself (cli.leave), running atexit handlers
def report():
    mark("bnexp train")
    print(json.dumps({"marks": marks, "dynamo": "torch._dynamo" in sys.modules}))
main()  # as the console script runs it (garbage collector and exit included)
"""


def train_startup(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Where one default `bnexp train` process spends its time, medians over repeats."""
    parts: dict[str, list[float]] = {}
    dynamo = set()
    for i in range(args.repeats):
        run_dir = tmp / "endtoend" / f"train{i}"
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", STARTUP_PROBE, str(run_dir)],
                             capture_output=True, text=True, check=True, cwd=tmp)
        total = time.perf_counter() - start
        found = json.loads(out.stdout.strip().splitlines()[-1])
        dynamo.add(found["dynamo"])
        marks = found["marks"]
        metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
        figures = {"process, whole": total,
                   "python start-up and exit": total - (marks[-1][1] - marks[0][1])}
        for (_, before), (what, at) in zip(marks, marks[1:]):
            figures[what] = at - before
        run = metrics["wall_seconds"]
        figures["  of it: checks, composition, Hydra, files"] = figures["bnexp train"] - run
        figures["  of it: the run's set-up"] = metrics["setup_seconds"]
        figures["  of it: training"] = metrics["train_seconds"]
        figures["  of it: evaluation"] = metrics["eval_seconds"]
        figures["  of it: the rest of the run (finish, probes, files)"] = (
            run - metrics["setup_seconds"] - metrics["train_seconds"]
            - metrics["eval_seconds"])
        for what, seconds in figures.items():
            parts.setdefault(what, []).append(seconds)
    return [{"what": f"bnexp train: {what}", "wall s": statistics.median(v),
             "quartiles": quartile_text(v),
             "ratio": f"torch._dynamo imported: {sorted(dynamo)}" if what == "process, whole"
             else "-"} for what, v in parts.items()]


# ----------------------------------------------------------------------------- compile, gpu


def write_synthetic(root: Path, mnist: int, cifar: int) -> None:
    """MNIST- and CIFAR-10-sized random datasets in torchvision's on-disk formats: timings
    do not depend on the pixels, and the real files cannot be downloaded everywhere."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (mnist, 1, 28, 28), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, 10, mnist))
    write_mnist_raw(data.Dataset("mnist", x, y, x[:10000], y[:10000], 10,
                                 torch.zeros(1), torch.ones(1)), root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        n = cifar // 5 if name != "test_batch" else min(cifar, 10000)
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in
                                                                          range(10)]}))


def timed_fit(overrides: list[str], tmp: Path, mark: int | None = None
              ) -> tuple[float, float, dict, float]:
    """(seconds of Loop.fit, seconds of the whole run, summary, the fit's seconds at its
    rate after step `mark`, for all its steps) of one run."""
    start = time.perf_counter()
    with FitTimer(mark) as timer:
        summary = loop.train([compose(overrides)], [Path(tempfile.mkdtemp(dir=tmp))])[0]
    assert summary["status"] in ("completed", "diverged"), summary
    wall = time.perf_counter() - start
    steps = summary["metrics"]["steps"]
    steady = (timer.after_mark * steps / (steps - timer.marked_step)
              if mark and steps > timer.marked_step else 0.0)
    return timer.seconds, wall, summary, steady


QUIET = ["trainer.progress=none", "trainer.checkpoint=false", "trainer.diagnostics=false"]


def bench_compile(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """torch.compile's one-off cost and its gain per step on this machine's CPU (the GPU
    section does the same on a GPU): the first compiled run pays the compilation, later runs
    in the same process reuse it."""
    rows = []
    base = ["device=cpu", *QUIET, "trainer.batch_size=128", f"trainer.steps={args.steps_mlp}",
            "trainer.threads=1", "trainer.eval_every=1000000"]
    timed_fit([*base, "trainer.compile=off"], tmp)  # warm-up
    first = timed_fit([*base, "trainer.compile=on"], tmp)[0]  # compiles (or loads its cache)
    fits = interleaved({mode: lambda mode=mode: timed_fit([*base, f"trainer.compile={mode}"],
                                                          tmp)[0] for mode in ("off", "on")},
                       args.repeats)
    e, c = fits["off"], fits["on"]
    rows.append({"device": "cpu", "model": "MLP + BN, batch 128", "steps": args.steps_mlp,
                 "eager s": e, "compiled s": c, "speed-up": e / c,
                 "one-off compile s": first - c,
                 "break-even steps": (first - c) / max((e - c) / args.steps_mlp, 1e-12)
                 if e > c else "never"})
    return rows


def bench_gpu(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """The GPU goals: MNIST-sized MLP +-BN, batch 128, 10 epochs, eager vs the step captured
    in CUDA graphs (graph) vs the same with torch.compile's forward inside (on);
    CIFAR-10-sized small CNN + BN, bf16, channels_last, augmentation on the GPU, one epoch.
    Compiling and capturing happen in the first steps of a run: `steady` is the run's time
    at the rate after its first steps, `one-off` what the first run of the process cost
    beyond that (compilation, capture, cuDNN autotuning, CUDA context)."""
    if not torch.cuda.is_available():
        return [{"what": "GPU", "result": "not measured: no CUDA device on this machine"}]
    root = tmp / "synthetic"
    n_mnist, n_cifar = (6000, 5000) if args.quick else (60000, 50000)
    write_synthetic(root, n_mnist, n_cifar)
    card = torch.cuda.get_device_name()
    repeats = min(args.repeats, 3)
    rows = []
    common = ["device=cuda", *QUIET, f"data.root={root}", "trainer.eval_every=1000000",
              "trainer.log_every=1000000"]
    cases = []
    for norm, modes in (("batch", ("off", "graph", "on")), ("none", ("off", "graph"))):
        for compile_mode in modes:
            cases.append((f"MNIST-sized MLP norm={norm}, batch 128, {args.gpu_epochs} epochs",
                          [*common, "data=mnist", "trainer.batch_size=128",
                           f"trainer.epochs={args.gpu_epochs}", f"model.norm={norm}",
                           f"trainer.compile={compile_mode}"], compile_mode,
                          min(n_mnist // 128, args.gpu_epochs * (n_mnist // 128) // 2)))
    for compile_mode in ("off", "graph", "on"):
        cases.append(("CIFAR-10-sized CNN + BN, bf16, channels_last, GPU augmentation, "
                      "batch 512, 1 epoch",
                      [*common, "data=cifar10", "model=cnn", "trainer.precision=bf16",
                       "data.augment=true", "trainer.batch_size=512", "trainer.epochs=1",
                       f"trainer.compile={compile_mode}"], compile_mode,
                      min(10, n_cifar // 512 // 2)))
    for what, overrides, compile_mode, mark in cases:
        first = timed_fit(overrides, tmp, mark)
        later = [timed_fit(overrides, tmp, mark) for _ in range(repeats)]
        total = later[0][2]["metrics"]["steps"]
        fit = statistics.median(r[0] for r in later)
        steady = statistics.median(r[3] for r in later)
        rows.append({"card": card, "what": what, "compile": compile_mode,
                     "step": later[0][2]["env"]["training_step"], "steps": total,
                     "seconds": fit, "steady seconds": steady,
                     "steady ms/step": 1000 * steady / total,
                     "first run s": first[0], "one-off s": first[0] - steady})
    # The same MLP loop written by hand (resident tensors, no logging), eager: the ceiling of
    # eager PyTorch on this card, as on the CPU.
    ds = data.load(compose(["data=mnist", f"data.root={root}"]).data)
    steps = args.gpu_epochs * (len(ds.y_train) // 128)
    minimal_loop(ds, "mlp", 128, 50, torch.device("cuda"))  # warm-up
    sps = statistics.median(minimal_loop(ds, "mlp", 128, steps, torch.device("cuda"))
                            for _ in range(repeats))
    rows.append({"card": card, "what": f"minimal hand-written loop, MLP + BN, batch 128, "
                 f"{args.gpu_epochs} epochs", "compile": "off", "steps": steps,
                 "seconds": steps * 128 / sps, "steady ms/step": 1000 / (sps / 128)})
    # The arithmetic limits: training FLOPs over the card's matmul rate (fp32 without TF32, as
    # the MLP runs; bf16 for the CNN), 4096-square, large enough to fill the card.
    cuda = torch.device("cuda")
    cifar = data.load(compose(["data=cifar10", f"data.root={root}"]).data)
    for what, model_name, shape, samples, dtype in (
            ("MLP + BN", "mlp", ds.in_shape, steps * 128, torch.float32),
            ("CNN + BN (bf16)", "cnn", cifar.in_shape, len(cifar.y_train) // 512 * 512,
             torch.bfloat16)):
        model = models.build(compose([f"model={model_name}"]).model, shape, 10)
        rate = matmul_rate(cuda, dtype, 4096)
        rows.append({"card": card, "what": f"arithmetic limit, {what}: "
                     f"{train_flops_per_sample(model, shape) / 1e6:.3g} MFLOP/sample at "
                     f"{rate / 1e12:.3g} TFLOP/s", "compile": "-", "steps": "-",
                     "seconds": train_flops_per_sample(model, shape) * samples / rate})
    return rows


# ----------------------------------------------------------------------------- main


def render(title: str, rows: list[dict]) -> str:
    """A markdown table (compare's), with figures rounded for reading."""
    from bnexp.compare import render as table

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    if not rows:
        return ""
    return f"### {title}\n\n" + table([{k: cell(v) for k, v in r.items()} for r in rows],
                                      "markdown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--models", type=int, default=None, help="K for the vectorized section")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    quick = args.quick
    args.repeats = args.repeats or (1 if quick else 5)
    args.models = args.models or (3 if quick else 32)
    args.steps_mlp, args.steps_cnn = (8, 2) if quick else (300, 40)
    args.steps_result = 10 if quick else 300
    args.steps_vectorized = 6 if quick else 150
    args.steps_vectorized_gpu = 1000
    args.gpu_epochs = 1 if quick else 10
    logging.disable(logging.INFO)
    os.environ.setdefault("BNEXP_DATA", str(ROOT / "data"))

    print(f"# bnexp benchmark, {time.strftime('%Y-%m-%d %H:%M')}"
          f"{' (--quick: sizes too small to quote)' if quick else ''}\n")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'};"
          f" medians of {args.repeats} interleaved repeats\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.only:
            rows = globals()[f"bench_{section}"](args, Path(tmp))
            results[section] = rows
            print(render(section, rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    multiprocessing.set_start_method("fork", force=True)
    main()
