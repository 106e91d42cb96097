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


def test_bn_report_summarizes_every_bn_layer() -> None:
    model = mlp("model.bn_momentum=0.2")
    rows = probes.bn_report(model)
    assert len(rows) == 3
    first = rows[0]
    bn = model[1][1]
    assert first["num_features"] == 100 and first["momentum"] == 0.2
    assert first["num_batches_tracked"] == 1
    assert first["running_mean"]["max"] == pytest.approx(bn.running_mean.max().item())
    assert first["gamma"]["mean"] == pytest.approx(1.0)
    assert probes.bn_report(mlp("model.affine=false"))[0]["gamma"] is None


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
