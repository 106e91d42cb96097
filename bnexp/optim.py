"""SGD and Adam, as torch.optim defines them, on K models' parameters laid out as the rows of
one K x N matrix, each hyperparameter a per-model column.

Both steps (bnexp.steps) update through this rather than through torch.optim: a torch.optim
optimizer imports torch._dynamo when it is built or stepped (its wrappers call into it), 1.7 s
of every process's start-up for a run whose training may take less (docs/performance.md). The
state goes in and out in torch.optim's `state_dict()` format, so a checkpoint loads into
torch.optim as well, and checkpoints torch.optim wrote load here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch import nn

ADAM_EPS = 1e-8  # torch.optim.Adam's default


class Layout:
    """Where each parameter of a model lies in its row of the flat matrix. Conv weights of
    channels_last models are laid out channels-last inside the row, so that their views keep
    the layout cuDNN's fast kernels want. transposed: linear weights (out x in) lie in the row
    as their transposes (in x out), the layout in which vmap's backward computes a stack's
    weight gradients, so gathering them into one matrix is a plain copy rather than a
    transposing one (a 32-MLP step 10-16 % faster on this CPU: docs/performance.md)."""

    def __init__(self, model: nn.Module, channels_last: bool = False,
                 transposed: bool = False):
        params = list(model.parameters())
        self.shapes = [p.shape for p in params]
        self.channels_last = [channels_last and len(s) == 4 for s in self.shapes]
        self.transposed = [transposed and len(s) == 2 for s in self.shapes]
        sizes = [p.numel() for p in params]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def rows(self, stacked: Sequence[torch.Tensor], out: torch.Tensor | None = None
             ) -> torch.Tensor:
        """K models' parameters (or gradients), each tensor with a leading model dimension,
        as the K rows of one matrix (written into out if given): the inverse of views."""
        k = stacked[0].shape[0]
        return torch.cat([(t.permute(0, 1, 3, 4, 2) if last else t.transpose(1, 2) if tr
                           else t).reshape(k, -1)
                          for t, last, tr in zip(stacked, self.channels_last, self.transposed)],
                         dim=1, out=out)

    def row(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """One model's parameters (or gradients) as one row, 1 x N."""
        return self.rows([t[None] for t in tensors])

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The K-stacked parameter tensors inside the rows of flat (K x N)."""
        out = []
        for a, b, shape, last, tr in zip(self.offsets, self.offsets[1:], self.shapes,
                                         self.channels_last, self.transposed):
            if last:
                o, c, h, w = shape
                out.append(flat[:, a:b].view(-1, o, h, w, c).permute(0, 1, 4, 2, 3))
            elif tr:
                out.append(flat[:, a:b].view(-1, shape[1], shape[0]).transpose(1, 2))
            else:
                out.append(flat[:, a:b].view(-1, *shape))
        return out

    def bind(self, models: Sequence[nn.Module], flat: torch.Tensor) -> None:
        """Make model k's parameters views into row k of flat: updating flat updates them."""
        for k, model in enumerate(models):
            for p, view in zip(model.parameters(), self.views(flat.detach()[k : k + 1])):
                p.data = view[0]


def _copy(view: torch.Tensor) -> torch.Tensor:
    """A state tensor as torch.optim holds it: dense, in the standard layout (a transposed or
    channels-last view in torch.optim's fused kernels would be read in the wrong order)."""
    return view.clone(memory_format=torch.contiguous_format)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


class Optimizer:
    """The update of K models' flat parameters (K x N): one optimizer (sgd or adam) for all,
    learning rate, momentum, weight decay and betas per model."""

    def __init__(self, flat: torch.Tensor, configs: Sequence[DictConfig], layout: Layout):
        names = {o.name for o in configs}
        if len(names) != 1:
            raise ValueError(f"one optimizer per stack, not {sorted(names)}")
        self.flat, self.layout = flat, layout
        self.adam = names == {"adam"}
        self.nesterov = bool(configs[0].nesterov)
        self.momentum = _column([o.momentum for o in configs], flat)
        self.weight_decay = _column([o.weight_decay for o in configs], flat)
        self.beta1 = _column([o.beta1 for o in configs], flat)
        self.beta2 = _column([o.beta2 for o in configs], flat)
        self.any_weight_decay = bool(self.weight_decay.any())
        self.configs = list(configs)
        self.m = torch.zeros_like(flat, requires_grad=False)
        self.v = torch.zeros_like(self.m) if self.adam else None

    @torch.no_grad()
    def update(self, g: torch.Tensor, lr: torch.Tensor, step: torch.Tensor) -> None:
        """One update with gradients g (K x N) and learning rates lr (K x 1); step: the number
        of updates before this one, a tensor on the device (as a captured step must read it)."""
        p = self.flat.detach()
        if self.any_weight_decay:
            g = g.addcmul(p, self.weight_decay)  # L2, as torch's weight_decay
        if self.adam:
            t = (step + 1).to(p.dtype)
            b1, b2 = self.beta1, self.beta2
            self.m.lerp_(g, 1 - b1)
            self.v.mul_(b2).addcmul_(g, g * (1 - b2))
            denom = (self.v.sqrt() / (1 - b2 ** t).sqrt()).add_(ADAM_EPS)
            p.addcdiv_(self.m * (-lr / (1 - b1 ** t)), denom)
            return
        # torch starts the momentum buffer at the first gradient: from zero, mom * 0 + g is
        # exactly that, with no branch on the step number.
        self.m.mul_(self.momentum).add_(g)
        d = g.addcmul(self.m, self.momentum) if self.nesterov else self.m
        p.addcmul_(d, -lr)

    @torch.no_grad()
    def retire(self, k: int) -> None:
        """Model k's state zeroed: it no longer trains."""
        self.m[k].zero_()
        if self.adam:
            self.v[k].zero_()

    # ------------------------------------------------------------------ torch.optim's format

    @torch.no_grad()
    def load_state_dict(self, k: int, state: dict) -> None:
        """Model k's state from a torch.optim state_dict of its parameters."""
        m = self.layout.views(self.m[k : k + 1])
        v = self.layout.views(self.v[k : k + 1]) if self.adam else m
        for i, entry in state["state"].items():
            if self.adam:
                m[int(i)][0].copy_(entry["exp_avg"])
                v[int(i)][0].copy_(entry["exp_avg_sq"])
            elif entry.get("momentum_buffer") is not None:
                m[int(i)][0].copy_(entry["momentum_buffer"])

    def state_dict(self, k: int, step: int, lr: float) -> dict:
        """Model k's state as torch.optim.SGD / Adam (fused) would give it after `step`
        updates, with `lr` as its group's current learning rate."""
        o = self.configs[k]
        n = len(self.layout.shapes)
        m = self.layout.views(self.m[k : k + 1])
        state: dict[int, dict] = {}
        if self.adam:
            v = self.layout.views(self.v[k : k + 1])
            group = {"lr": lr, "betas": (o.beta1, o.beta2), "eps": ADAM_EPS,
                     "weight_decay": o.weight_decay, "amsgrad": False, "maximize": False,
                     "foreach": None, "capturable": False, "differentiable": False,
                     "fused": True, "decoupled_weight_decay": False}
            if step:
                state = {i: {"step": torch.tensor(float(step)), "exp_avg": _copy(m[i][0]),
                             "exp_avg_sq": _copy(v[i][0])} for i in range(n)}
        else:
            group = {"lr": lr, "momentum": o.momentum, "dampening": 0,
                     "weight_decay": o.weight_decay, "nesterov": bool(o.nesterov),
                     "maximize": False, "foreach": None, "differentiable": False,
                     "fused": True}
            if step and o.momentum:
                state = {i: {"momentum_buffer": _copy(m[i][0])} for i in range(n)}
        return {"state": state, "param_groups": [{**group, "params": list(range(n))}]}
