"""CPU backend: the C++17 + OpenMP kernels of `rbkd._C` (csrc/cpu), behind the backend interface
of rbkd/ops/backends/__init__.py. Tensors go in as pointers; the caller has validated them.
"""

from __future__ import annotations

import os

import torch

from ._native import DTYPE_CODES, NativeKernels

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

# ---- sparse soft labels (issue 16): C++ where the kernels cover the call, else the torch twin ----
NATIVE_TAILS = (0, 1, 2)  # sparse_twin.TAIL_MODES: bucket, renormalize and sampled


def sparse_kd_forward(student, ids, topk, logz, labels, T, alpha, grad_scale, need_grad, tail,
                      opts, *more, **extra):  # fmt: skip
    """sparse_twin.sparse_kd_forward's contract: the C++ kernel for every tail on a float32 /
    float16 / bfloat16 student (sampled: its counts, sample_logz and sample_T in `more`); the
    twin for a float64 student."""
    if student.dtype in DTYPE_CODES and tail in NATIVE_TAILS:
        return _kernels.sparse_kd_forward(
            student, ids, topk, logz, labels, T, alpha, grad_scale, need_grad, tail, opts,
            *more, **extra,
        )  # fmt: skip
    from rbkd.ops import sparse_twin  # here: rbkd.ops imports this module

    return sparse_twin.sparse_kd_forward(
        student, ids, topk, logz, labels, T, alpha, grad_scale, need_grad, tail, opts,
        *more, **extra,
    )  # fmt: skip


def capture_rows(x, k, temps, samples, sample_T, generator):
    """capture.py's _capture_rows contract: top-k, logz and entropy from one C++ pass over the
    logits; the samples (samples > 0) from the torch twin's sampler, chunk by chunk as the twin
    draws them (the same generator gives the same draws)."""
    from rbkd.ops import capture  # here: rbkd.ops imports this module

    if x.dtype not in DTYPE_CODES:
        return capture._capture_rows(x, k, temps, samples, sample_T, generator)
    ids, vals, logz, entropy = _kernels.capture_forward(x, k, temps)
    if not samples:
        return ids, vals, logz, entropy, None, None
    n, vocab = x.shape
    s_ids = torch.empty(n, samples, dtype=torch.int32)
    s_counts = torch.empty(n, samples, dtype=torch.int32)
    bad = logz.isnan().any(-1)  # the non-finite rule's rows: NaN at every T
    step = max(1, capture.CHUNK_ELEMENTS // vocab)
    for r0 in range(0, n, step):
        part = slice(r0, min(n, r0 + step))
        s_ids[part], s_counts[part] = capture._sample(
            x[part].float(), bad[part], samples, sample_T, generator
        )
    return ids, vals, logz, entropy, s_ids, s_counts
