"""Probes measure without changing anything, and measure the right thing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnexp import probes
from bnexp.config import compose
from bnexp.models import build


def mlp(*overrides: str) -> nn.Module:
    torch.manual_seed(0)
    model = build(compose(["model=mlp", *overrides]).model, (1, 28, 28), 10)
    # Move BN's running statistics away from their init so that a restore is visible.
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 28, 28))
    return model


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_every_probe_leaves_parameters_buffers_and_rng_bit_identical() -> None:
    model = mlp()
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    before, rng = snapshot(model), torch.get_rng_state()
    model.eval()
    probes.activation_inputs(model, x)
    probes.landscape(model, x, y, (0.1, 1.0))
    probes.mode_comparison(model, x, y, lambda t: t, batch_size=16, bs1_samples=8)
    probes.mode_study(model, x, y, lambda t: t, [1, 2, 64])
    probes.population_statistics(model, x, lambda t: t, batch_size=16)
    assert identical(before, snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())
    assert not model.training


def test_untouched_restores_after_an_optimizer_step() -> None:
    model = mlp()
    before = snapshot(model)
    with probes.untouched(model):
        torch.optim.SGD(model.parameters(), lr=1.0).zero_grad()
        loss = model(torch.randn(8, 1, 28, 28)).sum()
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=1.0).step()
        assert not identical(before, snapshot(model))
    assert identical(before, snapshot(model))


def test_activation_inputs_are_the_pre_activations_with_batch_statistics() -> None:
    model = mlp("model.depth=1")
    x = torch.randn(50, 1, 28, 28)
    linear, bn = model[1][0], model[1][1]
    expected = nn.functional.batch_norm(linear(x.flatten(1)), None, None, bn.weight, bn.bias,
                                        training=True, eps=bn.eps)
    got = probes.activation_inputs(model, x)
    assert list(got) == ["act1"]
    assert torch.allclose(got["act1"], expected, atol=1e-5)
    # Batch statistics: every unit's input is standardized over the batch (gamma=1, beta=0).
    fresh = mlp("model.depth=1")
    z = probes.activation_inputs(fresh, x)["act1"]
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0, unbiased=False) - 1).abs().max() < 1e-2


def test_mode_comparison_reports_bs1_train_mode_as_not_measurable_with_bn() -> None:
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    out, notes = probes.mode_comparison(mlp(), x, y, lambda t: t, batch_size=8, bs1_samples=5)
    assert out["val_acc_train_bs1"] is None and "batch of one" in notes["val_acc_train_bs1"]
    assert out["train_eval_gap"] == pytest.approx(out["val_acc_eval_mode"]
                                                  - out["val_acc_train_mode"])
    plain, notes = probes.mode_comparison(mlp("model.norm=none"), x, y, lambda t: t, 8, 5)
    assert plain["val_acc_train_bs1"] == plain["val_acc_eval_bs1"]
    assert plain["train_eval_gap"] == 0


def test_eval_mode_at_batch_size_one_reads_the_running_statistics_as_trained() -> None:
    """The comparison's train-mode passes update BN's running statistics as they go (they are
    restored at the end); eval mode at batch size one must read them as training left them.
    Labels are the predictions of an eval-mode pass before any comparison: accuracy 1."""
    model = mlp()
    x = torch.randn(40, 1, 28, 28) * 4 + 2  # far from the running statistics
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))  # as the probe
    model.eval()
    with torch.no_grad():
        y = torch.empty(40, dtype=torch.long)
        y[order] = model(x[order]).argmax(1)
    out, _ = probes.mode_comparison(model, x, y, lambda t: t, batch_size=8, bs1_samples=20)
    assert out["val_acc_eval_mode"] == 1.0
    assert out["val_acc_eval_bs1"] == 1.0


def test_norm_report_summarizes_every_bn_layer() -> None:
    model = mlp("model.bn_momentum=0.2")
    rows = probes.norm_report(model)
    assert len(rows) == 3
    first = rows[0]
    bn = model[1][1]
    assert first["num_features"] == 100 and first["momentum"] == 0.2
    assert first["num_batches_tracked"] == 1
    assert first["running_mean"]["max"] == pytest.approx(bn.running_mean.max().item())
    assert first["gamma"]["mean"] == pytest.approx(1.0)
    assert probes.norm_report(mlp("model.affine=false"))[0]["gamma"] is None


@pytest.mark.parametrize("overrides", [["model.norm=layer"],
                                       ["model.norm=group", "model.norm_groups=10"],
                                       ["model=cnn", "model.width=4", "model.norm=instance"],
                                       ["model=cnn", "model.width=4", "model.norm=layer"]])
def test_probes_of_the_other_norms_report_gamma_beta_and_no_running_statistics(
        overrides: list[str]) -> None:
    model = mlp(*overrides)
    rows = probes.norm_report(model)
    assert rows and all(r["running_mean"] is None and r["momentum"] is None
                        and r["num_batches_tracked"] is None for r in rows)
    layer = dict(model.named_modules())[rows[0]["layer"]]
    assert rows[0]["gamma"]["max"] == pytest.approx(layer.weight.max().item())
    tensors = probes.norm_tensors(model)
    prefix = {"layer": "ln", "group": "gn", "instance": "in"}[
        next(o for o in overrides if o.startswith("model.norm=")).split("=")[1]]
    assert set(tensors) == {f"{prefix}{i}/{t}" for i in range(1, len(rows) + 1)
                            for t in ("gamma", "beta")}
    assert probes.population_statistics(model, torch.randn(40, 1, 28, 28), lambda t: t) == {}
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    found, notes = probes.mode_comparison(model, x, y, lambda t: t, batch_size=2,
                                          bs1_samples=10)
    # each sample normalized on its own: the batch, and the mode, change nothing
    assert found["train_eval_gap"] == 0 and found["val_acc_train_bs1"] == found[
        "val_acc_eval_bs1"]
    assert "each sample's own statistics" in notes["train_eval_gap"]
    modes, _ = probes.mode_study(model, x, y, lambda t: t, [1, 3, 40])
    assert modes["modes_train_changed_bs1"] == 0 and modes["modes_train_acc_bs1"] is not None


def test_landscape_is_flat_for_a_zero_gradient() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    # Zero inputs and balanced labels: the zero model's gradient is zero, nothing moves.
    found = probes.landscape(model, torch.zeros(6, 4), y, (0.5, 1.0))
    assert found == {"loss_range": 0.0, "grad_change_max": 0.0, "beta_smoothness": 0.0}
    # With signal, a large step along the gradient changes the loss and the gradient.
    moved = probes.landscape(model, torch.eye(6, 4) * 5, y, (0.5, 4.0))
    assert moved["loss_range"] > 0.1 and moved["beta_smoothness"] > 0


def test_mode_study_eval_mode_ignores_the_batch_and_train_mode_does_not() -> None:
    model = mlp()
    x, y = torch.randn(60, 1, 28, 28), torch.randint(0, 10, (60,))
    found, notes = probes.mode_study(model, x, y, lambda t: t, [1, 2, 7, 60])
    for size in (1, 2, 7):
        assert found[f"modes_eval_changed_bs{size}"] == 0.0
        assert found[f"modes_eval_acc_bs{size}"] == found["modes_eval_acc_bs60"]
    assert found["modes_train_changed_bs2"] > 0.1  # pairs normalize each other
    assert found["modes_train_acc_bs1"] is None and "cannot normalize" in notes[
        "modes_train_acc_bs1"]


def test_population_statistics_measure_the_bn_inputs_in_eval_mode() -> None:
    model = mlp("model.depth=2", "model.width=8")
    x = torch.randn(500, 1, 28, 28) * 2 + 1
    (_, bn1), _ = probes.norm_layers(model)
    # The population of bn1's input is the first linear layer's output over x: set bn1's
    # running statistics to exactly that; the error must be 0.
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        z = first(x.flatten(1)).double()
        bn1.running_mean.copy_(z.mean(0))
        bn1.running_var.copy_(z.var(0, unbiased=False))
    found = probes.population_statistics(model, x, lambda t: t, batch_size=64)
    assert found["running_mean_error_bn1"] == pytest.approx(0, abs=1e-5)
    assert found["running_var_rel_error_bn1"] == pytest.approx(0, abs=1e-5)
    with torch.no_grad():  # one population std off on every feature; variance 21% high
        bn1.running_mean.add_(z.std(0, unbiased=False).float())
        bn1.running_var.mul_(1.21)
    found = probes.population_statistics(model, x, lambda t: t, batch_size=64)
    assert found["running_mean_error_bn1"] == pytest.approx(1.0, rel=1e-4)
    assert found["running_var_rel_error_bn1"] == pytest.approx(0.21, rel=1e-4)
    assert "running_mean_error_bn2" in found


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_eval_at_batch_size_one_vectorized_equals_one_call_per_sample(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """vmap over samples, each a batch of one, predicts what 20 separate calls predict."""
    torch.manual_seed(0)
    shape = (1, 28, 28) if name != "resnet" else (3, 32, 32)
    model = build(compose([f"model={name}"]).model, shape, 10)
    model.train()
    with torch.no_grad():  # running statistics away from their initial 0 / 1
        for _ in range(3):
            model(torch.randn(16, *shape) * 2 + 0.5)
    x = torch.randn(20, *shape) * 2 + 0.5
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model(x[i : i + 1]).argmax(1) for i in range(len(x))])
    wrong = alone.clone()
    wrong[::2] = (wrong[::2] + 1) % 10  # half of the labels cannot be hit
    monkeypatch.setattr(probes, "accuracy", None)  # the one-call-per-sample fallback
    assert probes.accuracy_one_by_one(model, x, alone, lambda t: t) == 1.0
    assert probes.accuracy_one_by_one(model, x, wrong, lambda t: t) == 0.5
    assert model.training is False


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_train_mode_at_batch_size_one_without_bn_is_batched_alike(name: str) -> None:
    """Without BN, train mode at batch size one goes through vmap too: the same accuracy as
    one train-mode call per sample, the model's mode and weights untouched."""
    torch.manual_seed(1)
    model = build(compose([f"model={name}", "model.norm=none"]).model, (1, 28, 28), 10)
    x, y = torch.randn(30, 1, 28, 28), torch.randint(0, 10, (30,))
    with torch.no_grad():
        y[:12] = model(x[:12]).argmax(1)  # a known share of hits, not chance alone
    before = [p.clone() for p in model.parameters()]
    model.eval()
    looped = probes.accuracy(model, x, y, lambda t: t, 1, train_mode=True)
    assert looped >= 0.4
    assert probes.accuracy_one_by_one(model, x, y, lambda t: t, train_mode=True) == looped
    assert model.training is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    modes, _ = probes.mode_comparison(model, x, y, lambda t: t, 8, bs1_samples=30)
    assert modes["val_acc_train_bs1"] == looped
