"""bnexp.optim against torch.optim itself: the same updates, and state dicts that go both ways."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bnexp.optim import Layout, Optimizer

SETTINGS = [
    {"name": "sgd", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4},
    {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
    {"name": "adam", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"name": "adam", "momentum": 0.0, "nesterov": False, "weight_decay": 1e-3,
     "beta1": 0.8, "beta2": 0.99},
]


def optim_config(setting: dict) -> OmegaConf:
    return OmegaConf.create({"beta1": 0.9, "beta2": 0.999, **setting})


def net(transposed: bool = False) -> nn.Module:
    """transposed: the linear weight stored as its transpose, as a transposed Layout binds it,
    so that every compared model multiplies in the same order (the layout alone moves a
    BN-cancelled bias's ~1e-17 gradient, which Adam divides by eps, by ~1e-9)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(),
                          nn.Linear(12, 4)).double()
    if transposed:
        model[3].weight.data = model[3].weight.data.t().contiguous().t()
    return model


def torch_optimizer(o: OmegaConf, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=o.momentum,
                               nesterov=o.nesterov, weight_decay=o.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(o.beta1, o.beta2),
                            weight_decay=o.weight_decay)


def gradients(model: nn.Module, step: int) -> None:
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(step))
    model.zero_grad(set_to_none=True)
    (model(x) ** 2).mean().backward()


class Flat:
    """A model whose parameters live in one row, updated by bnexp.optim."""

    def __init__(self, model: nn.Module, o: OmegaConf, transposed: bool = False):
        self.model, self.params = model, list(model.parameters())
        self.layout = Layout(model, transposed=transposed)
        with torch.no_grad():
            self.flat = self.layout.row(self.params)
        self.layout.bind([model], self.flat)
        self.optimizer = Optimizer(self.flat, [o], self.layout)
        self.step = 0

    def update(self, lr: float) -> None:
        g = self.layout.row([p.grad for p in self.params])
        self.optimizer.update(g, torch.tensor([[lr]], dtype=g.dtype), torch.tensor(self.step))
        self.step += 1


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed-rows"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['name']}-{s['momentum']}-"
                         f"{s['nesterov']}-{s['weight_decay']}")
def test_updates_and_state_match_torch_optim(setting: dict, transposed: bool) -> None:
    o = optim_config(setting)
    ours, theirs = net(transposed), net(transposed)
    flat, reference = Flat(ours, o, transposed), torch_optimizer(o, theirs, 0.05)
    if transposed:  # the linear weight lies in the row as its transpose
        weight = ours[3].weight
        assert weight.stride() == (1, 4) and flat.layout.transposed == [False] * 4 + [True, False]
    lrs = [0.05, 0.1, 0.02, 0.07, 0.03, 0.05]
    for step, lr in enumerate(lrs[:4]):
        for model in (ours, theirs):
            gradients(model, step)
        flat.update(lr)
        reference.param_groups[0]["lr"] = lr
        reference.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    # Our state, loaded into torch.optim, continues as torch.optim's own state does...
    state = flat.optimizer.state_dict(0, flat.step, lrs[4])
    assert state["state"].keys() == reference.state_dict()["state"].keys()
    assert state["param_groups"][0].keys() - {"fused"} <= \
        reference.state_dict()["param_groups"][0].keys()
    copy_ = net()  # a user's model: the standard layout, whatever ours was
    copy_.load_state_dict(theirs.state_dict())
    resumed = torch_optimizer(o, copy_, lrs[4])
    resumed.load_state_dict(state)
    # ...and torch.optim's state, loaded here, continues as ours does.
    other = net(transposed)
    other.load_state_dict(theirs.state_dict())
    loaded = Flat(other, o, transposed)
    loaded.optimizer.load_state_dict(0, reference.state_dict())
    loaded.step = flat.step
    for step, lr in enumerate(lrs[4:], start=4):
        for model in (ours, theirs, copy_, other):
            gradients(model, step)
        flat.update(lr)
        loaded.update(lr)
        for opt in (reference, resumed):
            opt.param_groups[0]["lr"] = lr
            opt.step()
    # rtol 1e-9: after 10 Adam steps a parameter whose gradient is ~0 (a bias that BN's mean
    # subtraction cancels) carries 1e-16 summation-order noise divided by sqrt(v) ~ eps, which
    # torch's build-dependent kernels turn into ~7e-12 here; a wrong formula is off by >1e-3.
    # copy_ multiplies in another order than a transposed `ours`: that bias moves by ~1e-9
    # (relative ~5e-9), still a thousandth of what a wrong formula gives.
    loose = {"rtol": 1e-6, "atol": 1e-9} if transposed else {"rtol": 1e-9, "atol": 1e-12}
    for group in zip(ours.parameters(), theirs.parameters(), copy_.parameters(),
                     other.parameters()):
        for p in group[1:]:
            tolerance = loose if p is group[2] else {"rtol": 1e-9, "atol": 1e-12}
            torch.testing.assert_close(group[0], p, **tolerance)


def test_a_training_process_never_imports_torch_dynamo(tmp_path: Path) -> None:
    """torch.optim imports torch._dynamo (1.7 s of start-up) when an optimizer is built; a run
    with trainer.compile at its default must not pay for it."""
    code = (
        "import sys\n"
        "from bnexp.cli import app\n"
        "try:\n"
        f"    app(['train', 'trainer.epochs=1', 'device=cpu', 'trainer.checkpoint_every=5',\n"
        f"         'hydra.run.dir={tmp_path / 'run'}'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "no dynamo"
    assert (tmp_path / "run" / "summary.json").exists()
