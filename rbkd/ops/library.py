"""The fused ops registered with torch.library, so torch.compile traces models that call them.

Each op picks its backend at run time from the tensors' device (rbkd.ops.dispatch); the fake
(meta) implementations give torch.compile shapes without running anything.
"""

from __future__ import annotations

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


@torch.library.custom_op("rbkd::kd_loss", mutates_args=())
def kd_loss_op(
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
    if labels is not None:
        v.check_label_values(labels, c, ignore_index)
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
        if labels is None:
            grad_scale = 1.0 / max(n, 1)
        else:  # a device tensor: no host synchronisation on GPUs
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


@kd_loss_op.register_fake
def _(student, teacher, labels, T_rows, T, alpha_rows, alpha, teacher_kind, t_squared,
      ignore_index, reduction, need_grad):
    n, c = student.shape
    loss_shape = (n,) if reduction == _NONE else ()
    grad = student.new_empty((n, c) if need_grad else (0,))
    return student.new_empty(loss_shape, dtype=torch.float32), grad


@torch.library.custom_op("rbkd::kd_loss_scale_grad_", mutates_args=("grad",))
def kd_loss_scale_grad_(grad: Tensor, grad_output: Tensor) -> None:
    """Scales the saved gradient in place by the incoming gradient of the loss.

    The common case, loss.backward() on a scalar loss, has grad_output == 1 and then the saved
    gradient is already the answer: skipping the multiply saves a read and a write of [N, C].
    """
    if grad_output.dim() == 0:
        if float(grad_output) != 1.0:  # one scalar read; on a GPU it waits for the forward
            grad.mul_(grad_output.to(grad.dtype))
    else:
        grad.mul_(grad_output.to(grad.dtype).unsqueeze(1))


@kd_loss_scale_grad_.register_fake
def _(grad: Tensor, grad_output: Tensor) -> None:
    return None


def _kd_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])


def _kd_backward(ctx, grad_loss: Tensor, _grad_of_saved_grad: Tensor):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and grad_loss.numel() != 0 and grad.dim() == 1:
        raise RuntimeError("kd_loss was computed without a gradient (no_grad or student without requires_grad)")
    if torch.compiler.is_compiling() or type(grad_loss) is not torch.Tensor:
        # Being traced (torch.compile / AOTAutograd): the saved gradient is a graph output there,
        # and mutating it is not allowed, so scale out of place.
        scale = grad_loss if grad_loss.dim() == 0 else grad_loss.unsqueeze(1)
        return (grad * scale.to(grad.dtype),) + (None,) * 11
    kd_loss_scale_grad_(grad, grad_loss)
    return (grad,) + (None,) * 11


kd_loss_op.register_autograd(_kd_backward, setup_context=_kd_setup)


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
    scale = 1.0 / torch.log(torch.tensor(float(c))).item() if ctx.normalize and c > 1 else 1.0
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
