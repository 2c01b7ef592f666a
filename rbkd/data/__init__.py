"""Datasets for rbkd: Fashion-MNIST (the default), MNIST and CIFAR-10, read from their standard
files (no pickle anywhere: CIFAR-10 comes from its binary archive), found on disk or fetched
from the public mirrors.

>>> from rbkd.data import load_dataset
>>> train = load_dataset("fashion-mnist", "train")   # uint8 images [60000, 1, 28, 28]
>>> x = train.normalize(train.images[:256].to("cuda"))  # float32, normalised on the GPU
"""

from rbkd._lazy import lazy_names
from rbkd.data.errors import (
    DATA_ERRORS,
    DataError,
    DatasetFetchError,
    DatasetNotFoundError,
    UnknownDatasetError,
)
from rbkd.data.locate import cache_dir, find_dataset, locate_dataset, search_roots
from rbkd.data.registry import DATASETS, DEFAULT_DATASET, SPLITS, DatasetInfo, RemoteFile, get_info

# Loaded on first use (PEP 562): the images need numpy and torch, a download urllib; where the
# files are (locate, registry) needs neither, so the command line and rbkd.provenance read it
# without them.
_LAZY = {
    "ImageDataset": "rbkd.data.dataset",
    "load_dataset": "rbkd.data.dataset",
    "fetch": "rbkd.data.download",
}

__all__ = [
    "DATASETS",
    "DATA_ERRORS",
    "DEFAULT_DATASET",
    "SPLITS",
    "DataError",
    "DatasetFetchError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageDataset",
    "RemoteFile",
    "UnknownDatasetError",
    "cache_dir",
    "fetch",
    "find_dataset",
    "get_info",
    "load_dataset",
    "locate_dataset",
    "search_roots",
]


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)
