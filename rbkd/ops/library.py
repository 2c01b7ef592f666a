"""The fused ops registered with torch.library, so torch.compile traces models that call them.

Each op picks its backend at run time from the tensors' device (rbkd.ops.dispatch); the fake
(meta) implementations give torch.compile shapes without running anything.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rbkd.ops import validation as v
from rbkd.ops.dispatch import select_backend

_MEAN, _SUM, _NONE = v.REDUCTIONS["mean"], v.REDUCTIONS["sum"], v.REDUCTIONS["none"]


def _rows(x: Tensor) -> Tensor:
    """[..., C] as [N, C] with a unit stride in the class dimension (a copy only if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---- temperature softmax -------------------------------------------------------------------------


@torch.library.custom_op("rbkd::temperature_softmax", mutates_args=())
def temperature_softmax_op(x: Tensor, T: float, log: bool) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    out = select_backend(x.device).softmax_forward(_rows(x), T, log)
    return out.reshape(x.shape)


@temperature_softmax_op.register_fake
def _(x: Tensor, T: float, log: bool) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("rbkd::temperature_softmax_backward", mutates_args=())
def temperature_softmax_backward_op(y: Tensor, grad: Tensor, T: float, log: bool) -> Tensor:
    if y.numel() == 0:
        return torch.empty_like(y)
    grad_rows = _rows(grad.to(y.dtype))
    out = select_backend(y.device).softmax_backward(_rows(y).contiguous(), grad_rows, T, log)
    return out.reshape(y.shape)


@temperature_softmax_backward_op.register_fake
def _(y: Tensor, grad: Tensor, T: float, log: bool) -> Tensor:
    return torch.empty_like(y)


def _softmax_setup(ctx, inputs, output) -> None:
    _, ctx.T, ctx.log = inputs
    ctx.save_for_backward(output)


def _softmax_backward(ctx, grad: Tensor):
    (y,) = ctx.saved_tensors
    return temperature_softmax_backward_op(y, grad, ctx.T, ctx.log), None, None


temperature_softmax_op.register_autograd(_softmax_backward, setup_context=_softmax_setup)


# ---- KD loss -------------------------------------------------------------------------------------


def kd_loss_impl(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    T_rows: Tensor | None,
    T: float,
    alpha_rows: Tensor | None,
    alpha: float,
    teacher_kind: int,
    t_squared: bool,
    ignore_index: int,
    reduction: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (loss, saved gradient of the reduced loss w.r.t. student; empty if not needed)."""
    n, c = student.shape
    every_row_counts = labels is None or v.check_label_values(labels, c, ignore_index)
    if T_rows is not None:
        v.check_temperature_values("T", T_rows)
        T_rows = T_rows.to(torch.float32).contiguous()
    if alpha_rows is not None:
        v.check_alpha_values(alpha_rows)
        alpha_rows = alpha_rows.to(torch.float32).contiguous()
    if teacher_kind == v.TEACHER_KINDS["probs"]:
        v.check_probability_rows("teacher", teacher)

    grad_scale: float | Tensor = 1.0
    if reduction == _MEAN:
        if every_row_counts:  # the common case needs no count at all
            grad_scale = 1.0 / max(n, 1)
        else:  # the count stays on the device: the GPU kernels read it through a pointer
            count = (labels != ignore_index).sum().clamp_min(1).to(torch.float32)
            grad_scale = count.reciprocal()
            if student.device.type == "cpu":
                grad_scale = float(grad_scale)
    if n == 0:
        rows = student.new_zeros((0,), dtype=torch.float32)
        grad = student.new_zeros((0, c)) if need_grad else None
    else:
        backend = select_backend(student.device)
        rows, grad = backend.kd_loss_forward(
            _rows(student),
            _rows(teacher),
            labels,
            T if T_rows is None else T_rows,
            alpha if alpha_rows is None else alpha_rows,
            teacher_kind,
            t_squared,
            ignore_index,
            grad_scale,
            need_grad,
        )
    if reduction == _NONE:
        loss = rows
    elif reduction == _SUM:
        loss = rows.sum()
    else:
        loss = rows.sum() * grad_scale
    if grad is None:
        grad = student.new_empty((0,))
    return loss, grad


kd_loss_op = torch.library.custom_op("rbkd::kd_loss", kd_loss_impl, mutates_args=())


@kd_loss_op.register_fake
def _(
    student,
    teacher,
    labels,
    T_rows,
    T,
    alpha_rows,
    alpha,
    teacher_kind,
    t_squared,
    ignore_index,
    reduction,
    need_grad,
):
    n, c = student.shape
    loss_shape = (n,) if reduction == _NONE else ()
    grad = student.new_empty((n, c) if need_grad else (0,))
    return student.new_empty(loss_shape, dtype=torch.float32), grad


def scale_saved_grad(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """The saved gradient times the incoming gradient of the loss.

    In eager mode this works in place and skips the common case, loss.backward() on a scalar loss,
    where grad_loss == 1 and the saved gradient is already the answer: no read and write of [N, C].
    While traced (torch.compile, AOTAutograd) it stays out of place, as graphs require.
    """
    scale = grad_loss if grad_loss.dim() == 0 else grad_loss.unsqueeze(1)
    if torch.compiler.is_compiling() or type(grad_loss) is not torch.Tensor:
        return grad * scale.to(grad.dtype)
    if grad_loss.dim() != 0 or float(grad_loss) != 1.0:  # one scalar read (a GPU sync)
        grad.mul_(scale.to(grad.dtype))
    return grad


def _kd_setup(ctx, inputs, output) -> None:
    # The saved gradient is kept as a plain attribute, not with save_for_backward, and released in
    # backward: autograd then hands that very tensor to .grad instead of cloning it (it steals a
    # gradient only when nothing else holds it), which saves an [N, C] copy. It is marked
    # non-differentiable, so it has no grad_fn and makes no reference cycle.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd fills an [N, C] zero grad for output[1]
    ctx.saved_grad = output[1]


def _take_saved_grad(ctx) -> Tensor:
    grad = ctx.saved_grad
    if grad is None:
        raise RuntimeError(
            "kd_loss: backward ran twice through one graph; its saved gradient is used up"
        )
    if grad.dim() == 1:
        raise RuntimeError(
            "kd_loss ran without a gradient (under no_grad, or on a student without requires_grad)"
        )
    ctx.saved_grad = None
    return grad


def _kd_backward(ctx, grad_loss: Tensor, _grad_of_saved_grad: Tensor | None):
    return (scale_saved_grad(_take_saved_grad(ctx), grad_loss),) + (None,) * 11


kd_loss_op.register_autograd(_kd_backward, setup_context=_kd_setup)


class KDLossFunction(torch.autograd.Function):
    """The same op for eager mode, without the torch.library dispatch (~0.2 ms a call, which is
    a quarter of a training step of the thesis's baseline student on a 2-core CPU)."""

    @staticmethod
    def forward(ctx, *args):
        loss, grad = kd_loss_impl(*args)
        ctx.saved_grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        return (scale_saved_grad(_take_saved_grad(ctx), grad_loss),) + (None,) * 11


# ---- soft-label entropy --------------------------------------------------------------------------


@torch.library.custom_op("rbkd::soft_label_entropy", mutates_args=())
def soft_label_entropy_op(x: Tensor, temps: Tensor, kind: int, normalize: bool) -> Tensor:
    """Entropy [K, N] of softmax(x / T_k) (kind 0) or of probability rows (kind 1)."""
    v.check_temperature_values("T", temps)
    if kind == 1:
        v.check_probability_rows("logits", x)
    k, (n, _) = temps.shape[0], x.shape
    if n == 0 or k == 0:
        return x.new_zeros((k, n), dtype=torch.float32)
    temps = temps.to(device=x.device, dtype=torch.float32).contiguous()
    return select_backend(x.device).entropy_forward(_rows(x), temps, kind, normalize)


@soft_label_entropy_op.register_fake
def _(x: Tensor, temps: Tensor, kind: int, normalize: bool) -> Tensor:
    return x.new_empty((temps.shape[0], x.shape[0]), dtype=torch.float32)


def _entropy_setup(ctx, inputs, output) -> None:
    x, temps, ctx.kind, ctx.normalize = inputs
    ctx.save_for_backward(x, temps, output)


def _entropy_backward(ctx, grad: Tensor):
    """dH/dx = -(1/T) p (log p + H) for logits; dH/dp = -(log p + 1) for probability rows."""
    x, temps, entropy = ctx.saved_tensors
    x32 = x.float()
    c = x.shape[-1]
    scale = 1.0 / math.log(c) if ctx.normalize and c > 1 else 1.0
    if ctx.normalize and c == 1:
        return torch.zeros_like(x), None, None, None
    if ctx.kind == 1:
        log_p = x32.log()
        d = torch.where(x32 > 0, -(log_p + 1), torch.zeros_like(x32))
        return (grad.sum(0).unsqueeze(1) * d * scale).to(x.dtype), None, None, None
    t = temps.to(x32.device, torch.float32).view(-1, 1, 1)
    log_p = torch.log_softmax(x32.unsqueeze(0) / t, dim=-1)
    p = log_p.exp()
    h = (entropy / scale).unsqueeze(-1)
    d = -p * torch.where(p > 0, log_p + h, torch.zeros_like(p)) / t
    return ((grad.unsqueeze(-1) * d).sum(0) * scale).to(x.dtype), None, None, None


soft_label_entropy_op.register_autograd(_entropy_backward, setup_context=_entropy_setup)
