"""The block factory's knobs really change the networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnexp import models
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


# ----------------------------------------------------------------------------- every norm

NORMS_OF = {"mlp": ["batch", "layer", "group", "none"],
            "cnn": ["batch", "layer", "group", "instance", "none"]}


def reference(norm: str, x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """The normalization written out from its definition (biased variance, each group's own
    mean and variance), without gamma/beta."""
    n, c = x.shape[:2]
    if norm == "batch":
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
        return (x - mean) / (var + eps).sqrt()
    g = {"layer": 1, "instance": c, "group": groups}[norm]
    z = x.reshape(n, g, -1)
    z = (z - z.mean(-1, keepdim=True)) / (z.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return z.reshape(x.shape)


def per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *[1] * (x.dim() - 2))


@pytest.mark.parametrize("name,norm", [(n, k) for n, ks in NORMS_OF.items() for k in ks
                                       if k != "none"])
@pytest.mark.parametrize("affine", [True, False])
def test_each_norm_computes_its_definition_forward_and_backward(name: str, norm: str,
                                                                 affine: bool) -> None:
    """The first norm layer of a network built with model.norm=NORM against the formula, in
    float64: train mode, eval mode, and the gradients of the input and of gamma/beta."""
    torch.manual_seed(0)
    model = net(name, f"model.norm={norm}", f"model.affine={str(affine).lower()}",
                "model.width=8" if name == "cnn" else "model.width=100",
                "model.norm_groups=2", "model.bn_eps=0.001").double()
    (_, layer), *_ = models.norm_layers(model)
    shape = (6, 8, 5, 5) if name == "cnn" else (6, 100)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    if affine:
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
    for train in (True, False):
        layer.train(train)
        out = layer(x)
        if norm == "batch" and not train:  # eval mode: the running statistics
            mean = per_channel(layer.running_mean, x) if x.dim() == 4 else layer.running_mean
            var = per_channel(layer.running_var, x) if x.dim() == 4 else layer.running_var
            expect = (x - mean) / (var + 0.001).sqrt()
        else:
            expect = reference(norm, x, 2, 0.001)
        if affine:
            w, b = layer.weight, layer.bias
            expect = (expect * (per_channel(w, x) if x.dim() == 4 else w)
                      + (per_channel(b, x) if x.dim() == 4 else b))
        assert (out - expect).abs().max().item() < 1e-12, (norm, train)
        probe = torch.randn_like(out)
        wrt = [x, *([layer.weight, layer.bias] if affine else [])]
        got = torch.autograd.grad((out * probe).sum(), wrt)
        want = torch.autograd.grad((expect * probe).sum(), wrt)
        for a, b in zip(got, want, strict=True):
            assert (a - b).abs().max().item() < 1e-10, (norm, train)
    tracks = [b for n, b in layer.named_buffers() if "running" in n]
    assert bool(tracks) == (norm == "batch")  # only BN keeps running statistics


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("norm", ["batch", "layer", "group", "instance", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_model_builds_with_every_norm_where_the_catalog_says(name: str, norm: str,
                                                                   shape) -> None:
    """Each network with each norm maps images to logits, and its norm layers see the inputs
    catalog.norm_inputs (what config validation checks) predicts."""
    from bnexp import catalog
    from bnexp.config import ConfigError

    overrides = [f"model={name}", *SMALL[name], f"model.norm={norm}", "model.norm_groups=2",
                 f"data={'mnist5k' if shape[0] == 1 else 'cifar100'}"]
    if name == "mlp" and norm == "instance":
        with pytest.raises(ConfigError, match="model.norm: 'instance'.*MLP"):
            compose(overrides)
        return
    cfg = compose(overrides)
    model = build(cfg.model, shape, SHAPES[shape])
    seen: list[tuple[int, int]] = []
    for _, layer in models.norm_layers(model):
        layer.register_forward_pre_hook(lambda _m, a: seen.append(
            (a[0].shape[1], a[0].shape[-1] if a[0].dim() == 4 else 1)))
    assert model(torch.randn(3, *shape)).shape == (3, SHAPES[shape])
    expected = catalog.norm_inputs(name, cfg.model.depth, cfg.model.width, shape[-1])
    assert seen == ([] if norm == "none" else expected)
    kinds = {models.norm_prefix(layer) for _, layer in models.norm_layers(model)}
    assert kinds == (set() if norm == "none" else {norm[0] + "n" if norm != "batch" else "bn"})
