"""The pure-PyTorch twin of every fused op: the fallback of last resort and the test oracle.

Everything is computed in float32 (float64 when given float64, for gradcheck) and written out with
the same formulas as csrc/README.md, including the explicit gradient the fused kernels save in
their forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "torch"


def is_available() -> bool:
    return True


def supports(device: torch.device) -> bool:
    return True


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_row(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A scalar stays a scalar; a per-row [N] tensor becomes a broadcastable [N, 1] column."""
    if isinstance(value, Tensor):
        return value.to(like.dtype).reshape(-1, 1)
    return value


def softmax_forward(x: Tensor, T: float, log: bool) -> Tensor:
    z = x.to(_compute_dtype(x)) / T
    out = F.log_softmax(z, dim=-1) if log else F.softmax(z, dim=-1)
    return out.to(x.dtype)


def softmax_backward(y: Tensor, grad: Tensor, T: float, log: bool) -> Tensor:
    dtype = _compute_dtype(y)
    y32, g32 = y.to(dtype), grad.to(dtype)
    if log:
        grad_in = g32 - y32.exp() * g32.sum(-1, keepdim=True)
    else:
        grad_in = y32 * (g32 - (g32 * y32).sum(-1, keepdim=True))
    return (grad_in / T).to(y.dtype)


def teacher_log_probs(teacher: Tensor, T: float | Tensor, teacher_kind: int) -> Tensor:
    """log p_t for the three teacher kinds (0 logits, 1 probs, 2 log_probs)."""
    t = teacher.to(_compute_dtype(teacher))
    if teacher_kind == 0:
        return F.log_softmax(t / _per_row(T, t), dim=-1)
    if teacher_kind == 1:
        return t.log()  # log 0 = -inf; the 0 * log 0 terms are masked by the caller
    return t


def kl_rows(log_pt: Tensor, log_ps: Tensor) -> Tensor:
    """sum_j p_t (log p_t - log p_s) with 0 * log 0 = 0, also where both are -inf."""
    pt = log_pt.exp()
    terms = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt))
    return terms.sum(-1)


KD_MAX_TEMPERATURE = 100.0  # rbkd.ops.validation.KD_MAX_TEMPERATURE (not imported: no cycle)


def nonfinite_rows(x: Tensor) -> Tensor:
    """Rows holding NaN or +inf, or no finite value."""
    return x.isnan().any(-1) | (x == math.inf).any(-1) | ~(x > -math.inf).any(-1)


def counted_rows(labels: Tensor | None, n: int, ignore_index: int, device) -> Tensor:
    """Rows that take part: every row without labels, else those not labelled ignore_index."""
    if labels is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return labels != ignore_index


def bad_rows(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    T: float | Tensor,
    alpha: float | Tensor,
    teacher_kind: int,
    ignore_index: int,
    probs_tol: float = 1e-3,
) -> Tensor:
    """Counted rows that the non-finite rule makes NaN (loss and gradient row)."""
    n, c = student.shape
    bad = nonfinite_rows(student)
    t = teacher.to(_compute_dtype(teacher))
    if teacher_kind == 0:
        bad |= nonfinite_rows(t)
    else:
        mass = (t.exp() if teacher_kind == 2 else t).sum(-1)
        bad |= ~((mass - 1).abs() <= probs_tol)
    if isinstance(T, Tensor):
        bad |= ~((T > 0) & (T <= KD_MAX_TEMPERATURE))
    if labels is not None:
        if isinstance(alpha, Tensor):
            bad |= ~((alpha >= 0) & (alpha <= 1))
        bad |= (labels < 0) | (labels >= c)
    return bad & counted_rows(labels, n, ignore_index, student.device)


def _weighted(w: float | Tensor, x: Tensor) -> Tensor:
    """w * x, where a zero weight drops the term (0 * inf would be NaN). A float weight is
    decided in Python, a per-row one on the tensors' device (no host read, no CPU tensor)."""
    if isinstance(w, Tensor):
        return torch.where(w > 0, w * x, torch.zeros_like(x))
    return w * x if w > 0 else torch.zeros_like(x)


def valid_rows(labels: Tensor | None, n: int, c: int, ignore_index: int, device) -> Tensor:
    """Counted rows with a usable label (the rows whose formula is computed)."""
    if labels is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return (labels != ignore_index) & (labels >= 0) & (labels < c)


def kd_loss_rows(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    T: float | Tensor,
    alpha: float | Tensor,
    teacher_kind: int,
    t_squared: bool,
    ignore_index: int,
    probs_tol: float = 1e-3,
) -> Tensor:
    """Per-row KD loss, differentiable with autograd (the oracle for the saved gradient).

    Rows that the non-finite rule makes NaN (bad_rows) are NaN here too; autograd gives them a
    zero gradient, where the op's gradient row is NaN (kd_loss_forward).
    """
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    z = student.to(dtype)
    n, c = z.shape
    if labels is not None:
        labels = labels.long()
    T_col = _per_row(T, z)
    log_ps = F.log_softmax(z / T_col, dim=-1)
    kl = kl_rows(teacher_log_probs(teacher, T, teacher_kind).to(dtype), log_ps)
    scale = (T_col * T_col) if t_squared else 1.0
    scale = scale.reshape(-1) if isinstance(scale, Tensor) else scale
    valid = valid_rows(labels, n, c, ignore_index, z.device)
    if labels is None:
        loss = scale * kl
    else:
        a = alpha.to(dtype) if isinstance(alpha, Tensor) else alpha
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        ce = torch.logsumexp(z, dim=-1) - z.gather(1, safe.unsqueeze(1)).squeeze(1)
        # A term with zero weight is dropped, as the fused kernels do: 0 * inf would be NaN.
        ce_part = _weighted(1 - a, ce)
        kl_part = _weighted(a, scale * kl)
        loss = ce_part + kl_part
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    bad = bad_rows(student, teacher, labels, T, alpha, teacher_kind, ignore_index, probs_tol)
    return torch.where(bad, torch.full_like(loss, math.nan), loss)


def kd_loss_forward(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    T: float | Tensor,
    alpha: float | Tensor,
    teacher_kind: int,
    t_squared: bool,
    ignore_index: int,
    grad_scale: float | Tensor,
    need_grad: bool,
    probs_tol: float = 1e-3,
) -> tuple[Tensor, Tensor | None]:
    with torch.no_grad():
        if labels is not None:
            labels = labels.long()
        loss = kd_loss_rows(
            student, teacher, labels, T, alpha, teacher_kind, t_squared, ignore_index, probs_tol
        )
        if not need_grad:
            return loss.float(), None
        dtype = loss.dtype
        z = student.to(dtype)
        n, c = z.shape
        T_col = _per_row(T, z)
        ps = F.softmax(z / T_col, dim=-1)
        pt = teacher_log_probs(teacher, T, teacher_kind).to(dtype).exp()
        s = (T_col * T_col) if t_squared else 1.0
        valid = valid_rows(labels, n, c, ignore_index, z.device)
        if labels is None:
            grad = s / T_col * (ps - pt)
        else:
            a = _per_row(alpha, z)
            # A one-hot without F.one_hot, which checks the labels' range with a host sync.
            classes = torch.arange(c, device=z.device)
            onehot = (classes == torch.where(valid, labels, 0).unsqueeze(1)).to(dtype)
            grad = (1 - a) * (F.softmax(z, dim=-1) - onehot) + a * s / T_col * (ps - pt)
        grad = torch.where(valid.unsqueeze(1), grad, torch.zeros_like(grad)) * grad_scale
        grad = torch.where(loss.isnan().unsqueeze(1), torch.full_like(grad, math.nan), grad)
        return loss.float(), grad.to(student.dtype)


def entropy_rows(x: Tensor, T: float | Tensor, kind: int, probs_tol: float = 1e-3) -> Tensor:
    """Shannon entropy (nats) of softmax(x / T) (kind 0) or of the rows themselves (kind 1);
    NaN for rows that the non-finite rule covers."""
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    log_p = F.log_softmax(x / T, dim=-1) if kind == 0 else x.log()
    p = log_p.exp()
    h = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    if kind == 0:
        bad = nonfinite_rows(x)
        if isinstance(T, Tensor):
            bad = bad | ~((T > 0) & (T < math.inf))
    else:
        bad = ~((x.sum(-1) - 1).abs() <= probs_tol)
    return torch.where(bad, torch.full_like(h, math.nan), h)


def entropy_forward(
    x: Tensor, temps: Tensor, kind: int, normalize: bool, probs_tol: float = 1e-3
) -> Tensor:
    n, c = x.shape
    temps = temps.to(x.device)
    # temps[k] stays a 0-dim tensor: no host read, so no GPU sync.
    rows = [entropy_rows(x, temps[k], kind, probs_tol) for k in range(temps.shape[0])]
    out = torch.stack(rows) if rows else x.new_zeros((0, n), dtype=torch.float32)
    if normalize:
        out = out / math.log(c) if c > 1 else out * 0.0
    return out.float()
