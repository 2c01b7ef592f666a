"""What the public API (rbkd.api) accepts, turned into what the engine trains on.

Data: an `ImageDataset`, a pair (x, y) of tensors or NumPy arrays, or a map-style Dataset
returning (x, y). Models: any nn.Module, or an rbkd model name ("small", "general", ...) built
for the data's shape. Hyper-parameters: a TrainConfig, keyword arguments, or both (the keywords
win); every default is rbkd.config's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rbkd.config import DEFAULT_DATASET, TrainConfig, check_batch_size, check_epochs
from rbkd.data.adapters import from_dataset, from_tensors
from rbkd.data.dataset import ImageDataset

DATA_FORMS = "an ImageDataset, a pair (x, y) of tensors or NumPy arrays, or a Dataset of (x, y)"


def as_dataset(
    data: Any,
    *,
    split: str,
    num_classes: int | None = None,
    what: str = "data",
    unlabelled: bool = False,
) -> ImageDataset:
    """`data` as an ImageDataset (rbkd's own are returned as they are). `unlabelled`: inputs
    alone (`x` or `(x, None)`) are a transfer set without labels (every label IGNORE_INDEX)."""
    if unlabelled and (_is_array(data) or (isinstance(data, tuple) and len(data) == 2
                                           and data[1] is None)):  # fmt: skip
        x = data[0] if isinstance(data, tuple) else data
        rows = len(x)
        data = (x, _unlabelled(rows))
    if isinstance(data, ImageDataset):
        if num_classes is not None and num_classes != data.num_classes:
            raise ValueError(
                f"{what} has {data.num_classes} classes, num_classes says {num_classes}"
            )
        return data
    if _is_array(data):  # the inputs alone: the labels were forgotten
        shape = list(getattr(data, "shape", ()))
        raise ValueError(
            f"{what} is a single {type(data).__name__} {shape} without labels; pass {what}=(x, y), "
            "the inputs and their class labels"
        )
    try:
        if isinstance(data, tuple) and len(data) == 2:  # a list is a dataset of samples
            x, y = data
            return from_tensors(ImageDataset, x, y, num_classes=num_classes, split=split)
        if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, str):
            return from_dataset(ImageDataset, data, num_classes=num_classes, split=split)
    except ValueError as e:  # the adapters name the value; the user needs the argument too
        raise ValueError(f"{what}: {e}") from None
    raise ValueError(f"{what} must be {DATA_FORMS}; got {type(data).__name__}")


def _unlabelled(rows: int):
    import torch

    from rbkd.data.adapters import IGNORE_INDEX

    return torch.full((rows,), IGNORE_INDEX, dtype=torch.int64)


def check_labelled(data: ImageDataset, what: str) -> None:
    """A split that is scored (a test split, a teacher's training data) needs every label."""
    from rbkd.data.adapters import IGNORE_INDEX

    missing = int((data.labels == IGNORE_INDEX).sum())
    if missing:
        raise ValueError(
            f"{what} has {missing} unlabelled examples (label {IGNORE_INDEX}); only a "
            "distillation's training data (its transfer set) may be unlabelled"
        )


def _is_array(data: Any) -> bool:
    """A tensor or NumPy array (of inputs), not a pair or a Dataset of (input, label) pairs."""
    import numpy as np
    import torch

    if isinstance(data, np.ndarray):
        return data.dtype != object  # an object array may hold (input, label) pairs
    return isinstance(data, torch.Tensor)


def with_classes(dataset: ImageDataset, num_classes: int, *, fixed: bool) -> ImageDataset:
    """`dataset` with `num_classes` classes: widened when its count was only inferred from its
    labels (`fixed` False), an error when the count was the user's or the dataset's own."""
    if num_classes == dataset.num_classes:
        return dataset
    if fixed or num_classes < dataset.num_classes:
        raise ValueError(
            f"the data has {dataset.num_classes} classes but the teacher or the other split has "
            f"{num_classes}; pass data with the same classes (or num_classes={num_classes})"
        )
    names = tuple(map(str, range(num_classes)))
    return dataclasses.replace(dataset, num_classes=num_classes, class_names=names)


def as_splits(
    train: Any, test: Any | None, num_classes: int | None, *, unlabelled: bool = False
) -> tuple[ImageDataset, ImageDataset | None, bool]:
    """(train, test, fixed): both splits with one class count; `fixed` is False when that count
    was inferred from the labels (so a teacher with more outputs may widen it). `unlabelled`:
    the training split may be unlabelled (a distillation's transfer set), wholly or in part."""
    fixed = num_classes is not None or isinstance(train, ImageDataset)
    train_ds = as_dataset(
        train, split="train", num_classes=num_classes, what="train", unlabelled=unlabelled
    )
    if not unlabelled:
        check_labelled(train_ds, "train")
    if test is None:
        return train_ds, None, fixed
    test_ds = as_dataset(  # inputs alone are read, then refused in one clear line
        test, split="test", num_classes=num_classes, what="test", unlabelled=unlabelled
    )
    check_labelled(test_ds, "test")
    check_same_inputs(train_ds, test_ds)
    c = max(train_ds.num_classes, test_ds.num_classes)
    train_ds = with_classes(train_ds, c, fixed=fixed)
    test_ds = with_classes(test_ds, c, fixed=fixed or isinstance(test, ImageDataset))
    return train_ds, test_ds, fixed or isinstance(test, ImageDataset)


def check_same_inputs(train: ImageDataset, test: ImageDataset) -> None:
    """Both splits feed one model: the same input shape and kind (uint8 images or features)."""
    a, b = train.images, test.images
    if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
        kind = [str(t.dtype).removeprefix("torch.") for t in (a, b)]
        raise ValueError(
            f"test holds {kind[1]} inputs of shape {list(b.shape[1:])} per example but train "
            f"holds {kind[0]} {list(a.shape[1:])}; give both splits the same inputs"
        )


def train_config(config: TrainConfig | None, **overrides: Any) -> TrainConfig:
    """`config` (default TrainConfig()) with the keyword arguments that are not None, every
    value checked (rbkd.config's rules, each error naming the argument) before any work."""
    cfg = config if config is not None else TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"config must be an rbkd.TrainConfig, got {type(cfg).__name__}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg  # TrainConfig checks each
    check_epochs(cfg.epochs, "epochs")  # a run trains: at least one epoch
    return cfg


def eval_batch_size(batch_size: Any) -> int:
    """The batch size of an evaluation-only pass (soft labels): given, else TrainConfig's."""
    if batch_size is None:
        return TrainConfig().eval_batch_size
    return check_batch_size(batch_size, "batch_size")


def check_trainable(net: Any, what: str) -> None:
    """`net` can be trained by rbkd: float32 weights with data (not on `meta`), at least one
    parameter that requires a gradient. One line naming `what` and the fix otherwise."""
    name = f"{what} {type(net).__name__}"
    params = list(net.parameters())
    tensors = params + list(net.buffers())
    if any(t.is_meta for t in tensors):
        raise ValueError(
            f"{name} has weights on the meta device (shapes only, no values); materialise them "
            "first, e.g. model.to_empty(device='cpu') and then load_state_dict(...)"
        )
    if not params:
        raise ValueError(f"{name} has no parameters: there is nothing to train")
    if not any(p.requires_grad for p in params):
        raise ValueError(
            f"every parameter of {name} is frozen (requires_grad=False): there is nothing to "
            "train; unfreeze some, e.g. model.requires_grad_(True)"
        )
    wrong = sorted({str(t.dtype) for t in tensors if t.is_floating_point()} - {"torch.float32"})
    if wrong:
        raise ValueError(
            f"{name} has {', '.join(w.removeprefix('torch.') for w in wrong)} weights; rbkd "
            "trains in float32: convert it with model.float()"
        )


def zoo_dataset(data: ImageDataset) -> str:
    """The rbkd dataset whose models fit `data`: its own name, else the first (the default
    first) whose image shape and class count are the data's."""
    from rbkd.models import DATASET_SHAPES

    if data.name in DATASET_SHAPES:
        return data.name
    shape = tuple(data.images.shape[1:])
    fits = [n for n, (s, c) in DATASET_SHAPES.items() if (s, c) == (shape, data.num_classes)]
    if not data.is_float and fits:
        return DEFAULT_DATASET if DEFAULT_DATASET in fits else fits[0]
    known = ", ".join(f"{n} {list(s)} x {c} classes" for n, (s, c) in DATASET_SHAPES.items())
    raise ValueError(
        f"rbkd's models are built for uint8 images of {known}; the data is {data.images.dtype} "
        f"{list(shape)} with {data.num_classes} classes: pass your own nn.Module"
    )


def as_model(model: Any, data: ImageDataset, seed: int, what: str = "model"):
    """An nn.Module as it is, or rbkd's model `model` (a name) built for `data` from `seed`."""
    from torch import nn

    from rbkd.models import ARCHS, build_model

    if isinstance(model, nn.Module):
        return model
    if isinstance(model, str):
        if model not in ARCHS:
            raise ValueError(
                f"{what} {model!r} is not an rbkd model: choose one of {', '.join(ARCHS)}, or "
                "pass an nn.Module"
            )
        return build_model(zoo_dataset(data), model, seed=seed)
    raise ValueError(
        f"{what} must be an nn.Module or an rbkd model name ({', '.join(ARCHS)}), got "
        f"{type(model).__name__}"
    )


def teacher_device(teacher: Any, device: Any):
    """`device` when given (a module is moved there), else where the module's weights are (the
    CPU for a function)."""
    import torch
    from torch import nn

    from rbkd.engine import resolve_device

    if device is not None:
        dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
        if isinstance(teacher, nn.Module):
            teacher.to(dev)
        return dev
    if isinstance(teacher, nn.Module):
        tensors = list(teacher.parameters()) or list(teacher.buffers())
        if tensors:
            return tensors[0].device
    return torch.device("cpu")
