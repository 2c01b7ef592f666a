"""rbkd.ops: the fused ops of response-based distillation.

    temperature_softmax(logits, T=1.0, *, log=False)
    kd_loss(student_logits, teacher, labels=None, *, T=4.0, alpha=0.9, teacher_kind="logits",
            t_squared=True, ignore_index=-100, reduction="mean")
    soft_label_entropy(logits, T=1.0, *, teacher_kind="logits", normalize=False)

The backend is chosen per call from the tensors' device (see rbkd.ops.dispatch): the C++ CPU
kernels, Triton or CUDA C++ on GPUs, and the pure-torch reference when nothing compiled exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rbkd.ops import library
from rbkd.ops import validation as v
from rbkd.ops.dispatch import BackendError, available_backends, select_backend, use_backend

__all__ = [
    "BackendError",
    "available_backends",
    "kd_loss",
    "select_backend",
    "soft_label_entropy",
    "temperature_softmax",
    "use_backend",
]


def temperature_softmax(logits: Tensor, T: float = 1.0, *, log: bool = False) -> Tensor:
    """softmax(logits / T) over the last dimension (log-softmax with log=True), in the input dtype.

    Any leading shape; differentiable.

    >>> temperature_softmax(torch.tensor([[2.0, 0.0]]), T=2.0)
    tensor([[0.7311, 0.2689]])
    """
    v.check_float_tensor("logits", logits)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have at least one class in the last dimension")
    T = v.check_temperature("T", T, 0, logits.device)
    if isinstance(T, Tensor):
        raise TypeError("T for temperature_softmax must be a float")
    return library.temperature_softmax_op(logits, T, bool(log))


def kd_loss(
    student_logits: Tensor,
    teacher: Tensor,
    labels: Tensor | None = None,
    *,
    T: float | Tensor = 4.0,
    alpha: float | Tensor = 0.9,
    teacher_kind: str = "logits",
    t_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Knowledge-distillation loss of student logits [N, C] against a teacher [N, C].

    Per row i:  L_i = (1 - a) * CE(z_i, y_i) + a * s * KL(p_t || p_s), with p_s = softmax(z_i / T),
    p_t = softmax(t_i / T) | t_i | exp(t_i) for teacher_kind "logits" | "probs" | "log_probs",
    s = T**2 if t_squared else 1 (Hinton et al. 2015; the thesis's eq. 3.5 is t_squared=False).
    labels=None is pure distillation (a = 1). Rows labelled ignore_index contribute nothing and
    leave the mean. T and alpha may be per-row 1-D tensors. The loss is float32; the gradient
    flows to student_logits only, in its dtype.
    """
    v.check_kd_inputs(student_logits, teacher, labels)
    n, c = student_logits.shape
    if c == 0:
        raise ValueError("student_logits must have at least one class (C >= 1)")
    kind = v.check_choice("teacher_kind", teacher_kind, v.TEACHER_KINDS)
    red = v.check_choice("reduction", reduction, v.REDUCTIONS)
    T = v.check_temperature("T", T, n, student_logits.device)
    alpha = v.check_alpha(alpha, n, student_logits.device)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    T_rows, T_scalar = (T, 1.0) if isinstance(T, Tensor) else (None, T)
    a_rows, a_scalar = (alpha, 0.0) if isinstance(alpha, Tensor) else (None, alpha)
    args = (
        student_logits,
        teacher.detach(),
        labels,
        T_rows,
        T_scalar,
        a_rows,
        a_scalar,
        kind,
        bool(t_squared),
        ignore_index,
        red,
        need_grad,
    )
    if torch.compiler.is_compiling():
        return library.kd_loss_op(*args)[0]
    return library.KDLossFunction.apply(*args)


def soft_label_entropy(
    logits: Tensor,
    T: float | Sequence[float] | Tensor = 1.0,
    *,
    teacher_kind: str = "logits",
    normalize: bool = False,
) -> Tensor:
    """Shannon entropy (nats) of softmax(logits / T) per row: shape [N].

    With K temperatures (a sequence or a 1-D tensor) the result is [K, N], computed reading the
    logits once. normalize=True divides by log(C). teacher_kind="probs" takes rows of
    probabilities as they are (then T must be 1).
    """
    v.check_float_tensor("logits", logits, dims=2)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have at least one class (C >= 1)")
    kind = v.check_choice("teacher_kind", teacher_kind, {"logits": 0, "probs": 1})
    many = not isinstance(T, (int, float)) or isinstance(T, bool)
    if isinstance(T, Tensor):
        if T.dim() > 1:
            raise ValueError(
                f"T must be a float or a 1-D tensor of temperatures, got shape {tuple(T.shape)}"
            )
        many = T.dim() == 1
        temps = T.detach().reshape(-1).to("cpu", torch.float32)
    elif many:
        values = list(T)
        for t in values:
            v.check_temperature("T", t, 0, logits.device)
        temps = torch.tensor([float(t) for t in values], dtype=torch.float32)
    else:
        temps = torch.tensor([v.check_temperature("T", T, 0, logits.device)], dtype=torch.float32)
    if kind == 1 and bool((temps != 1).any()):
        raise ValueError(
            "teacher_kind='probs' takes rows of probabilities as they are: T must be 1"
        )
    out = library.soft_label_entropy_op(logits, temps, kind, bool(normalize))
    return out if many else out[0]
