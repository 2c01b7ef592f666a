"""The data a run sees: both splits of a dataset, cut to their first `limit` examples."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rbkd.data import load_dataset


def limit_dataset(dataset, limit: int | None):
    """The first `limit` examples of a split. A prefix keeps every index equal to its index in
    the full split, so soft labels made on it still match the full split."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return dataclasses.replace(
        dataset, images=dataset.images[:limit], labels=dataset.labels[:limit]
    )


def load_splits(dataset: str, data_dir: Path | None = None, limit: int | None = None):
    """(train, test) ImageDatasets, each cut to its first `limit` examples when given."""
    train = load_dataset(dataset, "train", data_dir)
    test = load_dataset(dataset, "test", data_dir)
    return limit_dataset(train, limit), limit_dataset(test, limit)
