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
NORMS = ("batch", "none")  # the block factory is keyed on these
ACTIVATIONS = ("relu", "sigmoid", "tanh")
NORM_POSITIONS = ("before_act", "after_act")
INITS = ("default", "normal")
# VGG: convs per stage for each depth; the stages have width, 2w, 4w, 8w, 8w channels.
VGG_STAGES: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4),
}
