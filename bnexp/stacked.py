"""K models of one MLP architecture run layer by layer on stacked tensors, without vmap.

`torch.func.vmap` runs any architecture as a stack, but on a CPU its batching rules and
`functional_call` cost a visible share of a small net's step: a 32-MLP step took 1.13-1.24x as
long through vmap (docs/performance.md, "Cuts of 2026-12-07, third session"). For the layers an
MLP is built of, the batched form is short: a linear layer is one batched matmul, batch norm
runs as one batch norm over the K models' features side by side (K x C channels, the kernel
vmap's rule runs too), and activations are element-wise. Only the order of the matmuls' sums
differs from vmap's. `forward_of` returns that forward for a model made only of
such layers, and None for any other, which then runs through vmap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Identity)
StackedForward = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor],
                           torch.Tensor], torch.Tensor]


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The layers of nested nn.Sequentials in forward order, with their parameter prefixes."""
    if not (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward):
        return [(prefix, module)]
    return [leaf for name, child in module.named_children()
            for leaf in _leaves(child, f"{prefix}{name}.")]


def _supported(layer: nn.Module) -> bool:
    if type(layer) in (nn.Linear, nn.Flatten, *ELEMENTWISE):
        return True
    # A fixed momentum and running statistics: the batch norm whose update is plain.
    return (type(layer) is nn.BatchNorm1d and layer.momentum is not None
            and layer.track_running_stats)


def forward_of(model: nn.Module) -> StackedForward | None:
    """forward(params, buffers, x): the K models' outputs (K x B x classes) for inputs x
    (K x B x ...: each model its own batch), with params and buffers stacked by name as
    functional_call takes them (linear weights K x out x in). None if the model has a layer
    this cannot stack. Train or eval mode follows the model's flags, read at each call."""
    leaves = _leaves(model)
    if not leaves or not all(_supported(m) for _, m in leaves):
        return None

    def forward(params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                x: torch.Tensor) -> torch.Tensor:
        for prefix, m in leaves:
            if isinstance(m, nn.Linear):
                w = params[prefix + "weight"].transpose(1, 2)  # K x in x out
                bias = params.get(prefix + "bias")
                x = torch.bmm(x, w) if bias is None else torch.baddbmm(bias[:, None], x, w)
            elif isinstance(m, nn.Flatten):
                end = m.end_dim if m.end_dim < 0 else m.end_dim + 1
                x = x.flatten(m.start_dim + 1, end)
            elif isinstance(m, nn.BatchNorm1d):
                x = _batch_norm(m, prefix, params, buffers, x)
            else:
                x = m(x)
        return x

    return forward


def _batch_norm(m: nn.BatchNorm1d, prefix: str, params: Mapping[str, torch.Tensor],
                buffers: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """BatchNorm1d of K models' features (K x B x C) as one over B x (K C) channels, each
    model's running statistics updated in place in its row of the stacked buffers."""
    k, b, c = x.shape
    if m.training and b == 1:  # refused as for one model, whose size the message names
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {torch.Size([b, c])}")
    mean, var = buffers[prefix + "running_mean"], buffers[prefix + "running_var"]
    if m.training:
        buffers[prefix + "num_batches_tracked"].add_(1)
    weight, bias = params.get(prefix + "weight"), params.get(prefix + "bias")
    y = F.batch_norm(x.transpose(0, 1).reshape(b, k * c), mean.view(-1), var.view(-1),
                     None if weight is None else weight.reshape(-1),
                     None if bias is None else bias.reshape(-1),
                     m.training, m.momentum, m.eps)
    return y.view(b, k, c).transpose(0, 1)
