"""The block factory's knobs really change the networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnexp.config import compose
from bnexp.models import build, norm_layers

SHAPES = {(1, 28, 28): 10, (3, 32, 32): 100}
SMALL = {"mlp": [], "cnn": ["model.width=4"], "vgg": ["model.width=4"],
         "resnet": ["model.width=4", "model.depth=8"]}


def net(name: str, *overrides: str, shape=(1, 28, 28), classes=10) -> nn.Module:
    return build(compose([f"model={name}", *SMALL[name], *overrides]).model, shape, classes)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_model_maps_inputs_to_class_logits(name: str, shape) -> None:
    model = net(name, shape=shape, classes=SHAPES[shape])
    assert model(torch.randn(3, *shape)).shape == (3, SHAPES[shape])


@pytest.mark.parametrize("name", SMALL)
def test_norm_none_has_no_batchnorm(name: str) -> None:
    assert norm_layers(net(name))
    assert not norm_layers(net(name, "model.norm=none"))


@pytest.mark.parametrize("name", SMALL)
def test_affine_false_removes_gamma_and_beta(name: str) -> None:
    with_affine = norm_layers(net(name))
    without = norm_layers(net(name, "model.affine=false"))
    assert all(bn.weight is not None and bn.bias is not None for _, bn in with_affine)
    assert all(bn.weight is None and bn.bias is None and not bn.affine for _, bn in without)
    assert all(bn.track_running_stats for _, bn in without)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("activation,cls", [("relu", nn.ReLU), ("sigmoid", nn.Sigmoid),
                                             ("tanh", nn.Tanh)])
def test_activation_knob_sets_every_activation(name: str, activation: str, cls) -> None:
    kinds = {type(m) for m in net(name, f"model.activation={activation}").modules()}
    assert cls in kinds
    assert not kinds & ({nn.ReLU, nn.Sigmoid, nn.Tanh} - {cls})


def _order(model: nn.Module) -> list[str]:
    names = {nn.Linear: "layer", nn.Conv2d: "layer", nn.BatchNorm1d: "norm",
             nn.BatchNorm2d: "norm", nn.ReLU: "act", nn.Sigmoid: "act"}
    return [names[type(m)] for m in model.modules() if type(m) in names]


def test_norm_position_puts_bn_before_or_after_the_activation() -> None:
    before = _order(net("mlp", "model.depth=1"))
    after = _order(net("mlp", "model.depth=1", "model.norm_position=after_act"))
    assert before == ["layer", "norm", "act", "layer"]
    assert after == ["layer", "act", "norm", "layer"]


def test_bias_dropped_only_when_bn_follows_the_layer() -> None:
    def hidden_biases(*o: str) -> list[bool]:
        return [m.bias is not None for m in net("mlp", *o).modules()
                if isinstance(m, nn.Linear)][:-1]

    assert hidden_biases() == [False, False, False]
    assert hidden_biases("model.norm=none") == [True, True, True]
    assert hidden_biases("model.norm_position=after_act") == [True, True, True]


def test_normal_init_uses_the_given_std_and_zero_biases() -> None:
    torch.manual_seed(0)
    model = net("mlp", "model.norm=none", "model.init=normal", "model.init_std=0.1",
                "model.width=400")
    layer = [m for m in model.modules() if isinstance(m, nn.Linear)][1]
    assert layer.weight.std().item() == pytest.approx(0.1, rel=0.02)
    assert torch.all(layer.bias == 0)
    default = [m for m in net("mlp", "model.width=400").modules()
               if isinstance(m, nn.Linear)][1]
    assert default.weight.std().item() < 0.05  # PyTorch's kaiming-uniform: ~1/sqrt(3*400)


def test_bn_knobs_reach_the_layers() -> None:
    (_, bn), *_ = norm_layers(net("cnn", "model.bn_momentum=0.3", "model.bn_eps=0.01"))
    assert bn.momentum == 0.3 and bn.eps == 0.01


def test_resnet_depth_sets_the_number_of_blocks() -> None:
    from bnexp.models import BasicBlock

    def blocks(depth: int) -> int:
        m = net("resnet", f"model.depth={depth}")
        return sum(isinstance(b, BasicBlock) for b in m.modules())

    assert blocks(8) == 3 and blocks(20) == 9
