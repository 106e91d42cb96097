"""End-to-end runs through the CLI, exactly as a user types them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from bnexp.cli import app

runner = CliRunner()
QUICK = ["trainer.progress=plain", "device=cpu"]


def train(*overrides: str) -> tuple[int, str]:
    result = runner.invoke(app, ["train", *QUICK, *overrides])
    return result.exit_code, result.output


def test_one_epoch_run_writes_everything_and_learns(isolated: Path) -> None:
    run_dir = isolated / "run"
    code, out = train("trainer.epochs=1", f"hydra.run.dir={run_dir}")
    assert code == 0, out
    assert str(run_dir) in out and "tensorboard --logdir" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    m = summary["metrics"]
    assert m["final_val_acc"] > 0.8
    for key in ("best_val_acc", "final_val_loss", "final_train_loss", "steps",
                "wall_seconds", "samples_per_second"):
        assert m[key] is not None and m[key] >= 0
    assert m["steps"] == 4000 // 64
    assert summary["config"]["model"]["norm"] == "batch"
    for key in ("python", "torch", "cuda", "device_name", "threads", "git_commit"):
        assert key in summary["env"]
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert overrides == [*QUICK, "trainer.epochs=1"]
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["seed"] == 0
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "train/lr",
            "train/samples_per_sec"} <= tags
    assert events.Scalars("val/acc")[-1].value == pytest.approx(m["final_val_acc"])
    ckpt = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)
    assert ckpt["step"] == m["steps"] and "model" in ckpt and "optimizer" in ckpt
    assert ckpt["config"] == summary["config"]
    # The mode comparison takes its eval-mode accuracy from the final evaluation: it must be
    # what the saved weights score in eval mode, measured here afresh.
    from omegaconf import OmegaConf

    from bnexp import data, probes
    from bnexp.run import load_model, preflight

    model, _ = load_model(run_dir)
    cfg = OmegaConf.create(ckpt["config"])
    _, ds = preflight(cfg)
    afresh, _ = probes.mode_comparison(model, ds.x_val, ds.y_val,
                                       data.Inputs(ds, cfg.data.inputs, torch.float32), 64)
    assert m["val_acc_eval_mode"] == m["final_val_acc"] == afresh["val_acc_eval_mode"]
    assert m["val_acc_train_mode"] == afresh["val_acc_train_mode"]


def test_run_directory_is_named_by_overrides_under_outputs(isolated: Path) -> None:
    code, out = train("trainer=debug", "model.norm=none", "seed=3")
    assert code == 0, out
    (run_dir,) = (isolated / "outputs" / "runs").iterdir()
    assert run_dir.name.endswith("_model.norm=none,seed=3,trainer=debug")
    assert (run_dir / "summary.json").is_file()


def test_same_seed_same_metrics_and_other_seed_differs(isolated: Path) -> None:
    def metrics(seed: int, name: str) -> dict:
        code, out = train("trainer=debug", f"seed={seed}", f"hydra.run.dir={isolated / name}")
        assert code == 0, out
        m = json.loads((isolated / name / "summary.json").read_text())["metrics"]
        return {k: v for k, v in m.items() if "second" not in k}

    a, b, c = metrics(0, "a"), metrics(0, "b"), metrics(1, "c")
    assert a == b
    assert a != c


def test_divergence_is_a_result_not_a_crash(isolated: Path) -> None:
    run_dir = isolated / "boom"
    code, out = train("model.norm=none", "optim.lr=1e6", "trainer=debug", "trainer.log_every=1",
                      f"hydra.run.dir={run_dir}")
    assert code == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["metrics"]["diverged_at_step"] < 20
    assert summary["metrics"]["steps"] == summary["metrics"]["diverged_at_step"]


def test_ablation_overrides_reach_the_trained_model(isolated: Path) -> None:
    run_dir = isolated / "sig"
    code, out = train("model.norm=none", "model.activation=sigmoid", "optim.lr=0.5", "seed=3",
                      "trainer=debug", "trainer.checkpoint=true", f"hydra.run.dir={run_dir}")
    assert code == 0, out
    state = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)["model"]
    assert not any("running_mean" in k for k in state)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["optim"]["lr"] == 0.5 and summary["config"]["seed"] == 3


def test_bf16_autocast_runs_on_cpu(isolated: Path) -> None:
    run_dir = isolated / "bf16"
    code, out = train("trainer=debug", "trainer.precision=bf16", f"hydra.run.dir={run_dir}")
    assert code == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["metrics"]["final_val_acc"] > 0.5


def test_sigterm_records_an_interrupted_run_and_exits_143(isolated: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = isolated / "term"
    proc = subprocess.Popen([sys.executable, "-m", "bnexp", "train", "trainer.steps=100000",
                             "trainer.progress=none", "device=cpu", f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "summary.json").is_file():
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the training loop
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["notes"]["interrupted_by"] == "SIGTERM"
    assert 0 < summary["metrics"]["steps"] < 100000
    # An unfinished run keeps last.pt (what `bnexp resume` continues from); final.pt is
    # written only when a run finishes.
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == summary["metrics"]["steps"]
    assert not (run_dir / "checkpoints" / "final.pt").exists()


def _step(loss_fn, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN001, ANN202
    model.zero_grad(set_to_none=True)
    loss, hits = loss_fn(x, y)
    loss.backward()
    return (torch.stack([loss.detach(), hits.double()]),
            [p.grad.clone() for p in model.parameters()],
            [b.clone() for b in model.buffers()])


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_compiled_step_equals_the_eager_step(model_name: str) -> None:
    """torch.compile's graph capture of the training forward and loss (AOTAutograd, as on a
    GPU; the aot_eager backend runs its graphs without generating kernels): same loss, hits,
    gradients and BN running statistics as the eager step."""
    from bnexp import models, steps
    from bnexp.config import compose

    cfg = compose([f"model={model_name}", "model.width=8"])
    torch.manual_seed(0)
    eager_model = models.build(cfg.model, (1, 28, 28), 10)
    compiled_model = models.build(cfg.model, (1, 28, 28), 10)
    compiled_model.load_state_dict(eager_model.state_dict())
    eager = steps.loss_function(eager_model, False, False)
    compiled = steps.loss_function(compiled_model, False, True, backend="aot_eager")
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    for _ in range(2):  # the second call replays the captured graph
        e, c = _step(eager, eager_model, x, y), _step(compiled, compiled_model, x, y)
        assert torch.allclose(e[0], c[0], atol=1e-6)
        for a, b in zip(e[1] + e[2], c[1] + c[2], strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_compile_auto_stays_eager_on_cpu_and_a_gpu_run_trains_as_a_captured_stack() -> None:
    from bnexp import steps
    from bnexp.config import compose

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not steps.should_compile(cpu, "auto")
    assert not steps.should_compile(cpu, "off")
    assert steps.should_compile(cpu, "on")
    assert not steps.should_compile(cuda, "on")  # the stack of one compiles instead
    for setting, captured in (("auto", True), ("graph", True), ("on", True), ("off", False)):
        cfg = compose([f"trainer.compile={setting}", "trainer.precision=bf16"])
        assert steps.capturable(cfg, cuda) is captured, setting
        assert not steps.capturable(cfg, cpu), setting


@pytest.mark.slow
def test_inductor_compiled_run_matches_the_eager_run(isolated: Path) -> None:
    """trainer.compile=on end to end on the CPU (inductor generates C++; tens of seconds)."""
    from bnexp import loop, record
    from bnexp.config import compose

    base = ["device=cpu", "trainer.steps=20", "trainer.progress=none", "trainer.threads=1"]
    eager = loop.train([compose([*base, "trainer.compile=off"])], [isolated / "eager"])[0]
    compiled = loop.train([compose([*base, "trainer.compile=on"])], [isolated / "compiled"])[0]
    assert eager["status"] == compiled["status"] == "completed"
    a = record.load_checkpoint(isolated / "eager" / "checkpoints" / "final.pt")["model"]
    b = record.load_checkpoint(isolated / "compiled" / "checkpoints" / "final.pt")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4), k


def test_batches_cover_each_epoch_once_and_drop_the_remainder(isolated: Path) -> None:
    from bnexp.config import compose
    from bnexp.interrupt import StopFlag
    from bnexp.loop import Loop
    from bnexp.run import Run
    from bnexp.steps import Eager

    cfg = compose(["trainer.batch_size=1500", "trainer.steps=3", "device=cpu",
                   "trainer.progress=none", "trainer.diagnostics=false"])
    run = Run(cfg, isolated, threads=1)  # mnist5k: 4,000 training samples
    seen, batch = [], run.batch
    run.batch = lambda idx: (seen.append(idx.clone()), batch(idx))[1]  # what each step drew
    Loop([run], Eager(run)).fit(StopFlag())
    epoch = seen[:2]
    assert run.steps_per_epoch == 2 and [len(b) for b in seen] == [1500, 1500, 1500]
    assert len(set(torch.cat(epoch).tolist())) == 3000  # no sample twice; 1,000 left over
    assert run.epoch == 2  # the third batch opened a new epoch
    run.events.close()


def test_eval_batch_size_auto_chunks_conv_evaluation_and_changes_no_result(
        isolated: Path) -> None:
    """auto picks cache-sized batches for a conv net on a CPU (one pass of 1,000 CNN samples
    is 2x slower here) and the single large batch for the MLP; eval-mode results do not
    depend on the chunking, so an explicit 1000 scores the same."""
    def summary(name: str, *overrides: str) -> dict:
        code, out = train("trainer=debug", "model=cnn", "model.width=8", "trainer.steps=4",
                          f"hydra.run.dir={isolated / name}", *overrides)
        assert code == 0, out
        return json.loads((isolated / name / "summary.json").read_text())

    auto, whole = summary("auto"), summary("whole", "trainer.eval_batch_size=1000")
    chosen = auto["config"]["trainer"]["eval_batch_size"]
    assert isinstance(chosen, int) and 16 <= chosen < 1000  # recorded as the value that ran
    assert whole["config"]["trainer"]["eval_batch_size"] == 1000
    for key in ("final_val_acc", "final_val_loss", "val_acc_eval_mode"):
        assert auto["metrics"][key] == pytest.approx(whole["metrics"][key], rel=1e-5, abs=1e-6)
    code, out = train("trainer=debug", f"hydra.run.dir={isolated / 'mlp'}")
    assert code == 0, out
    mlp = json.loads((isolated / "mlp" / "summary.json").read_text())
    assert mlp["config"]["trainer"]["eval_batch_size"] == 1000


def test_only_a_one_command_process_tunes_the_garbage_collector(isolated: Path) -> None:
    """The console entry freezes what the imports made and raises the first generation's
    threshold (docs/performance.md); a command run inside a longer-lived process (tests, a
    notebook) leaves the collector as it found it, or it would keep that process's garbage."""
    import gc
    import subprocess
    import sys

    before = gc.get_threshold(), gc.get_freeze_count()
    result = runner.invoke(app, ["train", "trainer.steps=2", "trainer.progress=none",
                                 "device=cpu"])
    assert result.exit_code == 0, result.output
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
    # main() ends the process itself (cli.leave): the probe reads the collector from an
    # atexit handler, which must still run.
    probe = ("import atexit, gc, sys\nfrom bnexp.cli import main\n"
             "atexit.register(lambda: print(gc.get_threshold()[0], gc.get_freeze_count()))\n"
             "sys.argv = ['bnexp', 'train', 'trainer.steps=2', 'trainer.progress=none', "
             "'device=cpu']\nmain()\nprint('main returned')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=isolated).stdout.split()
    assert int(out[-2]) == 20_000 and int(out[-1]) > 100_000  # torch's objects, frozen
    assert "returned" not in out
    assert list((isolated / "outputs" / "runs").glob("*/summary.json"))


@pytest.mark.parametrize("args,code", [
    (["train", "trainer.steps=2", "trainer.progress=plain", "device=cpu"], 0),
    (["train", "optim.lrr=1"], 2),
    (["sweep", "optim.lr=0.1,0.2", "trainer.steps=2", "device=cpu", "--name", "s"], 0),
])
def test_the_console_entry_ends_as_the_interpreter_would(isolated: Path, args: list[str],
                                                         code: int) -> None:
    """cli.leave skips only the interpreter's teardown of every module: the exit status,
    everything printed (through a pipe), atexit handlers, and each run's train.log, whose
    handler the logging module's atexit flushes and closes, are as a normal exit leaves
    them."""
    import subprocess
    import sys

    probe = ("import atexit, sys\nfrom bnexp.cli import main\n"
             "atexit.register(print, 'atexit ran')\n"
             f"sys.argv = ['bnexp', *{args!r}]\nmain()")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=isolated)
    assert done.returncode == code, done.stderr
    assert done.stdout.rstrip().endswith("atexit ran")
    if code:
        assert done.stderr.startswith("bnexp: error: optim.lrr: unknown config key")
        return
    assert "compare:" in done.stdout or "outputs:" in done.stdout
    logs = list((isolated / "outputs").rglob("train.log"))
    assert logs and all("bnexp: " in p.read_text() for p in logs)


def test_steady_threads_ignore_the_load_that_auto_follows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun repeats its numbers only with the same thread count: steady is auto's choice
    on an idle machine, whatever the load."""
    from bnexp import device

    monkeypatch.setattr(device, "usable_cores", lambda: 2)
    monkeypatch.setattr(device.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(device, "_busy_cores", lambda window=0.05: 1.0)  # one core busy
    assert device.choose_threads("auto", "mlp", 32) == 1
    assert device.choose_threads("steady", "mlp", 32) == 2
    assert device.choose_threads("steady", "cnn") == 2
    assert device.choose_threads("steady", "mlp") == 1  # a lone MLP: one thread either way
    monkeypatch.setattr(device, "_busy_cores", lambda window=0.05: 0.0)  # idle
    assert device.choose_threads("auto", "mlp", 32) == device.choose_threads("steady", "mlp", 32)
