"""The tests' float64 oracle of rbkd.ops: one reference per op, one tolerance table, one comparison.

Written from the formulas (csrc/README.md, the README's loss convention and non-finite rule, the
divergences of issue 14), never from rbkd/ops/backends/torch_twin.py: the torch backend is checked
against something other than itself, loss included.

    softmax(x, T, log=False)                         softmax(x / T) or log_softmax(x / T)
    entropy(x, temps, kind="logits", normalize=False)  [K, N] Shannon entropies in nats
    kd_loss(student, teacher, labels=None, **kw)     (loss, grad): kd_loss with every argument of
                                                     the op, its gradient by torch.autograd

A row that the non-finite rule covers is NaN in the loss and NaN in its gradient row, as the op's.
Autograd never sees such a row's values (they are swapped for harmless ones before the formula),
so the finite rows' gradients stay exact; rows labelled ignore_index are 0 in both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import rbkd.ops as ops

F64 = torch.float64
NAN, INF = math.nan, math.inf
KD_MAX_T = 100.0  # the README: kd_loss refuses T above 100 (a per-row T above it is a NaN row)
# (atol, rtol) of a result in this dtype (or in float32 computed from inputs in this dtype); atol
# is relative to the largest finite |expected| (see assert_close).
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# The non-finite rule's mass tolerance of probs / log_probs rows, per input dtype (README).
MASS_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "dkd")


def assert_close(actual, expected, what, dtype=torch.float32, *, floor=1.0, loose=1.0):
    """|actual - expected| <= atol * max(floor, max |finite expected|) + rtol * |expected|, with
    (atol, rtol) = TOLERANCES[dtype] * loose; NaN must meet NaN and an inf the same inf. On failure
    it says how many differ, the first bad index with both values, and the NaN/inf mismatches."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    finite = e[e.isfinite()]
    scale = max(floor, float(finite.abs().max())) if finite.numel() else floor
    atol, rtol = (x * loose for x in TOLERANCES[dtype])
    same = (a == e) | (a.isnan() & e.isnan())
    bad = ~(same | ((a - e).abs() <= atol * scale + rtol * e.abs()))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        nan_miss = int((a.isnan() != e.isnan()).sum())
        inf_miss = int(((a.isinf() | e.isinf()) & ~same).sum())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ (NaN mismatches {nan_miss}, "
            f"inf mismatches {inf_miss}); first at {idx}: got {float(a[idx])!r}, expected "
            f"{float(e[idx])!r} (atol={atol * scale:.3g}, rtol={rtol:.3g})"
        )


# ---- temperature softmax and entropy -------------------------------------------------------------


def softmax(x: Tensor, T: float, log: bool = False) -> Tensor:
    """softmax(x / T) (log-softmax with log) in float64; differentiable in x."""
    z = x.double() / T
    return z - torch.logsumexp(z, -1, keepdim=True) if log else torch.softmax(z, -1)


def _nonfinite_rows(x: Tensor) -> Tensor:
    """Rows holding NaN or +inf, or no finite value (all -inf)."""
    return x.isnan().any(-1) | (x == INF).any(-1) | ~(x > -INF).any(-1)


def _plogp(logp: Tensor) -> Tensor:
    """sum p log p over the last dimension, 0 log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * torch.where(p > 0, logp, 0.0), 0.0).sum(-1)


def entropy(x: Tensor, temps, kind: str = "logits", normalize: bool = False) -> Tensor:
    """[K, N] entropies of softmax(x / T_k) (kind "logits") or of the rows as they are ("probs"),
    NaN for rows (and temperatures) that the non-finite rule covers; differentiable in x."""
    temps = temps.reshape(-1).tolist() if isinstance(temps, Tensor) else temps
    temps = [float(t) for t in (temps if isinstance(temps, (list, tuple)) else [temps])]
    x64, c = x.double(), x.shape[-1]
    if kind == "probs":
        bad = ~((x64.sum(-1) - 1).abs() <= MASS_TOL.get(x.dtype, 1e-3))
        safe = torch.where(bad[:, None], 1.0 / c, x64)
        rows = [-_plogp(safe.log()) for _ in temps]
    else:
        bad = _nonfinite_rows(x64)
        safe = torch.where(bad[:, None], 0.0, x64)
        rows = [-_plogp(torch.log_softmax(safe / T, -1)) for T in temps]
    h = torch.stack(rows) if rows else x64.new_zeros(0, x.shape[0])
    if normalize:
        h = h / math.log(c) if c > 1 else h * 0.0
    bad_t = torch.tensor([not (0 < T < INF) for T in temps], dtype=torch.bool)
    return torch.where(bad[None, :] | bad_t[:, None], NAN, h)


# ---- kd_loss -------------------------------------------------------------------------------------


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum p (log p - log q) per row, 0 log 0 = 0 (also where both are 0)."""
    p = log_p.exp()
    m = p > 0
    terms = p * (torch.where(m, log_p, 0.0) - torch.where(m, log_q, 0.0))
    return torch.where(m, terms, 0.0).sum(-1)


def _log_mix(log_p: Tensor, log_q: Tensor, w: float) -> Tensor:
    """log(w p + (1 - w) q) in log space (logsumexp of the two weighted logs)."""
    if w == 0:
        return log_q
    if w == 1:
        return log_p
    both0 = (log_p == -INF) & (log_q == -INF)  # keeps logsumexp's gradient finite there
    pair = torch.stack([torch.where(both0, 0.0, log_p) + math.log(w),
                        torch.where(both0, 0.0, log_q) + math.log1p(-w)])  # fmt: skip
    return torch.where(both0, -INF, torch.logsumexp(pair, 0))


def _dkd(log_ps, log_pt, y, dkd_alpha, dkd_beta):
    """dkd_alpha * TCKD + dkd_beta * NCKD (Zhao et al. 2022): the binary KL of [p_y, rest] and
    the KL of the non-target classes renormalised (q_j = p_j / sum_{k != y} p_k)."""
    if log_ps.shape[-1] == 1:  # no non-target class: both parts are empty
        return log_ps.sum(-1) * 0.0
    target = torch.arange(log_ps.shape[-1]) == y[:, None]

    def split(lp):
        rest = torch.logsumexp(lp.masked_fill(target, -INF), -1)  # log sum_{j != y} p_j
        binary = torch.stack([lp.gather(1, y[:, None])[:, 0], rest], -1)
        return binary, (lp - rest[:, None]).masked_fill(target, -INF)

    (b_s, q_s), (b_t, q_t) = split(log_ps), split(log_pt)
    return dkd_alpha * _kl(b_t, b_s) + dkd_beta * _kl(q_t, q_s)


def divergence_rows(log_ps, log_pt, y=None, divergence="kl", beta=0.5, skew=0.1,
                    dkd_alpha=1.0, dkd_beta=8.0):  # fmt: skip
    """D(p_t, p_s) per row from the two log-distributions, by name (issue 14's definitions)."""
    if divergence == "kl":
        return _kl(log_pt, log_ps)
    if divergence == "reverse_kl":
        return _kl(log_ps, log_pt)
    if divergence == "jsd":  # beta = 0: KL(p_t || p_s), beta = 1: KL(p_s || p_t), as TRL's ends
        if beta in (0, 1):
            return _kl(log_pt, log_ps) if beta == 0 else _kl(log_ps, log_pt)
        log_m = _log_mix(log_pt, log_ps, beta)
        return beta * _kl(log_pt, log_m) + (1 - beta) * _kl(log_ps, log_m)
    if divergence == "skew_kl":
        return _kl(log_pt, _log_mix(log_pt, log_ps, skew))
    if divergence == "skew_reverse_kl":
        return _kl(log_ps, _log_mix(log_ps, log_pt, skew))
    if divergence == "tvd":
        return 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(-1)
    if divergence == "dkd":
        return _dkd(log_ps, log_pt, y, dkd_alpha, dkd_beta)
    raise ValueError(f"unknown divergence {divergence!r}")


def _standardized(x: Tensor) -> Tensor:
    """(x - mean) / (std + 1e-7) per row, std unbiased over the classes; 0 for C = 1."""
    if x.shape[-1] == 1 or x.numel() == 0:
        return x * 0.0
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-7)


def _weighted(w: Tensor, x: Tensor) -> Tensor:
    """w * x with a zero weight dropping the term (0 * inf is 0 here, and so is its gradient)."""
    return torch.where(w > 0, w * torch.where(w > 0, x, 0.0), 0.0)


def _per_row(value, n: int) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().double().reshape(n)
    return torch.full((n,), float(value), dtype=F64)


def kd_loss(student, teacher, labels=None, *, T=4.0, alpha=0.9, teacher_kind="logits",
            t_squared=True, ignore_index=-100, reduction="mean", standardize=False,
            graph=False, **div):  # fmt: skip
    """(loss, grad) of rbkd.ops.kd_loss in float64: the loss as the op returns it (the leading
    shape for reduction="none") and d loss.sum() / d student. div: divergence, beta, skew,
    dkd_alpha, dkd_beta (divergence_rows). graph=True: the loss only, differentiable in a
    float64 student (NaN rows as 0)."""
    lead, c = student.shape[:-1], student.shape[-1]
    n = lead.numel()
    z = student.reshape(n, c) if graph else student.detach().double().reshape(n, c)
    z = z if graph else z.requires_grad_(True)
    t = teacher.detach().double().reshape(n, c)
    y = None if labels is None else labels.reshape(n).long()
    T, a = _per_row(T, n), _per_row(alpha, n)
    # The non-finite rule: which counted rows are NaN.
    counted = torch.ones(n, dtype=torch.bool) if y is None else y != ignore_index
    bad = _nonfinite_rows(z) | ~((T > 0) & (T <= KD_MAX_T))
    if teacher_kind == "logits":
        bad |= _nonfinite_rows(t)
    else:
        mass = (t.exp() if teacher_kind == "log_probs" else t).sum(-1)
        bad |= ~((mass - 1).abs() <= MASS_TOL.get(teacher.dtype, 1e-3))
    if y is not None:
        bad |= ~((a >= 0) & (a <= 1)) | (y < 0) | (y >= c)
    if standardize:  # a row holding -inf has no z-score
        bad |= (z == -INF).any(-1) | (t == -INF).any(-1)
    bad &= counted
    ok = counted & ~bad
    # The formula, on rows that are computed; the others get harmless stand-ins.
    zz = torch.where(ok[:, None], z, 0.0)
    tt = torch.where(ok[:, None], t, {"logits": 0.0, "probs": 1 / c, "log_probs": -math.log(c)}[teacher_kind])  # fmt: skip
    TT = torch.where(ok, T, 1.0)[:, None]
    if teacher_kind == "logits":
        log_pt = torch.log_softmax((_standardized(tt) if standardize else tt) / TT, -1)
    else:
        log_pt = tt.log() if teacher_kind == "probs" else tt
    log_ps = torch.log_softmax((_standardized(zz) if standardize else zz) / TT, -1)
    yy = None if y is None else torch.where(ok, y, 0)
    d = divergence_rows(log_ps, log_pt, yy, **div)
    s = TT[:, 0] ** 2 if t_squared else torch.ones(n, dtype=F64)
    if y is None:
        rows = s * d
    else:
        ce = torch.logsumexp(zz, -1) - zz.gather(1, yy[:, None])[:, 0]  # CE on the raw logits
        aa = torch.where(ok, a, 0.5)
        rows = _weighted(1 - aa, ce) + _weighted(aa, s * d)
    rows = torch.where(ok, rows, 0.0)
    count = max(int(counted.sum()), 1)

    def reduce(r):
        return {"none": r.reshape(lead), "sum": r.sum(), "mean": r.sum() / count}[reduction]

    if graph:  # for gradcheck: the differentiable loss of a float64 student
        return reduce(rows)
    if n:
        reduce(rows).sum().backward()
    grad = z.grad if z.grad is not None else torch.zeros_like(z)
    grad = torch.where(bad[:, None], NAN, grad)
    return reduce(torch.where(bad, NAN, rows.detach())), grad.reshape(student.shape)


def run_kd(backend, student, teacher, labels=None, **kw):
    """The op's (loss, grad of loss.sum()) on one backend."""
    z = student.detach().clone().requires_grad_(True)
    with ops.use_backend(backend):
        loss = ops.kd_loss(z, teacher, labels, **kw)
    if z.numel():
        loss.sum().backward()
    return loss, z.grad if z.grad is not None else torch.zeros_like(z)


def check_kd(backend, student, teacher, labels=None, *, loose=1.0, grad_floor=0.0, **kw):
    """kd_loss on a backend against the oracle: a float32 loss at float32's tolerance (it is
    computed in float32 from the dtype's values; its KL loses digits as T^2, hence the T factor)
    and a gradient in the student's dtype at that dtype's tolerance, relative to its largest
    entry or to grad_floor (where saturated rows make every entry tiny, a difference of O(1)
    terms, its error is relative to those terms)."""
    loss, grad = run_kd(backend, student, teacher, labels, **kw)
    exp_loss, exp_grad = kd_loss(student, teacher, labels, **kw)
    T = kw.get("T", 4.0)
    t_max = float(T.max()) if isinstance(T, Tensor) and T.numel() else 1.0
    t_max = T if not isinstance(T, Tensor) else t_max
    what = f"{backend} {student.dtype} {tuple(student.shape)}"
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype, what
    t_factor = max(1.0, t_max**2 / 2000)
    assert_close(loss, exp_loss, f"{what} loss", loose=loose * t_factor)
    tiny = max(1e-12, torch.finfo(student.dtype).tiny, grad_floor)  # below: may underflow
    assert_close(grad, exp_grad, f"{what} grad", student.dtype, floor=tiny, loose=loose)
