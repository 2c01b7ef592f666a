"""Triton backend: the kernels of rbkd.kernels behind the interface of rbkd.ops.backends.

Serves CUDA tensors. Under TRITON_INTERPRET=1 it also accepts CPU tensors, so the kernels can be
tested on a machine without a GPU (slowly: the interpreter runs each program in numpy). The
variable is read when this is asked, but Triton reads it when a kernel module is imported, so it
must be set before anything imports triton.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from rbkd import kernels

NAME = "triton"


def is_available() -> bool:
    return kernels.TRITON_AVAILABLE


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def softmax_forward(x: Tensor, T: float | Tensor, log: bool) -> Tensor:
    return kernels.temperature_softmax_forward(x, T, log)


def softmax_backward(y: Tensor, grad: Tensor, T: float | Tensor, log: bool) -> Tensor:
    return kernels.temperature_softmax_backward(y, grad, T, log)


def kd_loss_forward(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    T: float | Tensor,
    alpha: float | Tensor,
    teacher_kind: int,
    t_squared: bool,
    ignore_index: int,
    grad_scale: float | Tensor,
    need_grad: bool,
    probs_tol: float = 1e-3,
) -> tuple[Tensor, Tensor | None]:
    return kernels.kd_loss_forward(
        student, teacher, labels, T, alpha, teacher_kind, t_squared, ignore_index,
        grad_scale, need_grad, probs_tol,
    )  # fmt: skip


def entropy_forward(
    x: Tensor, temps: Tensor, kind: int, normalize: bool, probs_tol: float = 1e-3
) -> Tensor:
    return kernels.soft_label_entropy_forward(x, temps, kind, normalize, probs_tol)
