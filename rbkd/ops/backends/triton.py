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


# ---- sparse soft labels (issue 16): the kernels where they cover the call, else the torch twin ----
KERNEL_TAILS = (0, 1)  # sparse_twin.TAIL_MODES bucket and renormalize
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sparse_kd_forward(student, ids, topk, logz, labels, T, alpha, grad_scale, need_grad, tail,
                      opts, *more, **extra):  # fmt: skip
    """sparse_twin.sparse_kd_forward's contract (backends/cpu.py's signature): the Triton kernel
    (kernels/sparse_kd.py) for tail bucket / renormalize on a float32 / float16 / bfloat16
    student with k <= its MAX_K ids; the twin for anything else (tail="sampled", a float64
    student), whose further arguments pass through unchanged."""
    from rbkd.kernels import sparse_kd

    if student.dtype in KERNEL_DTYPES and tail in KERNEL_TAILS and ids.shape[1] <= sparse_kd.MAX_K:
        return sparse_kd.sparse_kd_forward(
            student, ids, topk, logz, labels, T, alpha, grad_scale, need_grad, tail, opts
        )
    from rbkd.ops import sparse_twin  # here: rbkd.ops imports this module

    return sparse_twin.sparse_kd_forward(
        student, ids, topk, logz, labels, T, alpha, grad_scale, need_grad, tail, opts,
        *more, **extra,
    )  # fmt: skip


def capture_rows(x, k, temps, samples, sample_T, generator):
    """capture.py's _capture_rows contract (backends/cpu.py's signature): top-k by torch.topk on
    the device, logz and entropy at every T from one kernel read per row (kernels/capture.py),
    the samples (samples > 0) from the torch twin's sampler, chunk by chunk as the twin draws them
    (the same generator gives the same draws)."""
    from rbkd.kernels import capture as capture_kernel
    from rbkd.ops import capture  # here: rbkd.ops imports this module

    if x.dtype not in KERNEL_DTYPES:
        return capture._capture_rows(x, k, temps, samples, sample_T, generator)
    ids, vals, logz, entropy = capture_kernel.capture_forward(x, k, temps)
    if not samples:
        return ids, vals, logz, entropy, None, None
    n, vocab = x.shape
    s_ids = torch.empty(n, samples, dtype=torch.int32, device=x.device)
    s_counts = torch.empty(n, samples, dtype=torch.int32, device=x.device)
    bad = logz.isnan().any(-1)  # the non-finite rule's rows: NaN at every T
    step = max(1, capture.CHUNK_ELEMENTS // vocab)
    for r0 in range(0, n, step):
        part = slice(r0, min(n, r0 + step))
        s_ids[part], s_counts[part] = capture._sample(
            x[part].float(), bad[part], samples, sample_T, generator
        )
    return ids, vals, logz, entropy, s_ids, s_counts
