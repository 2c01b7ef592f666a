"""Soft labels from any teacher: an nn.Module or a function mapping a batch to logits.

The teacher sees exactly what a student trained on the same data sees (`dataset.normalize` of
each batch), in eval mode and without gradients. Its output must be logits [batch, C] (a
Hugging Face style output with a `.logits` field is read through it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rbkd.data.dataset import ImageDataset


def teacher_device(teacher: Any, device: str | torch.device | None) -> torch.device:
    """`device` when given (a module is moved there), else where the module's weights are (the
    CPU for a function)."""
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


def _as_logits(out: Any, rows: int, name: str) -> Tensor:
    out = getattr(out, "logits", out)
    if not isinstance(out, Tensor):
        raise ValueError(f"teacher {name} returned {type(out).__name__}; it must return logits")
    if out.dim() != 2 or out.shape[0] != rows or not out.dtype.is_floating_point:
        raise ValueError(
            f"teacher {name} returned {out.dtype} {list(out.shape)} for a batch of {rows}; it "
            f"must return float logits [{rows}, num_classes]"
        )
    return out.detach().float().cpu()


def _weights_dtype(teacher: Any, name: str) -> torch.dtype | None:
    """The floating dtype a module's weights hold (its inputs are cast to it: a float64 or
    float16 teacher answers in float32 logits all the same); None for a function. A module on
    the meta device has no values to answer with: one line."""
    if not isinstance(teacher, nn.Module):
        return None
    tensors = [*teacher.parameters(), *teacher.buffers()]
    if any(t.is_meta for t in tensors):
        raise ValueError(
            f"teacher {name} has weights on the meta device (shapes only, no values); load its "
            "weights first, e.g. model.to_empty(device='cpu') and then load_state_dict(...)"
        )
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


@torch.no_grad()
def teacher_logits(
    teacher: Any, dataset: ImageDataset, *, device: torch.device, batch_size: int
) -> Tensor:
    """The teacher's logits for every row of `dataset`, float32 [N, C] on the CPU, in order."""
    if not callable(teacher):
        raise ValueError(
            f"teacher must be an nn.Module or a function of a batch, got {type(teacher).__name__}"
        )
    name = type(teacher).__name__ if isinstance(teacher, nn.Module) else repr(teacher)
    dtype = _weights_dtype(teacher, name)
    was_training = isinstance(teacher, nn.Module) and teacher.training
    if isinstance(teacher, nn.Module):
        teacher.eval()  # dropout off, BatchNorm's running statistics: the teacher's answers
    try:
        parts = []
        for start in range(0, len(dataset), batch_size):
            x = dataset.images[start : start + batch_size].to(device)
            x = dataset.normalize(x)
            out = teacher(x.to(dtype) if dtype is not None and x.is_floating_point() else x)
            parts.append(_as_logits(out, x.shape[0], name))
    finally:
        if was_training:
            teacher.train()
    logits = torch.cat(parts) if parts else torch.zeros(0, dataset.num_classes)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(1).nonzero()[0])
        raise ValueError(f"teacher {name} returned NaN or inf logits (first at row {bad})")
    return logits
