"""`ImageDataset` and `load_dataset`: a whole split in memory as uint8, normalised per batch."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rbkd.data import adapters
from rbkd.data.cifar import read_cifar_binary
from rbkd.data.errors import DataError
from rbkd.data.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx
from rbkd.data.locate import find_dataset, resolve_file
from rbkd.data.registry import DEFAULT_DATASET, SPLITS, DatasetInfo, get_info

__all__ = ["ImageDataset", "load_dataset"]


@dataclass(eq=False)
class ImageDataset:
    """One split of a dataset. `images` stay uint8 ([N, C, H, W], 60,000 Fashion-MNIST images
    are 47 MB instead of 188 MB as float32); `normalize` turns one batch at a time into float32.

    Your own data (rbkd/data/adapters.py): `ImageDataset.from_tensors(x, y)` and
    `ImageDataset.from_dataset(ds)`. Their float inputs ([N, ...] float32 features of any shape,
    already normalised) are kept as they are: `normalize` passes a float batch through unchanged
    and `mean`/`std` are empty."""

    name: str
    split: str
    images: Tensor  # torch.uint8 [N, C, H, W]
    labels: Tensor  # torch.int64 [N]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...] = field(default=(0.0,))  # per channel, on the [0, 1] scale
    std: tuple[float, ...] = field(default=(1.0,))
    root: Path | None = None  # the folder the files were read from
    # (scale, shift) per device for normalize: building them is two small tensors and a copy per
    # call, a tenth of a training step of the baseline student on a 2-core CPU.
    _affine: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.is_float:  # already-normalised features of any shape: nothing per channel
            if self.images.dtype != torch.float32 or self.images.dim() < 2:
                raise ValueError(
                    f"float images must be float32 [N, ...], got {self.images.dtype} "
                    f"{list(self.images.shape)}"
                )
        elif self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 [{self.images.shape[0]}], got {self.labels.dtype} "
                f"{list(self.labels.shape)}"
            )
        channels = 0 if self.is_float else self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values, one per channel")

    @property
    def is_float(self) -> bool:
        """True for float features (kept as given, never normalised), False for uint8 images."""
        return self.images.dtype.is_floating_point

    from_tensors = classmethod(adapters.from_tensors)
    from_dataset = classmethod(adapters.from_dataset)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.images.shape
        return (c, h, w)

    def normalize(self, batch_uint8: Tensor) -> Tensor:
        """(batch / 255 - mean) / std per channel, as float32 on the batch's own device.

        Takes [N, C, H, W] or one [C, H, W] image; call it per batch, after moving the uint8
        batch to the GPU (4x fewer bytes to copy than float32).
        """
        if self.is_float and batch_uint8.dtype == torch.float32:
            return batch_uint8  # float features are the user's, already normalised
        if batch_uint8.dtype != torch.uint8:
            raise TypeError(f"batch must be torch.uint8, got {batch_uint8.dtype}")
        channels = len(self.mean)
        if batch_uint8.dim() not in (3, 4) or batch_uint8.shape[-3] != channels:
            raise ValueError(
                f"batch must be [N, {channels}, H, W] or [{channels}, H, W], "
                f"got {list(batch_uint8.shape)}"
            )
        device = batch_uint8.device
        if device not in self._affine:
            # x / 255 / std - mean / std, folded into one multiply-add per element.
            scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], dtype=torch.float32)
            shift = torch.tensor([m / s for m, s in zip(self.mean, self.std, strict=True)])
            self._affine[device] = (
                scale.to(device).view(channels, 1, 1),
                shift.to(device=device, dtype=torch.float32).view(channels, 1, 1),
            )
        scale, shift = self._affine[device]
        return torch.addcmul(-shift, batch_uint8.to(torch.float32), scale)


def _load_idx(info: DatasetInfo, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = info.split_files[split]
    images_path = resolve_file(folder, images_name)
    labels_path = resolve_file(folder, labels_name)
    if images_path is None or labels_path is None:
        missing = images_name if images_path is None else labels_name
        raise DataError(f"{folder} has no {missing} (nor its un-gzipped twin)")
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    _, height, width = info.image_shape
    if images.shape[1:] != (height, width):
        raise DataError(
            f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, "
            f"{info.title} images are {height}x{width}"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path} holds {labels.shape[0]} labels but {images_path} holds "
            f"{images.shape[0]} images"
        )
    if labels.size and int(labels.max()) >= info.num_classes:
        raise DataError(
            f"{labels_path} holds label {int(labels.max())}, {info.title} has "
            f"{info.num_classes} classes (0..{info.num_classes - 1})"
        )
    return images[:, None, :, :], labels.astype(np.int64)


def _load_cifar(info: DatasetInfo, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for batch_name in info.split_files[split]:
        path = resolve_file(folder, batch_name)
        if path is None:
            raise DataError(f"{folder} has no {batch_name}")
        batch_images, batch_labels = read_cifar_binary(path, info.num_classes)
        images.append(batch_images)
        labels.append(batch_labels)
    if len(images) == 1:
        return images[0], labels[0]
    return np.concatenate(images), np.concatenate(labels)


def load_dataset(
    name: str = DEFAULT_DATASET,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
) -> ImageDataset:
    """Load one split ("train" or "test") of a dataset into memory, as uint8 images.

    The files are found by `find_dataset` (data_dir, $RBKD_DATA, the cache, /usr/share/datasets).

    >>> train = load_dataset("fashion-mnist", "train")
    >>> x = train.normalize(train.images[:128].to(device))
    """
    info = get_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    folder = find_dataset(info.name, data_dir)
    loader = _load_cifar if info.format == "cifar" else _load_idx
    images, labels = loader(info, folder, split)
    return ImageDataset(
        name=info.name,
        split=split,
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        num_classes=info.num_classes,
        class_names=info.class_names,
        mean=info.mean,
        std=info.std,
        root=folder,
    )
