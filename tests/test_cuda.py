"""The GPU path, checked against the CPU (and eager) on a machine with a CUDA device.

Deselected by default (marker `gpu`); run them with `pytest -m gpu` on a machine with a GPU.
There they fail, not skip, when no CUDA device is found. Each check prints the difference it
measured, so that `pytest -m gpu -s` records the figures (docs/performance.md quotes them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnexp import loop, record, runs, steps
from bnexp.config import compose
from bnexp.optim import Layout, Optimizer

pytestmark = pytest.mark.gpu

F64 = ["trainer.progress=none", "trainer.precision=fp64", "trainer.log_every=5",
       "trainer.eval_every=10", "trainer.diagnostics_every=10", "trainer.histogram_every=10",
       "trainer.batch_size=32"]


@pytest.fixture(autouse=True)
def cuda_present() -> None:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device (run them with -m gpu " \
                                      "on a machine that has one)"


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return record.load_checkpoint(run_dir / "checkpoints" / "final.pt")["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double().cpu() - b[k].double().cpu()).abs().max().item() for k in a)


def report(what: str, value: float) -> None:
    print(f"\n[gpu check] {what}: {value:.3g}")


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_a_full_run_on_the_gpu_learns_like_the_cpu_run(tmp_path: Path, model: str) -> None:
    """One run end to end on the GPU: evaluation, every diagnostic and the histograms.
    The data order comes from a generator on the run's device, so the two runs see other
    batches: they must learn alike, not bit for bit (the next test compares the steps)."""
    extra = ["model.width=8", "trainer.steps=80"] if model == "cnn" else ["trainer.steps=60"]
    common = [*F64, f"model={model}", *extra]
    cpu = loop.train([compose([*common, "device=cpu"])], [tmp_path / "cpu"])[0]
    gpu = loop.train([compose([*common, "device=cuda"])], [tmp_path / "gpu"])[0]
    assert cpu["status"] == gpu["status"] == "completed"
    assert gpu["env"]["device"].startswith("cuda") and gpu["env"]["device_name"]
    a, b = cpu["metrics"]["final_val_acc"], gpu["metrics"]["final_val_acc"]
    report(f"{model}: val acc CPU", a)
    report(f"{model}: val acc GPU", b)
    assert b > 0.3 and abs(a - b) < 0.15
    for tag in ("train/loss", "val/acc", "grad_norm/layer1", "act_input/act1/p50"):
        assert len(runs.scalar_series(tmp_path / "gpu", tag)) > 1, tag


def test_the_same_steps_on_the_gpu_and_the_cpu_agree_in_float64() -> None:
    """One model, the same batches on both devices (indices drawn once on the CPU): the
    training step (loss_and_hits, backward, bnexp.optim's SGD, BN) agrees to float64 rounding."""
    from bnexp import data, models

    cfg = compose([*F64, "optim.momentum=0.9", "optim.weight_decay=0.0005"])
    ds = data.load(cfg.data)
    torch.manual_seed(0)
    base = models.build(cfg.model, ds.in_shape, ds.num_classes).double()
    batches = torch.randint(0, len(ds.y_train), (30, 32),
                            generator=torch.Generator().manual_seed(1))
    x_all = data.Inputs(ds, "standardized", torch.float64)(ds.x_train)
    states = {}
    for name in ("cpu", "cuda"):
        device = torch.device(name)
        model = models.build(cfg.model, ds.in_shape, ds.num_classes).double().to(device)
        model.load_state_dict(base.state_dict())
        params = list(model.parameters())
        layout = Layout(model)
        with torch.no_grad():
            flat = layout.row(params)
        layout.bind([model], flat)
        opt = Optimizer(flat, [cfg.optim], layout)
        lr = torch.full((1, 1), 0.1, dtype=flat.dtype, device=device)
        x, y = x_all.to(device), ds.y_train.to(device)
        for step, idx in enumerate(batches.to(device)):
            loss, _ = steps.loss_and_hits(model, x[idx], y[idx], False)
            for p in params:
                p.grad = None
            loss.backward()
            opt.update(layout.row([p.grad for p in params]), lr,
                       torch.tensor(step, device=device))
        states[name] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    diff = max_difference(states["cpu"], states["cuda"])
    report("30 SGD steps, float64, GPU vs CPU, max weight/BN difference", diff)
    assert diff <= 1e-10


def test_a_compiled_run_on_the_gpu_matches_the_eager_run(tmp_path: Path) -> None:
    """trainer.compile=on on a GPU: the forward through torch.compile (inductor kernels),
    inside the captured step. float32, so the kernels' other summation order shows; the runs
    must still agree closely step by step."""
    base = ["device=cuda", "trainer.steps=200", "trainer.progress=none", "trainer.log_every=10",
            "trainer.eval_every=100"]
    eager = loop.train([compose([*base, "trainer.compile=off"])], [tmp_path / "eager"])[0]
    compiled = loop.train([compose([*base, "trainer.compile=on"])], [tmp_path / "compiled"])[0]
    assert eager["status"] == compiled["status"] == "completed"
    assert compiled["env"]["training_step"] == "torch.compile + cuda graph"
    a, b = (runs.scalar_series(tmp_path / d, "train/loss") for d in ("eager", "compiled"))
    worst = max(abs(x[1] - y[1]) / abs(x[1]) for x, y in zip(a, b))
    report("compiled (CUDA graphs) vs eager, 200 steps fp32, worst relative train-loss gap",
           worst)
    assert [x[0] for x in a] == [x[0] for x in b] and worst < 1e-2
    diff = max_difference(final_state(tmp_path / "eager"), final_state(tmp_path / "compiled"))
    report("compiled vs eager, max final weight difference", diff)
    assert diff < 1e-2
    assert abs(eager["metrics"]["final_val_acc"] - compiled["metrics"]["final_val_acc"]) < 0.01


@pytest.mark.parametrize("compile_setting", ["auto", "off"])
def test_a_vectorized_stack_on_the_gpu_equals_single_gpu_runs_in_float64(
        tmp_path: Path, compile_setting: str) -> None:
    """The stack's step captured in a CUDA graph (compile=auto) or eager (off), vs each model
    trained alone on the GPU."""
    variants = [["optim.lr=0.05", "seed=0"],
                ["optim.lr=0.2", "seed=1", "optim.momentum=0.5", "optim.weight_decay=0.001"],
                ["optim.lr=200", "seed=2"],  # diverges
                ["optim.lr=0.1", "seed=3", "optim.momentum=0"]]
    common = [*F64, "device=cuda", "trainer.steps=40", f"trainer.compile={compile_setting}"]
    cfgs = [compose([*common, *v]) for v in variants]
    dirs = [tmp_path / f"stacked{i}" for i in range(len(cfgs))]
    stacked = loop.train(cfgs, dirs, kind="stack")
    assert stacked[0]["env"]["training_step"] == (
        "cuda graph" if compile_setting == "auto" else "eager")
    worst = 0.0
    for i, cfg in enumerate(cfgs):
        alone = loop.train([cfg], [tmp_path / f"alone{i}"])[0]
        assert stacked[i]["status"] == alone["status"]
        assert stacked[i]["metrics"]["diverged_at_step"] == alone["metrics"]["diverged_at_step"]
        if alone["status"] == "diverged":
            continue
        worst = max(worst, max_difference(final_state(dirs[i]), final_state(tmp_path /
                                                                             f"alone{i}")))
        # evaluations and the final mode comparison, batched over the stack on a GPU
        for key in ("final_val_acc", "val_acc_eval_mode", "val_acc_train_mode",
                    "val_acc_eval_bs1", "val_acc_train_bs1"):
            assert stacked[i]["metrics"][key] == alone["metrics"][key], key
    report(f"vectorized (compile={compile_setting}) vs alone on the GPU, float64, max weight/BN "
           "difference", worst)
    assert worst <= 1e-10


@pytest.mark.parametrize("norm", ["model.norm=layer", "model.norm=group",
                                  "model.norm=instance"])
def test_a_captured_stack_of_every_other_norm_equals_single_gpu_runs_in_float64(
        tmp_path: Path, norm: str) -> None:
    """Layer, group and instance norm of a CNN (vmap over their per-sample statistics) in the
    stack's CUDA graph against each model trained alone on the GPU."""
    common = [*F64, "device=cuda", "model=cnn", "model.width=8", "model.norm_groups=4", norm,
              "trainer.steps=20", "trainer.batch_size=16"]
    cfgs = [compose([*common, f"optim.lr={lr}", f"seed={seed}"])
            for seed, lr in enumerate((0.05, 0.2))]
    dirs = [tmp_path / f"stacked{i}" for i in range(len(cfgs))]
    stacked = loop.train(cfgs, dirs, kind="stack")
    assert stacked[0]["env"]["training_step"] == "cuda graph"
    worst = 0.0
    for i, cfg in enumerate(cfgs):
        alone = loop.train([cfg], [tmp_path / f"alone{i}"])[0]
        assert stacked[i]["status"] == alone["status"] == "completed"
        assert stacked[i]["metrics"]["train_eval_gap"] == 0  # no batch statistics
        worst = max(worst, max_difference(final_state(dirs[i]),
                                          final_state(tmp_path / f"alone{i}")))
    report(f"{norm}: captured CNN stack vs alone on the GPU, float64, max weight difference",
           worst)
    assert worst <= 1e-10


def test_bf16_channels_last_cnn_with_gpu_augmentation_learns_like_fp32(tmp_path: Path) -> None:
    """bf16 autocast against fp32, two seeds each (single short runs differ by several
    points from seed to seed). The bf16 runs train as a stack of one, captured (no vmap, whose
    batch-norm backward rejects bf16 on a GPU); the eager bf16 run learns alike."""
    common = ["device=cuda", "model=cnn", "data.augment=true", "trainer.steps=300",
              "trainer.batch_size=128", "trainer.progress=none", "trainer.eval_every=300"]
    accs = {}
    for precision in ("bf16", "fp32"):
        found = [loop.train([compose([*common, f"trainer.precision={precision}",
                                      f"seed={seed}"])], [tmp_path / f"{precision}{seed}"])[0]
                 for seed in (0, 1)]
        assert all(f["status"] == "completed" for f in found)
        assert all(f["env"]["training_step"] == "cuda graph" for f in found)
        accs[precision] = sum(f["metrics"]["final_val_acc"] for f in found) / len(found)
        report(f"CNN {precision}, augmented, 300 steps, mean val acc of 2 seeds",
               accs[precision])
    assert accs["bf16"] > 0.8 and abs(accs["bf16"] - accs["fp32"]) < 0.05
    eager = loop.train([compose([*common, "trainer.precision=bf16", "seed=0",
                               "trainer.compile=off"])], [tmp_path / "bf16-eager"])[0]
    graph = json.loads((tmp_path / "bf160" / "summary.json").read_text())
    gap = abs(eager["metrics"]["final_val_acc"] - graph["metrics"]["final_val_acc"])
    report("CNN bf16, seed 0: captured vs eager, val acc gap", gap)
    assert eager["env"]["training_step"] == "eager" and gap < 0.03


@pytest.mark.parametrize("model", ["mlp", "cnn-augmented", "mlp-16-step-graphs"])
def test_the_whole_step_in_a_cuda_graph_equals_the_eager_run_in_float64(
        tmp_path: Path, model: str) -> None:
    """trainer.compile=graph (the default on a GPU): a single run as a stack of one, runs of
    steps captured in CUDA graphs, against the eager Trainer. With augmentation the graph
    draws from the run's own generator (registered with the graph): the same crops and flips.
    With log_every=32 the graphs hold 16 steps, and epochs end inside the log windows."""
    extra = {"cnn-augmented": ["model=cnn", "model.width=8", "data.augment=true",
                               "trainer.steps=30"],
             "mlp": ["trainer.steps=60", "optim.momentum=0.9"],
             "mlp-16-step-graphs": ["trainer.steps=300", "trainer.log_every=32",
                                    "trainer.eval_every=96",
                                    "trainer.diagnostics_every=96", "optim=adam", "optim.lr=0.003",
                                    "optim.schedule=cosine", "optim.warmup_steps=20"]}[model]
    common = [*F64, "device=cuda", *extra]
    graph = loop.train([compose([*common, "trainer.compile=graph"])], [tmp_path / "graph"])[0]
    eager = loop.train([compose([*common, "trainer.compile=off"])], [tmp_path / "eager"])[0]
    assert graph["env"]["training_step"] == "cuda graph"
    assert eager["env"]["training_step"] == "eager"
    diff = max_difference(final_state(tmp_path / "graph"), final_state(tmp_path / "eager"))
    report(f"{model}: whole-step CUDA graph vs eager, float64, max weight/BN difference", diff)
    assert diff <= 1e-10
    assert graph["metrics"]["final_val_acc"] == eager["metrics"]["final_val_acc"]
    for tag in ("train/loss", "train/acc", "train/grad_norm", "train/lr"):
        a, b = (runs.scalar_series(tmp_path / d, tag) for d in ("graph", "eager"))
        assert [x[0] for x in a] == [x[0] for x in b], tag
        assert [x[1] for x in a] == pytest.approx([x[1] for x in b], rel=1e-9), tag


def test_cli_train_on_the_gpu_then_interrupt_and_resume_bit_identically(
        tmp_path: Path) -> None:
    """`bnexp train device=cuda`, stopped by SIGINT mid-run and resumed, ends with the
    weights of an uninterrupted run (the CUDA generator's state is in the checkpoint)."""
    # long enough that the signal lands mid-run: a captured step takes ~0.1 ms
    run = ["train", "device=cuda", "trainer.steps=20000", "trainer.eval_every=2000",
           "trainer.checkpoint_every=500", "trainer.progress=none"]

    def bnexp(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "bnexp", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=os.environ.copy(),
                                start_new_session=True)

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    proc = bnexp(*run, f"hydra.run.dir={ref}")
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode()
    proc = bnexp(*run, f"hydra.run.dir={cut}")
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.stdout.read().decode()
    assert json.loads((cut / "summary.json").read_text())["status"] == "interrupted"
    proc = bnexp("resume", str(cut))
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode()
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["env"]["device"].startswith("cuda")
    assert summary["env"]["training_step"] == "cuda graph"  # the default on a GPU
    a, b = final_state(ref), final_state(cut)
    report("CLI run interrupted and resumed vs uninterrupted, max weight difference",
           max_difference(a, b))
    assert all(torch.equal(a[k], b[k]) for k in a)
