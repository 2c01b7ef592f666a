"""Argument checks shared by the public ops. Each error names the argument and says what to do.

Checks on shapes, dtypes and Python scalars run in the public wrappers (torch.compile traces them
for free); checks on tensor *values* (labels in range, per-row temperatures, probability rows) run
inside the registered ops, where they cost no graph break.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TEACHER_KINDS = {"logits": 0, "probs": 1, "log_probs": 2}
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
# Rows of probabilities must sum to 1 within this, loose enough for float16/bfloat16 inputs.
PROBS_SUM_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_float_tensor(name: str, x: object, *, dims: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {_dtype_name(x.dtype)}; "
            f"convert it with {name}.float()"
        )
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D [N, C], got shape {tuple(x.shape)}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a class dimension, got a 0-D tensor")
    return x


def _per_row_tensor(name: str, x: Tensor, n: int, device: torch.device) -> Tensor:
    """A per-row hyperparameter: 1-D, floating point, one value per row, on the logits' device."""
    if x.dim() != 1 or x.shape[0] != n:
        raise ValueError(
            f"{name} as a tensor must be 1-D with one value per row ({n}), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} as a tensor must be floating point, got {_dtype_name(x.dtype)}")
    if x.device != device:
        raise ValueError(
            f"{name} is on {x.device} but the logits are on {device}; move it with .to()"
        )
    return x  # its values are checked inside the op (check_temperature_values / check_alpha_values)


def _python_number(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float or a 1-D tensor, got {type(x).__name__}")
    return float(x)


def check_temperature(name: str, T: object, n: int, device: torch.device) -> float | Tensor:
    """A positive finite float, or a 1-D tensor of n per-row values (checked in the op)."""
    if isinstance(T, Tensor):
        return _per_row_tensor(name, T, n, device)
    T = _python_number(name, T)
    if not math.isfinite(T) or T <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {T}")
    return T


def check_alpha(alpha: object, n: int, device: torch.device) -> float | Tensor:
    if isinstance(alpha, Tensor):
        return _per_row_tensor("alpha", alpha, n, device)
    alpha = _python_number("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def check_choice(name: str, value: object, choices: dict[str, int]) -> int:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return choices[value]


def check_kd_inputs(student: Tensor, teacher: Tensor, labels: Tensor | None) -> None:
    check_float_tensor("student_logits", student, dims=2)
    check_float_tensor("teacher", teacher, dims=2)
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher has shape {tuple(teacher.shape)} but student_logits has {tuple(student.shape)}; "
            "they must match [N, C]"
        )
    if teacher.device != student.device:
        raise ValueError(
            f"teacher is on {teacher.device} but student_logits is on {student.device}"
        )
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {_dtype_name(labels.dtype)}; use labels.long()")
    if labels.shape != student.shape[:1]:
        raise ValueError(f"labels must have shape [{student.shape[0]}], got {tuple(labels.shape)}")
    if labels.device != student.device:
        raise ValueError(f"labels is on {labels.device} but student_logits is on {student.device}")


# ---- value checks, run inside the registered ops ------------------------------------------------


def check_label_values(labels: Tensor, num_classes: int, ignore_index: int) -> bool:
    """Raises on a label outside [0, C) that is not ignore_index; True when no row is ignored."""
    if labels.numel() == 0:
        return True
    low, high = torch.aminmax(labels)  # one pass; the full search runs only if something is off
    if int(low) >= 0 and int(high) < num_classes:
        return not (0 <= ignore_index < num_classes) or not bool((labels == ignore_index).any())
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{row}] = {int(labels[row])} is outside [0, {num_classes}) and is not "
            f"ignore_index ({ignore_index})"
        )
    return False


def check_temperature_values(name: str, T: Tensor) -> None:
    bad = ~torch.isfinite(T) | (T <= 0)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{row}] = {float(T[row])}: temperatures must be finite and > 0")


def check_alpha_values(alpha: Tensor) -> None:
    bad = ~((alpha >= 0) & (alpha <= 1))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"alpha[{row}] = {float(alpha[row])} is outside [0, 1]")


def check_probability_rows(name: str, p: Tensor) -> None:
    if p.numel() == 0:
        return
    tol = PROBS_SUM_TOLERANCE.get(p.dtype, 1e-3)
    sums = p.float().sum(-1)
    bad = ((sums - 1).abs() > tol) | (p < 0).any(-1) | ~torch.isfinite(sums)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} rows must be probabilities (>= 0, summing to 1): row {row} sums to "
            f"{float(sums[row]):.6g}; pass teacher_kind='logits' for raw logits"
        )
