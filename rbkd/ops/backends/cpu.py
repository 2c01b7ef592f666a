"""CPU backend: the C++17 + OpenMP kernels of `rbkd._C` (csrc/cpu), behind the backend interface
of rbkd/ops/backends/__init__.py. Tensors go in as pointers; the caller has validated them.
"""

from __future__ import annotations

import os

import torch

from ._native import NativeKernels

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


def is_available() -> bool:
    return _C is not None


def supports(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu"


_kernels = NativeKernels(lib=_C)
softmax_forward = _kernels.softmax_forward
softmax_backward = _kernels.softmax_backward
kd_loss_forward = _kernels.kd_loss_forward
entropy_forward = _kernels.entropy_forward
