"""Vectorized sweeps: K models trained as one stack equal the same models trained alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnexp import loop, record, runs, steps
from bnexp.cli import app
from bnexp.config import compose

runner = CliRunner()
F64 = ["device=cpu", "trainer.progress=none", "trainer.precision=fp64", "trainer.log_every=5",
       "trainer.eval_every=10", "trainer.diagnostics_every=10", "trainer.batch_size=32"]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return record.load_checkpoint(run_dir / "checkpoints" / "final.pt")["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def stacked_and_alone(tmp: Path, variants: list[list[str]], common: list[str]
                      ) -> list[tuple[dict, dict, Path, Path]]:
    cfgs = [compose([*F64, *common, *v]) for v in variants]
    assert len(steps.groups(cfgs)) == 1, "the variants must share one stack"
    stacked_dirs = [tmp / f"stacked{i}" for i in range(len(cfgs))]
    stacked = loop.train(cfgs, stacked_dirs, kind="stack")
    out = []
    for i, cfg in enumerate(cfgs):
        alone = loop.train([cfg], [tmp / f"alone{i}"])[0]
        out.append((stacked[i], alone, stacked_dirs[i], tmp / f"alone{i}"))
    return out


@pytest.fixture
def batched_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stack evaluates all its models in each call, as it does on a GPU (on a CPU each
    model evaluates itself: faster there)."""
    monkeypatch.setattr(steps, "BATCHED_EVALUATION_ON_CPU", True)


@pytest.mark.parametrize("layered,batched", [(False, False), (False, True), (True, True)],
                         ids=["vmap-each-model", "vmap-batched", "layered-batched"])
def test_stack_equals_single_runs_in_float64_and_a_diverging_model_disturbs_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layered: bool, batched: bool) -> None:
    """Through vmap (evaluating each model alone or all at once) and layer by layer
    (bnexp.stacked, which evaluates all at once), each model trains as it does alone."""
    from bnexp import stacked as layers

    monkeypatch.setattr(steps, "BATCHED_EVALUATION_ON_CPU", batched)
    if not layered:
        monkeypatch.setattr(layers, "forward_of", lambda model: None)
    made = []
    original = steps.Stack.__init__
    monkeypatch.setattr(steps.Stack, "__init__",
                        lambda self, runs: (original(self, runs), made.append(self))[0])
    variants = [["optim.lr=0.05", "seed=0"],
                ["optim.lr=0.2", "seed=1", "optim.momentum=0.5", "optim.weight_decay=0.001"],
                ["optim.lr=200", "seed=2"],  # diverges
                ["optim.lr=0.1", "seed=3", "optim.momentum=0"]]
    found = stacked_and_alone(tmp_path, variants, ["trainer.steps=40"])
    statuses = [(s["status"], a["status"]) for s, a, *_ in found]
    assert statuses == [("completed",) * 2, ("completed",) * 2, ("diverged",) * 2,
                        ("completed",) * 2]
    for i, (stacked, alone, sdir, adir) in enumerate(found):
        ms, ma = stacked["metrics"], alone["metrics"]
        assert ms["steps"] == ma["steps"]
        assert 0 < ms["train_seconds"] < ms["wall_seconds"]  # the stack's loop, off-clock out
        assert ms["diverged_at_step"] == ma["diverged_at_step"]
        if stacked["status"] == "diverged":
            continue  # chaotic by then: only where and that it diverged are comparable
        # parameters and BN running statistics (and num_batches_tracked) of every layer
        assert max_difference(final_state(sdir), final_state(adir)) <= 1e-10, variants[i]
        # evaluations and the final mode comparison, batched over the stack's models
        for key in ("final_val_acc", "best_val_acc", "steps_to_target", "val_acc_eval_mode",
                    "val_acc_train_mode", "train_eval_gap", "val_acc_eval_bs1",
                    "val_acc_train_bs1", "bs1_samples"):
            assert ms[key] == ma[key], key
        assert stacked["notes"] == alone["notes"]
        for key in ("final_val_loss", "train_loss_auc", "grad_norm_max", "act_input_drift"):
            assert ms[key] == pytest.approx(ma[key], rel=1e-9, abs=1e-12), key
        # the same TensorBoard record as the run alone
        for tag in ("train/loss", "val/acc", "act_input/act1/p50", "grad_norm/layer1"):
            s, a = runs.scalar_series(sdir, tag), runs.scalar_series(adir, tag)
            assert [x[0] for x in s] == [x[0] for x in a] and len(s) > 1, tag
            assert [x[1] for x in s] == pytest.approx([x[1] for x in a], rel=1e-5), tag
    assert found[0][0]["env"]["vectorized_models"] == 4
    assert "vectorized_models" not in found[0][1]["env"]
    assert [(st.layered, st.batched_evaluation) for st in made if st.k > 1] == [
        (layered, batched)]


@pytest.mark.parametrize("common, variants", [
    # data.inputs=unit for Adam: standardized, MNIST's blank border pixels are a nonzero
    # constant, whose first-layer gradient is zero in exact arithmetic (BN removes the batch
    # mean) but rounding noise in practice; Adam divides it by ~eps = 1e-8, which turns
    # 1e-17 differences of summation order into 1e-11 weight differences. Unit-scaled pixels
    # are 0 there, and the gradient exactly 0.
    (["optim=adam", "trainer.steps=15", "data.inputs=unit"],
     [["optim.lr=0.001", "seed=0"], ["optim.lr=0.003", "optim.beta1=0.8", "seed=1",
                                     "optim.beta2=0.99", "optim.weight_decay=0.01"]]),
    (["model=cnn", "model.width=4", "trainer.steps=6", "trainer.batch_size=8",
      "trainer.diagnostics=false", "optim.nesterov=true"],
     [["optim.lr=0.05", "seed=0"], ["optim.lr=0.1", "seed=1", "optim.momentum=0.8"]]),
    (["model.init=normal", "model.activation=sigmoid", "optim.schedule=cosine",
      "optim.warmup_steps=3", "trainer.steps=12"],
     [["model.init_std=0.05", "seed=0"], ["model.init_std=0.2", "seed=0", "optim.lr=0.3"]]),
], ids=["adam", "cnn-nesterov", "init-std-schedule"])
def test_stack_equals_single_runs_for_adam_convnets_and_init(
        tmp_path: Path, common: list[str], variants: list[list[str]]) -> None:
    for stacked, alone, sdir, adir in stacked_and_alone(tmp_path, variants, common):
        assert stacked["status"] == alone["status"] == "completed"
        assert max_difference(final_state(sdir), final_state(adir)) <= 1e-10
        assert stacked["metrics"]["final_val_acc"] == alone["metrics"]["final_val_acc"]
        # the schedule the stack applied is the one its scheduler records (train/lr)
        s, a = runs.scalar_series(sdir, "train/lr"), runs.scalar_series(adir, "train/lr")
        assert s == a and len(s) > 1
        assert stacked["env"]["training_step"] == "eager"  # no CUDA graph on a CPU


@pytest.mark.parametrize("common", [
    ["model.norm=layer"], ["model.norm=group", "model.norm_groups=10"],
    ["model.norm=layer", "model.affine=false", "model.norm_position=after_act"],
    ["model=cnn", "model.width=4", "model.norm=group", "model.norm_groups=2"],
    ["model=cnn", "model.width=4", "model.norm=layer"],
    ["model=cnn", "model.width=4", "model.norm=instance"],
], ids=["mlp-layer", "mlp-group", "mlp-layer-plain-after", "cnn-group", "cnn-layer",
        "cnn-instance"])
def test_stack_equals_single_runs_for_every_norm(tmp_path: Path, common: list[str],
                                                 batched_evaluation: None) -> None:
    variants = [["optim.lr=0.05", "seed=0"], ["optim.lr=0.2", "seed=1", "optim.momentum=0.5"]]
    conv = "model=cnn" in common
    common = [*common, f"trainer.steps={6 if conv else 20}",
              *(["trainer.batch_size=8", "trainer.diagnostics=false"] if conv else [])]
    for stacked, alone, sdir, adir in stacked_and_alone(tmp_path, variants, common):
        assert stacked["status"] == alone["status"] == "completed"
        assert max_difference(final_state(sdir), final_state(adir)) <= 1e-10, common
        ms, ma = stacked["metrics"], alone["metrics"]
        for key in ("final_val_acc", "val_acc_eval_mode", "val_acc_train_mode",
                    "val_acc_eval_bs1", "val_acc_train_bs1"):
            assert ms[key] == ma[key], key
        assert stacked["notes"] == alone["notes"]
        # a norm of each sample alone: train and eval mode compute the same function
        assert ms["train_eval_gap"] == 0


@pytest.mark.parametrize("model,batched", [("mlp", True), ("cnn", False)])
def test_on_a_cpu_only_an_mlp_stack_compares_its_modes_batched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, batched: bool) -> None:
    """The final train/eval-mode comparison: batched for an MLP stack on a CPU (faster there),
    one model at a time for conv nets (slower batched); either way each model's numbers are
    its own (the float64 stack tests compare them with the model alone)."""
    from bnexp import probes

    alone_calls = []
    one_model = probes.mode_comparison
    monkeypatch.setattr(probes, "mode_comparison",
                        lambda *a, **kw: alone_calls.append(1) or one_model(*a, **kw))
    common = ["trainer.steps=4", *(["model=cnn", "model.width=4", "trainer.batch_size=8",
                                    "trainer.diagnostics=false"] if model == "cnn" else [])]
    cfgs = [compose([*F64, *common, f"optim.lr={lr}"]) for lr in (0.05, 0.1)]
    summaries = loop.train(cfgs, [tmp_path / "a", tmp_path / "b"], kind="stack")
    assert len(alone_calls) == (0 if batched else 2)
    for s in summaries:
        assert s["metrics"]["val_acc_eval_mode"] == s["metrics"]["final_val_acc"]
        assert s["metrics"]["val_acc_train_mode"] is not None


def test_a_stacks_batched_evaluations_equal_each_model_alone_for_a_bn_cnn(
        tmp_path: Path, batched_evaluation: None) -> None:
    """BatchNorm2d normalizes a batch of one sample over its positions, so train mode at batch
    size one is measurable there: the stack's batched passes (one call per sample for all its
    models) give each model's own numbers, and the val curves match."""
    variants = [["optim.lr=0.05", "seed=0"], ["optim.lr=0.1", "seed=1"],
                ["optim.lr=0.02", "seed=2"]]
    common = ["model=cnn", "model.width=4", "trainer.steps=6", "trainer.batch_size=8",
              "trainer.eval_every=3", "data.train_size=400"]
    for stacked, alone, *_ in stacked_and_alone(tmp_path, variants, common):
        ms, ma = stacked["metrics"], alone["metrics"]
        assert ma["val_acc_train_bs1"] is not None
        for key in ("val_acc_eval_mode", "val_acc_train_mode", "val_acc_eval_bs1",
                    "val_acc_train_bs1"):
            assert ms[key] == ma[key], key
        assert stacked["curves"]["val_acc"] == alone["curves"]["val_acc"]
        assert [v for _, v in stacked["curves"]["val_loss"]] == pytest.approx(
            [v for _, v in alone["curves"]["val_loss"]], rel=1e-12)
        assert ms["eval_seconds"] > 0


def as_interrupted(run_dir: Path) -> None:
    """What an interruption right after the step-10 checkpoint leaves: that checkpoint and an
    interrupted summary (bnexp refuses to resume a completed run)."""
    path = run_dir / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "interrupted"}))


def test_checkpoint_of_a_stacked_model_resumes_as_a_single_run(tmp_path: Path) -> None:
    """The optimizer state a stack exports is torch.optim's: resuming model 1 alone from the
    stack's step-10 checkpoint ends where the stack ended."""
    common = ["trainer.steps=20", "trainer.checkpoint_every=10"]
    cfgs = [compose([*F64, *common, f"optim.lr={lr}", f"seed={s}"])
            for lr, s in ((0.05, 0), (0.2, 1))]
    dirs = [tmp_path / "a", tmp_path / "b"]
    loop.train(cfgs, dirs, kind="stack")
    stacked_final = final_state(dirs[1])
    assert record.load_checkpoint(dirs[1] / "checkpoints" / "last.pt")["step"] == 10
    as_interrupted(dirs[1])
    resumed = compose([*F64, *common, "optim.lr=0.2", "seed=1", f"resume={dirs[1]}"])
    summary = loop.train([resumed], [dirs[1]])[0]
    assert summary["status"] == "completed" and summary["metrics"]["steps"] == 20
    assert max_difference(final_state(dirs[1]), stacked_final) <= 1e-10


def test_a_stacked_models_checkpoint_holds_its_own_weights_only(tmp_path: Path) -> None:
    """A stacked model's tensors are views into the whole stack: its checkpoint must not
    carry the other models' weights along (it did: 8 models, 8x the file)."""
    common = ["trainer.steps=4", "model.width=64"]
    cfgs = [compose([*common, f"optim.lr={lr}"]) for lr in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3,
                                                            0.5, 1.0)]
    dirs = [tmp_path / f"s{i}" for i in range(len(cfgs))]
    loop.train(cfgs, dirs, kind="stack")
    loop.train([cfgs[0]], [tmp_path / "alone"], kind="eager")
    alone = (tmp_path / "alone" / "checkpoints" / "final.pt").stat().st_size
    for d in dirs:
        assert (d / "checkpoints" / "final.pt").stat().st_size < 1.2 * alone
    weights = record.load_checkpoint(dirs[3] / "checkpoints" / "final.pt")["model"]
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size()
               for v in weights.values())


@pytest.mark.parametrize("optim", [["optim.momentum=0.9"], ["optim=adam", "optim.lr=0.003"]],
                         ids=["sgd-momentum", "adam"])
def test_a_stack_of_one_resumes_from_its_checkpoint_where_it_left_off(
        tmp_path: Path, optim: list[str]) -> None:
    """On a GPU a single run trains as a stack of one (its step in a CUDA graph), so a stack
    resumes too: from the step-10 checkpoint, with the optimizer state, data order, schedule
    and log window it saved, it ends where the uninterrupted stack ended."""
    common = [*F64, *optim, "trainer.steps=20", "trainer.checkpoint_every=10",
              "optim.schedule=cosine", "trainer.log_every=3", "data.inputs=unit"]
    [whole] = loop.train([compose(common)], [tmp_path / "whole"], kind="stack")
    [cut] = loop.train([compose(common)], [tmp_path / "cut"], kind="stack")
    assert whole["status"] == cut["status"] == "completed"
    assert record.load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == 10
    as_interrupted(tmp_path / "cut")
    [resumed] = loop.train([compose([*common, f"resume={tmp_path / 'cut'}"])],
                           [tmp_path / "cut"], kind="stack")
    assert resumed["status"] == "completed" and resumed["metrics"]["steps"] == 20
    assert max_difference(final_state(tmp_path / "cut"), final_state(tmp_path / "whole")) \
        <= 1e-12
    for tag in ("train/loss", "train/lr", "val/acc"):
        a, b = runs.scalar_series(tmp_path / "cut", tag), runs.scalar_series(tmp_path / "whole",
                                                                             tag)
        assert [x[0] for x in a] == [x[0] for x in b], tag  # no step twice, none missing
        assert [x[1] for x in a] == pytest.approx([x[1] for x in b], rel=1e-6), tag
    for key in ("grad_norm_max", "train_loss_auc", "final_val_loss"):
        assert resumed["metrics"][key] == pytest.approx(whole["metrics"][key], rel=1e-9), key


@pytest.mark.parametrize("model", [["model=vgg", "model.depth=11", "model.width=8"],
                                   ["model=resnet", "model.depth=20", "model.width=8"]],
                         ids=["vgg", "resnet"])
def test_vgg_and_resnet_train_in_a_stack_as_alone(tmp_path: Path, model: list[str]) -> None:
    """On a GPU every single run trains as a stack of one: the CIFAR nets too."""
    from conftest import make_cifar10

    make_cifar10(tmp_path / "data", per_batch=8)
    common = ["device=cpu", "data=cifar10", f"data.root={tmp_path / 'data'}", *model,
              "trainer.steps=3", "trainer.batch_size=8", "trainer.progress=none",
              "trainer.precision=fp64", "data.augment=false", "trainer.eval_every=3",
              "trainer.diagnostics=false"]
    [stacked] = loop.train([compose(common)], [tmp_path / "stacked"], kind="stack")
    alone = loop.train([compose(common)], [tmp_path / "alone"])[0]
    assert stacked["status"] == alone["status"] == "completed"
    assert max_difference(final_state(tmp_path / "stacked"), final_state(tmp_path / "alone")) \
        <= 1e-10


def test_a_channels_last_stack_of_one_steps_as_the_eager_step(tmp_path: Path) -> None:
    """On a GPU, conv nets run channels_last, and a stack of one lays its conv weights out
    channels-last inside the flat parameter row (so its views keep that layout). The CPU has
    channels_last kernels too: the same layout here steps exactly as the eager step."""
    from conftest import make_cifar10

    make_cifar10(tmp_path / "data", per_batch=8)
    cfg = compose(["device=cpu", "data=cifar10", f"data.root={tmp_path / 'data'}", "model=cnn",
                   "trainer.steps=6", "trainer.batch_size=8", "trainer.progress=none",
                   "trainer.precision=fp64", "data.augment=true", "trainer.log_every=3",
                   "optim.momentum=0.9"])
    from bnexp.run import Run

    found = []
    for name in ("stacked", "alone"):
        run = Run(cfg, tmp_path / name, threads=1)
        run.channels_last = True  # what a CUDA device sets (see bnexp.run.Run)
        run.model.to(memory_format=torch.channels_last)
        found.append(run)
    stacked, alone = found
    before = {n: p.detach().clone() for n, p in stacked.model.named_parameters()}
    stack = steps.Stack([stacked])
    convs = [n for n, p in stacked.model.named_parameters() if p.dim() == 4]
    assert convs and all(stacked.model.get_parameter(n).is_contiguous(
        memory_format=torch.channels_last) for n in convs)
    assert max_difference(before, dict(stacked.model.named_parameters())) == 0
    eager = steps.Eager(alone)
    for run, step in ((stacked, stack), (alone, eager)):
        run.new_epoch()  # the same generator state: the same order
        step.set_order([run.perm], 0)
    n = stacked.steps_per_epoch  # one epoch: the data order is set per epoch
    stack.steps(n)
    eager.steps(n)
    assert max_difference(dict(stacked.model.named_parameters()),
                          dict(alone.model.named_parameters())) <= 1e-12
    assert max_difference(dict(stacked.model.named_buffers()),
                          dict(alone.model.named_buffers())) <= 1e-12
    assert stack.grad_norms[:n, 0].tolist() == pytest.approx(
        eager.grad_norms[:n, 0].tolist(), rel=1e-10)


@pytest.mark.slow
def test_a_compiled_stack_of_one_equals_the_eager_run_in_float64(tmp_path: Path) -> None:
    """trainer.compile=on on a GPU: the stack of one's forward through torch.compile (inductor
    generates C++ here, CUDA kernels there; tens of seconds), inside the captured step."""
    common = [*F64, "trainer.steps=12", "trainer.log_every=4", "optim.momentum=0.9"]
    [compiled] = loop.train([compose([*common, "trainer.compile=on"])],
                            [tmp_path / "compiled"], kind="stack")
    alone = loop.train([compose([*common, "trainer.compile=off"])], [tmp_path / "alone"])[0]
    assert compiled["status"] == alone["status"] == "completed"
    assert compiled["env"]["training_step"] == "torch.compile + eager"  # no graph on a CPU
    assert max_difference(final_state(tmp_path / "compiled"), final_state(tmp_path / "alone")) \
        <= 1e-10


def test_compile_graph_needs_a_gpu(isolated: Path) -> None:
    result = runner.invoke(app, ["train", "device=cpu", "trainer.compile=graph"])
    assert result.exit_code == 2
    assert "trainer.compile" in result.output and "CUDA" in result.output
    assert not (isolated / "outputs").exists() or not any((isolated / "outputs").rglob("*.json"))


def test_runs_of_steps_end_at_every_step_the_loop_acts_on() -> None:
    """The stack's loop advances by runs of steps (up to a CUDA graph's length): every step
    with a log window, evaluation, diagnostics, probe, checkpoint or epoch end ends one, and
    no other step does."""
    import random

    from bnexp.config import TrainerConfig

    rng = random.Random(0)
    for _ in range(200):
        t = TrainerConfig(log_every=rng.randint(1, 40), eval_every=rng.randint(1, 90),
                            diagnostics=rng.choice(["full", "summary", "off"]),
                            diagnostics_every=rng.randint(1, 90),
                            probe_every=rng.choice([0, rng.randint(1, 90)]),
                            checkpoint_every=rng.choice([0, rng.randint(1, 90)]))
        per_epoch, total = rng.randint(1, 50), rng.randint(1, 400)
        cadences = [t.log_every, t.eval_every, t.probe_every, t.checkpoint_every,
                    t.diagnostics_every if t.diagnostics != "off" else 0, per_epoch]
        wanted = {s for s in range(1, total + 1) if any(c and s % c == 0 for c in cadences)}
        ends, step, pos = set(), 0, per_epoch
        while step < total:
            if pos == per_epoch:
                pos = 0
            n = steps.steps_to_event(step, total, t, per_epoch - pos)
            assert n >= 1
            step, pos = step + n, pos + n
            ends.add(step)
        assert ends == wanted | {total}  # each of them, and no other
        graph = steps.graph_steps(t.log_every)
        assert t.log_every % graph == 0 and graph <= steps.GRAPH_STEPS


def test_groups_stack_only_what_differs_in_per_model_scalars() -> None:
    cfgs = [compose(o) for o in (["optim.lr=0.1"], ["optim.lr=1", "seed=3"],
                                 ["trainer.batch_size=32"], ["model.norm=none"],
                                 ["optim.momentum=0", "model.init_std=0.3"],
                                 ["trainer.threads=1", "optim.lr=0.5"])]
    assert steps.groups(cfgs) == [[0, 1, 4, 5], [2], [3]]
    resumed = compose(["resume=/somewhere"])
    assert steps.groups([cfgs[0], resumed, cfgs[1]]) == [[0, 2], [1]]
    if not torch.cuda.is_available():  # a device that is not there: the run reports it alone
        missing = compose(["device=cuda"])
        assert steps.groups([cfgs[0], missing, cfgs[1]]) == [[0, 2], [1]]
        # device is not a variant: two names of the one device share a stack
        assert steps.groups([compose(["device=cpu"]), compose(["optim.lr=0.5"])]) == [[0, 1]]


def test_stacked_runs_share_the_first_runs_data_but_keep_their_own_eval_batch_size(
        tmp_path: Path) -> None:
    cfgs = [compose([*F64, "trainer.steps=2", *o]) for o in
            (["optim.lr=0.1"], ["optim.lr=0.2", "trainer.eval_batch_size=64"], ["optim.lr=0.3"])]
    assert steps.groups(cfgs) == [[0, 1, 2]]  # eval_batch_size is not a variant
    summaries = loop.train(cfgs, [tmp_path / str(i) for i in range(3)], kind="stack")
    sizes = [s["config"]["trainer"]["eval_batch_size"] for s in summaries]
    assert sizes[1] == 64 and sizes[0] == sizes[2] != 64
    alone = loop.train([cfgs[1]], [tmp_path / "alone"])[0]
    assert summaries[1]["metrics"]["final_val_acc"] == alone["metrics"]["final_val_acc"]


def test_bf16_runs_with_batch_norm_train_alone_and_complete(tmp_path: Path) -> None:
    """vmap's batch norm rejects bf16 activations with float32 running statistics (on a CPU
    too): such runs leave the stack, while bf16 runs without batch norm still share one."""
    bf16 = ["device=cpu", "trainer.progress=none", "trainer.steps=3", "trainer.precision=bf16"]
    cfgs = [compose([*bf16, *o]) for o in (["optim.lr=0.1"], ["optim.lr=0.2"],
                                           ["model.norm=none", "optim.lr=0.1"],
                                           ["model.norm=none", "optim.lr=0.2"])]
    assert steps.groups(cfgs) == [[0], [1], [2, 3]]
    summaries = loop.train_all(cfgs, [tmp_path / str(i) for i in range(4)])
    assert [s["status"] for s in summaries] == ["completed"] * 4
    assert [s["env"].get("vectorized_models") for s in summaries] == [None, None, 2, 2]


def test_sweep_vectorize_gives_every_job_its_own_run(isolated: Path) -> None:
    tiny = ["trainer.steps=8", "trainer.eval_every=4", "trainer.log_every=4", *F64[:3]]
    args = ["sweep", "--name", "v", "optim.lr=0.05,0.2", "model.norm=batch,none", *tiny]
    result = runner.invoke(app, [*args, "--vectorize"])
    assert result.exit_code == 0, result.output
    sweep_dir = isolated / "outputs" / "sweeps" / "v"
    found = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}
    assert sorted(found) == ["lr=0.05,norm=batch", "lr=0.05,norm=none", "lr=0.2,norm=batch",
                             "lr=0.2,norm=none"]
    for name, summary in found.items():
        assert summary["status"] == "completed"
        assert summary["env"]["vectorized_models"] == 2  # one stack per norm setting
        assert (sweep_dir / name / ".hydra" / "overrides.yaml").is_file()
        assert list((sweep_dir / name).glob("events.out.tfevents.*"))
        assert "one stack" in (sweep_dir / name / "train.log").read_text()
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert {j["status"] for j in manifest["jobs"].values()} == {"completed"}
    # the same sweep one job at a time gives the same results
    result = runner.invoke(app, ["sweep", "--name", "seq", *args[3:]])
    assert result.exit_code == 0, result.output
    for name, summary in found.items():
        alone = json.loads((sweep_dir.parent / "seq" / name / "summary.json").read_text())
        assert alone["metrics"]["final_val_acc"] == summary["metrics"]["final_val_acc"]
    # a rerun skips everything
    result = runner.invoke(app, [*args, "--vectorize"])
    assert result.exit_code == 0 and "4 to run" not in result.output


def test_vectorize_refuses_parallel_jobs(isolated: Path) -> None:
    result = runner.invoke(app, ["sweep", "optim.lr=0.1,1", "--vectorize", "--jobs", "2"])
    assert result.exit_code == 2
    assert "--vectorize" in result.output and "--jobs" in result.output
    assert not (isolated / "outputs").exists()
