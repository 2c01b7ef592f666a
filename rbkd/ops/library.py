"""The fused ops registered with torch.library, so torch.compile traces models that call them.

Each op picks its backend at run time from the tensors' device (rbkd.ops.dispatch); the fake
(meta) implementations give torch.compile shapes without running anything.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rbkd.ops import validation as v
from rbkd.ops.args import EntropyOptions, KDOptions, SoftmaxOptions
from rbkd.ops.dispatch import select_backend

_MEAN, _SUM, _NONE = v.REDUCTIONS["mean"], v.REDUCTIONS["sum"], v.REDUCTIONS["none"]


def _rows(x: Tensor) -> Tensor:
    """[..., C] as [N, C] with a unit stride in the class dimension (a copy only if needed)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a reshape costs ~3 us a call
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---- temperature softmax -------------------------------------------------------------------------
# Each op is a plain implementation and its registration. A call that needs no autograd and is not
# being traced runs the implementation directly (`eager`): the registered op's first eager call
# imports torch._dynamo, 3 s on this 2-core machine, for `rbkd analyze entropy` and every study.


def eager(*tensors: Tensor) -> bool:
    """True when the op may skip its registration: not traced and no gradient wanted."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def temperature_softmax_impl(x: Tensor, T: float, log: bool) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    out = select_backend(x.device).softmax_forward(_rows(x), SoftmaxOptions(T, log))
    return out.reshape(x.shape)


temperature_softmax_op = torch.library.custom_op(
    "rbkd::temperature_softmax", temperature_softmax_impl, mutates_args=()
)


@temperature_softmax_op.register_fake
def _(x: Tensor, T: float, log: bool) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("rbkd::temperature_softmax_backward", mutates_args=())
def temperature_softmax_backward_op(y: Tensor, grad: Tensor, T: float, log: bool) -> Tensor:
    if y.numel() == 0:
        return torch.empty_like(y)
    grad_rows = _rows(grad.to(y.dtype))
    opts = SoftmaxOptions(T, log)
    out = select_backend(y.device).softmax_backward(_rows(y).contiguous(), grad_rows, opts)
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


def _check_kd_values(student, teacher, labels, T_rows, alpha_rows, opts: KDOptions, span):
    """The value checks of kd_loss (validation.host_value_checks decides whether they run)."""
    teacher_kind, ignore_index = opts.teacher_kind, opts.ignore_index
    c = student.shape[1]
    if labels is not None:
        v.check_label_values(labels, c, ignore_index, span)
    if T_rows is not None:
        v.check_temperature_values("T", T_rows, v.KD_MAX_TEMPERATURE)
    if alpha_rows is not None:
        v.check_alpha_values(alpha_rows)
    # The counted-row mask only where a check reads it (logits rows are checked under
    # RBKD_CHECKS=full alone) and some row is ignored: the [N] compare was 45 us of a
    # 65536-row call on one thread. None means every row counts.
    logits = teacher_kind == v.TEACHER_KINDS["logits"]
    full = v.checks_mode() == "full"  # read once: each read of the environment is ~2 us
    some_ignored = labels is not None and (span is None or span[0] <= ignore_index <= span[1])
    needs_mask = some_ignored and (not logits or full)
    counted = labels != ignore_index if needs_mask else None
    if logits:
        if full:
            v.check_finite_rows("teacher", teacher, counted)
    else:
        log = teacher_kind == v.TEACHER_KINDS["log_probs"]
        v.check_probability_rows("teacher", teacher, log=log, counted=counted)
    if full:
        v.check_finite_rows("student_logits", student, counted)


def kd_loss_impl(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    T_rows: Tensor | None,
    T: float,
    alpha_rows: Tensor | None,
    alpha: float,
    reduction: int,
    need_grad: bool,
    options: str,
) -> tuple[Tensor, Tensor]:
    """Returns (loss, saved gradient of the reduced loss w.r.t. student; empty if not needed).

    options: the KDOptions record, encoded (rbkd/ops/args.py). No host synchronisation on a GPU:
    value checks run only where validation.host_value_checks says so, and the mean's row count
    stays a device tensor that the kernels read.
    """
    opts = KDOptions.decode(options)
    n, c = student.shape
    # On the CPU the labels' range settles the common case of both the checks and the mean's count.
    span = None
    if labels is not None and v.host_reads_are_free(labels.device):
        span = v.label_span(labels)
    if v.host_value_checks(student.device):
        _check_kd_values(student, teacher, labels, T_rows, alpha_rows, opts, span)
    if T_rows is not None:
        T_rows = T_rows.to(torch.float32).contiguous()
    if alpha_rows is not None:
        alpha_rows = alpha_rows.to(torch.float32).contiguous()

    grad_scale: float | Tensor = 1.0
    if reduction == _MEAN:
        ignore_index = opts.ignore_index
        if labels is None or (span is not None and not span[0] <= ignore_index <= span[1]):
            grad_scale = 1.0 / max(n, 1)  # every row counts: the count is known on the host
        else:  # the count stays a tensor: the kernels read it through a pointer
            count = (labels != opts.ignore_index).sum().clamp_min(1).to(torch.float32)
            grad_scale = count.reciprocal()
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
            grad_scale,
            need_grad,
            opts,
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


# The op torch.compile sees (KDLoss.forward calls it while traced). It has no autograd formula of
# its own: KDLoss is the one autograd path, in eager and compiled code alike.
kd_loss_op = torch.library.custom_op("rbkd::kd_loss", kd_loss_impl, mutates_args=())


@kd_loss_op.register_fake
def _(student, teacher, labels, T_rows, T, alpha_rows, alpha, reduction, need_grad, options):
    n, c = student.shape
    loss_shape = (n,) if reduction == _NONE else ()
    grad = student.new_empty((n, c) if need_grad else (0,))
    return student.new_empty(loss_shape, dtype=torch.float32), grad


def scale_saved_grad(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """The saved gradient times the incoming gradient of the loss, in place, without a host sync.

    The common case, loss.backward() on a scalar loss, has grad_loss == 1 and the saved gradient
    is already the answer. On the CPU that is one scalar read; on a GPU the Triton kernel reads
    grad_loss on the device and leaves rows whose scale is 1 untouched (no [N, C] read or write).
    """
    scale = grad_loss if grad_loss.dim() == 0 else grad_loss.reshape(-1, 1)
    if type(grad_loss) is not torch.Tensor:  # e.g. a functorch wrapper: stay out of place
        return grad * scale.to(grad.dtype)
    if v.host_reads_are_free(grad.device):
        if grad_loss.dim() != 0 or float(grad_loss) != 1.0:
            grad.mul_(scale.to(grad.dtype))
        return grad
    from rbkd import kernels  # here, not at import: CPU-only processes never import triton

    if kernels.TRITON_AVAILABLE and grad.is_cuda:
        kernels.scale_rows_(grad, grad_loss.to(torch.float32).reshape(-1).contiguous())
        return grad
    return grad.mul_(scale.to(grad.dtype))


def saved_grad_function(op_name: str, op, impl) -> type[torch.autograd.Function]:
    """The autograd path of a loss whose forward pass already computes its gradient (kd_loss,
    sparse_kd_loss), eager and compiled: `impl` returns (loss, grad); `op` is its registered
    torch.library op.

    Eager calls run `impl` directly: the torch.library dispatch costs ~140 us a call here
    (a 64 x 10 kd_loss forward + backward: 212 us this way, 349 us through the registered op's
    own autograd, 2-core CPU), a quarter of a training step of the thesis's baseline student.
    While torch.compile traces, forward calls the registered op instead, which the graph can hold.

    Eager keeps the gradient as a plain ctx attribute, released in backward: autograd then hands
    that very tensor to .grad instead of cloning it (it steals a gradient nobody else holds),
    which saves an [N, C] copy. So one call serves one backward; retain_graph=True keeps the rest
    of the graph, and a second backward through the same call is a clear error.
    """

    def forward(ctx, *args):
        ctx.num_inputs = len(args)
        if torch.compiler.is_compiling():
            loss, grad = op(*args)
            ctx.save_for_backward(grad)
        else:
            loss, grad = impl(*args)
            ctx.saved_grad = grad
        return loss

    def backward(ctx, grad_loss: Tensor):
        nones = (None,) * (ctx.num_inputs - 1)
        if torch.compiler.is_compiling():
            (grad,) = ctx.saved_tensors
            scale = grad_loss if grad_loss.dim() == 0 else grad_loss.reshape(-1, 1)
            return (grad * scale.to(grad.dtype), *nones)
        grad = ctx.saved_grad
        if grad is None:
            raise RuntimeError(
                f"{op_name}: a second backward through the same {op_name} call is not supported "
                f"(the first handed its saved gradient to .grad); call {op_name} again for "
                "another backward"
            )
        ctx.saved_grad = None
        return (scale_saved_grad(grad, grad_loss), *nones)

    # Built with type() so that the class (and autograd's node, "<name>Backward") has its name.
    name = "".join(part.title() for part in op_name.split("_")).replace("Kd", "KD")
    return type(name, (torch.autograd.Function,), {
        "__doc__": f"The autograd path of {op_name} (library.saved_grad_function).",
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })  # fmt: skip


KDLoss = saved_grad_function("kd_loss", kd_loss_op, kd_loss_impl)


# ---- soft-label entropy --------------------------------------------------------------------------


def soft_label_entropy_impl(x: Tensor, temps: Tensor, kind: int, normalize: bool) -> Tensor:
    # The registered op keeps plain arguments (kind, normalize): the record is built here, with
    # the tolerance of the input's dtype.
    """Entropy [K, N] of softmax(x / T_k) (kind 0) or of probability rows (kind 1)."""
    if v.host_value_checks(x.device):
        v.check_temperature_values("T", temps)
        if kind == 1:
            if bool((temps != 1).any()):
                raise ValueError(
                    "teacher_kind='probs' takes rows of probabilities as they are: T must be 1"
                )
            v.check_probability_rows("logits", x)
        else:
            v.check_finite_rows("logits", x)
    k, (n, _) = temps.shape[0], x.shape
    if n == 0 or k == 0:
        return x.new_zeros((k, n), dtype=torch.float32)
    temps = temps.to(device=x.device, dtype=torch.float32).contiguous()
    backend = select_backend(x.device)
    opts = EntropyOptions(kind, bool(normalize), v.probs_tolerance(x.dtype))
    return backend.entropy_forward(_rows(x), temps, opts)


soft_label_entropy_op = torch.library.custom_op(
    "rbkd::soft_label_entropy", soft_label_entropy_impl, mutates_args=()
)


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
    t = temps.to(x32).view(-1, 1, 1)  # x32's device and dtype; the wrapper put temps there
    log_p = torch.log_softmax(x32.unsqueeze(0) / t, dim=-1)
    p = log_p.exp()
    h = (entropy / scale).unsqueeze(-1)
    d = -p * torch.where(p > 0, log_p + h, torch.zeros_like(p)) / t
    return ((grad.unsqueeze(-1) * d).sum(0) * scale).to(x.dtype), None, None, None


soft_label_entropy_op.register_autograd(_entropy_backward, setup_context=_entropy_setup)
