"""Calling the compiled CPU kernels of `rbkd._C`: tensors in, the pointer ABI of csrc/README.md
out. The last argument of every entry point is the thread count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from types import ModuleType

import torch
from torch import Tensor

from rbkd.ops.args import EntropyOptions, KDOptions, SoftmaxOptions

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


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


@functools.lru_cache(maxsize=256)
def native_options(lib: ModuleType, record: KDOptions | EntropyOptions):
    """The C++ twin of an option record, field by field (the names are the same on both sides).

    Cached per record (records are frozen, and the kernels take the twin as const): building it
    was a fifth of a small kd_loss call's host time."""
    native = (lib.KdOptions if isinstance(record, KDOptions) else lib.EntropyOptions)()
    for field in fields(record):
        setattr(native, field.name, getattr(record, field.name))
    return native


@dataclass(frozen=True)
class NativeKernels:
    lib: ModuleType | None  # rbkd._C; None when not built

    @staticmethod
    def num_threads() -> int:
        return max(1, torch.get_num_threads())

    def softmax_forward(self, x: Tensor, opts: SoftmaxOptions) -> Tensor:
        x = unit_last_stride(x)
        n, c = x.shape
        out = torch.empty((n, c), dtype=x.dtype, device=x.device)
        self.lib.temperature_softmax_fwd(
            x.data_ptr(), dtype_code(x), row_stride(x), out.data_ptr(), n, c, float(opts.T),
            bool(opts.log), self.num_threads(),
        )  # fmt: skip
        return out

    def softmax_backward(self, y: Tensor, grad: Tensor, opts: SoftmaxOptions) -> Tensor:
        y = y.contiguous()
        grad = unit_last_stride(grad.to(y.dtype))  # e.g. the expanded ones of .sum().backward()
        n, c = y.shape
        grad_in = torch.empty((n, c), dtype=y.dtype, device=y.device)
        self.lib.temperature_softmax_bwd(
            y.data_ptr(), grad.data_ptr(), row_stride(grad), grad_in.data_ptr(), dtype_code(y),
            n, c, float(opts.T), bool(opts.log), self.num_threads(),
        )  # fmt: skip
        return grad_in

    def kd_loss_forward(
        self,
        student: Tensor,
        teacher: Tensor,
        labels: Tensor | None,
        T: float | Tensor,
        alpha: float | Tensor,
        grad_scale: float | Tensor,
        need_grad: bool,
        opts: KDOptions,
    ) -> tuple[Tensor, Tensor | None]:
        student, teacher = unit_last_stride(student), unit_last_stride(teacher)
        n, c = student.shape
        T_value, T_ptr, _T_keep = scalar_or_rows(T)
        alpha_value, alpha_ptr, _alpha_keep = scalar_or_rows(alpha)
        if labels is not None:  # the kernels read int64 (an int32 [N] costs one small copy)
            labels = labels.to(torch.int64).contiguous()
        # A tensor grad_scale goes in as a pointer that the kernel reads (no .item() here).
        scale_value, scale_ptr, _scale_keep = 1.0, 0, None
        if isinstance(grad_scale, Tensor):
            _scale_keep = grad_scale.to(device=student.device, dtype=torch.float32).reshape(1)
            scale_ptr = _scale_keep.data_ptr()
        else:
            scale_value = float(grad_scale)
        loss = torch.empty(n, dtype=torch.float32, device=student.device)
        grad = (
            torch.empty((n, c), dtype=student.dtype, device=student.device) if need_grad else None
        )
        self.lib.kd_loss_fwd(
            student.data_ptr(), dtype_code(student), row_stride(student),
            teacher.data_ptr(), dtype_code(teacher), row_stride(teacher),
            labels.data_ptr() if labels is not None else 0,
            T_value, T_ptr, alpha_value, alpha_ptr, n, c,
            loss.data_ptr(), grad.data_ptr() if grad is not None else 0,
            scale_value, scale_ptr, native_options(self.lib, opts), self.num_threads(),
        )  # fmt: skip
        return loss, grad

    def entropy_forward(self, x: Tensor, temps: Tensor, opts: EntropyOptions) -> Tensor:
        x = unit_last_stride(x)
        n, c = x.shape
        temps = temps.to(dtype=torch.float32).contiguous()
        k = temps.numel()
        out = torch.empty((k, n), dtype=torch.float32, device=x.device)
        self.lib.soft_label_entropy_fwd(
            x.data_ptr(), dtype_code(x), row_stride(x), temps.data_ptr(), k, n, c,
            out.data_ptr(), native_options(self.lib, opts), self.num_threads(),
        )  # fmt: skip
        return out

    def sparse_kd_forward(
        self,
        student: Tensor,
        ids: Tensor,
        topk: Tensor,
        logz: Tensor | None,
        labels: Tensor | None,
        T: float | Tensor,
        alpha: float | Tensor,
        grad_scale: float | Tensor,
        need_grad: bool,
        tail: int,
        opts: KDOptions,
        counts: Tensor | None = None,
        sample_logz: Tensor | None = None,
        sample_T: float = 1.0,
    ) -> tuple[Tensor, Tensor | None]:
        """sparse_twin.sparse_kd_forward's contract, in one C++ call (every tail).

        The O(N k) side inputs go in as contiguous float32 (topk, logz, sample_logz: the twin's
        compute dtype) and int64 labels and counts; the ids as they are (int32 or int64)."""
        student = unit_last_stride(student)
        n, vocab = student.shape
        k = ids.shape[1]
        ids = ids.contiguous()
        topk = topk.to(torch.float32).contiguous()
        if logz is not None:
            logz = logz.to(torch.float32).reshape(-1).contiguous()
        if labels is not None:
            labels = labels.to(torch.int64).contiguous()
        if counts is not None:
            counts = counts.to(torch.int64).contiguous()
        if sample_logz is not None:
            sample_logz = sample_logz.to(torch.float32).reshape(-1).contiguous()
        T_value, T_ptr, _T_keep = scalar_or_rows(T)
        alpha_value, alpha_ptr, _alpha_keep = scalar_or_rows(alpha)
        scale_value, scale_ptr, _scale_keep = 1.0, 0, None
        if isinstance(grad_scale, Tensor):
            _scale_keep = grad_scale.to(device=student.device, dtype=torch.float32).reshape(1)
            scale_ptr = _scale_keep.data_ptr()
        else:
            scale_value = float(grad_scale)
        loss = torch.empty(n, dtype=torch.float32, device=student.device)
        grad = (
            torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else None
        )
        self.lib.sparse_kd_loss_fwd(
            student.data_ptr(), dtype_code(student), row_stride(student),
            ids.data_ptr(), ids.dtype == torch.int64, topk.data_ptr(),
            logz.data_ptr() if logz is not None else 0,
            labels.data_ptr() if labels is not None else 0,
            T_value, T_ptr, alpha_value, alpha_ptr, n, vocab, k, int(tail),
            loss.data_ptr(), grad.data_ptr() if grad is not None else 0,
            scale_value, scale_ptr, native_options(self.lib, opts), self.num_threads(),
            counts.data_ptr() if counts is not None else 0,
            sample_logz.data_ptr() if sample_logz is not None else 0, float(sample_T),
        )  # fmt: skip
        return loss, grad

    def capture_forward(
        self, x: Tensor, k: int, temps: list[float]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(topk_ids [N, k] int32, topk_logits [N, k] x's dtype, logz [N, J], entropy [N, J])
        of logits x [N, V] in one C++ pass: capture.py's contract without the samples."""
        x = unit_last_stride(x)
        n, vocab = x.shape
        temps_t = torch.tensor(temps, dtype=torch.float32)
        j = temps_t.numel()
        ids = torch.empty((n, k), dtype=torch.int32)
        vals = torch.empty((n, k), dtype=x.dtype)
        logz = torch.empty((n, j), dtype=torch.float32)
        entropy = torch.empty((n, j), dtype=torch.float32)
        self.lib.capture_soft_labels_fwd(
            x.data_ptr(), dtype_code(x), row_stride(x), n, vocab, k, temps_t.data_ptr(), j,
            ids.data_ptr(), vals.data_ptr(), logz.data_ptr(), entropy.data_ptr(),
            self.num_threads(),
        )  # fmt: skip
        return ids, vals, logz, entropy
