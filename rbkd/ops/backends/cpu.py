"""CPU backend: the C++17 + OpenMP kernels of `rbkd._C` (csrc/cpu), behind the backend interface
of rbkd/ops/backends/__init__.py. Tensors go in as pointers; the caller has validated them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

# Our kernels run on libgomp. torch's Linux wheels ship a libgomp.so.1 too: when it is already
# loaded (torch imported first), rbkd._C binds to that same runtime and its thread pool is shared.
# Where a build carries a second, separately named runtime, both would keep idle threads spinning
# after each parallel region and fight for the same cores (on a 2-core machine that halves the
# other runtime's speed). A passive wait policy makes our idle threads sleep at once. libgomp reads
# it when it is loaded, so it must be set before rbkd._C is imported; setdefault keeps a user's
# choice. Every call also passes num_threads = torch.get_num_threads(), so the two never
# oversubscribe by thread count.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:  # the compiled module is optional: without it this backend is merely unavailable
    from rbkd import _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None

NAME = "cpu"

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def is_available() -> bool:
    return _C is not None


def supports(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu"


def dtype_code(x: Tensor) -> int:
    try:
        return DTYPE_CODES[x.dtype]
    except KeyError:
        raise TypeError(f"rbkd kernels take float32, float16 or bfloat16, got {x.dtype}") from None


def unit_last_stride(x: Tensor) -> Tensor:
    """x itself when its rows are unit-stride (any row stride), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.size(-1) <= 1 else x.contiguous()


def row_stride(x: Tensor) -> int:
    return x.stride(0) if x.size(0) > 1 else x.size(1)


def scalar_or_rows(value: float | Tensor) -> tuple[float, int, Tensor | None]:
    """(scalar, pointer to float32 [N] or 0, tensor to keep alive) for T / alpha."""
    if isinstance(value, Tensor):
        rows = value.to(torch.float32).contiguous()
        return 1.0, rows.data_ptr(), rows
    return float(value), 0, None


def _num_threads() -> int:
    return max(1, torch.get_num_threads())


def softmax_forward(x: Tensor, T: float, log: bool) -> Tensor:
    x = unit_last_stride(x)
    n, c = x.shape
    out = torch.empty((n, c), dtype=x.dtype, device=x.device)
    _C.temperature_softmax_fwd(
        x.data_ptr(),
        dtype_code(x),
        row_stride(x),
        out.data_ptr(),
        n,
        c,
        float(T),
        bool(log),
        _num_threads(),
    )
    return out


def softmax_backward(y: Tensor, grad: Tensor, T: float, log: bool) -> Tensor:
    y = y.contiguous()
    grad = unit_last_stride(grad.to(y.dtype))  # e.g. the expanded ones of .sum().backward()
    n, c = y.shape
    grad_in = torch.empty((n, c), dtype=y.dtype, device=y.device)
    _C.temperature_softmax_bwd(
        y.data_ptr(),
        grad.data_ptr(),
        row_stride(grad),
        grad_in.data_ptr(),
        dtype_code(y),
        n,
        c,
        float(T),
        bool(log),
        _num_threads(),
    )
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
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, c), dtype=student.dtype, device=student.device) if need_grad else None
    _C.kd_loss_fwd(
        student.data_ptr(), dtype_code(student), row_stride(student),
        teacher.data_ptr(), dtype_code(teacher), row_stride(teacher), int(teacher_kind),
        labels.data_ptr() if labels is not None else 0, int(ignore_index),
        T_value, T_ptr, alpha_value, alpha_ptr, bool(t_squared), n, c,
        loss.data_ptr(), grad.data_ptr() if grad is not None else 0,
        float(grad_scale), 0, _num_threads(),
    )  # fmt: skip
    return loss, grad


def entropy_forward(x: Tensor, temps: Tensor, kind: int, normalize: bool) -> Tensor:
    x = unit_last_stride(x)
    n, c = x.shape
    temps = temps.to(device="cpu", dtype=torch.float32).contiguous()
    k = temps.numel()
    out = torch.empty((k, n), dtype=torch.float32, device=x.device)
    _C.soft_label_entropy_fwd(
        x.data_ptr(),
        dtype_code(x),
        row_stride(x),
        int(kind),
        temps.data_ptr(),
        k,
        n,
        c,
        out.data_ptr(),
        bool(normalize),
        _num_threads(),
    )
    return out
