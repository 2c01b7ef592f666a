"""The pure-PyTorch twin of every fused op: the fallback of last resort and the test oracle.

Its backend name is "torch" (NAME, what `RBKD_BACKEND` and the dispatcher call it: PyTorch's own
ops compute it); the module is torch_twin.py, not torch.py, which would read as the package.

Everything is computed in float32 (float64 when given float64, for gradcheck) and written out with
the same formulas as csrc/README.md, including the explicit gradient the fused kernels save in
their forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rbkd.config import KD_MAX_TEMPERATURE
from rbkd.ops.args import DIVERGENCES, STANDARDIZE_EPS, EntropyOptions, KDOptions, SoftmaxOptions

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


def softmax_forward(x: Tensor, opts: SoftmaxOptions) -> Tensor:
    z = x.to(_compute_dtype(x)) / opts.T
    out = F.log_softmax(z, dim=-1) if opts.log else F.softmax(z, dim=-1)
    return out.to(x.dtype)


def softmax_backward(y: Tensor, grad: Tensor, opts: SoftmaxOptions) -> Tensor:
    T, log = opts.T, opts.log
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


def standardized(x: Tensor) -> Tensor:
    """(x - mean) / (std + eps) per row, std unbiased (Sun et al. 2024); 0 for a 1-class row."""
    c = x.shape[-1]
    if c <= 1:
        return torch.zeros_like(x)
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / (x.std(-1, keepdim=True) + STANDARDIZE_EPS)


def _xlogy_rows(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_j p (log p - log q), 0 where p == 0 (0 log 0 = 0, also against log q = -inf)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def divergence_rows(
    log_ps: Tensor, log_pt: Tensor, labels: Tensor | None, opts: KDOptions
) -> Tensor:
    """D(p_t, p_s) per row for opts.divergence, from the log-probabilities (csrc/README.md)."""
    div, ps, pt = opts.divergence, log_ps.exp(), log_pt.exp()
    if div == DIVERGENCES["jsd"] and opts.beta in (0.0, 1.0):  # TRL's and Liger's ends
        div = DIVERGENCES["kl"] if opts.beta == 0.0 else DIVERGENCES["reverse_kl"]
    if div == DIVERGENCES["kl"]:
        return _xlogy_rows(pt, log_pt, log_ps)
    if div == DIVERGENCES["reverse_kl"]:
        return _xlogy_rows(ps, log_ps, log_pt)
    if div == DIVERGENCES["jsd"]:
        b = opts.beta
        log_m = torch.logaddexp(log_pt + math.log(b), log_ps + math.log1p(-b))
        return b * _xlogy_rows(pt, log_pt, log_m) + (1 - b) * _xlogy_rows(ps, log_ps, log_m)
    if div in (DIVERGENCES["skew_kl"], DIVERGENCES["skew_reverse_kl"]):
        lam = opts.skew
        log_lam = math.log(lam) if lam > 0 else -math.inf
        if div == DIVERGENCES["skew_kl"]:
            log_m = torch.logaddexp(log_pt + log_lam, log_ps + math.log1p(-lam))
            return _xlogy_rows(pt, log_pt, log_m)
        log_m = torch.logaddexp(log_ps + log_lam, log_pt + math.log1p(-lam))
        return _xlogy_rows(ps, log_ps, log_m)
    if div == DIVERGENCES["tvd"]:
        return 0.5 * (pt - ps).abs().sum(-1)
    if div == DIVERGENCES["dkd"]:
        return _dkd_rows(log_ps, log_pt, labels, opts)
    raise ValueError(f"unknown divergence code {div}")


def _dkd_rows(log_ps: Tensor, log_pt: Tensor, labels: Tensor, opts: KDOptions) -> Tensor:
    """dkd_alpha * TCKD + dkd_beta * NCKD (Zhao et al. 2022), from log-probabilities."""
    c = log_ps.shape[-1]
    y = labels.clamp(0, c - 1).unsqueeze(1)
    target = torch.arange(c, device=log_ps.device) == y
    ninf = torch.full_like(log_ps, -math.inf)
    # log(1 - p_y) as the log-sum of the other classes: exact where p_y is close to 1.
    rest_s = torch.logsumexp(torch.where(target, ninf, log_ps), -1)
    rest_t = torch.logsumexp(torch.where(target, ninf, log_pt), -1)
    ys, yt = log_ps.gather(1, y).squeeze(1), log_pt.gather(1, y).squeeze(1)

    def term(log_p: Tensor, log_q: Tensor) -> Tensor:
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))

    tckd = term(yt, ys) + term(rest_t, rest_s)
    q_s = torch.where(target, ninf, log_ps - rest_s.unsqueeze(1))
    q_t = torch.where(target, ninf, log_pt - rest_t.unsqueeze(1))
    nckd = _xlogy_rows(q_t.exp(), q_t, q_s)
    return opts.dkd_alpha * tckd + opts.dkd_beta * nckd


def kd_loss_rows(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    T: float | Tensor,
    alpha: float | Tensor,
    opts: KDOptions,
) -> Tensor:
    """Per-row KD loss, differentiable with autograd (the twin's gradient for every divergence
    but plain KL, whose gradient kd_loss_forward writes out).

    Rows that the non-finite rule makes NaN (bad_rows) are NaN here too; autograd gives them a
    zero gradient, where the op's gradient row is NaN (kd_loss_forward).
    """
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    z = student.to(dtype)
    n, c = z.shape
    if labels is not None:
        labels = labels.long()
    T_col = _per_row(T, z)
    t = teacher.to(dtype)
    if opts.standardize:
        log_ps = F.log_softmax(standardized(z) / T_col, dim=-1)
        log_pt = F.log_softmax(standardized(t) / T_col, dim=-1)
    else:
        log_ps = F.log_softmax(z / T_col, dim=-1)
        log_pt = teacher_log_probs(teacher, T, opts.teacher_kind).to(dtype)
    valid = valid_rows(labels, n, c, opts.ignore_index, z.device)
    safe = None if labels is None else torch.where(valid, labels, torch.zeros_like(labels))
    div = divergence_rows(log_ps, log_pt, safe, opts)
    scale = (T_col * T_col) if opts.t_squared else 1.0
    scale = scale.reshape(-1) if isinstance(scale, Tensor) else scale
    if labels is None:
        loss = scale * div
    else:
        a = alpha.to(dtype) if isinstance(alpha, Tensor) else alpha
        ce = torch.logsumexp(z, dim=-1) - z.gather(1, safe.unsqueeze(1)).squeeze(1)
        # A term with zero weight is dropped, as the fused kernels do: 0 * inf would be NaN.
        loss = _weighted(1 - a, ce) + _weighted(a, scale * div)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    bad = bad_rows(
        student, teacher, labels, T, alpha, opts.teacher_kind, opts.ignore_index, opts.probs_tol
    )
    if opts.standardize:  # a -inf logit has no z-score: the row's mean and std are undefined
        counted = counted_rows(labels, n, opts.ignore_index, z.device)
        bad |= counted & ~(torch.isfinite(z).all(-1) & torch.isfinite(t).all(-1))
    return torch.where(bad, torch.full_like(loss, math.nan), loss)


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
    with torch.no_grad():
        if labels is not None:
            labels = labels.long()
        loss = kd_loss_rows(student, teacher, labels, T, alpha, opts)
        if not need_grad:
            return loss.float(), None
        n, c = student.shape
        valid = valid_rows(labels, n, c, opts.ignore_index, student.device)
        grad = kd_grad_rows(student, teacher, labels, T, alpha, opts, valid)
        return loss.float(), _finish_grad(grad, valid, loss, grad_scale, student.dtype)


def divergence_h(log_ps: Tensor, log_pt: Tensor, div: int, opts: KDOptions) -> Tensor:
    """h_j = p_s_j * dD/dp_s_j, up to a constant times p_s_j (which the centring removes):
    dD/du_j = h_j - p_s_j * sum_k h_k for the tempered logits u = z / T (csrc/README.md)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    zero = torch.zeros_like(ps)
    if div == DIVERGENCES["reverse_kl"]:
        return torch.where(ps > 0, ps * (log_ps - log_pt), zero)
    if div == DIVERGENCES["jsd"]:
        b = opts.beta
        log_m = torch.logaddexp(log_pt + math.log(b), log_ps + math.log1p(-b))
        return torch.where(ps > 0, (1 - b) * ps * (log_ps - log_m), zero)
    lam = opts.skew
    log_lam = math.log(lam) if lam > 0 else -math.inf
    if div == DIVERGENCES["skew_kl"]:
        log_m = torch.logaddexp(log_pt + log_lam, log_ps + math.log1p(-lam))
        return torch.where(pt > 0, -(1 - lam) * pt * (log_ps - log_m).exp(), zero)
    if div == DIVERGENCES["skew_reverse_kl"]:
        log_m = torch.logaddexp(log_ps + log_lam, log_pt + math.log1p(-lam))
        ratio = (log_ps - log_m).exp()  # p_s / m
        return torch.where(ps > 0, ps * (log_ps - log_m + 1 - lam * ratio), zero)
    if div == DIVERGENCES["tvd"]:
        return 0.5 * ps * torch.sign(ps - pt)
    raise ValueError(f"divergence code {div} has no h (kl and dkd are written out)")


def dkd_grad(log_ps: Tensor, log_pt: Tensor, labels: Tensor, opts: KDOptions) -> Tensor:
    """dD/du_j of dkd_alpha * TCKD + dkd_beta * NCKD:
    dkd_alpha (p_y - q_y) ([j == y] - [j != y] r_j) + dkd_beta [j != y] (r_j - rt_j),
    r / rt: student / teacher probabilities renormalised over the classes other than y."""
    c = log_ps.shape[-1]
    y = labels.clamp(0, c - 1).unsqueeze(1)
    target = torch.arange(c, device=log_ps.device) == y
    ninf = torch.full_like(log_ps, -math.inf)
    rest_s = torch.logsumexp(torch.where(target, ninf, log_ps), -1, keepdim=True)
    rest_t = torch.logsumexp(torch.where(target, ninf, log_pt), -1, keepdim=True)
    zero = torch.zeros_like(log_ps)
    r = torch.where(target | (rest_s == -math.inf), zero, (log_ps - rest_s).exp())
    rt = torch.where(target | (rest_t == -math.inf), zero, (log_pt - rest_t).exp())
    dy = log_ps.gather(1, y).exp() - log_pt.gather(1, y).exp()  # p_y - q_y
    tckd = dy * torch.where(target, torch.ones_like(r), -r)
    return opts.dkd_alpha * tckd + opts.dkd_beta * (r - rt)


def standardize_backward(x: Tensor, g: Tensor) -> Tensor:
    """dL/dx from dL/dx' for x' = (x - mean) / (std + eps), std unbiased:
    r (g - mean(g)) - r^2 (x - mean) sum_k g_k (x_k - mean) / ((C - 1) std), r = 1 / (std + eps)."""
    c = x.shape[-1]
    if c <= 1:
        return torch.zeros_like(g)
    d = x - x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)
    r = 1.0 / (std + STANDARDIZE_EPS)
    s = (g * d).sum(-1, keepdim=True)
    second = torch.where(std > 0, r * r * d * s / ((c - 1) * std), torch.zeros_like(g))
    return r * (g - g.mean(-1, keepdim=True)) - second


def kd_grad_rows(student, teacher, labels, T, alpha, opts: KDOptions, valid: Tensor) -> Tensor:
    """dL_i/dz_i written out for every divergence (what the fused kernels compute)."""
    dtype = _compute_dtype(student)
    z = student.to(dtype)
    n, c = z.shape
    T_col = _per_row(T, z)
    if opts.standardize:
        log_ps = F.log_softmax(standardized(z) / T_col, dim=-1)
        log_pt = F.log_softmax(standardized(teacher.to(dtype)) / T_col, dim=-1)
    else:
        log_ps = F.log_softmax(z / T_col, dim=-1)
        log_pt = teacher_log_probs(teacher, T, opts.teacher_kind).to(dtype)
    div = opts.divergence
    if div == DIVERGENCES["jsd"] and opts.beta in (0.0, 1.0):
        div = DIVERGENCES["kl"] if opts.beta == 0.0 else DIVERGENCES["reverse_kl"]
    ps = log_ps.exp()
    if div == DIVERGENCES["kl"]:
        du = ps - log_pt.exp()
    elif div == DIVERGENCES["dkd"]:
        du = dkd_grad(log_ps, log_pt, torch.where(valid, labels, 0), opts)
    else:
        h = divergence_h(log_ps, log_pt, div, opts)
        du = h - ps * h.sum(-1, keepdim=True)
    s = (T_col * T_col) if opts.t_squared else 1.0
    a = 1.0 if labels is None else _per_row(alpha, z)
    kd = _weighted(a, s / T_col * du)
    if opts.standardize:
        kd = standardize_backward(z, kd)
    if labels is None:
        return kd
    ce = F.softmax(z, dim=-1) - _onehot(labels, valid, c, dtype)
    return kd + _weighted(1 - a, ce)


def _onehot(labels: Tensor, valid: Tensor, c: int, dtype: torch.dtype) -> Tensor:
    # Without F.one_hot, which checks the labels' range with a host sync.
    classes = torch.arange(c, device=labels.device)
    return (classes == torch.where(valid, labels, 0).unsqueeze(1)).to(dtype)


def _finish_grad(grad, valid, loss, grad_scale, dtype) -> Tensor:
    """Zero for rows that do not count, times grad_scale, NaN rows where the loss is NaN."""
    grad = torch.where(valid.unsqueeze(1), grad, torch.zeros_like(grad)) * grad_scale
    grad = torch.where(loss.isnan().unsqueeze(1), torch.full_like(grad, math.nan), grad)
    return grad.to(dtype)


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


def entropy_forward(x: Tensor, temps: Tensor, opts: EntropyOptions) -> Tensor:
    kind, normalize, probs_tol = opts.kind, opts.normalize, opts.probs_tol
    n, c = x.shape
    temps = temps.to(x.device)
    # temps[k] stays a 0-dim tensor: no host read, so no GPU sync.
    rows = [entropy_rows(x, temps[k], kind, probs_tol) for k in range(temps.shape[0])]
    out = torch.stack(rows) if rows else x.new_zeros((0, n), dtype=torch.float32)
    if normalize:
        out = out / math.log(c) if c > 1 else out * 0.0
    return out.float()
