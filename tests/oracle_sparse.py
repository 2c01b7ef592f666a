"""The float64 oracle of rbkd.ops.sparse_kd_loss and capture_soft_labels, written from the formulas
of issue 16 and the op's docstring, never from rbkd/ops/sparse_twin.py:

- bucket: the student's log tail mass is the log-sum-exp of its log-softmax over the ids outside
  the k, the teacher's tail 1 - sum exp(t_i / T - logz) in float64, floored at 2^-24; no tail
  bucket when k = V;
- renormalize: the full-vocabulary divergence of oracle.divergence_rows against the teacher
  renormalised over its k ids and padded with zeros (the twin works on k + 1 buckets);
- sampled: the teacher estimated as the dense vector p_hat = (c / S) p_T / p_sample_T scattered
  over the vocabulary (0 off the sampled ids), D = sum_v p_hat_v (log p_T,v - log p_s,v);
- the gradient by torch.autograd.

A row that the non-finite rule covers is NaN in the loss and in its gradient row; the formula
never sees its values (they are swapped for harmless ones first), so autograd stays exact.
"""

from __future__ import annotations

import math

import torch
from oracle import MASS_TOL, _nonfinite_rows, _weighted, divergence_rows
from torch import Tensor

F64 = torch.float64
NAN = math.nan
TAIL_FLOOR = 2.0**-24
KD_MAX_T = 100.0


def _per_row(value, n: int) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().double().reshape(n)
    return torch.full((n,), float(value), dtype=F64)


def sparse_kd_loss(student, ids, topk, labels=None, *, logz=None, T=1.0, alpha=0.9,
                   t_squared=True, tail="bucket", ignore_index=-100, reduction="mean",
                   divergence="kl", beta=0.5, skew=0.1, sample_counts=None, sample_T=None,
                   sample_logz=None):  # fmt: skip
    """(loss, grad of loss.sum() w.r.t. student) in float64, the loss as the op returns it."""
    lead, v, k = student.shape[:-1], student.shape[-1], ids.shape[-1]
    n = lead.numel()
    z = student.detach().double().reshape(n, v).requires_grad_(True)
    idx = ids.reshape(n, k).long()
    t = topk.detach().double().reshape(n, k)
    y = None if labels is None else labels.reshape(n).long()
    T, a = _per_row(T, n), _per_row(alpha, n)
    lz = None if logz is None else logz.detach().double().reshape(n)

    counted = torch.ones(n, dtype=torch.bool) if y is None else y != ignore_index
    bad = _nonfinite_rows(z) | ~((T > 0) & (T <= KD_MAX_T))
    safe_idx = idx.clamp(0, v - 1)
    if tail == "sampled":
        c = sample_counts.reshape(n, k).long()
        lz0 = None if sample_logz is None else sample_logz.detach().double().reshape(n)
        used, bad_s = _sampled_rows(idx, c, t, T, lz, sample_T, lz0, v, topk.dtype)
        bad |= bad_s
    else:
        bad |= _nonfinite_rows(t) | ((idx < 0) | (idx >= v)).any(-1)
        for r in range(n):  # repeated ids, row by row: the plain way
            bad[r] |= len(set(safe_idx[r].tolist())) != k
    if tail == "bucket":
        mass = torch.exp(t / T[:, None] - lz[:, None]).sum(-1)
        bad |= ~torch.isfinite(lz) | (mass > 1 + MASS_TOL.get(topk.dtype, 1e-3))
    if y is not None:
        bad |= ~((a >= 0) & (a <= 1)) | (y < 0) | (y >= v)
    bad &= counted
    ok = counted & ~bad

    zz = torch.where(ok[:, None], z, 0.0)
    TT = torch.where(ok, T, 1.0)[:, None]
    tt = torch.where(ok[:, None], t, 0.0)
    log_ps = torch.log_softmax(zz / TT, -1)
    ii = torch.where(ok[:, None], safe_idx, torch.arange(k)[None, :] % v)
    if tail == "sampled":
        use = used & ok[:, None]
        ii = torch.where(use, safe_idx, 0)
        tu = torch.where(use, t, 0.0)
        log_pt = tu / TT - torch.where(ok, lz, 0.0)[:, None]
        w = torch.ones_like(log_pt)
        if lz0 is not None:
            w = torch.exp(log_pt - (tu / sample_T - torch.where(ok, lz0, 0.0)[:, None]))
        cu = torch.where(use, c, 0).double()
        p_hat = torch.where(use, cu / cu.sum(-1, keepdim=True).clamp(min=1) * w, 0.0)
        p_hat_full = torch.zeros(n, v, dtype=F64).scatter_add(1, ii, p_hat)
        log_pt_full = torch.zeros(n, v, dtype=F64).scatter_add(1, ii, torch.where(use, log_pt, 0))
        d = (p_hat_full * (log_pt_full - log_ps)).sum(-1)
    elif tail == "renormalize":
        q = torch.softmax(tt / TT, -1)
        q_full = torch.zeros(n, v, dtype=F64).scatter(1, ii, q)
        d = divergence_rows(log_ps, q_full.log(), None, divergence, beta, skew)
    else:
        lzz = torch.where(ok, lz, torch.logsumexp(tt / TT, -1))
        q = torch.exp(tt / TT - lzz[:, None])
        log_p = log_ps.gather(1, ii)
        if k < v:
            outside = torch.ones(n, v, dtype=torch.bool).scatter(1, ii, False)
            log_p_tail = torch.logsumexp(log_ps.masked_fill(~outside, -math.inf), -1, True)
            q_tail = (1 - q.sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR)
            log_p, q = torch.cat([log_p, log_p_tail], 1), torch.cat([q, q_tail], 1)
        d = divergence_rows(log_p, q.log(), None, divergence, beta, skew)
    s = TT[:, 0] ** 2 if t_squared else torch.ones(n, dtype=F64)
    if y is None:
        rows = s * d
    else:
        yy = torch.where(ok, y, 0)
        ce = torch.logsumexp(zz, -1) - zz.gather(1, yy[:, None])[:, 0]
        aa = torch.where(ok, a, 0.5)
        rows = _weighted(1 - aa, ce) + _weighted(aa, s * d)
    rows = torch.where(ok, rows, 0.0)
    count = max(int(counted.sum()), 1)

    def reduce(x):
        return {"none": x.reshape(lead), "sum": x.sum(), "mean": x.sum() / count}[reduction]

    if n:
        reduce(rows).sum().backward()
    grad = z.grad if z.grad is not None else torch.zeros_like(z)
    grad = torch.where(bad[:, None], NAN, grad)
    return reduce(torch.where(bad, NAN, rows.detach())), grad.reshape(student.shape)


def _sampled_rows(idx, c, t, T, lz, sample_T, lz0, v, dtype):
    """(used entries [n, s], bad rows [n]) of tail='sampled': an entry is an id in [0, V) with a
    count >= 0 or padding (-1, 0); a row is bad with another entry, an id twice, no draw, a
    non-finite teacher logit at a drawn id or logz, or a mass on the drawn ids above 1 + tol."""
    n = idx.shape[0]
    in_range = (idx >= 0) & (idx < v)
    entry = (in_range & (c >= 0)) | ((idx == -1) & (c == 0))
    used = in_range & (c > 0)
    bad = ~entry.all(-1) | (torch.where(used, c, 0).sum(-1) == 0)
    for r in range(n):
        drawn = [i for i in idx[r].tolist() if 0 <= i < v]
        bad[r] |= len(set(drawn)) != len(drawn)
    bad |= ~torch.where(used, t.isfinite(), True).all(-1) | ~torch.isfinite(lz)
    tol = MASS_TOL.get(dtype, 1e-3)
    tu = torch.where(used, t, 0.0)
    bad |= torch.where(used, torch.exp(tu / T[:, None] - lz[:, None]), 0.0).sum(-1) > 1 + tol
    if lz0 is not None:
        bad |= ~torch.isfinite(lz0)
        bad |= torch.where(used, torch.exp(tu / sample_T - lz0[:, None]), 0.0).sum(-1) > 1 + tol
    return used, bad


def capture(logits: Tensor, k: int, temps) -> dict[str, Tensor]:
    """topk ids (descending logits), their logits, logz [..., J] and entropy [..., J] in float64."""
    x = logits.detach().double()
    vals, ids = x.topk(k, -1)
    logz, ent = [], []
    for T in temps:
        u = x / float(T)
        lz = torch.logsumexp(u, -1)
        p = torch.softmax(u, -1)
        logz.append(lz)
        ent.append(lz - torch.where(p > 0, p * u, 0.0).sum(-1))
    return {"topk_ids": ids, "topk_logits": vals, "logz": torch.stack(logz, -1),
            "entropy": torch.stack(ent, -1)}  # fmt: skip
