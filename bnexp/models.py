"""The networks, all built from one block factory that holds every normalization knob.

`Knobs` is read once from `cfg.model`; `block()` is the only place where a norm layer or an
activation is created, so an ablation (norm: batch, layer, group, instance or none; affine,
activation, position, init) applies to every architecture the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from bnexp import catalog


@dataclass(frozen=True)
class Knobs:
    norm: str = "batch"
    affine: bool = True
    activation: str = "relu"
    norm_position: str = "before_act"
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    norm_groups: int = catalog.NORM_GROUPS

    @classmethod
    def from_config(cls, m: DictConfig) -> Knobs:
        affine = m.norm != "none" if m.affine is None else bool(m.affine)
        return cls(m.norm, affine, m.activation, m.norm_position, m.bn_momentum, m.bn_eps,
                   m.get("norm_groups", catalog.NORM_GROUPS))

    @property
    def has_norm(self) -> bool:
        return self.norm != "none"

    @property
    def layer_bias(self) -> bool:
        # A norm right after the layer subtracts the mean, so a bias there is wasted: beta
        # takes its place (Ioffe & Szegedy 2015, section 3.2).
        return not (self.has_norm and self.norm_position == "before_act")


ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def norm_layer(knobs: Knobs, features: int, spatial: bool) -> nn.Module:
    """The norm layer over `features` channels (spatial: of N x C x H x W maps) or features.
    eps and affine apply to every norm; momentum only to BN's running statistics."""
    norm, eps, affine = knobs.norm, knobs.bn_eps, knobs.affine
    if norm == "batch":
        cls = nn.BatchNorm2d if spatial else nn.BatchNorm1d
        return cls(features, eps=eps, momentum=knobs.bn_momentum, affine=affine)
    if norm == "layer" and not spatial:
        return nn.LayerNorm(features, eps=eps, elementwise_affine=affine, bias=affine)
    if norm in ("layer", "group"):
        # Layer norm of a conv net normalizes each sample over (C, H, W), which is GroupNorm
        # with one group; its gamma/beta are per channel (Wu & He 2018, section 3.1), so the
        # net does not depend on the image size.
        groups = catalog.norm_groups(norm, knobs.norm_groups, features)
        if features % groups:
            raise ValueError(f"{groups} groups do not divide {features} channels")
        return nn.GroupNorm(groups, features, eps=eps, affine=affine)
    if norm == "instance":
        if not spatial:
            raise ValueError("instance norm needs spatial feature maps (not an MLP)")
        # PyTorch's semantics: each sample's own statistics in train and eval mode alike
        # (track_running_stats=False), so there are no running statistics to keep.
        return nn.InstanceNorm2d(features, eps=eps, affine=affine)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}")


def block(layer: nn.Module, features: int, knobs: Knobs, spatial: bool,
          act: bool = True) -> nn.Sequential:
    """layer -> norm -> act (before_act) or layer -> act -> norm (after_act); act=False gives
    layer -> norm, as at the end of a residual branch. Identity layers are left out."""
    parts: list[nn.Module] = [layer]
    norm = [norm_layer(knobs, features, spatial)] if knobs.has_norm else []
    activation = [ACTIVATIONS[knobs.activation]()] if act else []
    if knobs.norm_position == "before_act" or not act:
        parts += norm + activation
    else:
        parts += activation + norm
    return nn.Sequential(*parts)


def linear_block(n_in: int, n_out: int, knobs: Knobs, act: bool = True) -> nn.Sequential:
    return block(nn.Linear(n_in, n_out, bias=knobs.layer_bias), n_out, knobs, False, act)


def conv_block(c_in: int, c_out: int, knobs: Knobs, kernel: int = 3, stride: int = 1,
               act: bool = True) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=knobs.layer_bias)
    return block(conv, c_out, knobs, True, act)


# ----------------------------------------------------------------------------- networks


class MLP(nn.Sequential):
    def __init__(self, in_shape: tuple[int, ...], classes: int, depth: int, width: int,
                 knobs: Knobs):
        n_in = int(torch.tensor(in_shape).prod())
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            layers.append(linear_block(n_in if i == 0 else width, width, knobs))
        layers.append(nn.Linear(width, classes))
        super().__init__(*layers)


class CNN(nn.Sequential):
    """depth stages of two 3x3 conv blocks + 2x2 max-pool; channels double per stage."""

    def __init__(self, in_shape: tuple[int, ...], classes: int, depth: int, width: int,
                 knobs: Knobs):
        layers: list[nn.Module] = []
        c_in = in_shape[0]
        for stage in range(depth):
            c_out = width * 2**stage
            layers += [conv_block(c_in, c_out, knobs), conv_block(c_out, c_out, knobs),
                       nn.MaxPool2d(2)]
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
        super().__init__(*layers)


class VGG(nn.Sequential):
    """VGG for 32x32 inputs (Santurkar et al. 2018 used VGG on CIFAR-10); 28x28 works too."""

    def __init__(self, in_shape: tuple[int, ...], classes: int, depth: int, width: int,
                 knobs: Knobs):
        layers: list[nn.Module] = []
        c_in = in_shape[0]
        for stage, convs in enumerate(catalog.VGG_STAGES[depth]):
            c_out = width * min(2**stage, 8)
            for _ in range(convs):
                layers.append(conv_block(c_in, c_out, knobs))
                c_in = c_out
            # ceil_mode keeps 28x28 inputs alive through five poolings.
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
        super().__init__(*layers)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, knobs: Knobs):
        super().__init__()
        self.branch = nn.Sequential(
            conv_block(c_in, c_out, knobs, stride=stride),
            conv_block(c_out, c_out, knobs, act=False),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = conv_block(c_in, c_out, knobs, kernel=1, stride=stride, act=False)
        self.act = ACTIVATIONS[knobs.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.branch(x) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): depth = 6n + 2, three stages of n basic blocks."""

    def __init__(self, in_shape: tuple[int, ...], classes: int, depth: int, width: int,
                 knobs: Knobs):
        super().__init__()
        n = (depth - 2) // 6
        layers: list[nn.Module] = [conv_block(in_shape[0], width, knobs)]
        c_in = width
        for stage in range(3):
            c_out = width * 2**stage
            for i in range(n):
                layers.append(BasicBlock(c_in, c_out, 2 if stage and i == 0 else 1, knobs))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


NETWORKS = {"mlp": MLP, "cnn": CNN, "vgg": VGG, "resnet": ResNet}


def init_weights(model: nn.Module, std: float) -> None:
    """The paper's init: N(0, std^2) weights, zero biases (norm layers keep gamma=1, beta=0)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build(m: DictConfig, in_shape: tuple[int, ...], classes: int) -> nn.Module:
    """The network named by the `model` config, for inputs of in_shape (C, H, W)."""
    model = NETWORKS[m.name](in_shape, classes, m.depth, m.width, Knobs.from_config(m))
    if m.init == "normal":
        init_weights(model, m.init_std)
    return model


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
              nn.modules.instancenorm._InstanceNorm)
# Short names of the layers in probes' tags and summary keys (bn1, gn2, ...).
NORM_PREFIXES = {nn.modules.batchnorm._BatchNorm: "bn", nn.LayerNorm: "ln",
                 nn.GroupNorm: "gn", nn.modules.instancenorm._InstanceNorm: "in"}


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every normalization layer, in module order."""
    return [(n, mod) for n, mod in model.named_modules() if isinstance(mod, NORM_TYPES)]


def batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BN layers: the only norms whose output depends on the rest of the batch in train
    mode and that keep running statistics for eval mode."""
    return [(n, mod) for n, mod in model.named_modules()
            if isinstance(mod, nn.modules.batchnorm._BatchNorm)]


def norm_prefix(layer: nn.Module) -> str:
    if isinstance(layer, nn.GroupNorm) and layer.num_groups == 1:
        return "ln"  # a conv net's layer norm (see norm_layer)
    return next(p for cls, p in NORM_PREFIXES.items() if isinstance(layer, cls))


def depends_on_batch(model: nn.Module) -> bool:
    """Whether train mode computes a different function from eval mode (BN's batch
    statistics): false for layer, group and instance norm as bnexp builds them."""
    return bool(batch_norms(model))
