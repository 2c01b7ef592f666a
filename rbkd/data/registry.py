"""What rbkd knows about each dataset: shapes, classes, normalisation, files and download mirrors."""

from __future__ import annotations

from dataclasses import dataclass

from rbkd.data.errors import UnknownDatasetError

__all__ = ["DATASETS", "DEFAULT_DATASET", "SPLITS", "DatasetInfo", "RemoteFile", "get_info"]

SPLITS = ("train", "test")
DEFAULT_DATASET = "fashion-mnist"


@dataclass(frozen=True)
class RemoteFile:
    """One file as published upstream. `sha256` is what `fetch` verifies; `md5` is the checksum
    upstream (and torchvision) publish, kept so a copy can be checked by hand against it."""

    filename: str
    sha256: str
    md5: str
    size: int  # bytes, as published; used for the progress bar when the server sends no length


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str  # how people write it: "Fashion-MNIST"
    num_classes: int
    image_shape: tuple[int, int, int]  # (channels, height, width)
    class_names: tuple[str, ...]
    # Per-channel statistics of the training split on the [0, 1] scale (pixel / 255).
    mean: tuple[float, ...]
    std: tuple[float, ...]
    format: str  # "idx" (MNIST-style ubyte files) or "cifar" (CIFAR-10's binary batches)
    split_files: dict[str, tuple[str, ...]]  # split -> files in the dataset folder
    split_sizes: dict[str, int]
    # Where a search root may hold the files, tried in order ("" is the root itself).
    folder_names: tuple[str, ...]
    mirrors: tuple[str, ...]  # base URLs, tried in order; a file's URL is mirror + filename
    downloads: tuple[RemoteFile, ...]
    debian_package: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the dataset folder must hold (both splits)."""
        return tuple(name for split in SPLITS for name in self.split_files[split])


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Checksums: MD5s are the ones upstream and torchvision publish; the SHA-256s are those of the
# same bytes, as TensorFlow Datasets, Keras and torchvision's prototype datasets pin them.
DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        title="Fashion-MNIST",
        num_classes=10,
        image_shape=(1, 28, 28),
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        # Measured on the 60,000 training images: 0.28604, 0.35302.
        mean=(0.2860,),
        std=(0.3530,),
        format="idx",
        split_files=_IDX_FILES,
        split_sizes={"train": 60_000, "test": 10_000},
        folder_names=("fashion-mnist", "FashionMNIST/raw", ""),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        downloads=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                26_421_880,
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "25c81989df183df01b3e8a0aad5dffbe",
                29_515,
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "bef4ecab320f06d8554ea6380940ec79",
                4_422_102,
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                "bb300cfdad3c16e7a12a480ee83cd310",
                5_148,
            ),
        ),
        debian_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        title="MNIST",
        num_classes=10,
        image_shape=(1, 28, 28),
        class_names=tuple(str(digit) for digit in range(10)),
        mean=(0.1307,),
        std=(0.3081,),
        format="idx",
        split_files=_IDX_FILES,
        split_sizes={"train": 60_000, "test": 10_000},
        folder_names=("mnist", "MNIST/raw", ""),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        downloads=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                9_912_422,
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "d53e105ee54ea40749a09fcbcd1e9432",
                28_881,
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "9fb629c4189551a2d022fa330f9573f3",
                1_648_877,
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                "ec29112dd5afa0611ce80d1b7f02629c",
                4_542,
            ),
        ),
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        title="CIFAR-10",
        num_classes=10,
        image_shape=(3, 32, 32),
        class_names=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        # Population std of the training pixels (the often copied 0.2023, 0.1994, 0.2010 is the
        # mean of per-image stds, a different number).
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        format="cifar",
        # The binary version: fixed-size records, no pickle (see rbkd/data/cifar.py).
        split_files={
            "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
            "test": ("test_batch.bin",),
        },
        split_sizes={"train": 50_000, "test": 10_000},
        folder_names=(
            "cifar10/cifar-10-batches-bin",
            "cifar-10-batches-bin",
            "cifar10",
            "",
        ),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        downloads=(
            # MD5 and size as the CIFAR page publishes them. Toronto publishes no SHA-256; this
            # one is pinned identically by independent downloaders (Julia's MLDatasets.jl, Go's
            # GoMLX, among others), and `fetch` checks the MD5 and the size as well.
            RemoteFile(
                "cifar-10-binary.tar.gz",
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                "c32a1d4ab5d03f1284b67883e8d87530",
                170_052_171,
            ),
        ),
    ),
}

_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
}


def get_info(name: str) -> DatasetInfo:
    """The registry entry for `name` (case and `_`/`-` do not matter: "Fashion_MNIST" works)."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    try:
        return DATASETS[key]
    except KeyError:
        choices = ", ".join(DATASETS)
        raise UnknownDatasetError(f"unknown dataset {name!r}: choose one of {choices}") from None
