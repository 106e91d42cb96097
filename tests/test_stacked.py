"""The layer-by-layer forward of an MLP stack (bnexp.stacked) computes what vmap computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp import loop, models, stacked, steps
from bnexp.config import compose


def stack_of(overrides: list[str], k: int = 3) -> tuple[nn.Module, dict, dict]:
    """K float64 models of one config (different seeds), their parameters and buffers
    stacked by name, and a meta copy to run them (as bnexp.steps.Stack holds them)."""
    cfg = compose(["device=cpu", *overrides])
    nets = []
    for seed in range(k):
        torch.manual_seed(seed)
        nets.append(models.build(cfg.model, (1, 6, 5), 4).double())
    params, buffers = torch.func.stack_module_state(nets)
    return nets[0].to("meta"), params, buffers


def run(forward, base: nn.Module, params: dict, buffers: dict, x: torch.Tensor,
        train: bool) -> tuple[torch.Tensor, dict, tuple[torch.Tensor, ...]]:
    """The outputs, the buffers after the call, and every parameter's gradient of a loss."""
    base.train(train)
    buffers = {n: b.clone() for n, b in buffers.items()}
    params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    out = forward(params, buffers, x)
    target = torch.arange(out.shape[0] * out.shape[1]) % out.shape[-1]
    loss = F.cross_entropy(out.flatten(0, 1), target) + out.pow(2).mean()
    return out, buffers, torch.autograd.grad(loss, list(params.values()))


@pytest.mark.parametrize("overrides", [
    [], ["model.norm_position=after_act"], ["model.affine=false"], ["model.norm=none"],
    ["model.activation=sigmoid", "model.depth=2"], ["model.activation=tanh", "model.width=7"],
    ["model.norm_position=after_act", "model.bn_momentum=0.3", "model.bn_eps=0.01"],
], ids=["bn-relu", "after-act", "no-affine", "no-norm", "sigmoid", "tanh", "momentum-eps"])
@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
def test_the_layered_forward_equals_vmap(overrides: list[str], train: bool) -> None:
    base, params, buffers = stack_of(overrides)
    layered = stacked.forward_of(base)
    assert layered is not None

    def one(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(base, (p, b), (x,))

    torch.manual_seed(9)
    x = torch.randn(3, 16, 1, 6, 5, dtype=torch.float64)  # each model its own batch
    # The running statistics as training leaves them, so that eval mode reads real ones.
    for name, b in buffers.items():
        if name.endswith("running_var"):
            b.uniform_(0.5, 2.0)
        elif name.endswith("running_mean"):
            b.normal_()
    want = run(torch.func.vmap(one), base, params, buffers, x, train)
    got = run(layered, base, params, buffers, x, train)
    assert got[0].shape == want[0].shape == (3, 16, 4)
    assert torch.allclose(got[0], want[0], rtol=0, atol=1e-12)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:  # running statistics moved (train mode) or not, as vmap moves them
        assert torch.allclose(got[1][name].double(), want[1][name].double(), rtol=0,
                              atol=1e-12), name
    if train and "model.norm=none" not in overrides:
        assert not torch.equal(got[1][next(iter(got[1]))], buffers[next(iter(buffers))])
    for g, w in zip(got[2], want[2], strict=True):
        assert torch.allclose(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("overrides", [
    ["model=cnn", "model.width=4"], ["model.norm=layer"],
    ["model.norm=group", "model.norm_groups=10"],
], ids=["cnn", "layer-norm", "group-norm"])
def test_a_model_with_a_layer_it_does_not_know_runs_through_vmap(
        overrides: list[str]) -> None:
    base, _, _ = stack_of(overrides, k=1)
    assert stacked.forward_of(base) is None


def test_a_batch_norm_with_a_cumulative_average_runs_through_vmap() -> None:
    base, _, _ = stack_of([], k=1)
    assert stacked.forward_of(base) is not None
    next(m for m in base.modules() if isinstance(m, nn.BatchNorm1d)).momentum = None
    assert stacked.forward_of(base) is None


@pytest.mark.parametrize("overrides,layered", [
    ([], True), (["trainer.precision=bf16", "model.norm=none"], False),
    (["model=cnn", "model.width=4", "trainer.batch_size=8", "trainer.diagnostics=false"],
     False)], ids=["mlp", "mlp-bf16", "cnn"])
def test_a_cpu_stack_runs_layered_where_it_can(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               overrides: list[str], layered: bool) -> None:
    made: list[steps.Stack] = []
    original = steps.Stack.__init__

    def spy(self: steps.Stack, runs: list) -> None:
        original(self, runs)
        made.append(self)

    monkeypatch.setattr(steps.Stack, "__init__", spy)
    cfgs = [compose(["device=cpu", "trainer.progress=none", "trainer.steps=2", *overrides,
                     f"optim.lr={lr}"]) for lr in (0.05, 0.1)]
    summaries = loop.train(cfgs, [tmp_path / "a", tmp_path / "b"], kind="stack")
    assert [s["status"] for s in summaries] == ["completed"] * 2
    assert len(made) == 1 and made[0].layered is layered
