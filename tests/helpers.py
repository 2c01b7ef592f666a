"""Shared test helpers: float64 oracles, tolerances and a comparison that says where it failed."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from rbkd.ops.backends import reference

TOLERANCES = {  # (atol, rtol) against the float64 oracle, per input dtype
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def cpu_backends() -> list[str]:
    """Backends that run CPU tensors here: the reference, the C++ kernels, Triton when interpreted."""
    from rbkd.ops import available_backends

    names = [b for b in ("torch", "cpu") if b in available_backends()]
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in available_backends():
        names.append("triton")
    return names


def assert_close(actual: Tensor, expected: Tensor, atol: float, rtol: float, what: str) -> None:
    """torch.testing-style check that reports the first mismatched index and NaN/inf mismatches."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    same_nonfinite = (a == e) | (a.isnan() & e.isnan())
    bad = ~(((a - e).abs() <= atol + rtol * e.abs()) | same_nonfinite)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ; first at {idx}: "
            f"got {float(a[idx])!r}, expected {float(e[idx])!r} (atol={atol}, rtol={rtol})"
        )


def kd_oracle(
    student, teacher, labels, *, T, alpha, teacher_kind, t_squared, ignore_index, reduction
):
    """Loss and gradient in float64 from the autograd of the reference's per-row formula."""
    kinds = {"logits": 0, "probs": 1, "log_probs": 2}
    z = student.detach().double().requires_grad_(True)
    t = teacher.detach().double()
    T64 = T.double() if isinstance(T, Tensor) else T
    a64 = alpha.double() if isinstance(alpha, Tensor) else alpha
    rows = reference.kd_loss_rows(
        z, t, labels, T64, a64, kinds[teacher_kind], t_squared, ignore_index
    )
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        n_valid = rows.numel() if labels is None else int((labels != ignore_index).sum())
        loss = rows.sum() / max(n_valid, 1)
    loss.sum().backward() if loss.numel() else None
    grad = z.grad if z.grad is not None else torch.zeros_like(z)
    return loss.detach(), grad
