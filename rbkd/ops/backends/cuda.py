"""CUDA backend: the kernels of `rbkd._C_cuda` (csrc/cuda), behind the backend interface of
rbkd/ops/backends/__init__.py. Launches go on the current stream of the tensors' device and never
synchronise the host: a tensor grad_scale is passed as a device pointer, not read with .item().
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cpu import dtype_code, row_stride, scalar_or_rows, unit_last_stride

try:  # built only where nvcc was found; importing it needs the CUDA driver library
    from rbkd import _C_cuda
except ImportError:  # pragma: no cover - depends on the build and the machine
    _C_cuda = None

NAME = "cuda"


def is_available() -> bool:
    return _C_cuda is not None


def supports(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def _stream(x: Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def softmax_forward(x: Tensor, T: float, log: bool) -> Tensor:
    x = unit_last_stride(x)
    n, c = x.shape
    out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        _C_cuda.temperature_softmax_fwd(
            x.data_ptr(), dtype_code(x), row_stride(x), out.data_ptr(), n, c, float(T), bool(log),
            _stream(x),
        )  # fmt: skip
    return out


def softmax_backward(y: Tensor, grad: Tensor, T: float, log: bool) -> Tensor:
    y = y.contiguous()
    grad = unit_last_stride(grad.to(y.dtype))
    n, c = y.shape
    grad_in = torch.empty((n, c), dtype=y.dtype, device=y.device)
    with torch.cuda.device(y.device):
        _C_cuda.temperature_softmax_bwd(
            y.data_ptr(), grad.data_ptr(), row_stride(grad), grad_in.data_ptr(), dtype_code(y),
            n, c, float(T), bool(log), _stream(y),
        )  # fmt: skip
    return grad_in


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
) -> tuple[Tensor, Tensor | None]:
    student, teacher = unit_last_stride(student), unit_last_stride(teacher)
    n, c = student.shape
    T_value, T_ptr, _T_keep = scalar_or_rows(T)
    alpha_value, alpha_ptr, _alpha_keep = scalar_or_rows(alpha)
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()
    scale_value, scale_ptr, _scale_keep = 1.0, 0, None
    if isinstance(grad_scale, Tensor):
        _scale_keep = grad_scale.to(device=student.device, dtype=torch.float32).reshape(1)
        scale_ptr = _scale_keep.data_ptr()
    else:
        scale_value = float(grad_scale)
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, c), dtype=student.dtype, device=student.device) if need_grad else None
    with torch.cuda.device(student.device):
        _C_cuda.kd_loss_fwd(
            student.data_ptr(), dtype_code(student), row_stride(student),
            teacher.data_ptr(), dtype_code(teacher), row_stride(teacher), int(teacher_kind),
            labels.data_ptr() if labels is not None else 0, int(ignore_index),
            T_value, T_ptr, alpha_value, alpha_ptr, bool(t_squared), n, c,
            loss.data_ptr(), grad.data_ptr() if grad is not None else 0,
            scale_value, scale_ptr, _stream(student),
        )  # fmt: skip
    return loss, grad


def entropy_forward(x: Tensor, temps: Tensor, kind: int, normalize: bool) -> Tensor:
    x = unit_last_stride(x)
    n, c = x.shape
    temps = temps.to(device=x.device, dtype=torch.float32).contiguous()
    k = temps.numel()
    out = torch.empty((k, n), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _C_cuda.soft_label_entropy_fwd(
            x.data_ptr(), dtype_code(x), row_stride(x), int(kind), temps.data_ptr(), k, n, c,
            out.data_ptr(), bool(normalize), _stream(x),
        )  # fmt: skip
    return out
