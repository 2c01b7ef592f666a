"""Shared fixtures: a tiny Fashion-MNIST-like dataset in real IDX files, so CLI runs need no data.

`tiny_data` writes 200 train / 100 test 28x28 images of 10 classes (gzip IDX, magic numbers 2051
and 2049, big-endian headers) into a temporary folder laid out like /usr/share/datasets
(`<root>/fashion-mnist/*.gz`) and points $RBKD_DATA at it. Each class is a bright square at its
own place on a 4x3 grid, plus noise, so that even a tiny model learns it in an epoch.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
TRAIN_SIZE, TEST_SIZE, NUM_CLASSES = 200, 100, 10


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    header = struct.pack(">IIII", IMAGES_MAGIC, n, h, w)
    path.write_bytes(gzip.compress(header + images.astype(np.uint8).tobytes()))


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    header = struct.pack(">II", LABELS_MAGIC, labels.shape[0])
    path.write_bytes(gzip.compress(header + labels.astype(np.uint8).tobytes()))


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class k: a 7x7 bright square at grid cell (k // 4, k % 4) of a 28x28 image, jittered."""
    n = labels.shape[0]
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.int64)
    for i, k in enumerate(labels):
        r, c = 7 * (k // 4) + rng.integers(0, 3), 7 * (k % 4) + rng.integers(0, 3)
        images[i, r : r + 6, c : c + 6] += rng.integers(150, 196)
    return np.clip(images, 0, 255).astype(np.uint8)


def write_tiny_fashion_mnist(root: Path, seed: int = 0) -> Path:
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", TRAIN_SIZE), ("t10k", TEST_SIZE)):
        labels = np.arange(n) % NUM_CLASSES
        rng.shuffle(labels)
        write_idx_images(folder / f"{prefix}-images-idx3-ubyte.gz", make_images(labels, rng))
        write_idx_labels(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """A session-wide folder holding the tiny dataset (written once)."""
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tiny_data(tiny_data_root, monkeypatch) -> Path:
    """$RBKD_DATA points at the tiny dataset for this test; returns the data root."""
    monkeypatch.setenv("RBKD_DATA", str(tiny_data_root))
    return tiny_data_root
