"""tail="sampled" of sparse_kd_loss: the importance-sampled estimator of Sparse Logit Sampling
(Anshumann et al., ACL 2025), in torch (issue 16): the twin, which GPUs and float64 students run;
the C++ backend runs it fused (csrc/cpu/sparse_kd_cpu.cpp, sampled_buckets, the same float64
teacher side).

Per row the teacher is known through S draws from q = softmax(z_t / T0), T0 = sample_T
(capture_soft_labels's samples): the distinct ids i with their counts c_i (sum S), the teacher's raw
logits t_i at those ids, logz = log sum_v exp(z_t,v / T) and, when T != T0, logz0 = the same at T0.
With log p_i = t_i / T - logz (the teacher at T) and the importance weight
w_i = p_i / q_i = exp((t_i / T - logz) - (t_i / T0 - logz0)) (1 when T = T0):

    p_hat_i = (c_i / S) w_i,    D_hat = sum_i p_hat_i (log p_i - log P_i),    P = softmax(z / T)
    dD_hat / du_j = P_j sum_i p_hat_i - p_hat_j                                 (u = z / T)

What is unbiased: E[c_i / S] = q_i, so E[p_hat_v] = p_v for every id v of the vocabulary (q > 0
wherever p > 0: both are softmaxes of the same finite logits). D_hat and its gradient are linear
in p_hat, hence, over the draws, E[D_hat] = KL(p || P) and E[dD_hat / dz] = (P - p) / T, the exact
value and gradient of kd_loss's "kl" term at T (and of its CE term, which is not sampled); so is
any loss that is linear in the rows (sum, mean). Up to float rounding: the estimator is exact
arithmetic on the stored values. Only "kl" is linear in p like this: reverse_kl needs p at ids the
student, not the teacher, puts mass on; jsd, skew_kl, skew_reverse_kl and tvd are non-linear in p,
so a plug-in p_hat biases them. They are refused.

Variance: at T = T0 the weights are 1 and sum_i p_hat_i = 1 exactly. At T > T0 the tail is sampled
less than it is weighted (w grows on rare ids), so the estimate is noisier; it stays unbiased.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rbkd.ops import validation as v
from rbkd.ops.sparse_twin import _col, finish_rows


def _entries(ids: Tensor, counts: Tensor, v: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(safe ids [n, s] int64, used [n, s], counts [n, s] int64 (0 where unused), bad [n]):
    an entry is an id in [0, V) with a count >= 0, or padding (id -1, count 0); a row with any
    other entry, an id twice, or no draw at all is bad."""
    in_range = (ids >= 0) & (ids < v)
    pad = (ids == -1) & (counts == 0)
    bad = ~((in_range & (counts >= 0)) | pad).all(1)
    safe = torch.where(in_range, ids, 0).long()
    used = in_range & (counts > 0)
    c = torch.where(used, counts, 0).long()
    # Repeated ids among the non-padding entries: padding sorts as distinct negative numbers.
    slot = torch.arange(ids.shape[1], device=ids.device)
    key = torch.where(in_range, safe, -1 - slot).sort(1).values
    bad |= (key[:, 1:] == key[:, :-1]).any(1) | (c.sum(1) == 0)
    return safe, used, c, bad


def teacher_weights(topk, logz, sample_logz, T, sample_T, used, c):
    """(log p [n, s], p_hat [n, s], bad [n], log mass [n]) in float64 (O(N s)): the teacher at T
    on the used entries (0 elsewhere), the estimator's p_hat, the rows whose logits (at used
    entries) or logz are not finite, and the log of the teacher's mass on the drawn ids, at T and
    at sample_T, whichever is larger (above 0: a logz that is not the full vocabulary's)."""
    t = torch.where(used, topk.double(), 0.0)
    T_col = _col(T, t)
    log_p = torch.where(used, t / T_col - logz.double().reshape(-1, 1), 0.0)
    bad = ~(topk.double().isfinite() | ~used).all(1) | ~logz.double().reshape(-1).isfinite()
    log_mass = [torch.logsumexp(log_p.masked_fill(~used, -math.inf), 1)]
    if sample_logz is None:
        log_w = torch.zeros_like(log_p)
    else:
        log_q = t / sample_T - sample_logz.double().reshape(-1, 1)
        log_w = torch.where(used, log_p - log_q, 0.0)
        bad |= ~sample_logz.double().reshape(-1).isfinite()
        log_mass.append(torch.logsumexp(log_q.masked_fill(~used, -math.inf), 1))
    total = c.sum(1, keepdim=True).clamp_min(1).double()
    p_hat = torch.where(used, c.double() / total * log_w.exp(), 0.0)
    return log_p, p_hat, bad, torch.stack(log_mass).amax(0)


def sampled_chunk(z_in, ids, counts, topk, logz, sample_logz, labels, T, sample_T, alpha, opts,
                  need_grad):  # fmt: skip
    """(loss [n], valid [n], grad [n, V] or None) of one chunk of rows, as sparse_twin._chunk."""
    dtype = torch.float64 if z_in.dtype == torch.float64 else torch.float32
    z = z_in.to(dtype)
    v = z.shape[1]
    safe, used, c, bad = _entries(ids, counts, v)
    log_p, p_hat, bad_t, log_mass = teacher_weights(topk, logz, sample_logz, T, sample_T, used, c)
    bad |= bad_t | (log_mass > math.log1p(opts.probs_tol))

    u = z / _col(T, z)
    lse = torch.logsumexp(u, -1, keepdim=True)
    log_P = u.gather(1, safe) - lse
    p_hat, log_p = p_hat.to(dtype), log_p.to(dtype)
    div = torch.where(used, p_hat * (log_p - log_P), 0.0).sum(1)

    def div_grad():
        mass = p_hat.sum(1, keepdim=True)  # 1 at T = T0; its expectation is 1 at any T
        return (u - lse).exp_().mul_(mass).scatter_add_(1, safe, -p_hat)

    return finish_rows(z, div, bad, labels, T, alpha, opts, need_grad, div_grad)


def check_sampled_values(ids, counts, topk, logz, sample_logz, T, sample_T, vocab, keep, tol):
    """The host checks of tail="sampled" (CPU tensors, or RBKD_CHECKS=full), as the bucket
    tail's: a bad entry, an id twice, a row with no draw or a mass on the drawn ids above
    1 + tol (a logz that is not the full vocabulary's) are one-line ValueErrors for counted rows
    (`keep`); non-finite logits or logz only under RBKD_CHECKS=full (else NaN rows)."""
    ids, counts, keep = ids.cpu(), counts.cpu(), keep.cpu()
    in_range = (ids >= 0) & (ids < vocab)
    wrong = ~((in_range & (counts >= 0)) | ((ids == -1) & (counts == 0))) & keep[:, None]
    if bool(wrong.any()):
        r, j = (int(x) for x in wrong.nonzero()[0])
        raise ValueError(
            f"sampled ids/counts row {r}, entry {j}: id {int(ids[r, j])} with count "
            f"{int(counts[r, j])}; an entry is an id in [0, {vocab}) with a count >= 0, or "
            "padding (id -1, count 0)"
        )
    _, used, c, bad = _entries(ids, counts, vocab)
    bad &= keep
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        why = "holds no draw (every count 0)" if int(c[r].sum()) == 0 else "holds an id twice"
        raise ValueError(f"sampled ids row {r} {why}: give distinct ids with counts > 0")
    T_cpu = T.cpu() if isinstance(T, Tensor) else T
    slogz = None if sample_logz is None else sample_logz.cpu()
    _, _, bad_t, log_mass = teacher_weights(topk.cpu(), logz.cpu(), slogz, T_cpu, sample_T, used, c)
    over = (log_mass > math.log1p(tol)) & keep & ~bad_t  # non-finite rows: the NaN rule's
    if bool(over.any()):
        r = int(over.nonzero()[0, 0])
        raise ValueError(
            f"row {r}: the teacher's mass on the sampled ids is {math.exp(float(log_mass[r])):.6g}"
            ", above 1: logz (and sample_logz) must be log sum_v exp(z_v / T) over the full "
            "vocabulary at T (and at sample_T)"
        )
    bad_t &= keep
    if v.checks_mode() == "full" and bool(bad_t.any()):
        raise ValueError(
            f"row {int(bad_t.nonzero()[0, 0])}: topk_logits at a sampled id, logz or sample_logz "
            "is not finite, so its loss would be NaN (RBKD_CHECKS=full makes this an error)"
        )
