"""The public ops: temperature_softmax, kd_loss and soft_label_entropy (re-exported by rbkd.ops).

Each checks its arguments (rbkd.ops.validation), packs its options (rbkd.ops.args) and calls the
registered op (rbkd.ops.library), which picks the backend from the tensors' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rbkd.ops import library
from rbkd.ops import validation as v
from rbkd.ops.args import KDOptions

__all__ = ["kd_loss", "soft_label_entropy", "temperature_softmax"]


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
    op = (
        library.temperature_softmax_impl
        if library.eager(logits)
        else library.temperature_softmax_op
    )
    return op(logits, T, bool(log))


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
    divergence: str = "kl",
    beta: float = 0.5,
    skew: float = 0.1,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
    standardize: bool = False,
) -> Tensor:
    """Knowledge-distillation loss of student logits [..., C] against a teacher of the same shape.

    Per row i:  L_i = (1 - a) * CE(z_i, y_i) + a * s * D(p_t, p_s), with p_s = softmax(z_i / T),
    p_t = softmax(t_i / T) | t_i | exp(t_i) for teacher_kind "logits" | "probs" | "log_probs",
    s = T**2 if t_squared else 1 (Hinton et al. 2015; the thesis's eq. 3.5 is t_squared=False).
    D is the divergence (csrc/README.md has the formulas and gradients):

        "kl"               KL(p_t || p_s)                             (default; Hinton et al.)
        "reverse_kl"       KL(p_s || p_t)                             (MiniLLM)
        "jsd"              beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s
                           (GKD, TRL, Liger; beta = 0 is "kl" and beta = 1 "reverse_kl", as they do)
        "skew_kl"          KL(p_t || skew p_t + (1 - skew) p_s)        (DistiLLM)
        "skew_reverse_kl"  KL(p_s || skew p_s + (1 - skew) p_t)        (DistiLLM)
        "tvd"              0.5 sum_j |p_t - p_s|                       (DistillKit)
        "dkd"              dkd_alpha TCKD + dkd_beta NCKD              (Zhao et al. 2022; needs labels)

    standardize=True z-scores each student and teacher row before dividing by T (Sun et al. 2024;
    logits teachers only); the CE term keeps the raw logits.
    Leading dimensions are flattened into rows (an LM's [batch, seq, vocab] works as is), and
    labels (int64 or int32) have the leading shape. labels=None is pure distillation (a = 1).
    Rows labelled ignore_index contribute nothing and leave the mean. T (at most
    KD_MAX_TEMPERATURE = 100) and alpha may be per-row tensors of the leading shape. The loss is
    float32 (reduction="none": the leading shape); the gradient flows to student_logits only, in
    its dtype.

    Non-finite rule: a counted row whose teacher or student holds NaN or +inf or no finite value,
    whose probs / log_probs teacher row does not hold mass 1, or whose label, T or alpha is out of
    range (where such values are not checked, see RBKD_CHECKS) gets a NaN loss and a NaN gradient
    row, identically on every backend; the reduced loss is then NaN. RBKD_CHECKS=full raises
    instead. No host synchronisation on a GPU unless RBKD_CHECKS=full.
    """
    v.check_kd_inputs(student_logits, teacher, labels)
    lead, c = student_logits.shape[:-1], student_logits.shape[-1]
    if c == 0:
        raise ValueError("student_logits must have at least one class (C >= 1)")
    kind = v.check_choice("teacher_kind", teacher_kind, v.TEACHER_KINDS)
    red = v.check_choice("reduction", reduction, v.REDUCTIONS)
    n = lead.numel()
    device = student_logits.device
    T = v.check_temperature("T", _per_row(T, lead), n, device, v.KD_MAX_TEMPERATURE)
    alpha = v.check_alpha(_per_row(alpha, lead), n, device)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    opts = KDOptions(
        teacher_kind=kind,
        t_squared=bool(t_squared),
        ignore_index=ignore_index,
        probs_tol=v.probs_tolerance(teacher.dtype),
        **v.check_divergence_options(
            divergence, beta, skew, dkd_alpha, dkd_beta, standardize, teacher_kind, labels
        ),
    )
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    T_rows, T_scalar = (T, 1.0) if isinstance(T, Tensor) else (None, T)
    a_rows, a_scalar = (alpha, 0.0) if isinstance(alpha, Tensor) else (None, alpha)
    flat = student_logits.dim() == 2  # [N, C] already: no reshapes (~3 us each)
    loss = library.KDLoss.apply(
        student_logits if flat else student_logits.reshape(n, c),
        teacher.detach() if flat else teacher.detach().reshape(n, c),
        labels if labels is None or flat else labels.reshape(n),
        T_rows,
        T_scalar,
        a_rows,
        a_scalar,
        red,
        need_grad,
        opts.encode(),
    )
    return loss.reshape(lead) if red == v.REDUCTIONS["none"] else loss


def _per_row(value: object, lead: torch.Size) -> object:
    """A per-row tensor given in the logits' leading shape, flattened to one value per row."""
    if isinstance(value, Tensor) and value.dim() > 1 and value.shape == lead:
        return value.reshape(-1)
    return value


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
    probabilities as they are (then T must be 1). A row with NaN or +inf or no finite value (or,
    for "probs", whose mass is not 1) has entropy NaN; RBKD_CHECKS=full raises instead.
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
        temps = T.detach().reshape(-1)  # values checked in the op (on the host only for CPU)
        if not temps.is_floating_point():
            temps = temps.float()
    else:
        values = list(T) if many else [T]
        values = [v.check_temperature("T", t, 0, logits.device) for t in values]
        if kind == 1 and any(t != 1 for t in values):
            raise ValueError(
                "teacher_kind='probs' takes rows of probabilities as they are: T must be 1"
            )
        temps = torch.tensor(values, dtype=torch.float32)
    if temps.device != logits.device:
        # A pinned, asynchronous copy: a plain host-to-GPU copy would synchronise the host.
        if temps.device.type == "cpu" and logits.is_cuda:
            temps = temps.pin_memory()
        temps = temps.to(logits.device, non_blocking=True)
    op = library.soft_label_entropy_impl if library.eager(logits) else library.soft_label_entropy_op
    out = op(logits, temps, kind, bool(normalize))
    return out if many else out[0]
