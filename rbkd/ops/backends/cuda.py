"""CUDA backend: the kernels of `rbkd._C_cuda` (csrc/cuda), behind the backend interface of
rbkd/ops/backends/__init__.py. Launches go on the current stream of the tensors' device and never
synchronise the host: a tensor grad_scale is passed as a device pointer, not read with .item().
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._native import NativeKernels

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


_kernels = NativeKernels(
    lib=_C_cuda,
    tail=_stream,
    on_device=lambda x: torch.cuda.device(x.device),
    host_side_scalars=False,
)
softmax_forward = _kernels.softmax_forward
softmax_backward = _kernels.softmax_backward
kd_loss_forward = _kernels.kd_loss_forward
entropy_forward = _kernels.entropy_forward
