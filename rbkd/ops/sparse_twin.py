"""The pure-PyTorch twin of sparse_kd_loss: the loss and its gradient, written out.

The student's full distribution p = softmax(z / T) over V ids is compared with a teacher known only
on k ids, through a (k + 1)-bucket view: bucket i is the i-th kept id, the last bucket the other
V - k ids together (the "tail"). For a partition of the ids into buckets B with P_B = sum_{j in B}
p_j, any divergence D(Q, P) of the bucket distributions has, for the tempered logits u = z / T,

    dD/du_j = (p_j / P_B(j)) h_B(j) - p_j H,   h_B = P_B dD/dP_B,   H = sum_B h_B,

the h of csrc/README.md taken at bucket level (backends.torch_twin.divergence_h). A kept id is its own
bucket (p_j / P_B = 1); a tail id gets r_j h_tail - p_j H with r_j = exp(u_j - lse_tail), the
student's distribution inside the tail, which stays exact where P_tail underflows.

Teacher buckets (tail="bucket"): Q_i = exp(t_i / T - logz), Q_tail = 1 - sum Q_i, taken as
log1mexp(logsumexp(t / T) - logz) and floored at TAIL_FLOOR (below it float32 logits and logz
cannot resolve the tail; the floor keeps the reverse divergences finite). With k = V there is no
tail on either side. tail="renormalize" (DistillKit's ZERO): Q_i = softmax(t / T) over the k ids,
Q_tail = 0: every f-divergence is 1-homogeneous, so its V - k terms with q_j = 0 sum to
f(P_tail, 0), and the (k + 1)-bucket divergence is the full-vocabulary divergence against the
teacher padded with zeros. reverse_kl (and its ends) are infinite there, so they are refused.
tail="sampled" is rbkd/ops/sparse_sampled.py's chunk function; finish_rows, the CE term, the
non-finite rule and the gradient's scaling, is shared by both.

Memory: rows run in chunks of at most CHUNK_ELEMENTS student entries, so beside the student, its
gradient and O(N k) this holds a fixed working set (a few float32 chunks), never [N, V] float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rbkd.ops.args import DIVERGENCES, KDOptions
from rbkd.ops.backends import torch_twin as ref

TAIL_MODES = {"bucket": 0, "renormalize": 1, "sampled": 2}
# A teacher tail below 2^-24 (float32's spacing just below 1) is below what float32 logits and a
# float32 logz can resolve: 1 - sum Q_i is rounding noise there. It is taken as 2^-24.
TAIL_FLOOR = 2.0**-24
# Student entries per chunk of rows: 2^21 float32 = 8 MiB per temporary (about six live at once).
CHUNK_ELEMENTS = 1 << 21


def _col(value: float | Tensor, like: Tensor) -> float | Tensor:
    return value.to(like.dtype).reshape(-1, 1) if isinstance(value, Tensor) else value


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); -inf at x = 0."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def effective_divergence(opts: KDOptions) -> int:
    """jsd at beta 0 / 1 is kl / reverse_kl (TRL's and Liger's ends; the formula vanishes there)."""
    div = opts.divergence
    if div == DIVERGENCES["jsd"] and opts.beta in (0.0, 1.0):
        return DIVERGENCES["kl"] if opts.beta == 0.0 else DIVERGENCES["reverse_kl"]
    return div


def teacher_buckets(
    topk: Tensor, logz: Tensor | None, T: float | Tensor, tail: int, has_tail: bool
) -> tuple[Tensor, Tensor]:
    """(log Q [n, k (+ 1)], log S [n]): the teacher's bucket log-probabilities and the log of its
    kept mass (0 for renormalize; above 0 is a logz that is not the full-vocabulary one).
    topk [n, k] and logz [n] (bucket only) in the compute dtype; the results in it too, computed
    in float64 (O(N k)): 1 - sum Q_i cancels, and float32 would resolve it only to about
    |logz| * 2^-23 (a 10% error of a 1e-6 tail at logz = 30)."""
    dtype = topk.dtype
    topk = topk.double()  # O(N k): the teacher's tail exactly as its inputs give it
    t = topk / _col(T, topk)
    if tail == TAIL_MODES["renormalize"]:
        log_q = t - torch.logsumexp(t, -1, keepdim=True)
        log_s = torch.zeros_like(log_q[:, 0])
        tail_col = torch.full_like(log_q[:, :1], -math.inf)
    else:
        log_q = t - logz.double().reshape(-1, 1)
        log_s = torch.logsumexp(log_q, -1)
        tail_col = log1mexp(log_s.clamp(max=0.0)).clamp(min=math.log(TAIL_FLOOR)).unsqueeze(1)
    log_q = torch.cat([log_q, tail_col], 1) if has_tail else log_q
    return log_q.to(dtype), log_s.to(dtype)


def _chunk(z_in, ids, topk, logz, labels, T, alpha, tail, opts, need_grad, probs_tol):
    """(loss [n], valid [n], grad [n, V] float32 or None) of one chunk of rows (bucket and
    renormalize)."""
    dtype = torch.float64 if z_in.dtype == torch.float64 else torch.float32
    z = z_in.to(dtype)
    n, v = z.shape
    k = ids.shape[1]
    has_tail = k < v
    T_col = _col(T, z)
    in_range = ((ids >= 0) & (ids < v)).all(1)
    ids = torch.where((ids >= 0) & (ids < v), ids, 0).long()
    ordered = ids.sort(1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(1)

    # The student: kept log-probabilities, and the tail's as the log-sum-exp of the other ids.
    u = z / T_col
    lse = torch.logsumexp(u, -1, keepdim=True)
    log_p = u.gather(1, ids) - lse
    if has_tail:
        rest = u.scatter(1, ids, -math.inf)
        lse_tail = torch.logsumexp(rest, -1, keepdim=True)
        log_p = torch.cat([log_p, lse_tail - lse], 1)
    t = topk.to(dtype)
    log_q, log_s = teacher_buckets(t, None if logz is None else logz.to(dtype), T, tail, has_tail)
    div = ref.divergence_rows(log_p, log_q, None, opts)

    bad = ref.nonfinite_rows(t) | ~in_range | repeated
    if logz is not None and tail == TAIL_MODES["bucket"]:
        bad |= ~torch.isfinite(logz.to(dtype).reshape(-1)) | (log_s > math.log1p(probs_tol))

    def div_grad():
        """dD/du: -p H everywhere, r h_tail on the tail ids, h_i added on the kept ids."""
        d = effective_divergence(opts)
        h = -log_q.exp() if d == DIVERGENCES["kl"] else ref.divergence_h(log_p, log_q, d, opts)
        grad = (u - lse).exp_().mul_(-h.sum(-1, keepdim=True))
        if has_tail:
            empty = lse_tail == -math.inf  # no student mass outside the kept ids: nothing to spread
            r = rest.sub_(torch.where(empty, 0.0, lse_tail)).exp_()
            grad.add_(r.mul_(torch.where(empty, 0.0, h[:, k:])))
        return grad.scatter_add_(1, ids, h[:, :k])

    return finish_rows(z, div, bad, labels, T, alpha, opts, need_grad, div_grad)


def finish_rows(z, div, bad, labels, T, alpha, opts, need_grad, div_grad):
    """(loss [n], valid [n], grad [n, V] or None): L = (1 - a) CE(z, y) + a s D per row with the
    non-finite rule (`bad`: the tail mode's own NaN rows, before ignore_index), and its gradient
    from div_grad() = dD/du, u = z / T ([n, V] in z's dtype, called only when need_grad; it may
    return one of its own temporaries, which is scaled in place)."""
    n, v = z.shape
    T_col = _col(T, z)
    s = T_col * T_col if opts.t_squared else 1.0
    s = s.reshape(-1) if isinstance(s, Tensor) else s
    a = 1.0 if labels is None else (alpha.to(z.dtype) if isinstance(alpha, Tensor) else alpha)
    valid = ref.valid_rows(labels, n, v, opts.ignore_index, z.device)
    if labels is None:
        loss = s * div
    else:
        safe = torch.where(valid, labels.long(), 0)
        ce = torch.logsumexp(z, -1) - z.gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = ref._weighted(1 - a, ce) + ref._weighted(a, s * div)
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    bad = bad | ref.nonfinite_rows(z)
    if isinstance(T, Tensor):
        bad |= ~((T > 0) & (T <= ref.KD_MAX_TEMPERATURE))
    if labels is not None:
        if isinstance(alpha, Tensor):
            bad |= ~((alpha >= 0) & (alpha <= 1))
        bad |= (labels < 0) | (labels >= v)
    bad &= ref.counted_rows(labels, n, opts.ignore_index, z.device)
    loss = torch.where(bad, torch.full_like(loss, math.nan), loss)
    if not need_grad:
        return loss, valid, None

    a_col = 1.0 if labels is None else _col(alpha, z)
    grad = ref._weighted(a_col, div_grad().mul_(T_col if opts.t_squared else 1.0 / T_col))  # s/T
    if labels is not None:
        ce_grad = torch.softmax(z, -1) - ref._onehot(labels, valid, v, z.dtype)
        grad = grad + ref._weighted(1 - a_col, ce_grad)
    return loss, valid, grad


def sparse_kd_forward(
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
    """(loss [N] float32, gradient [N, V] in the student's dtype times grad_scale, or None).

    student [N, V], ids [N, k] int32/int64, topk [N, k], logz [N] or None, labels [N] or None;
    T / alpha floats or float32 [N]; the non-finite rule as kd_loss (README, "The loss
    convention"), with out-of-range or repeated ids, a non-finite logz and a kept mass above
    1 + probs_tol also making a counted row NaN. tail="sampled" (rbkd/ops/sparse_sampled.py):
    ids are sampled ids (-1 padding), topk the teacher's raw logits there, counts [N, k] their
    counts, sample_logz [N] or None the teacher's logz at sample_T.
    """
    from rbkd.ops.sparse_sampled import sampled_chunk  # here: it imports finish_rows from here

    n, v = student.shape
    losses = []
    grad = torch.empty_like(student) if need_grad else None
    step = max(1, CHUNK_ELEMENTS // max(v, 1))
    with torch.no_grad():
        for r0 in range(0, n, step):
            rows = slice(r0, min(n, r0 + step))

            def part(x, rows=rows):
                return None if x is None or not isinstance(x, Tensor) else x[rows]

            T_part = part(T) if isinstance(T, Tensor) else T
            a_part = part(alpha) if isinstance(alpha, Tensor) else alpha
            if tail == TAIL_MODES["sampled"]:
                loss, valid, g = sampled_chunk(
                    student[rows], ids[rows], counts[rows], topk[rows], part(logz),
                    part(sample_logz), part(labels), T_part, sample_T, a_part, opts, need_grad,
                )  # fmt: skip
            else:
                loss, valid, g = _chunk(
                    student[rows], ids[rows], topk[rows], part(logz), part(labels), T_part,
                    a_part, tail, opts, need_grad, opts.probs_tol,
                )  # fmt: skip
            losses.append(loss.float())
            if need_grad:
                grad[rows] = ref._finish_grad(g, valid, loss, grad_scale, student.dtype)
    loss = torch.cat(losses) if losses else student.new_zeros((0,), dtype=torch.float32)
    return loss, grad
