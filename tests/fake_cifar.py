"""A tiny synthetic CIFAR-10 in the layout torchvision downloads, for tests that must not need the real data.

from fake_cifar import write_fake_cifar10
write_fake_cifar10(tmp_dir)  # -> tmp_dir/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Learnable: each class has its own mean colour; noise keeps it from being trivial.
    colours = np.random.default_rng(1234).integers(30, 226, size=(10, 3))
    base = colours[labels][:, :, None, None]  # [n, 3, 1, 1]
    noise = rng.normal(0, 25, size=(len(labels), 3, 32, 32))
    return np.clip(base + noise, 0, 255).astype(np.uint8).reshape(len(labels), 3 * 32 * 32)


def _dump(path: Path, record: dict) -> None:
    # Pickle is written here only because it is the official CIFAR-10 format (bytes keys, as in the release).
    with open(path, "wb") as f:
        pickle.dump(record, f, protocol=2)


def write_fake_cifar10(root: str | Path, num_train: int = 200, num_test: int = 100, seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py with num_train images split over five batches and num_test test images."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = rng.integers(0, 10, size=num_train)
    train_images = _images(train_labels, rng)
    bounds = np.linspace(0, num_train, 6).astype(int)
    for b in range(5):
        lo, hi = bounds[b], bounds[b + 1]
        _dump(
            folder / f"data_batch_{b + 1}",
            {b"data": train_images[lo:hi], b"labels": train_labels[lo:hi].tolist()},
        )
    test_labels = rng.integers(0, 10, size=num_test)
    _dump(folder / "test_batch", {b"data": _images(test_labels, rng), b"labels": test_labels.tolist()})
    _dump(folder / "batches.meta", {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072})
    return Path(root)
