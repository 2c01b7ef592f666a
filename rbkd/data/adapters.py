"""Your own data as an `ImageDataset`: tensors or NumPy arrays, or a map-style Dataset.

Attached to ImageDataset as classmethods (`ImageDataset.from_tensors`, `.from_dataset`), so this
module never imports it. Two kinds of input, told apart by dtype:

- uint8 images [N, H, W] or [N, C, H, W]: kept as uint8 and normalised per batch like rbkd's own
  datasets (`x / 255`, then `(x - mean) / std` with the given per-channel mean and std);
- float features of any shape [N, ...] (already normalised: a scaler's output, an embedding):
  stored as float32 and passed to the model unchanged (`normalize` is the identity for them).

Every problem is one ValueError line naming the argument and what to pass instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

USER_DATA = "user-data"  # the name of a dataset that does not give one


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{what} must be a tensor or NumPy array, got {type(value).__name__}"
        ) from e


IGNORE_INDEX = -100  # the label of an unlabelled example (kd_loss's ignore_index)


def check_labels(y: Any, n: int, num_classes: int | None) -> tuple[Tensor, int]:
    """Labels as int64 [n] in [0, num_classes) or IGNORE_INDEX (unlabelled; num_classes: given,
    or the largest label + 1)."""
    y = _as_tensor(y, "labels")
    if y.dtype == torch.bool or y.dtype.is_floating_point or y.dtype.is_complex:
        raise ValueError(
            f"labels must be integer class indices 0..C-1, got {y.dtype}; convert them, e.g. "
            "y.astype('int64') or LabelEncoder().fit_transform(y)"
        )
    y = y.reshape(-1) if y.dim() == 2 and y.shape[1] == 1 else y
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(
            f"labels must be one class index per example, shape [{n}], got {list(y.shape)}"
        )
    y = y.to(torch.int64)
    labelled = y[y != IGNORE_INDEX]
    if labelled.numel() and int(labelled.min()) < 0:
        raise ValueError(
            f"labels must be >= 0 (or {IGNORE_INDEX}: an unlabelled example), got "
            f"{int(labelled.min())}; map them to 0..C-1"
        )
    top = int(labelled.max()) + 1 if labelled.numel() else 0
    if num_classes is None and n and not labelled.numel():
        num_classes = 1  # no label at all: the teacher's width decides (rbkd.distill widens)
    if num_classes is None:
        num_classes = top
    elif top > num_classes:
        raise ValueError(
            f"labels reach {top - 1} but num_classes is {num_classes}; pass a larger num_classes"
        )
    if num_classes < 1:
        raise ValueError("no examples and no num_classes: pass num_classes")
    return y, int(num_classes)


def _images_or_features(x: Tensor) -> Tensor:
    if x.dtype == torch.uint8:
        if x.dim() == 3:  # [N, H, W]: one grey channel
            return x.unsqueeze(1).contiguous()
        if x.dim() == 4:
            return x.contiguous()
        raise ValueError(
            f"uint8 images must be [N, H, W] or [N, C, H, W], got {list(x.shape)}; pass float "
            "features for anything else"
        )
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"inputs must be uint8 images or float features, got {x.dtype}; convert them, "
            "e.g. x.astype('float32')"
        )
    if x.dim() < 2:
        raise ValueError(f"features must be [N, ...], got shape {list(x.shape)}; try x[:, None]")
    return x.to(torch.float32).contiguous()


def from_tensors(
    cls,
    x: Any,
    y: Any,
    *,
    num_classes: int | None = None,
    name: str = USER_DATA,
    split: str = "train",
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
):
    """An ImageDataset from inputs `x` ([N, ...], tensor or NumPy array) and labels `y` ([N]
    integers). uint8 `x` is images ([N, H, W] or [N, C, H, W]; normalised per batch with `mean`
    and `std` per channel on the [0, 1] scale, by default 0 and 1, so `x / 255`); float `x` is
    features used as they are. `num_classes` defaults to the largest label + 1."""
    x = _as_tensor(x, "inputs")
    x = _images_or_features(x)
    y, num_classes = check_labels(y, x.shape[0], num_classes)  # one label per input, checked
    if x.dtype == torch.uint8:
        channels = x.shape[1]
        mean = tuple(mean) if mean is not None else (0.0,) * channels
        std = tuple(std) if std is not None else (1.0,) * channels
    elif mean is not None or std is not None:
        raise ValueError("mean and std are for uint8 images; float features are used as given")
    else:
        mean, std = (), ()
    names = tuple(class_names) if class_names is not None else tuple(map(str, range(num_classes)))
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for {num_classes} classes")
    return cls(name, split, x, y, num_classes, names, mean=mean, std=std)


def _sample_array(x: Any) -> Tensor:
    """One sample as a tensor; a NumPy or PIL image [H, W, C] (channels last) becomes [C, H, W]."""
    if isinstance(x, Tensor):
        return x.detach().cpu()
    a = np.asarray(x)
    if a.dtype == np.uint8 and a.ndim == 3:
        a = np.ascontiguousarray(a.transpose(2, 0, 1))
    return torch.as_tensor(a)


def from_dataset(
    cls,
    dataset: Any,
    *,
    num_classes: int | None = None,
    name: str | None = None,
    split: str = "train",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
):
    """An ImageDataset from a map-style dataset (`len(ds)`, `ds[i] -> (x, y)`), read once into
    memory: a torchvision dataset, a `torch.utils.data.TensorDataset`, your own class. Samples
    may be tensors, NumPy arrays or PIL images (uint8 [H, W, C] arrays are channels last and
    become [C, H, W]); `classes` (torchvision's) names the classes when present."""
    try:
        n = len(dataset)
    except TypeError as e:
        raise ValueError(
            f"{type(dataset).__name__} has no len(): pass a map-style dataset (len and ds[i])"
        ) from e
    xs, ys = [], []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(
                f"{type(dataset).__name__}[{i}] must be a pair (input, label), got "
                f"{type(item).__name__}"
            )
        xs.append(_sample_array(item[0]))
        label = _sample_array(item[1])
        if label.numel() != 1:
            raise ValueError(
                f"{type(dataset).__name__}[{i}] has label of shape {list(label.shape)}; each "
                "label must be one class index"
            )
        ys.append(label.reshape(()))
    if not xs:
        raise ValueError(f"{type(dataset).__name__} is empty: nothing to train or label")
    shapes = {tuple(t.shape) for t in xs}
    if len(shapes) != 1:
        raise ValueError(f"samples must all have one shape, got {sorted(shapes)[:3]}")
    x = torch.stack(xs)
    y = torch.stack(ys)
    classes = getattr(dataset, "classes", None)
    names = [str(c) for c in classes] if classes is not None else None
    if names is not None and num_classes is None:
        num_classes = len(names)
    if names is not None and len(names) != num_classes:
        names = None  # a `classes` attribute that does not fit: plain numbers instead
    return from_tensors(
        cls,
        x,
        y,
        num_classes=num_classes,
        name=name or USER_DATA,
        split=split,
        class_names=names,
        mean=mean,
        std=std,
    )
