"""The metric functions on hand-made sequences with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnexp import metrics


def test_steps_to_target_is_the_first_eval_at_or_above_target() -> None:
    acc = [(50, 0.5), (100, 0.89), (150, 0.9), (200, 0.85), (250, 0.95)]
    assert metrics.steps_to_target(acc, 0.9) == 150
    assert metrics.steps_to_target(acc, 0.96) is None
    assert metrics.steps_to_target([], 0.5) is None


def test_value_at_fraction_takes_the_last_value_logged_by_then() -> None:
    acc = [(10, 0.1), (20, 0.2), (30, 0.3), (40, 0.4)]
    assert metrics.value_at_fraction(acc, 40, 0.25) == 0.1
    assert metrics.value_at_fraction(acc, 40, 0.5) == 0.2
    assert metrics.value_at_fraction(acc, 40, 1.0) == 0.4
    assert metrics.value_at_fraction(acc, 100, 0.05) is None


def test_curve_area_is_trapezoids_per_step_of_the_budget() -> None:
    # 0.5 held from step 0 to 10 (5), trapezoid 10..20 from 0.5 to 1.0 (7.5), then nothing
    # logged up to the budget of 40 (a run that stopped): (5 + 7.5) / 40
    assert metrics.curve_area([(10, 0.5), (20, 1.0)], 40) == pytest.approx(12.5 / 40)
    assert metrics.curve_area([(10, 0.5), (20, None)], 20) == pytest.approx((5 + 2.5) / 20)
    assert metrics.curve_area([], 20) is None


def test_mean_value_is_the_area_under_the_logged_curve() -> None:
    assert metrics.mean_value([(1, 1.0), (2, 2.0), (3, 6.0)]) == 3.0
    assert metrics.mean_value([]) is None


def test_divergence_on_non_finite_loss() -> None:
    losses = [(10, 2.0), (20, 1.5), (30, math.nan), (40, 1.0)]
    assert metrics.divergence(losses, bound=3.0, patience=3) == (30, "non-finite loss")
    assert metrics.divergence([(10, math.inf)], 3.0, 3)[0] == 10


def test_divergence_needs_patience_consecutive_points_above_bound() -> None:
    losses = [(10, 4.0), (20, 4.0), (30, 1.0), (40, 4.0), (50, 4.0), (60, 4.0), (70, 4.0)]
    step, why = metrics.divergence(losses, bound=3.0, patience=3)
    assert step == 60 and "above 3" in why
    assert metrics.divergence(losses[:5], 3.0, 3) == (None, None)


def test_chance_loss_is_log_of_classes() -> None:
    assert metrics.chance_loss(10) == pytest.approx(2.302585, rel=1e-6)


def test_loss_spikes_counts_points_above_ratio_times_trailing_median() -> None:
    losses = list(enumerate([1.0, 1.0, 1.0, 2.5, 1.0, 1.0, 0.5, 0.5, 0.5, 1.1, 3.0]))
    # 2.5 > 2 * median(1,1,1); 1.1 > 2 * median(...)? median of the 9 before is 1.0: no;
    # 3.0 > 2 * median(last 10 = 1,1,2.5,1,1,.5,.5,.5,1.1,... ) = 2 * 1.0: yes.
    assert metrics.loss_spikes(losses, ratio=2.0, window=10) == 2
    assert metrics.loss_spikes([(1, 1.0), (2, 1.9)], ratio=2.0) == 0


def test_tail_std_uses_the_last_fraction_of_steps() -> None:
    series = [(s, 5.0) for s in range(0, 90, 10)] + [(90, 1.0), (100, 3.0)]
    # last 10% of steps 0..100 = steps >= 90: values 1 and 3, population std 1.
    assert metrics.tail_std(series, 0.1) == pytest.approx(1.0)
    assert metrics.tail_std([(1, 2.0)], 0.1) == 0.0
    assert metrics.tail_std([], 0.1) is None


def test_percentiles_match_numpy() -> None:
    x = torch.linspace(-3, 7, 1001).reshape(7, 11, 13)[:5] ** 3
    expected = np.percentile(x.numpy(), [15, 50, 85])
    assert metrics.percentiles(x) == pytest.approx(expected.tolist(), rel=1e-5)


def test_percentiles_of_a_conv_sized_tensor_come_from_an_unbiased_fixed_sample() -> None:
    # a feature map whose value depends on the pixel position: a strided subsample would see
    # only a few positions; the random subset sees them all
    rows = torch.arange(28.0).repeat_interleave(28).reshape(1, 1, 28, 28)
    x = rows.expand(256, 16, 28, 28) + 0.01 * torch.randn(256, 16, 28, 28)  # 3.2M values
    expected = np.percentile(x.numpy(), [15, 50, 85])
    assert metrics.percentiles(x) == pytest.approx(expected.tolist(), abs=0.6)
    assert metrics.percentiles(x) == metrics.percentiles(x)  # fixed seed: reproducible
    assert len(metrics.sample(x)) == 1 << 16 and metrics.sample(x[:1, :1]).numel() == 784


def test_saturated_fraction_for_sigmoid_and_tanh_only() -> None:
    x = torch.tensor([-10.0, -3.0, 0.0, 3.0, 5.0])
    assert metrics.saturated_fraction(x, "sigmoid") == pytest.approx(2 / 5)
    assert metrics.saturated_fraction(x, "tanh") == pytest.approx(4 / 5)
    assert metrics.saturated_fraction(x, "relu") is None
    assert torch.sigmoid(torch.tensor(metrics.SATURATION["sigmoid"])) == pytest.approx(0.98, 1e-3)


def test_landscape_summary() -> None:
    out = metrics.landscape_summary([2.0, 1.5, 3.0], [0.5, 2.0], [1.0, 2.0])
    assert out == {"loss_range": 1.5, "grad_change_max": 2.0, "beta_smoothness": 1.0}


def test_percentile_drift_is_the_largest_range_of_any_percentile() -> None:
    stable = [[-1.0, 0.0, 1.0], [-1.1, 0.05, 1.0], [-0.9, 0.0, 1.1]]
    drifting = [[-1.0, 0.0, 1.0], [-3.0, -2.0, -1.0], [-4.0, -3.5, 0.5]]
    assert metrics.percentile_drift(stable) == pytest.approx(0.2)
    assert metrics.percentile_drift(drifting) == pytest.approx(3.5)
    assert metrics.percentile_drift([[0.0, 1.0, 2.0]]) is None


def test_lr_schedules() -> None:
    from omegaconf import OmegaConf

    from bnexp.steps import lr_factor

    def f(**o):
        base = {"warmup_steps": 0, "schedule": "constant", "gamma": 0.1, "step_size": 10}
        return lr_factor(OmegaConf.create({**base, **o}), total_steps=100)

    assert [f(warmup_steps=4)(s) for s in (0, 1, 3, 50)] == [0.25, 0.5, 1.0, 1.0]
    cosine = f(schedule="cosine")
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == 0.0
    step = f(schedule="step")
    assert [step(s) for s in (0, 9, 10, 25)] == pytest.approx([1, 1, 0.1, 0.01])
