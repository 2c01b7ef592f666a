"""Argument checks shared by the public ops. Each error names the argument and says what to do.

Checks on shapes, dtypes and Python scalars run in the public wrappers (torch.compile traces them
for free). Checks on tensor *values* (labels in range, per-row temperatures and alphas,
probability rows) need the values on the host, which on a GPU would stall the stream on every
call; they run inside the registered ops, and only where that costs nothing or was asked for:

    RBKD_CHECKS unset or "default": value checks for CPU tensors; none for CUDA tensors, whose
                                   kernels give every bad row a defined result instead (NaN).
    RBKD_CHECKS=full:              value checks on every device (a host sync per call on a GPU),
                                   and a row that would get NaN (non-finite teacher or student,
                                   see the loss convention in the README) is an error.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from rbkd.ops.args import DIVERGENCES
from rbkd.ops.args import KD_MAX_TEMPERATURE as KD_MAX_TEMPERATURE  # re-exported
from rbkd.ops.args import TEACHER_KINDS as TEACHER_KINDS  # re-exported

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
# Rows of probabilities must sum to 1 within this, loose enough for float16/bfloat16 inputs.
PROBS_SUM_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# kd_loss refuses temperatures above KD_MAX_TEMPERATURE (rbkd.ops.args says why).
CHECK_MODES = ("default", "full")
LABEL_DTYPES = (torch.int64, torch.int32)


def checks_mode() -> str:
    """RBKD_CHECKS: "default" (value checks for CPU tensors only) or "full" (everywhere)."""
    mode = (os.environ.get("RBKD_CHECKS") or "default").strip().lower()
    if mode not in CHECK_MODES:
        raise ValueError(f"RBKD_CHECKS must be 'default' or 'full', got {mode!r}")
    return mode


def host_reads_are_free(device: torch.device) -> bool:
    """Reading a tensor value on the host costs nothing for CPU tensors; on a GPU it is a sync.
    (The one place the ops decide this: tests switch it off to run the GPU code path on a CPU.)"""
    return device.type == "cpu"


def host_value_checks(device: torch.device) -> bool:
    """Whether the ops read tensor values on the host to check them (never on a GPU by default)."""
    return host_reads_are_free(device) or checks_mode() == "full"


def probs_tolerance(dtype: torch.dtype) -> float:
    return PROBS_SUM_TOLERANCE.get(dtype, 1e-3)


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


def check_temperature(
    name: str, T: object, n: int, device: torch.device, max_T: float | None = None
) -> float | Tensor:
    """A positive finite float (at most max_T), or a 1-D tensor of n per-row values (checked in
    the op)."""
    if isinstance(T, Tensor):
        return _per_row_tensor(name, T, n, device)
    T = _python_number(name, T)
    if not math.isfinite(T) or T <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {T}")
    if max_T is not None and T > max_T:
        raise ValueError(
            f"{name} = {T:.15g} is above {max_T:g}, the largest temperature kd_loss computes "
            "accurately in float32; use a smaller T"
        )
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


def _finite_number(name: str, x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return float(x)


def check_divergence_options(
    divergence: object,
    beta: object,
    skew: object,
    dkd_alpha: object,
    dkd_beta: object,
    standardize: object,
    teacher_kind: str,
    labels: Tensor | None,
) -> dict:
    """kd_loss's divergence arguments as KDOptions fields; each error names the argument."""
    code = check_choice("divergence", divergence, DIVERGENCES)
    beta = _finite_number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"beta must be in [0, 1] (the teacher's weight in the mixture), got {beta}"
        )
    skew = _finite_number("skew", skew)
    if not 0.0 <= skew < 1.0:
        raise ValueError(
            f"skew must be in [0, 1) (1 would compare a distribution with itself), got {skew}"
        )
    dkd_alpha, dkd_beta = (
        _finite_number("dkd_alpha", dkd_alpha),
        _finite_number("dkd_beta", dkd_beta),
    )
    if dkd_alpha < 0 or dkd_beta < 0:
        raise ValueError(f"dkd_alpha and dkd_beta must be >= 0, got {dkd_alpha} and {dkd_beta}")
    if not isinstance(standardize, bool):
        raise TypeError(f"standardize must be True or False, got {type(standardize).__name__}")
    if divergence == "dkd" and labels is None:
        raise ValueError(
            "divergence='dkd' needs labels: it splits the target class from the others; pass "
            "labels, or choose another divergence for an unlabelled transfer set"
        )
    if standardize and teacher_kind != "logits":
        raise ValueError(
            f"standardize=True z-scores logits: it needs teacher_kind='logits', got {teacher_kind!r}"
        )
    return {"divergence": code, "beta": beta, "skew": skew, "dkd_alpha": dkd_alpha,
            "dkd_beta": dkd_beta, "standardize": standardize}  # fmt: skip


def check_kd_inputs(student: Tensor, teacher: Tensor, labels: Tensor | None) -> None:
    """student and teacher [..., C] of one shape; labels None or int64/int32 of the leading shape."""
    check_float_tensor("student_logits", student)
    check_float_tensor("teacher", teacher)
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher has shape {tuple(teacher.shape)} but student_logits has {tuple(student.shape)}; "
            "they must match [..., C]"
        )
    if teacher.device != student.device:
        raise ValueError(
            f"teacher is on {teacher.device} but student_logits is on {student.device}"
        )
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"labels must be int64 or int32, got {_dtype_name(labels.dtype)}; use labels.long()"
        )
    if labels.shape != student.shape[:-1]:
        raise ValueError(
            f"labels must have shape {list(student.shape[:-1])} (the logits' leading shape), "
            f"got {list(labels.shape)}"
        )
    if labels.device != student.device:
        raise ValueError(f"labels is on {labels.device} but student_logits is on {student.device}")


# ---- value checks, run inside the registered ops where host_value_checks() allows -------------


def _first_row(bad: Tensor) -> int | None:
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def label_span(labels: Tensor) -> tuple[int, int] | None:
    """(min, max) of the labels, read on the host; None when empty. One pass: the common case, every
    label in [0, C), is then settled without the element-wise checks (8 ops over [N] otherwise:
    0.2 ms of a 65536-row kd_loss whose kernel takes 1.5 ms)."""
    if labels.numel() == 0:
        return None
    lo, hi = labels.aminmax()
    return int(lo), int(hi)


def check_label_values(
    labels: Tensor, num_classes: int, ignore_index: int, span: tuple[int, int] | None = None
) -> None:
    """Raises on a label outside [0, C) that is not ignore_index. span: label_span(labels) when
    the caller has it."""
    if labels.numel() == 0:
        return
    lo, hi = span if span is not None else label_span(labels)
    if lo >= 0 and hi < num_classes:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    row = _first_row(bad)
    if row is not None:
        raise ValueError(
            f"labels[{row}] = {int(labels[row])} is outside [0, {num_classes}) and is not "
            f"ignore_index ({ignore_index})"
        )


def check_temperature_values(name: str, T: Tensor, max_T: float | None = None) -> None:
    bad = ~torch.isfinite(T) | (T <= 0)
    if max_T is not None:
        bad |= T > max_T
    row = _first_row(bad)
    if row is not None:
        limit = "finite and > 0" if max_T is None else f"in (0, {max_T:g}]"
        raise ValueError(f"{name}[{row}] = {float(T[row])}: temperatures must be {limit}")


def check_alpha_values(alpha: Tensor) -> None:
    row = _first_row(~((alpha >= 0) & (alpha <= 1)))
    if row is not None:
        raise ValueError(f"alpha[{row}] = {float(alpha[row])} is outside [0, 1]")


def nonfinite_rows(x: Tensor) -> Tensor:
    """Rows holding NaN or +inf, or no finite value: the rows the non-finite rule makes NaN."""
    return x.isnan().any(-1) | (x == math.inf).any(-1) | ~(x > -math.inf).any(-1)


def check_finite_rows(name: str, x: Tensor, counted: Tensor | None = None) -> None:
    """Under RBKD_CHECKS=full: a row that the non-finite rule would make NaN is an error."""
    if x.numel() == 0 or checks_mode() != "full":
        return
    bad = nonfinite_rows(x)
    if counted is not None:
        bad &= counted
    row = _first_row(bad)
    if row is not None:
        raise ValueError(
            f"{name} row {row} holds NaN or +inf or no finite value, so its loss would be NaN "
            "(RBKD_CHECKS=full makes this an error); check what produced it"
        )


def check_probability_rows(
    name: str, x: Tensor, *, log: bool = False, counted: Tensor | None = None
) -> None:
    """Rows of probabilities (log-probabilities with log=True) must hold mass 1 within the dtype's
    tolerance, and no negative probability. Rows with NaN, +inf or no finite value follow the
    non-finite rule (NaN results) and are errors only under RBKD_CHECKS=full."""
    if x.numel() == 0:
        return
    tol = probs_tolerance(x.dtype)
    x32 = x.float()
    p = x32.exp() if log else x32
    sums = p.sum(-1)
    nonfinite = x32.isnan().any(-1) | (x32 == math.inf).any(-1)
    if log:
        nonfinite |= ~(x32 > -math.inf).any(-1)
    bad = ((sums - 1).abs() > tol) | (p < 0).any(-1)
    bad &= ~nonfinite
    if counted is not None:
        bad &= counted
    row = _first_row(bad)
    if row is not None:
        what = "log-probabilities (log-sum-exp 0)" if log else "probabilities (>= 0, summing to 1)"
        total = "exp sums" if log else "sums"
        raise ValueError(
            f"{name} rows must be {what}: row {row} {total} to {float(sums[row]):.6g}; "
            "pass teacher_kind='logits' for raw logits"
        )
    check_finite_rows(name, x, counted)
