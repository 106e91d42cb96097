"""Measurements taken on a model during training that leave training untouched.

Every probe runs inside `untouched(model)`, which restores the parameters, the BN running
statistics, the train/eval flag and the RNG state afterwards: a run with probes follows the
same trajectory as one without.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bnexp import metrics
from bnexp.data import eval_batches
from bnexp.models import ACTIVATIONS, batch_norms, depends_on_batch, norm_layers, norm_prefix

ACTIVATION_TYPES = tuple(ACTIVATIONS.values())


@contextlib.contextmanager
def untouched(model: nn.Module, parameters: bool = True) -> Iterator[None]:
    """Restore parameters, buffers (BN running stats), mode and RNG state on exit.
    parameters=False skips the parameters, for probes that run without gradients."""
    params = [p.detach().clone() for p in model.parameters()] if parameters else []
    buffers = [b.clone() for b in model.buffers()]
    training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(model.parameters(), params):
                p.copy_(saved)
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
        model.train(training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Hidden activations in forward order, named act1, act2, ..."""
    acts = [m for m in model.modules() if isinstance(m, ACTIVATION_TYPES)]
    return [(f"act{i}", m) for i, m in enumerate(acts, 1)]


@torch.no_grad()
def activation_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every hidden activation for the batch x, as the training step sees it
    (train mode, batch statistics), without updating the running statistics."""
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(
        lambda _m, inp, name=name: captured.__setitem__(name, inp[0].detach().float()))
        for name, m in activation_modules(model)]
    try:
        with untouched(model, parameters=False):
            model.train()
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return captured


def activation_scalars(inputs: dict[str, torch.Tensor], activation: str) -> dict[str, float]:
    out = {}
    for name, x in inputs.items():
        for q, v in zip(metrics.PERCENTILES, metrics.percentiles(x), strict=True):
            out[f"act_input/{name}/p{q}"] = v
        saturated = metrics.saturated_fraction(x, activation)
        if saturated is not None:
            out[f"saturation/{name}"] = saturated
    return out


def layer_norms(model: nn.Module) -> dict[str, float]:
    """Weight and gradient norm of every linear/conv layer (named layer1, layer2, ...)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    weights = torch._foreach_norm([m.weight for m in layers])
    grads = [m.weight.grad for m in layers]
    out = {}
    grad_norms = torch._foreach_norm(grads) if all(g is not None for g in grads) else None
    values = torch.stack([*weights, *(grad_norms or [])]).tolist()  # one host sync for all
    for i in range(len(layers)):
        out[f"weight_norm/layer{i + 1}"] = values[i]
        if grad_norms is not None:
            out[f"grad_norm/layer{i + 1}"] = values[len(layers) + i]
    return out


def _running(layer: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return getattr(layer, "running_mean", None), getattr(layer, "running_var", None)


def norm_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every norm layer's running mean/var (BN's; the other norms keep none) and gamma/beta,
    by layer: bn1, bn2, ... for batch norm, ln/gn/in for layer, group and instance norm."""
    out = {}
    for i, (_, layer) in enumerate(norm_layers(model), 1):
        name = f"{norm_prefix(layer)}{i}"
        for stat, value in zip(("running_mean", "running_var"), _running(layer)):
            if value is not None:
                out[f"{name}/{stat}"] = value
        if layer.weight is not None:
            out[f"{name}/gamma"] = layer.weight.detach()
        if layer.bias is not None:
            out[f"{name}/beta"] = layer.bias.detach()
    return out


def _stats(x: torch.Tensor | None) -> dict[str, float] | None:
    if x is None:
        return None
    x = x.detach().float()
    return {"mean": x.mean().item(), "std": x.std().item() if x.numel() > 1 else 0.0,
            "min": x.min().item(), "max": x.max().item()}


def norm_report(model: nn.Module) -> list[dict]:
    """Per norm layer: its settings and summaries of running mean/var (None where the layer
    keeps none) and gamma/beta (None without affine)."""
    rows = []
    for name, layer in norm_layers(model):
        mean, var = _running(layer)
        tracked = getattr(layer, "num_batches_tracked", None)
        features = getattr(layer, "num_features", None) or getattr(
            layer, "num_channels", None) or int(torch.Size(layer.normalized_shape).numel())
        affine = getattr(layer, "affine", getattr(layer, "elementwise_affine", False))
        rows.append({
            "layer": name, "type": type(layer).__name__, "num_features": features,
            "groups": getattr(layer, "num_groups", None), "eps": layer.eps,
            "momentum": getattr(layer, "momentum", None) if mean is not None else None,
            "affine": affine, "track_running_stats": mean is not None,
            "num_batches_tracked": int(tracked) if tracked is not None else None,
            "running_mean": _stats(mean), "running_var": _stats(var),
            "gamma": _stats(layer.weight), "beta": _stats(layer.bias),
        })
    return rows


# ----------------------------------------------------------------------------- BN modes


def _chunks(n: int, size: int) -> list[slice]:
    """Slices of at most `size`; a last chunk of one sample joins the one before, since BN in
    train mode cannot normalize a single sample."""
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [slice(s, starts[i + 1] if i + 1 < len(starts) else n) for i, s in enumerate(starts)]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, inputs, batch_size: int,
             train_mode: bool) -> float:
    """Accuracy in eval mode (running statistics) or train mode (each batch's statistics)."""
    correct = 0
    with untouched(model, parameters=False):
        model.train(train_mode)
        for s in _chunks(len(y), batch_size):
            correct += (model(inputs(x[s])).argmax(1) == y[s]).sum().item()
    return correct / len(y)


def accuracy_one_by_one(model: nn.Module, x: torch.Tensor, y: torch.Tensor, inputs,
                        train_mode: bool = False) -> float:
    """Accuracy with every sample its own batch of one (see ModelPredictor); a model vmap
    cannot run falls back to one call per sample."""
    with untouched(model, parameters=False), torch.no_grad():
        try:
            logits = ModelPredictor(model).logits_one_by_one(inputs(x), train_mode)[0]
        except RuntimeError:
            return accuracy(model, x, y, inputs, 1, train_mode=train_mode)
    return (logits.argmax(1) == y).sum().item() / len(y)


class Predictor(Protocol):
    """k models' logits (k x B x classes) for one batch: ModelPredictor (one model) or a
    stack's (bnexp.steps.StackPredictor)."""

    k: int
    has_bn: bool  # a norm whose train mode depends on the batch
    has_norm: bool

    def logits(self, x: torch.Tensor, train_mode: bool) -> torch.Tensor: ...

    def logits_one_by_one(self, x: torch.Tensor, train_mode: bool) -> torch.Tensor: ...


class ModelPredictor:
    """One model's logits as a stack of one (1 x B x classes), for mode_comparisons. Its
    running statistics stay as they are: use it inside untouched(model)."""

    def __init__(self, model: nn.Module):
        self.model, self.k = model, 1
        self.has_bn, self.has_norm = depends_on_batch(model), bool(norm_layers(model))

    def logits(self, x: torch.Tensor, train_mode: bool) -> torch.Tensor:
        self.model.train(train_mode)
        return self.model(x)[None]

    def logits_one_by_one(self, x: torch.Tensor, train_mode: bool) -> torch.Tensor:
        """Every sample its own batch of one, in one vmap call (100 calls took 8x as long for
        the MLP: docs/performance.md)."""
        from torch.func import functional_call, vmap

        model = self.model
        model.train(train_mode)
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}

        def one(sample: torch.Tensor) -> torch.Tensor:
            return functional_call(model, state, (sample[None],))[0]

        return vmap(one)(x)[None]


@torch.no_grad()
def mode_comparisons(models: Predictor, x: torch.Tensor, y: torch.Tensor, inputs, batch_size: int,
                     bs1_samples: int = 100, eval_acc: list[float] | None = None
                     ) -> list[tuple[dict, dict]]:
    """BN's two behaviours side by side for each of `models.k` models (a ModelPredictor, or a
    stack's, which runs all its models in each call): accuracy in eval mode (running
    statistics) and in train mode (each batch's statistics, batches of batch_size), plus
    evaluation one sample at a time on the first bs1_samples of the (shuffled) split;
    bs1_samples=0 skips that. eval_acc: the eval-mode accuracies on (x, y) when an evaluation
    of these very weights already measured them (a run's final evaluation). Running
    statistics are left as they were."""
    # A fixed shuffle: train-mode batches must not inherit any ordering of the split by class.
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(y.device)
    x, y = x[order], y[order]

    def accuracy_of(slices: list[slice], train_mode: bool) -> list[float]:
        hits = torch.zeros(models.k, dtype=torch.long, device=y.device)
        for s in slices:
            hits += (models.logits(inputs(x[s]), train_mode).argmax(-1) == y[s]).sum(-1)
        return (hits.double() / sum(sl.stop - sl.start for sl in slices)).tolist()

    def one_by_one(train_mode: bool) -> list[float]:
        try:
            logits = models.logits_one_by_one(inputs(x[:n1]), train_mode)
        except RuntimeError:  # a model vmap cannot run: one call per sample
            logits = torch.cat([models.logits(inputs(x[i : i + 1]), train_mode)
                                for i in range(n1)], dim=1)
        return ((logits.argmax(-1) == y[:n1]).double().sum(-1) / n1).tolist()

    n1 = min(bs1_samples, len(y))
    # Every eval-mode pass first: train-mode passes update BN's running statistics in place
    # (restored only when the comparison ends), and eval mode must read them as trained.
    if eval_acc is None:
        eval_acc = accuracy_of(_chunks(len(y), 1000), False)
    eval_bs1 = one_by_one(False) if n1 else [None] * models.k
    train_acc = accuracy_of(_chunks(len(y), batch_size), True)
    outs = [{"val_acc_eval_mode": e, "val_acc_train_mode": t, "train_eval_gap": e - t,
             "val_acc_eval_bs1": e1, "bs1_samples": n1, "val_acc_train_bs1": None}
            for e, t, e1 in zip(eval_acc, train_acc, eval_bs1)]
    notes: dict[str, str] = {}
    if n1 == 0:
        notes["val_acc_eval_bs1"] = "skipped: trainer.diagnostics=off"
        return [(out, dict(notes)) for out in outs]
    if models.has_bn:
        try:  # BN's buffers update in place in train mode, which vmap refuses: calls
            for out, acc in zip(outs, accuracy_of(_chunks(n1, 1), True)):
                out["val_acc_train_bs1"] = acc
        except ValueError as exc:
            notes["val_acc_train_bs1"] = (
                "not measurable: BatchNorm in train mode normalizes each feature over the "
                "batch, and a batch of one sample has zero variance per feature, so PyTorch "
                f"refuses it ({str(exc).splitlines()[0]}). In eval mode BN uses its running "
                "statistics and batch size 1 is fine (val_acc_eval_bs1).")
    else:
        # Without BN a batch of one in train mode is batched like eval mode's.
        for out, acc in zip(outs, one_by_one(True)):
            out["val_acc_train_bs1"] = acc
        notes["train_eval_gap"] = ("no BN layers: train and eval mode compute the same "
                                   "function" + (" (layer, group and instance norm use each "
                                                 "sample's own statistics in both)"
                                                 if models.has_norm else ""))
    return [(out, dict(notes)) for out in outs]


def mode_comparison(model: nn.Module, x: torch.Tensor, y: torch.Tensor, inputs,
                    batch_size: int, bs1_samples: int = 100,
                    eval_acc: float | None = None) -> tuple[dict, dict]:
    """mode_comparisons of one model."""
    with untouched(model, parameters=False):
        [found] = mode_comparisons(ModelPredictor(model), x, y, inputs, batch_size,
                                   bs1_samples, None if eval_acc is None else [eval_acc])
    return found


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, inputs, batch_size: int,
                train_mode: bool) -> torch.Tensor:
    """Predicted classes in eval mode or train mode, batch_size samples at a time (the last
    batch may be smaller; in train mode a last batch of one joins the one before)."""
    out = []
    with untouched(model, parameters=False):
        model.train(train_mode)
        for s in _chunks(len(x), batch_size) if train_mode else eval_batches(len(x), batch_size):
            out.append(model(inputs(x[s])).argmax(1))
    return torch.cat(out)


def mode_study(model: nn.Module, x: torch.Tensor, y: torch.Tensor, inputs,
               batch_sizes: list[int]) -> tuple[dict, dict]:
    """BN's two modes over eval batch sizes: accuracy in eval mode (running statistics) and in
    train mode (each batch's own statistics) at each size, and the fraction of predictions
    that change against the largest size in the same mode. Train mode with batches of one is
    recorded as refused when BN cannot normalize a single sample."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(y.device)
    x, y = x[order], y[order]  # train-mode batches must not follow the split's class order
    sizes = sorted(set(batch_sizes))
    out: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    for mode, train_mode in (("eval", False), ("train", True)):
        reference = predictions(model, x, inputs, sizes[-1], train_mode)
        for size in sizes:
            key = f"modes_{mode}_acc_bs{size}"
            try:
                pred = predictions(model, x, inputs, size, train_mode)
            except ValueError as exc:  # BatchNorm1d in train mode, one sample per batch
                out[key] = out[f"modes_{mode}_changed_bs{size}"] = None
                notes[key] = ("refused: a batch of one sample has zero variance per feature, "
                              f"so BN cannot normalize it ({str(exc).splitlines()[0]})")
                continue
            out[key] = (pred == y).float().mean().item()
            out[f"modes_{mode}_changed_bs{size}"] = (pred != reference).float().mean().item()
    return out, notes


@torch.no_grad()
def population_statistics(model: nn.Module, x: torch.Tensor, inputs,
                          batch_size: int = 1000) -> dict[str, float]:
    """Each BN layer's running mean/var against the mean/var of its input over all of x in
    eval mode (what the layer sees at inference), per layer (bn1, bn2, ...): the mean's error
    in units of the population standard deviation, and the variance's relative error, each
    the root mean square over the layer's features. Both are the errors BN's normalized
    output inherits: a shift of that many standard deviations, a scale off by that fraction."""
    layers = batch_norms(model)
    sums: dict[int, list] = {}

    def hook(i: int):
        def record(_module: nn.Module, args: tuple) -> None:
            z = args[0].double()
            dims = [d for d in range(z.dim()) if d != 1]
            acc = sums.setdefault(i, [0, 0.0, 0.0])
            acc[0] += z.numel() // z.shape[1]
            acc[1] = acc[1] + z.sum(dims)
            acc[2] = acc[2] + (z * z).sum(dims)
        return record

    hooks = [bn.register_forward_pre_hook(hook(i)) for i, (_, bn) in enumerate(layers, 1)]
    try:
        with untouched(model, parameters=False):
            model.eval()
            for s in eval_batches(len(x), batch_size):
                model(inputs(x[s]))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for i, (_, bn) in enumerate(layers, 1):
        if bn.running_mean is None or i not in sums:
            continue
        n, total, squares = sums[i]
        mean = total / n
        var = (squares / n - mean * mean).clamp_min(1e-12)
        mean_err = (bn.running_mean.double() - mean) / var.sqrt()
        var_err = bn.running_var.double() / var - 1
        out[f"running_mean_error_bn{i}"] = mean_err.square().mean().sqrt().item()
        out[f"running_var_rel_error_bn{i}"] = var_err.square().mean().sqrt().item()
    return out


# ----------------------------------------------------------------------------- landscape


def landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              step_sizes: tuple[float, ...]) -> dict[str, float]:
    """Santurkar et al. 2018: step along the negative gradient of the probe-batch loss by each
    step size; record the loss and the change of the gradient. Training state is untouched."""
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grad() -> tuple[float, list[torch.Tensor]]:
        out = model(x)
        loss = F.cross_entropy(out.float() if out.dtype == torch.bfloat16 else out, y)
        return loss.item(), torch.autograd.grad(loss, params)

    with untouched(model):
        model.train()
        loss0, g0 = loss_and_grad()
        g0_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g0))).item()
        origin = [p.detach().clone() for p in params]
        losses, changes, distances = [loss0], [], []
        for eta in step_sizes:
            with torch.no_grad():
                for p, saved, g in zip(params, origin, g0, strict=True):
                    p.copy_(saved - eta * g)
            loss, g = loss_and_grad()
            losses.append(loss)
            diff = torch._foreach_sub(list(g), list(g0))
            changes.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diff))).item())
            distances.append(eta * g0_norm)
    return metrics.landscape_summary(losses, changes, distances)
