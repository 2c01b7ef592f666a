"""Fused knowledge-distillation loss: per-row loss and its gradient in one launch.

    L_i = (1 - a) * CE(z_i, y_i) + a * s * KL(p_t || p_s),   s = T^2 if t_squared else 1
    p_s = softmax(z_i / T);  p_t = softmax(t_i / T) | t_i | exp(t_i)  (teacher logits/probs/log-probs)
    dL/dz_j = (1 - a) * (softmax(z)_j - [j == y]) + a * s / T * (p_s_j - p_t_j)

CE uses the untempered student logits; without labels there is no CE term and a = 1. Rows whose
label is ignore_index get loss 0 and gradient 0 and are not read. The non-finite rule (README):
a counted row with a label outside [0, C), T outside (0, KD_MAX_T], alpha outside [0, 1], a
student or teacher row with NaN or +inf or no finite value, or a probs / log_probs row whose mass
is off 1 by more than probs_tol gets loss NaN and a NaN gradient row. The gradient (times
grad_scale) is written during the forward, Liger-style, so the backward is a scale or a no-op and
the [N, C] probabilities are never stored.

The other divergences (reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd, dkd) and `standardize`
run in kernels/kd_divergence.py's kernel, launched by the same kd_loss_forward; the kernel below
is the plain-KL path, unchanged (tuned on an H200: bench/results/gpu-h200-2026-12-04.md).

One program per row, two passes in column blocks. Pass 1: online normalizers of z/T, z (for CE)
and t/T (teacher logits), sharing the student's running max. Pass 2: the KL terms computed
directly from the final normalizers (more accurate than an online KL when logits are ~1e4), and
the gradient.
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
from .kd_divergence import DKD, JSD, KL, REVERSE_KL, SKEW_KL, SKEW_REVERSE_KL, _kd_div_fwd_kernel

TEACHER_LOGITS, TEACHER_PROBS, TEACHER_LOG_PROBS = 0, 1, 2
# Above it the float32 KL loses its digits (rbkd.config, the one Python definition).
KD_MAX_T = tl.constexpr(KD_MAX_TEMPERATURE)


@triton.jit
def _kd_loss_fwd_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, labels_ptr, ignore_index,
    T_ptr, T_scalar, alpha_ptr, alpha_scalar, gs_ptr, gs_scalar,
    loss_ptr, grad_ptr, C, probs_tol,
    TEACHER_KIND: tl.constexpr, HAS_LABELS: tl.constexpr, T_ROWS: tl.constexpr,
    ALPHA_ROWS: tl.constexpr, T_SQUARED: tl.constexpr, GS_PTR: tl.constexpr,
    NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64: N * C passes 2^31 at LLM shapes
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    cols = tl.arange(0, BLOCK)

    T = tl.load(T_ptr + row) if T_ROWS else T_scalar
    # Rows that break the non-finite rule get NaN; NaN parameters fail these compares too.
    bad = (T <= 0.0) | ~(T <= KD_MAX_T)
    T = tl.where(bad, 1.0, T)
    inv_t = 1.0 / T
    s = T * T if T_SQUARED else 1.0
    if HAS_LABELS:
        alpha = tl.load(alpha_ptr + row) if ALPHA_ROWS else alpha_scalar
        bad |= (alpha < 0.0) | ~(alpha <= 1.0)
        y = tl.load(labels_ptr + row).to(tl.int64)  # int64 or int32 labels
        ignored = y == ignore_index
        in_range = (y >= 0) & (y < C)
        bad = (bad | ~in_range) & ~ignored
        # The kernel never reads z[y] for a label outside [0, C).
        y = tl.where(in_range, y, 0)
        # An ignored (or bad) row reads nothing: pass 1 runs no iterations and pass 2's loads are
        # masked off (it still runs to write the gradient). Padding rows are common in LM batches.
        C_read = tl.where(ignored | bad, 0, C)
    else:
        alpha = 1.0
        ignored = row < 0  # never: every row counts
        C_read = tl.where(bad, 0, C)

    # Pass 1: per-lane online normalizers. The student lanes share one running max m_z for z/T
    # and for z (max(z/T) = max(z)/T for T > 0).
    m_z = tl.full([BLOCK], NEG_FLT_MAX, tl.float32)
    d_s = tl.zeros([BLOCK], tl.float32)  # sum exp((z - m_z) / T)
    d_c = tl.zeros([BLOCK], tl.float32)  # sum exp(z - m_z), only with labels
    m_t = tl.full([BLOCK], NEG_FLT_MAX, tl.float32)
    d_t = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C_read, BLOCK):
        offs = start + cols
        mask = offs < C
        z = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_LABELS:
            # Both student sums from one |z - m| and one max update (same trick as
            # online_lse_update, two exps).
            neg = -tl.abs(z - m_z)
            up = z > m_z
            e_s = tl.exp(neg * inv_t)
            e_c = tl.exp(neg)
            d_s = tl.where(up, d_s * e_s + 1.0, d_s + e_s)
            d_c = tl.where(up, d_c * e_c + 1.0, d_c + e_c)
            m_z = tl.maximum(m_z, z)
        else:
            m_z, d_s = online_lse_update(m_z, d_s, z, inv_t)
        if TEACHER_KIND == 0:
            t = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            m_t, d_t = online_lse_update(m_t, d_t, t, inv_t)
        elif TEACHER_KIND == 1:  # the mass of the row, checked below
            d_t += tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            d_t += tl.exp(tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32))
    M_z, D_s = lane_lse_combine(m_z, d_s, inv_t)
    # Usable rows: a finite max (then D >= 1, the max contributing exp(0)). NaN entries make D
    # NaN, no finite entry leaves it 0, and +inf makes it NaN through inf - inf in the combine.
    bad |= ~(D_s >= 1.0)
    log_ds = tl.log(D_s)
    if HAS_LABELS:
        _, D_c = lane_lse_combine(m_z, d_c, 1.0)
        log_dc = tl.log(D_c)
    if TEACHER_KIND == 0:
        M_t, D_t = lane_lse_combine(m_t, d_t, inv_t)
        log_dt = tl.log(D_t)
        bad |= ~(D_t >= 1.0)
    else:
        bad |= ~(tl.abs(tl.sum(d_t, 0) - 1.0) <= probs_tol)
    bad = bad & ~ignored

    if NEED_GRAD:
        gs = tl.load(gs_ptr) if GS_PTR else gs_scalar
        kd_g = alpha * s * inv_t * gs
        ce_g = (1.0 - alpha) * gs
        grad_row = grad_ptr + row * C

    # Pass 2: KL terms p_t * (log p_t - log p_s), 0 where p_t == 0 (0 * log 0 = 0, also when
    # both sides are -inf), and the gradient. p_s - p_t is formed in float32 before the cast.
    kl = tl.zeros([BLOCK], tl.float32)
    # Without a gradient to zero-fill, an ignored row skips this pass too.
    for start in range(0, C if NEED_GRAD else C_read, BLOCK):
        offs = start + cols
        mask = offs < C
        rmask = offs < C_read
        z = tl.load(s_row + offs, mask=rmask, other=float("-inf")).to(tl.float32)
        log_ps = (z - M_z) * inv_t - log_ds
        if TEACHER_KIND == 0:
            t = tl.load(t_row + offs, mask=rmask, other=float("-inf")).to(tl.float32)
            log_pt = (t - M_t) * inv_t - log_dt
            p_t = tl.exp(log_pt)
        elif TEACHER_KIND == 1:
            p_t = tl.load(t_row + offs, mask=rmask, other=0.0).to(tl.float32)
            log_pt = tl.log(p_t)
        else:
            log_pt = tl.load(t_row + offs, mask=rmask, other=float("-inf")).to(tl.float32)
            p_t = tl.exp(log_pt)
        kl += tl.where(p_t > 0.0, p_t * (log_pt - log_ps), 0.0)
        if NEED_GRAD:
            g = kd_g * (tl.exp(log_ps) - p_t)
            if HAS_LABELS:
                p_1 = tl.exp(z - M_z - log_dc)
                g += ce_g * (p_1 - tl.where(offs == y, 1.0, 0.0))
            # Ignored rows computed NaN from their empty normalizers; they store zeros.
            g = tl.where(ignored, 0.0, tl.where(bad, float("nan"), g))
            tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)

    # A zero weight drops its term outright, so alpha = 1 with an infinite CE (or alpha = 0 with
    # an infinite KL) gives the other term rather than 0 * inf = NaN.
    kd_w = alpha * s
    loss = tl.where(kd_w != 0.0, kd_w * tl.sum(kl, 0), 0.0)
    if HAS_LABELS:
        z_y = tl.load(s_row + y, mask=C_read > 0, other=0.0).to(tl.float32)
        ce = M_z + log_dc - z_y
        loss += tl.where(alpha != 1.0, (1.0 - alpha) * ce, 0.0)
    loss = tl.where(ignored, 0.0, tl.where(bad, float("nan"), loss))
    tl.store(loss_ptr + row, loss)


@triton.jit
def _scale_rows_kernel(g_ptr, scale_ptr, C, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """g[row] *= scale (per row, or one scalar), read on the device; a row whose scale is 1 is
    not touched, so loss.backward() on a scalar loss costs no pass over the gradient."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row) if PER_ROW else tl.load(scale_ptr)
    if scale != 1.0:
        g_row = g_ptr + row * C
        cols = tl.arange(0, BLOCK)
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = offs < C
            g = tl.load(g_row + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)


def divergence_args(opts: KDOptions) -> tuple[int, tuple[float, float, float, float]]:
    """The kernel's divergence code and mixture scalars (w_q, w_p, log w_q, log w_p).

    jsd with beta 0 / 1 is kl / reverse_kl (TRL's and Liger's ends, where its formula vanishes);
    skew 0 makes skew_kl kl and skew_reverse_kl reverse_kl exactly (m = p or q), which also keeps
    log(0) out of the kernel's arguments. w_q / w_p weigh q and p in the mixture m; _div_terms
    reads w_p as the factor of its h (jsd 1 - beta, skew_kl 1 - skew, skew_reverse_kl skew).
    """
    div = int(opts.divergence)
    if div not in range(7):
        raise ValueError(f"unknown divergence code {div}")
    beta, skew = float(opts.beta), float(opts.skew)
    if div == JSD and beta in (0.0, 1.0):
        div = KL if beta == 0.0 else REVERSE_KL
    if div in (SKEW_KL, SKEW_REVERSE_KL) and skew == 0.0:
        div = KL if div == SKEW_KL else REVERSE_KL
    if div == JSD:
        w_q, w_p = beta, 1.0 - beta
        return div, (w_q, w_p, math.log(beta), math.log1p(-beta))
    if div == SKEW_KL:
        return div, (skew, 1.0 - skew, math.log(skew), math.log1p(-skew))
    if div == SKEW_REVERSE_KL:
        return div, (1.0 - skew, skew, math.log1p(-skew), math.log(skew))
    return div, (0.0, 0.0, 0.0, 0.0)


def kd_loss_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    T: float | torch.Tensor,
    alpha: float | torch.Tensor,
    grad_scale: float | torch.Tensor,
    need_grad: bool,
    opts: KDOptions,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row KD loss (float32 [N]) and, when need_grad, dL_i/dz_i * grad_scale ([N, C], in
    the student's dtype), from one launch.

    student, teacher: [N, C] with unit column stride (any row stride; dtypes may differ).
    labels: None or int64 / int32 [N]. T, alpha: float or float32 [N] on the device. grad_scale: float
    or float32 0-dim device tensor, read by the kernel (no host sync). opts: the op's options
    (rbkd.ops.args.KDOptions). block_size and num_warps override the launch heuristics (tests and
    bench/gpu_tune.py).
    """
    divergence, mix = divergence_args(opts)
    teacher_kind, t_squared = opts.teacher_kind, opts.t_squared
    ignore_index, probs_tol = opts.ignore_index, opts.probs_tol
    N, C = student.shape
    if teacher_kind not in (TEACHER_LOGITS, TEACHER_PROBS, TEACHER_LOG_PROBS):
        raise ValueError(
            f"teacher_kind must be 0 (logits), 1 (probs) or 2 (log_probs), got {teacher_kind}"
        )
    if opts.standardize and teacher_kind != TEACHER_LOGITS:
        raise ValueError("standardize z-scores logits: it needs teacher_kind 0 (logits)")
    if divergence == DKD and labels is None:
        raise ValueError("divergence dkd needs labels")
    loss = torch.empty(N, dtype=torch.float32, device=student.device)
    grad = torch.empty((N, C), dtype=student.dtype, device=student.device) if need_grad else None
    if N == 0:
        return loss, grad
    if C == 0:
        loss.zero_()
        return loss, grad
    T_ptr, T_scalar, T_rows = row_param(T, loss)
    alpha_ptr, alpha_scalar, alpha_rows = row_param(alpha, loss)
    if isinstance(grad_scale, torch.Tensor):
        gs_ptr, gs_scalar, gs_is_ptr = grad_scale, 1.0, True
    else:
        gs_ptr, gs_scalar, gs_is_ptr = loss, float(grad_scale), False
    has_labels = labels is not None
    block = pick_block(C, MAX_BLOCK_KD, block_size)
    num_warps = num_warps or pick_num_warps(block, KD_COLS)
    if divergence != KL or opts.standardize:
        with device_guard(student):
            _kd_div_fwd_kernel[(N,)](
                student, student.stride(0), teacher, teacher.stride(0),
                labels if has_labels else loss, int(ignore_index),
                T_ptr, T_scalar, alpha_ptr, alpha_scalar, gs_ptr, gs_scalar,
                loss, grad if need_grad else loss, C, float(probs_tol), *mix,
                float(opts.dkd_alpha), float(opts.dkd_beta),
                DIVERGENCE=divergence, STANDARDIZE=bool(opts.standardize),
                TEACHER_KIND=int(teacher_kind), HAS_LABELS=has_labels, T_ROWS=T_rows,
                ALPHA_ROWS=alpha_rows, T_SQUARED=bool(t_squared), GS_PTR=gs_is_ptr,
                NEED_GRAD=bool(need_grad), BLOCK=block, num_warps=num_warps,
            )  # fmt: skip
        return loss, grad
    with device_guard(student):
        _kd_loss_fwd_kernel[(N,)](
            student, student.stride(0), teacher, teacher.stride(0),
            labels if has_labels else loss, int(ignore_index),
            T_ptr, T_scalar, alpha_ptr, alpha_scalar, gs_ptr, gs_scalar,
            loss, grad if need_grad else loss, C, float(probs_tol),
            TEACHER_KIND=int(teacher_kind), HAS_LABELS=has_labels, T_ROWS=T_rows,
            ALPHA_ROWS=alpha_rows, T_SQUARED=bool(t_squared), GS_PTR=gs_is_ptr,
            NEED_GRAD=bool(need_grad), BLOCK=block,
            num_warps=num_warps,
        )  # fmt: skip
    return loss, grad


def scale_rows_(grad: torch.Tensor, scale: torch.Tensor, block_size: int | None = None) -> None:
    """grad [N, C] (contiguous) *= scale in place, scale a float32 [1] or [N] device tensor,
    without reading it on the host; rows whose scale is 1 are skipped on the device."""
    N, C = grad.shape
    if N == 0 or C == 0:
        return
    block = pick_block(C, MAX_BLOCK_KD, block_size)
    with device_guard(grad):
        _scale_rows_kernel[(N,)](
            grad, scale, C, PER_ROW=scale.numel() != 1, BLOCK=block,
            num_warps=pick_num_warps(block),
        )  # fmt: skip
