"""Fused sparse_kd_loss (issue 16): kd_loss against a teacher kept as its top-k, tail "bucket" or
"renormalize", every bucket divergence (kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd).

The math is rbkd/ops/sparse_twin.py's (csrc/README.md, "Sparse soft labels"): the student's
p = softmax(z / T) and the teacher are coarsened to the k kept ids plus one tail bucket, and with
h_B = P_B dD/dP_B, H = sum_B h_B, u = z / T,

    dD/du_j = h_i - p_j H              (j the i-th kept id)
    dD/du_j = r_j h_tail - p_j H       (j in the tail, r_j = p_j / P_tail)

Host side, in torch on the device (no host sync): the ids are checked (in range, distinct), sorted
and cut at the column blocks (O(N k + N V / BLOCK)), and the teacher's bucket log-probabilities
come from sparse_twin.teacher_buckets in float64 (1 - sum Q_i cancels; the C++ kernel does the
same per row in double).

One program per row, two passes over the student row in column blocks:
  pass 1: online (max, sum) of the tail's exp(z / T) -- the kept ids set to -inf in the block, the
      block's share of the sorted ids given by a host searchsorted (a per-block reduction over the
      ids in registers would cost a CTA-wide sync per block) -- and of
      exp(z) over the whole row for the CE term. The tail's sum is formed directly with its own
      max, never as 1 - kept mass, so a tiny student tail stays exact. The k kept logits are
      gathered; the k + 1 buckets, D and H are then a few vectors of k.
  pass 2: g_j = c e_j (+ the CE term), e_j = exp(u_j - lse_tail) = r_j, one exp (two with labels),
      written for every id; after a barrier the k kept ids are overwritten with their own value.
At T = 1 (a scalar T, the usual LM setting) softmax(z) is p itself: the CE term needs no sums or
exps of its own, so both passes take one exp per element (T_ONE).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rbkd.ops.args import KD_MAX_TEMPERATURE, KDOptions

from ._launch import (
    KD_COLS,
    MAX_BLOCK_KD,
    NEG_FLT_MAX,
    device_guard,
    lane_lse_combine,
    online_lse_update,
    pick_block,
    pick_num_warps,
    row_param,
)
from .kd_divergence import _div_terms, _logaddexp
from .kd_loss import divergence_args

KD_MAX_T = tl.constexpr(KD_MAX_TEMPERATURE)
# The kept ids live in registers as a [next_pow2(k)] vector; beyond this the backend runs the twin.
# Compiled for sm90 at BLOCK 1024, 8 warps (jsd, labels): 56 registers at k <= 128, 64 at 1024, 188
# at 4096, 255 at 8192, none spilled; so large k lowers occupancy (not measured on a GPU).
MAX_K = 8192
TAIL_BUCKET, TAIL_RENORMALIZE = 0, 1  # sparse_twin.TAIL_MODES


@triton.jit
def _bucket_terms(lp, lq, w_q, w_p, lw_q, lw_p, DIVERGENCE: tl.constexpr):
    """(D term, h) of one bucket (or a vector of them); kl is h = -q. 0 log 0 = 0."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    if DIVERGENCE == 0:
        d = tl.where(q > 0.0, q * (lq - lp), 0.0)
        h = -q
    else:
        d, h = _div_terms(lp, lq, p, q, w_q, w_p, lw_q, lw_p, DIVERGENCE)
    return d, h


@triton.jit
def _sparse_kd_fwd_kernel(
    s_ptr, s_row_stride, sid_ptr, bnd_ptr, bnd_row_stride, lq_ptr, lq_row_stride, pre_bad_ptr,
    labels_ptr, ignore_index,
    T_ptr, T_scalar, alpha_ptr, alpha_scalar, gs_ptr, gs_scalar,
    loss_ptr, grad_ptr, V, k, w_q, w_p, lw_q, lw_p,
    DIVERGENCE: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_LABELS: tl.constexpr,
    T_ROWS: tl.constexpr, ALPHA_ROWS: tl.constexpr, T_SQUARED: tl.constexpr,
    GS_PTR: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr, KPAD: tl.constexpr,
    T_ONE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64: N * V passes 2^31 at LLM shapes
    s_row = s_ptr + row * s_row_stride
    sid_row = sid_ptr + row * k
    cols = tl.arange(0, BLOCK)

    # Parameters and the non-finite rule, as kd_loss's kernel; pre_bad holds the host-side (O(k))
    # verdicts: ids out of range or repeated, the teacher's NaN / logz / kept-mass rule.
    T = tl.load(T_ptr + row) if T_ROWS else T_scalar
    bad = (T <= 0.0) | ~(T <= KD_MAX_T) | (tl.load(pre_bad_ptr + row) != 0)
    T = tl.where(bad, 1.0, T)
    inv_t = 1.0 / T
    s = T * T if T_SQUARED else 1.0
    if HAS_LABELS:
        alpha = tl.load(alpha_ptr + row) if ALPHA_ROWS else alpha_scalar
        bad |= (alpha < 0.0) | ~(alpha <= 1.0)
        y = tl.load(labels_ptr + row).to(tl.int64)
        ignored = y == ignore_index
        in_range = (y >= 0) & (y < V)
        bad = (bad | ~in_range) & ~ignored
        y = tl.where(in_range, y, 0)
    else:
        alpha = 1.0
        ignored = row < 0  # never: every row counts
        bad = bad & ~ignored
        y = row * 0 - 1
    C_read = tl.where(ignored | bad, 0, V)  # an ignored or bad row reads nothing
    live = C_read > 0

    kc = tl.arange(0, KPAD)
    kin = kc < k
    kmask = kc < tl.where(live, k, 0)  # (one compare: the interpreter rejects an & of masks)
    # Sorted kept ids; padding lanes (kc >= k) are never gathered or stored (kmask).
    sid = tl.load(sid_row + kc, mask=kin, other=V).to(tl.int64)

    # Pass 1: tail at T (kept ids masked out); the whole row at 1 for CE (at T != 1 only).
    m_t = tl.full([BLOCK], NEG_FLT_MAX, tl.float32)
    d_t = tl.zeros([BLOCK], tl.float32)
    m_c = tl.full([BLOCK], NEG_FLT_MAX, tl.float32)
    d_c = tl.zeros([BLOCK], tl.float32)
    bnd_row = bnd_ptr + row * bnd_row_stride
    for start in range(0, C_read, BLOCK):
        offs = start + cols
        z = tl.load(s_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        if HAS_LABELS and not T_ONE:
            m_c, d_c = online_lse_update(m_c, d_c, z, 1.0)
        if HAS_TAIL:
            # This block's kept ids: sid[lo:hi] (host searchsorted; no reduction per block).
            lo = tl.load(bnd_row + start // BLOCK)
            hi = tl.load(bnd_row + start // BLOCK + 1)
            for c in range(lo, hi):
                z = tl.where(offs == tl.load(sid_row + c), float("-inf"), z)
            m_t, d_t = online_lse_update(m_t, d_t, z, inv_t)

    # The k kept logits, and the row's max M over tail and kept ids.
    zk = tl.load(s_row + sid, mask=kmask, other=float("-inf")).to(tl.float32)
    bad |= tl.sum(((zk != zk) | (zk == float("inf"))).to(tl.int32), 0) > 0
    if HAS_TAIL:
        M_t, D_t = lane_lse_combine(m_t, d_t, inv_t)
        bad |= D_t != D_t  # NaN or +inf in the tail
        M = tl.maximum(M_t, tl.max(zk, 0))
        tail_empty = ~(D_t > 0.0)
        lse_tail = tl.where(tail_empty, float("-inf"), (M_t - M) * inv_t + tl.log(D_t))
    else:
        M = tl.maximum(tl.max(zk, 0), NEG_FLT_MAX)
        tail_empty = row >= 0  # always
        lse_tail = float("-inf")
    uk = (zk - M) * inv_t  # <= 0; -inf on padding lanes
    lse_kept = tl.log(tl.sum(tl.exp(uk), 0))
    lse = _logaddexp(lse_tail, lse_kept)
    bad |= ~(lse > float("-inf")) | (lse != lse)  # no finite value, NaN
    bad = bad & ~ignored

    # The buckets: the student's log P, the teacher's log Q (host, float64 then rounded).
    lp_k = uk - lse
    lq_k = tl.load(lq_ptr + row * lq_row_stride + kc, mask=kmask, other=float("-inf"))
    d_k, h_k = _bucket_terms(lp_k, lq_k, w_q, w_p, lw_q, lw_p, DIVERGENCE)
    d_k = tl.where(kmask, d_k, 0.0)
    h_k = tl.where(kmask, h_k, 0.0)
    D = tl.sum(d_k, 0)
    H = tl.sum(h_k, 0)
    if HAS_TAIL:
        lp_tail = lse_tail - lse
        lq_tail = tl.load(lq_ptr + row * lq_row_stride + k, mask=live, other=float("-inf"))
        d_tail, h_tail = _bucket_terms(lp_tail, lq_tail, w_q, w_p, lw_q, lw_p, DIVERGENCE)
        D += d_tail
        H += h_tail
    else:
        h_tail = 0.0

    kd_w = alpha * s
    loss = tl.where(kd_w != 0.0, kd_w * D, 0.0)
    if HAS_LABELS:
        if T_ONE:  # softmax(z) is p: the CE's normalizer is the row's, M + lse
            M_c = M
            log_dc = lse
        else:
            M_c, D_c = lane_lse_combine(m_c, d_c, 1.0)
            log_dc = tl.log(D_c)
        z_y = tl.load(s_row + y, mask=live, other=0.0).to(tl.float32)
        loss += tl.where(alpha != 1.0, (1.0 - alpha) * (M_c + log_dc - z_y), 0.0)
    loss = tl.where(ignored, 0.0, tl.where(bad, float("nan"), loss))
    tl.store(loss_ptr + row, loss)

    # Pass 2: g_j = kd_g (r_j h_tail - p_j H) on every id, as e_j = exp(u_j - shift) times a
    # constant (r_j, and p_j = r_j P_tail: P_tail <= 1, no overflow); the kept ids after.
    if NEED_GRAD:
        gs = tl.load(gs_ptr) if GS_PTR else gs_scalar
        # A zero weight drops the term (its h may be infinite).
        kd_g = tl.where(kd_w != 0.0, alpha * s * inv_t * gs, 0.0)
        ce_g = (1.0 - alpha) * gs
        grad_row = grad_ptr + row * V
        shift = tl.where(tail_empty, lse, lse_tail)
        p_shift = tl.where(tail_empty, 1.0, tl.exp(lse_tail - lse))
        coef = kd_g * (tl.where(tail_empty, 0.0, h_tail) - H * p_shift)
        coef = tl.where(kd_w != 0.0, coef, 0.0)  # 0 * an infinite h
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            z = tl.load(s_row + offs, mask=offs < C_read, other=float("-inf")).to(tl.float32)
            e = tl.exp((z - M) * inv_t - shift)
            g = tl.where(z > float("-inf"), coef * e, 0.0)
            if HAS_LABELS:
                # At T = 1 softmax(z)_j = p_j = e_j p_shift: no second exp.
                p_1 = e * p_shift if T_ONE else tl.exp(z - M_c - log_dc)
                g += ce_g * (p_1 - tl.where(offs == y, 1.0, 0.0))
            g = tl.where(ignored, 0.0, tl.where(bad, float("nan"), g))
            tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the kept ids' stores below land after pass 2's
        g_k = tl.where(kd_w != 0.0, kd_g * (h_k - tl.exp(lp_k) * H), 0.0)
        if HAS_LABELS:
            g_k += ce_g * (tl.exp(zk - M_c - log_dc) - tl.where(sid == y, 1.0, 0.0))
        g_k = tl.where(bad, float("nan"), g_k)
        tl.store(grad_row + sid, g_k.to(grad_ptr.dtype.element_ty), mask=kmask)


def prepare_teacher(ids, topk, logz, T, tail: int, vocab: int, probs_tol: float):
    """(sorted ids [N, k] int64, teacher bucket log Q [N, k (+ 1)] float32 in the same order, bad
    rows [N] int8): the O(N k) part, in torch on the ids' device, no host read."""
    from rbkd.ops import sparse_twin

    k = ids.shape[1]
    has_tail = k < vocab
    ids = ids.long()
    in_range = (ids >= 0) & (ids < vocab)
    sid, order = torch.where(in_range, ids, 0).sort(1)
    bad = ~in_range.all(1) | (sid[:, 1:] == sid[:, :-1]).any(1)
    t = topk.gather(1, order).float()
    lz = None if logz is None else logz.float()
    log_q, log_s = sparse_twin.teacher_buckets(t, lz, T, tail, has_tail)
    bad |= t.isnan().any(1) | (t == math.inf).any(1) | ~(t > -math.inf).any(1)  # the NaN rule
    if tail == TAIL_BUCKET:
        bad |= ~torch.isfinite(lz) | (log_s > math.log1p(probs_tol))
    return sid.contiguous(), log_q.contiguous(), bad.to(torch.int8)


def sparse_kd_forward(
    student: torch.Tensor,
    ids: torch.Tensor,
    topk: torch.Tensor,
    logz: torch.Tensor | None,
    labels: torch.Tensor | None,
    T: float | torch.Tensor,
    alpha: float | torch.Tensor,
    grad_scale: float | torch.Tensor,
    need_grad: bool,
    tail: int,
    opts: KDOptions,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sparse_twin.sparse_kd_forward's contract for tail bucket (0) / renormalize (1) and
    k <= MAX_K: (loss [N] float32, gradient [N, V] in the student's dtype times grad_scale, or
    None). block_size forces the column block (tests: several blocks on a small V)."""
    if tail not in (TAIL_BUCKET, TAIL_RENORMALIZE):
        raise ValueError(f"the Triton sparse kernel covers tail 0 and 1, got {tail}")
    divergence, mix = divergence_args(opts)
    if divergence == 6 or opts.standardize:
        raise ValueError("dkd and standardize are not defined on sparse soft labels")
    if student.stride(-1) != 1:
        student = student.contiguous()
    N, V = student.shape
    k = ids.shape[1]
    if k > MAX_K:
        raise ValueError(f"the Triton sparse kernel keeps at most {MAX_K} ids per row, got {k}")
    loss = torch.empty(N, dtype=torch.float32, device=student.device)
    grad = torch.empty((N, V), dtype=student.dtype, device=student.device) if need_grad else None
    if N == 0:
        return loss, grad
    sid, log_q, pre_bad = prepare_teacher(ids, topk, logz, T, tail, V, opts.probs_tol)
    block = pick_block(V, MAX_BLOCK_KD, block_size)
    # bounds[i, b] = how many of row i's kept ids lie below column b * block: block b masks
    # sid[i, bounds[i, b]:bounds[i, b + 1]]. O(N V / block) int32 (4 MB at 8192 x 128256).
    edges = torch.arange(0, V + block, block, device=sid.device)[: triton.cdiv(V, block) + 1]
    bounds = torch.searchsorted(sid, edges.expand(N, -1).contiguous(), out_int32=True)
    T_ptr, T_scalar, T_rows = row_param(T, loss)
    alpha_ptr, alpha_scalar, alpha_rows = row_param(alpha, loss)
    if isinstance(grad_scale, torch.Tensor):
        gs_ptr, gs_scalar, gs_is_ptr = grad_scale, 1.0, True
    else:
        gs_ptr, gs_scalar, gs_is_ptr = loss, float(grad_scale), False
    has_labels = labels is not None
    with device_guard(student):
        _sparse_kd_fwd_kernel[(N,)](
            student, student.stride(0), sid, bounds, bounds.stride(0), log_q, log_q.stride(0),
            pre_bad,
            labels if has_labels else loss, int(opts.ignore_index),
            T_ptr, T_scalar, alpha_ptr, alpha_scalar, gs_ptr, gs_scalar,
            loss, grad if need_grad else loss, V, k, *mix,
            DIVERGENCE=divergence, HAS_TAIL=k < V, HAS_LABELS=has_labels, T_ROWS=T_rows,
            ALPHA_ROWS=alpha_rows, T_SQUARED=bool(opts.t_squared), GS_PTR=gs_is_ptr,
            NEED_GRAD=bool(need_grad), BLOCK=block, KPAD=triton.next_power_of_2(k),
            T_ONE=not T_rows and T_scalar == 1.0,
            num_warps=pick_num_warps(block, KD_COLS),
        )  # fmt: skip
    return loss, grad
