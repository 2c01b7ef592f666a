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
from rbkd.ops.args import EntropyOptions, KDOptions, SoftmaxOptions

NAME = "triton"


def is_available() -> bool:
    return kernels.TRITON_AVAILABLE


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def softmax_forward(x: Tensor, opts: SoftmaxOptions) -> Tensor:
    return kernels.temperature_softmax_forward(x, opts.T, opts.log)


def softmax_backward(y: Tensor, grad: Tensor, opts: SoftmaxOptions) -> Tensor:
    return kernels.temperature_softmax_backward(y, grad, opts.T, opts.log)


def kd_loss_forward(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    T: float | Tensor,
    alpha: float | Tensor,
    grad_scale: float | Tensor,
    need_grad: bool,
    opts: KDOptions,
) -> tuple[Tensor, Tensor | None]:
    return kernels.kd_loss_forward(student, teacher, labels, T, alpha, grad_scale, need_grad, opts)


def entropy_forward(x: Tensor, temps: Tensor, opts: EntropyOptions) -> Tensor:
    return kernels.soft_label_entropy_forward(x, temps, opts)
