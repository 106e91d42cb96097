"""What bnexp can train, as plain data: the datasets, the networks and their knobs.

data.py and models.py build from these names and config.py validates against them, so a name
is stated once. No torch here: the CLI checks a config before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    image_side: int  # images are square
    target_acc: float  # default convergence target (trainer.target_acc) for this dataset
    folder: str  # where torchvision keeps the files, under data.root
    files: tuple[str, ...]  # the files torchvision reads, relative to folder


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

DATASETS: dict[str, DatasetSpec] = {
    "mnist5k": DatasetSpec(10, 28, 0.9, "", ()),
    "mnist": DatasetSpec(10, 28, 0.97, "MNIST/raw", _MNIST_FILES),
    "fashion_mnist": DatasetSpec(10, 28, 0.85, "FashionMNIST/raw", _MNIST_FILES),
    "cifar10": DatasetSpec(10, 32, 0.7, "cifar-10-batches-py", (
        *(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")),
    "cifar100": DatasetSpec(100, 32, 0.4, "cifar-100-python", ("train", "test", "meta")),
}

NETWORKS = ("mlp", "cnn", "vgg", "resnet")
# The block factory (models.norm_layer) is keyed on these. layer/group/instance normalize each
# sample on its own: over all its features (layer), over groups of channels (group), over each
# channel's spatial positions (instance; conv nets only).
NORMS = ("batch", "layer", "group", "instance", "none")
NORM_GROUPS = 32  # GroupNorm's default number of groups (Wu & He 2018)
ACTIVATIONS = ("relu", "sigmoid", "tanh")
NORM_POSITIONS = ("before_act", "after_act")
INITS = ("default", "normal")
# VGG: convs per stage for each depth; the stages have width, 2w, 4w, 8w, 8w channels.
VGG_STAGES: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4),
}


def norm_groups(norm: str, groups: int, channels: int) -> int:
    """How many groups a norm layer over `channels` divides them into: layer norm 1, instance
    norm one per channel, group norm `groups`, or every channel its own group when there are
    fewer channels than that. Batch norm has no groups (0)."""
    if norm == "layer":
        return 1
    if norm == "instance":
        return channels
    if norm == "group":
        return min(groups, channels)
    return 0


def norm_inputs(network: str, depth: int, width: int, side: int) -> list[tuple[int, int]]:
    """(channels, spatial side) of the input of every norm layer of a network, in module
    order; the MLP's side is 1. Mirrors models.py, so configs are checked before torch is
    imported (a test builds every network and compares)."""
    if network == "mlp":
        return [(width, 1)] * depth
    out: list[tuple[int, int]] = []
    if network == "cnn":
        for stage in range(depth):
            out += [(width * 2**stage, side // 2**stage)] * 2
    elif network == "vgg":
        for stage, convs in enumerate(VGG_STAGES[depth]):
            out += [(width * min(2**stage, 8), side)] * convs
            side = -(-side // 2)  # pooling with ceil_mode
    elif network == "resnet":
        out.append((width, side))
        c_in = width
        for stage in range(3):
            c_out = width * 2**stage
            for i in range((depth - 2) // 6):
                stride = 2 if stage and i == 0 else 1
                side = -(-side // stride)
                out += [(c_out, side), (c_out, side)]
                if stride != 1 or c_in != c_out:
                    out.append((c_out, side))
                c_in = c_out
    return out
