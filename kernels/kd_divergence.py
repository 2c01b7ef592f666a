"""Fused kd_loss for the divergences other than plain KL, and for `standardize` (any divergence).

The formulas are csrc/README.md's "Divergences" (rbkd/ops/backends/torch_twin.py is the
executable spec): with u = z' / T, p = softmax(u), q = the teacher's probabilities,

    dD/du_j = h_j - p_j H,  H = sum_k h_k       (every divergence but kl and dkd)
    dD/du_j = p_j - q_j                          (kl: h = -q, H = -1)
    dD/du_j = da (p_y - q_y) ([j == y] - [j != y] r_j) + db [j != y] (r_j - rt_j)   (dkd)

and the loss gradient dL/dz = a s / T dD/du (+ the CE term on the raw z), taken through the
z-score when standardizing: dL/dz_j = rho G_j - rho^2 d_j (sum_k G_k d_k) / ((C - 1) sigma),
with d = z - mean z, rho = 1 / (sigma + eps). The `- rho mean(G)` of the README formula is left
out: G sums to zero exactly (h - p H sums to H - H, the dkd gradient to 0), so mean(G) is
rounding noise.

One program per row, in column blocks, loss and gradient from one launch:

  pass 0 (standardize only): per-lane Welford mean and M2 of z - z[0] and t - t[0] (the shift
      keeps rows with a large mean exact), combined across lanes exactly;
  pass 1: the online normalizers, as the KL kernel (kd_loss.py);
  pass 2: the divergence terms and H; for dkd the non-target log-sums (their own running max, so
      p_y near 1 stays exact) and the NCKD sum; for standardize sum h_k d_k and sum p_k d_k
      (sum G d = a s / T (sum h d - H sum p d): no pass of its own);
  pass 3: the gradient.

The plain-KL kernel (kd_loss.py) is not touched: kd_loss_forward sends divergence 0 without
standardize there, and everything else here.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rbkd.ops.args import KD_MAX_TEMPERATURE, STANDARDIZE_EPS

from ._launch import NEG_FLT_MAX, lane_lse_combine, online_lse_update

# Divergence codes (rbkd.ops.args.DIVERGENCES).
KL, REVERSE_KL, JSD, SKEW_KL, SKEW_REVERSE_KL, TVD, DKD = range(7)
STD_EPS = tl.constexpr(STANDARDIZE_EPS)
KD_MAX_T = tl.constexpr(KD_MAX_TEMPERATURE)
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)), -inf when both are."""
    mx = tl.maximum(a, b)
    mn = tl.minimum(a, b)
    return tl.where(mx == NEG_INF, mx, mx + tl.log(1.0 + tl.exp(mn - mx)))


@triton.jit
def _row_moments(row_ptr, C_read, C, cols, BLOCK: tl.constexpr):
    """(x0, mean, sigma) of a row x: mean of x - x0 (x0 = x[0]) and the unbiased std.

    Per-lane Welford over the blocks: every lane still in range in block k was in range in the
    blocks before, so its count is k + 1 and one scalar reciprocal serves the block. Lanes are
    combined with their exact counts (Chan et al.). Reads nothing when C_read is 0.
    """
    x0 = tl.load(row_ptr, mask=C_read > 0, other=0.0).to(tl.float32)
    mean = tl.zeros([BLOCK], tl.float32)
    m2 = tl.zeros([BLOCK], tl.float32)
    n = 0.0
    for start in range(0, C_read, BLOCK):
        offs = start + cols
        mask = offs < C
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32) - x0
        n += 1.0
        delta = tl.where(mask, x - mean, 0.0)
        mean += delta / n
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    count = ((C_read - cols + (BLOCK - 1)) // BLOCK).to(tl.float32)  # blocks that held the lane
    mu = tl.sum(count * mean, 0) / tl.maximum(C_read, 1).to(tl.float32)
    dev = mean - mu
    var = tl.sum(m2 + count * dev * dev, 0) / tl.maximum(C_read - 1, 1).to(tl.float32)
    return x0, mu, tl.sqrt(var)


@triton.jit
def _load_block(
    s_row, t_row, offs, rmask, z0, mu_z, M_s, k_s, log_ds, t0, mu_t, M_t, k_t, log_dt,
    TEACHER_KIND: tl.constexpr, STANDARDIZE: tl.constexpr,
):  # fmt: skip
    """x = z - mean (or z), log p, log q and q for one block; -inf / 0 outside rmask."""
    z = tl.load(s_row + offs, mask=rmask, other=float("-inf")).to(tl.float32)
    x = (z - z0) - mu_z if STANDARDIZE else z
    lp = (x - M_s) * k_s - log_ds
    if TEACHER_KIND == 0:
        t = tl.load(t_row + offs, mask=rmask, other=float("-inf")).to(tl.float32)
        xt = (t - t0) - mu_t if STANDARDIZE else t
        lq = (xt - M_t) * k_t - log_dt
        q = tl.exp(lq)
    elif TEACHER_KIND == 1:
        q = tl.load(t_row + offs, mask=rmask, other=0.0).to(tl.float32)
        lq = tl.log(q)
    else:
        lq = tl.load(t_row + offs, mask=rmask, other=float("-inf")).to(tl.float32)
        q = tl.exp(lq)
    return x, lp, lq, q


@triton.jit
def _div_terms(lp, lq, p, q, w_q, w_p, lw_q, lw_p, DIVERGENCE: tl.constexpr):
    """(D_j, h_j) of the divergences written with h (csrc/README.md's table); 0 log 0 = 0.

    w_q / w_p: the mixture weights of q and p (jsd: beta, 1 - beta; skew_kl: skew, 1 - skew;
    skew_reverse_kl: 1 - skew, skew), lw_q / lw_p their logs."""
    if DIVERGENCE == 1:
        d = tl.where(p > 0.0, p * (lp - lq), 0.0)
        h = d
    elif DIVERGENCE == 2:
        lm = _logaddexp(lq + lw_q, lp + lw_p)
        tp = tl.where(p > 0.0, p * (lp - lm), 0.0)
        d = w_q * tl.where(q > 0.0, q * (lq - lm), 0.0) + w_p * tp
        h = w_p * tp
    elif DIVERGENCE == 3:
        lm = _logaddexp(lq + lw_q, lp + lw_p)
        d = tl.where(q > 0.0, q * (lq - lm), 0.0)
        h = tl.where(q > 0.0, -w_p * q * tl.exp(lp - lm), 0.0)
    elif DIVERGENCE == 4:
        lm = _logaddexp(lp + lw_p, lq + lw_q)
        d = tl.where(p > 0.0, p * (lp - lm), 0.0)
        h = tl.where(p > 0.0, p * (lp - lm + 1.0 - w_p * tl.exp(lp - lm)), 0.0)
    else:  # tvd
        d = 0.5 * tl.abs(q - p)
        h = 0.5 * p * tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
    return d, h


@triton.jit
def _online_pair(m, d, a, x, v):
    """Online sum of exp(x - m) (d) and of exp(x - m) v (a) per lane; x = -inf adds nothing
    (v must then be finite)."""
    e = tl.exp(-tl.abs(x - m))
    up = x > m
    d = tl.where(up, d * e + 1.0, d + e)
    a = tl.where(up, a * e + v, a + e * v)
    return tl.maximum(m, x), d, a


@triton.jit
def _online_triple(m, d, a, b, x, v, w):
    e = tl.exp(-tl.abs(x - m))
    up = x > m
    d = tl.where(up, d * e + 1.0, d + e)
    a = tl.where(up, a * e + v, a + e * v)
    b = tl.where(up, b * e + w, b + e * w)
    return tl.maximum(m, x), d, a, b


@triton.jit
def _kd_div_fwd_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, labels_ptr, ignore_index,
    T_ptr, T_scalar, alpha_ptr, alpha_scalar, gs_ptr, gs_scalar,
    loss_ptr, grad_ptr, C, probs_tol, w_q, w_p, lw_q, lw_p, dkd_alpha, dkd_beta,
    DIVERGENCE: tl.constexpr, STANDARDIZE: tl.constexpr,
    TEACHER_KIND: tl.constexpr, HAS_LABELS: tl.constexpr, T_ROWS: tl.constexpr,
    ALPHA_ROWS: tl.constexpr, T_SQUARED: tl.constexpr, GS_PTR: tl.constexpr,
    NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64: N * C passes 2^31 at LLM shapes
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    cols = tl.arange(0, BLOCK)

    # Parameters and the non-finite rule, as in kd_loss._kd_loss_fwd_kernel.
    T = tl.load(T_ptr + row) if T_ROWS else T_scalar
    bad = (T <= 0.0) | ~(T <= KD_MAX_T)
    T = tl.where(bad, 1.0, T)
    inv_t = 1.0 / T
    s = T * T if T_SQUARED else 1.0
    if HAS_LABELS:
        alpha = tl.load(alpha_ptr + row) if ALPHA_ROWS else alpha_scalar
        bad |= (alpha < 0.0) | ~(alpha <= 1.0)
        y = tl.load(labels_ptr + row).to(tl.int64)
        ignored = y == ignore_index
        in_range = (y >= 0) & (y < C)
        bad = (bad | ~in_range) & ~ignored
        y = tl.where(in_range, y, 0)
        C_read = tl.where(ignored | bad, 0, C)
    else:
        alpha = 1.0
        ignored = row < 0
        y = row * 0
        C_read = tl.where(bad, 0, C)

    # Pass 0: z-score moments. Without standardize x = z, mean 0 and the scale is 1 / T.
    if STANDARDIZE:
        z0, mu_z, sig_z = _row_moments(s_row, C_read, C, cols, BLOCK)
        t0, mu_t, sig_t = _row_moments(t_row, C_read, C, cols, BLOCK)
        rho_z = 1.0 / (sig_z + STD_EPS)
        k_s = rho_z * inv_t
        k_t = inv_t / (sig_t + STD_EPS)
    else:
        z0, mu_z, t0, mu_t = 0.0, 0.0, 0.0, 0.0
        k_s = inv_t
        k_t = inv_t

    # Pass 1: online normalizers of x * k_s, x (CE: z - max z = x - max x) and the teacher.
    m_z = tl.full([BLOCK], NEG_FLT_MAX, tl.float32)
    d_s = tl.zeros([BLOCK], tl.float32)
    d_c = tl.zeros([BLOCK], tl.float32)
    m_t = tl.full([BLOCK], NEG_FLT_MAX, tl.float32)
    d_t = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C_read, BLOCK):
        offs = start + cols
        mask = offs < C
        z = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        x = (z - z0) - mu_z if STANDARDIZE else z
        if HAS_LABELS:
            neg = -tl.abs(x - m_z)
            up = x > m_z
            e_s = tl.exp(neg * k_s)
            e_c = tl.exp(neg)
            d_s = tl.where(up, d_s * e_s + 1.0, d_s + e_s)
            d_c = tl.where(up, d_c * e_c + 1.0, d_c + e_c)
            m_z = tl.maximum(m_z, x)
        else:
            m_z, d_s = online_lse_update(m_z, d_s, x, k_s)
        if TEACHER_KIND == 0:
            t = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            xt = (t - t0) - mu_t if STANDARDIZE else t
            m_t, d_t = online_lse_update(m_t, d_t, xt, k_t)
        elif TEACHER_KIND == 1:
            d_t += tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            d_t += tl.exp(tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32))
    M_s, D_s = lane_lse_combine(m_z, d_s, k_s)
    bad |= ~(D_s >= 1.0)
    log_ds = tl.log(D_s)
    if HAS_LABELS:
        _, D_c = lane_lse_combine(m_z, d_c, 1.0)
        log_dc = tl.log(D_c)
    if TEACHER_KIND == 0:
        M_t, D_t = lane_lse_combine(m_t, d_t, k_t)
        log_dt = tl.log(D_t)
        bad |= ~(D_t >= 1.0)
    else:
        M_t, log_dt = 0.0, 0.0
        bad |= ~(tl.abs(tl.sum(d_t, 0) - 1.0) <= probs_tol)
    bad = bad & ~ignored

    # Pass 2: the divergence's terms and the sums the gradient needs.
    acc = tl.zeros([BLOCK], tl.float32)  # D terms (all but dkd)
    h_sum = tl.zeros([BLOCK], tl.float32)  # H
    hd_sum = tl.zeros([BLOCK], tl.float32)  # sum h d (standardize)
    pd_sum = tl.zeros([BLOCK], tl.float32)  # sum p d (standardize)
    # dkd: log-sums of log p and log q over j != y, NCKD's sum rt (log q - log p) and the
    # standardize sums of r d and rt d, each lane with its own running max.
    m_r = tl.full([BLOCK], NEG_FLT_MAX, tl.float32)
    d_r = tl.zeros([BLOCK], tl.float32)
    w_r = tl.zeros([BLOCK], tl.float32)
    m_rt = tl.full([BLOCK], NEG_FLT_MAX, tl.float32)
    d_rt = tl.zeros([BLOCK], tl.float32)
    a_rt = tl.zeros([BLOCK], tl.float32)
    w_rt = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C_read, BLOCK):
        offs = start + cols
        rmask = offs < C
        x, lp, lq, q = _load_block(
            s_row, t_row, offs, rmask, z0, mu_z, M_s, k_s, log_ds, t0, mu_t, M_t, k_t, log_dt,
            TEACHER_KIND, STANDARDIZE,
        )  # fmt: skip
        p = tl.exp(lp)
        if DIVERGENCE == 0:
            acc += tl.where(q > 0.0, q * (lq - lp), 0.0)
            if STANDARDIZE:
                pd_sum += tl.where(rmask, p * x, 0.0)
                hd_sum -= tl.where(rmask, q * x, 0.0)
        elif DIVERGENCE == 6:
            other = rmask & (offs != y)
            xr = tl.where(other, lp, float("-inf"))
            xrt = tl.where(other, lq, float("-inf"))
            v = tl.where(other & (lq > float("-inf")), lq - lp, 0.0)
            if STANDARDIZE:
                dx = tl.where(other, x, 0.0)
                m_r, d_r, w_r = _online_pair(m_r, d_r, w_r, xr, dx)
                m_rt, d_rt, a_rt, w_rt = _online_triple(m_rt, d_rt, a_rt, w_rt, xrt, v, dx)
            else:
                m_r, d_r = online_lse_update(m_r, d_r, xr, 1.0)
                m_rt, d_rt, a_rt = _online_pair(m_rt, d_rt, a_rt, xrt, v)
        else:
            dj, h = _div_terms(lp, lq, p, q, w_q, w_p, lw_q, lw_p, DIVERGENCE)
            acc += dj
            h_sum += h
            if STANDARDIZE:
                pd_sum += tl.where(rmask, p * x, 0.0)
                hd_sum += tl.where(rmask, h * x, 0.0)

    if DIVERGENCE == 6:
        # The label's scalars (z[y] is read only for a counted row with a label in range).
        live = C_read > 0
        zy = tl.load(s_row + y, mask=live, other=0.0).to(tl.float32)
        xy = (zy - z0) - mu_z if STANDARDIZE else zy
        lp_y = (xy - M_s) * k_s - log_ds
        if TEACHER_KIND == 0:
            ty = tl.load(t_row + y, mask=live, other=0.0).to(tl.float32)
            lq_y = (((ty - t0) - mu_t if STANDARDIZE else ty) - M_t) * k_t - log_dt
            q_y = tl.exp(lq_y)
        elif TEACHER_KIND == 1:
            q_y = tl.load(t_row + y, mask=live, other=0.0).to(tl.float32)
            lq_y = tl.log(q_y)
        else:
            lq_y = tl.load(t_row + y, mask=live, other=0.0).to(tl.float32)
            q_y = tl.exp(lq_y)
        p_y = tl.exp(lp_y)
        M_r = tl.max(m_r, 0)
        f_r = tl.exp(m_r - M_r)
        D_r = tl.sum(d_r * f_r, 0)
        M_rt = tl.max(m_rt, 0)
        f_rt = tl.exp(m_rt - M_rt)
        D_rt = tl.sum(d_rt * f_rt, 0)
        rest_s = M_r + tl.log(D_r)  # log(1 - p_y), exact near p_y = 1
        rest_t = M_rt + tl.log(D_rt)
        rest_g = tl.where(D_r > 0.0, rest_s, float("inf"))
        rest_tg = tl.where(D_rt > 0.0, rest_t, float("inf"))
        # TCKD = KL([q_y, 1 - q_y] || [p_y, 1 - p_y]); NCKD = sum rt (log rt - log r).
        tckd = tl.where(q_y > 0.0, q_y * (lq_y - lp_y), 0.0)
        q_rest = tl.exp(rest_t)
        tckd += tl.where(q_rest > 0.0, q_rest * (rest_t - rest_s), 0.0)
        nckd = tl.where(D_rt > 0.0, tl.sum(a_rt * f_rt, 0) / D_rt - (rest_t - rest_s), 0.0)
        div = dkd_alpha * tckd + dkd_beta * nckd
    else:
        div = tl.sum(acc, 0)
        H = -1.0 if DIVERGENCE == 0 else tl.sum(h_sum, 0)

    if NEED_GRAD:
        gs = tl.load(gs_ptr) if GS_PTR else gs_scalar
        kd_w = alpha * s
        kd_g = alpha * s * inv_t * gs
        ce_g = (1.0 - alpha) * gs
        grad_row = grad_ptr + row * C
        if STANDARDIZE:
            # sum_k G_k d_k with G = kd_g dD/du, then the second term's factor per d_j.
            if DIVERGENCE == 6:
                mean_rd = tl.where(D_r > 0.0, tl.sum(w_r * f_r, 0) / D_r, 0.0)
                mean_rtd = tl.where(D_rt > 0.0, tl.sum(w_rt * f_rt, 0) / D_rt, 0.0)
                gd = dkd_alpha * (p_y - q_y) * (xy - mean_rd) + dkd_beta * (mean_rd - mean_rtd)
            else:
                gd = tl.sum(hd_sum, 0) - H * tl.sum(pd_sum, 0)
            gd = kd_g * gd
            sec = tl.where(sig_z > 0.0, rho_z * rho_z * gd / ((C - 1) * sig_z), 0.0)
            k1 = tl.where(C > 1, rho_z, 0.0)  # C = 1: z' = 0 whatever z, no gradient
            sec = tl.where(C > 1, sec, 0.0)

    # Pass 3: the gradient.
    if NEED_GRAD:
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = offs < C
            rmask = offs < C_read
            x, lp, lq, q = _load_block(
                s_row, t_row, offs, rmask, z0, mu_z, M_s, k_s, log_ds, t0, mu_t, M_t, k_t, log_dt,
                TEACHER_KIND, STANDARDIZE,
            )  # fmt: skip
            p = tl.exp(lp)
            if DIVERGENCE == 0:
                du = p - q
            elif DIVERGENCE == 6:
                other = offs != y
                # r = 0 where the rest has no mass (rest_g = +inf then, also against lp = -inf).
                r = tl.where(other, tl.exp(lp - rest_g), 0.0)
                rt = tl.where(other, tl.exp(lq - rest_tg), 0.0)
                du = dkd_alpha * (p_y - q_y) * tl.where(other, -r, 1.0) + dkd_beta * (r - rt)
            else:
                d_unused, h = _div_terms(lp, lq, p, q, w_q, w_p, lw_q, lw_p, DIVERGENCE)
                du = h - p * H
            g = kd_g * du
            if STANDARDIZE:
                g = k1 * g - sec * x
            # A zero weight drops the term (its du may be infinite).
            g = tl.where(kd_w != 0.0, g, 0.0)
            if HAS_LABELS:
                p_1 = tl.exp(x - M_s - log_dc)
                g += ce_g * (p_1 - tl.where(offs == y, 1.0, 0.0))
            g = tl.where(ignored, 0.0, tl.where(bad, float("nan"), g))
            tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)

    kd_w = alpha * s
    loss = tl.where(kd_w != 0.0, kd_w * div, 0.0)
    if HAS_LABELS:
        if DIVERGENCE != 6:
            zy = tl.load(s_row + y, mask=C_read > 0, other=0.0).to(tl.float32)
            xy = (zy - z0) - mu_z if STANDARDIZE else zy
        ce = M_s + log_dc - xy
        loss += tl.where(alpha != 1.0, (1.0 - alpha) * ce, 0.0)
    loss = tl.where(ignored, 0.0, tl.where(bad, float("nan"), loss))
    tl.store(loss_ptr + row, loss)
