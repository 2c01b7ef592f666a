// kd_loss_fwd for C <= kSmallC, every divergence (plain KL included): rows are the SIMD lanes.
//
// A block of kLanes rows is transposed into [C][kLanes] tiles, so a 10-class row does not waste
// 6 of 16 lanes and every per-row quantity is a vector. The tiles stay in L1, so a pass over
// them costs its arithmetic, not memory: each exp is formed once, kept, and reused.
//   max    the maxima (dkd: also off the label) and the label's logits;
//   exps   exp_s and exp_t kept in P and X with their sums; kl's and dkd's accumulator;
//   ce     the untempered exps of the CE term in E: exp_s itself at T = 1, its T-th power at an
//          integer T (a few multiplies), else their own exps;
//   terms  (reverse_kl, jsd, the skewed KLs, tvd) p, q -> d_j summed, h_j kept in X;
//   grad   the gradient, written back through the transposition.
// The tile paths this replaced folded online (max, sum) pairs: no max pass, but one exp per push
// and three pushes per element (student, teacher, CE). kd_loss at 65536 x 10 on one thread: 6.6 ms
// then, 2.9 ms with the vectorised finish and gathers, 2.1 ms with float32 tiles moved by 8 x 8
// transposes (cpu_common.h), the one-scaling exps and unconditional maxima.
#include "cpu_common.h"
#include "kd_grad_plan.h"
#include "rbkd_divergence.h"
#include "rbkd_rows.h"

namespace rbkd::cpu {
namespace {

using namespace kd;  // NOLINT: kd_loss helpers shared with the row kernels (cpu_common.h)

enum Mode : int { kModeKL, kModeDKD, kModeTerms };
enum CeMode : int { kCeNone, kCeSame, kCePow, kCeExp };

struct Tile {
  alignas(64) float z[kSmallC][kLanes], t[kSmallC][kLanes];
  alignas(64) float P[kSmallC][kLanes], X[kSmallC][kLanes], E[kSmallC][kLanes];
  // One vector per quantity of a row: scales, z-score, maxima, shifts, label logits, sums.
  alignas(64) float sc_s[kLanes], sc_t[kLanes], mean[kLanes], sigma[kLanes], rho[kLanes];
  alignas(64) float mz[kLanes], mt[kLanes], mr[kLanes], mtr[kLanes], zy[kLanes], ty[kLanes];
  alignas(64) float sh_s[kLanes], sh_t[kLanes];
  alignas(64) float Ss[kLanes], St[kLanes], Sce[kLanes], A[kLanes];
  alignas(64) float Hs[kLanes], Ps[kLanes], sxd[kLanes], sed[kLanes];
  alignas(64) float lSs[kLanes], lSt[kLanes], inv_Ss[kLanes], inv_St[kLanes];
  alignas(64) int32_t label[kLanes];
};

RBKD_INLINE void zero(float* v) {
  for (int r = 0; r < kLanes; ++r) v[r] = 0.0f;
}

RBKD_INLINE void tile_zscore(int64_t C, const float (*x)[kLanes], float* mean, float* sigma,
                             float* rho) {
  for (int r = 0; r < kLanes; ++r) mean[r] = sigma[r] = rho[r] = 0.0f;
  if (C <= 1) return;
  for (int64_t j = 0; j < C; ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) mean[r] += x[j][r];
  }
  for (int r = 0; r < kLanes; ++r) mean[r] /= static_cast<float>(C);
  for (int64_t j = 0; j < C; ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) sigma[r] += (x[j][r] - mean[r]) * (x[j][r] - mean[r]);
  }
#pragma omp simd
  for (int r = 0; r < kLanes; ++r) {
    sigma[r] = sqrtf(sigma[r] / static_cast<float>(C - 1));
    rho[r] = 1.0f / (sigma[r] + kStandardizeEps);
  }
}

// Maxima (NaN is skipped here and surfaces through the exps' sums) and the label's logits.
// Every update is unconditional arithmetic: a select that keeps the old value (`isl ? z : zy`,
// `max_f(mr, isl ? -inf : z)`) became a masked store (vmaskmovps, microcoded on AMD Zen) behind
// a branch, half of a dkd call at 65536 x 10. The label's logit is a sum of z [j == label] (one
// term is non-zero: exact), the max off the label a max of z + (0 or -inf) (+inf at the label
// gives NaN, which the max skips, as it did -inf).
template <int KIND, bool DKD>
RBKD_INLINE void pass_max(int64_t C, Tile& T) {
  for (int r = 0; r < kLanes; ++r) {
    T.mz[r] = T.mt[r] = T.mr[r] = T.mtr[r] = -INFINITY;
    T.zy[r] = T.ty[r] = 0.0f;
  }
  for (int32_t j = 0; j < static_cast<int32_t>(C); ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      const float z = T.z[j][r], t = T.t[j][r];
      const bool isl = j == T.label[r];
      T.zy[r] += isl ? z : 0.0f;
      T.ty[r] += isl ? t : 0.0f;
      T.mz[r] = max_f(T.mz[r], z);
      if constexpr (KIND == kLogits) T.mt[r] = max_f(T.mt[r], t);
      if constexpr (DKD) {
        const float off = isl ? -INFINITY : 0.0f;
        T.mr[r] = max_f(T.mr[r], z + off);
        if constexpr (KIND == kLogits) T.mtr[r] = max_f(T.mtr[r], t + off);
      }
    }
  }
}

// exp_s into P, exp_t (the teacher's probabilities for probs / log_probs) into X, their sums;
// kl: A = sum kl_term; dkd: the same off the label (the NCKD sum), P and X 0 at the label.
template <int KIND, int MODE>
RBKD_INLINE void pass_exps(int64_t C, Tile& T) {
  zero(T.Ss);
  zero(T.St);
  zero(T.A);
  for (int32_t j = 0; j < static_cast<int32_t>(C); ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      const float t = T.t[j][r];
      const float ls = (T.z[j][r] - T.sh_s[r]) * T.sc_s[r];
      float es = fast_exp_nonpos<false>(ls), lt = 0.0f, et;  // dkd's label: > 0, zeroed below
      if constexpr (KIND == kLogits) {
        lt = (t - T.sh_t[r]) * T.sc_t[r];
        et = fast_exp_nonpos<false>(lt);
      } else if constexpr (KIND == kLogProbs) {
        lt = t;
        et = fast_exp(t);
      } else {
        et = t;
        if constexpr (MODE != kModeTerms) lt = fast_log(t);
      }
      if constexpr (MODE == kModeDKD) {
        const bool isl = j == T.label[r];
        es = isl ? 0.0f : es;
        et = isl ? 0.0f : et;
      }
      if constexpr (MODE != kModeTerms) T.A[r] += kl_term(et, lt, ls);
      T.P[j][r] = es;
      T.X[j][r] = et;
      T.Ss[r] += es;
      T.St[r] += et;
    }
  }
}

// The CE term's exps, exp(z - m_z), into E and their sum.
RBKD_INLINE void pass_ce(int mode, int pow_T, int64_t C, Tile& T) {
  zero(T.Sce);
  for (int64_t j = 0; j < C && mode != kCeNone; ++j) {
    if (mode == kCeSame) {
#pragma omp simd
      for (int r = 0; r < kLanes; ++r) T.E[j][r] = T.P[j][r];
    } else if (mode == kCePow) {
      pow_int_block(T.E[j], T.P[j], kLanes, pow_T);
    } else {
#pragma omp simd
      for (int r = 0; r < kLanes; ++r) T.E[j][r] = fast_exp(T.z[j][r] - T.mz[r]);
    }
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) T.Sce[r] += T.E[j][r];
  }
}

// dkd's CE exps from its tempered ones (pass_ce's mode kCeSame or kCePow): those are shifted by
// the max off the label, m_r, and 0 at the label, so exp(z_j - m_z) = P_j^T exp(m_r - m_z) off
// the label (P_j <= 1: no overflow; what underflows is below e^-87 of the label's term) and the
// label's own exp is formed once per lane. Own exps cost a third exp per element (dkd was 1.57x
// kl's time at 65536 x 10).
RBKD_INLINE void pass_ce_dkd(int mode, int pow_T, int64_t C, Tile& T) {
  pass_ce(mode, pow_T, C, T);
  alignas(64) float f[kLanes], ey[kLanes];
#pragma omp simd
  for (int r = 0; r < kLanes; ++r) {
    f[r] = fast_exp(T.sh_s[r] - T.mz[r]);
    ey[r] = fast_exp(T.zy[r] - T.mz[r]);
  }
  zero(T.Sce);
  for (int32_t j = 0; j < static_cast<int32_t>(C); ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      const float e = j == T.label[r] ? ey[r] : T.E[j][r] * f[r];
      T.E[j][r] = e;
      T.Sce[r] += e;
    }
  }
}

// The divergences with per-element terms: d_j summed into A, p_j kept in P, h_j in X.
template <int DIV, int KIND>
RBKD_INLINE void pass_terms(int64_t C, Tile& T, const DivConst& k) {
  const DivConst kk = k;  // a local copy: loads through the reference keep GCC from vectorising
  zero(T.A);
  zero(T.Hs);
  zero(T.Ps);
  for (int32_t j = 0; j < static_cast<int32_t>(C); ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      const float t = T.t[j][r];
      const float ls = (T.z[j][r] - T.sh_s[r]) * T.sc_s[r];
      const float lt = KIND == kLogits     ? (t - T.sh_t[r]) * T.sc_t[r] - T.lSt[r]
                       : KIND == kLogProbs ? t
                                           : fast_log(t);
      const float p = T.P[j][r] * T.inv_Ss[r];
      float d, h;
      div_elem<DIV>(p, ls - T.lSs[r], T.X[j][r] * T.inv_St[r], lt, kk, d, h);
      T.A[r] += d;
      T.P[j][r] = p;
      T.X[j][r] = h;
      T.Hs[r] += h;
      T.Ps[r] += p;
    }
  }
}

template <int DIV>
RBKD_INLINE void pass_terms_kind(int kind, int64_t C, Tile& T, const DivConst& k) {
  if (kind == kLogits) pass_terms<DIV, kLogits>(C, T, k);
  else if (kind == kProbs) pass_terms<DIV, kProbs>(C, T, k);
  else pass_terms<DIV, kLogProbs>(C, T, k);
}

template <int MODE>
RBKD_INLINE void pass_exps_kind(int kind, int64_t C, Tile& T) {
  if (kind == kLogits) pass_exps<kLogits, MODE>(C, T);
  else if (kind == kProbs) pass_exps<kProbs, MODE>(C, T);
  else pass_exps<kLogProbs, MODE>(C, T);
}

// Standardize's sums: sum x_j (z_j - mean), sum e_j (z_j - mean).
RBKD_INLINE void pass_std_sums(int64_t C, Tile& T) {
  zero(T.sxd);
  zero(T.sed);
  for (int64_t j = 0; j < C; ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      T.sxd[r] += T.X[j][r] * (T.z[j][r] - T.mean[r]);
      T.sed[r] += T.P[j][r] * (T.z[j][r] - T.mean[r]);
    }
  }
}

// 1 / S and log S of the student's and teacher's sums (probs / log_probs teachers: 1 and 0), for
// pass_terms. Two loops: GCC 12 does not vectorise a select on a loop-invariant bool, and the
// one loop with `logits ? ... : ...` in it ran scalar (32 scalar logs a tile, 17% of a reverse_kl
// call at 65536 x 10).
RBKD_INLINE void lane_logsums(bool logits, Tile& T) {
  if (logits) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      T.inv_Ss[r] = 1.0f / T.Ss[r];
      T.lSs[r] = fast_log(T.Ss[r]);
      T.inv_St[r] = 1.0f / T.St[r];
      T.lSt[r] = fast_log(T.St[r]);
    }
  } else {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      T.inv_Ss[r] = 1.0f / T.Ss[r];
      T.lSs[r] = fast_log(T.Ss[r]);
      T.inv_St[r] = 1.0f;
      T.lSt[r] = 0.0f;
    }
  }
}

// Per-row parameters of the kLanes rows of a tile. An uncounted lane (ignored, bad, or past the
// last row) computes with T = 1, alpha = 1 and a zero gradient weight, never NaN-poisoning the
// others' vectors, and is overwritten at the end.
struct Lanes {
  alignas(64) float inv_T[kLanes], alpha[kLanes], kl_scale[kLanes], valid[kLanes];
  alignas(64) float c_ce[kLanes], c_kl[kLanes], kd_on[kLanes];
  alignas(64) float ignored[kLanes], bad[kLanes];  // 1 or 0: vectors, not bools, for the simd loops
};

RBKD_INLINE void lane_params(const KdLossArgs& a, int64_t i0, int rows, Tile& T, Lanes& L) {
  const bool has_ce = a.labels != nullptr;
  const float gs = a.grad_scale_ptr != nullptr ? *a.grad_scale_ptr : a.grad_scale;
  if (a.T_rows == nullptr && a.alpha_rows == nullptr) {
    // One T and alpha for the call: their parameters once, the labels as a vector.
    RowParams p = row_params(a, i0);
    p.bad = !kd_params_ok(a.T, p.alpha);  // T and alpha alone: row i0's label speaks for no other
    const KdGradCoef c = kd_grad_coef(p.alpha, p.kl_scale, p.inv_T, has_ce, gs);
    const int64_t C = a.C, ignore = a.opt.ignore_index;
    const float param_bad = p.bad ? 1.0f : 0.0f;
    alignas(64) int64_t y[kLanes];
    // Two loops, not one select: GCC makes the select a masked load, and a masked-off load from
    // a null labels pointer faults into a microcode assist (a third of the call on AMD Zen).
    // (A full tile's labels are copied with vector moves: scalar stores read back as vectors
    // stall store forwarding.)
    if (has_ce && rows == kLanes) {
      memcpy(y, a.labels + i0, sizeof y);
    } else {
      for (int r = 0; r < kLanes; ++r) y[r] = -1;
      for (int r = 0; has_ce && r < rows; ++r) y[r] = a.labels[i0 + r];
    }
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      // As row_params: a bad T or alpha makes even an ignored row NaN; a row past the end is
      // ignored.
      const bool past = r >= rows;
      const bool ignored = past | (has_ce & (y[r] == ignore));
      const bool bad = !past & ((param_bad != 0.0f) |
                                (has_ce & !ignored & ((y[r] < 0) | (y[r] >= C))));
      const bool counted = !ignored & !bad;
      L.ignored[r] = ignored ? 1.0f : 0.0f;
      L.bad[r] = bad ? 1.0f : 0.0f;
      L.inv_T[r] = counted ? p.inv_T : 1.0f;
      L.alpha[r] = counted ? p.alpha : 1.0f;
      L.kl_scale[r] = counted ? p.kl_scale : 1.0f;
      T.label[r] = counted & has_ce ? static_cast<int32_t>(y[r]) : -1;
      L.valid[r] = counted ? 1.0f : 0.0f;
      L.c_ce[r] = counted ? c.c_ce : 0.0f;
      L.c_kl[r] = counted ? c.c_kl : 0.0f;
      L.kd_on[r] = L.alpha[r] > 0.0f ? 1.0f : 0.0f;
    }
    return;
  }
  for (int r = 0; r < kLanes; ++r) {
    RowParams p{1.0f, 1.0f, 1.0f, -1, true, false, 0};
    if (r < rows) p = row_params(a, i0 + r);
    const bool counted = !p.ignored && !p.bad;
    L.ignored[r] = p.ignored ? 1.0f : 0.0f;
    L.bad[r] = p.bad ? 1.0f : 0.0f;
    L.inv_T[r] = counted ? p.inv_T : 1.0f;
    L.alpha[r] = counted ? p.alpha : 1.0f;
    L.kl_scale[r] = counted ? p.kl_scale : 1.0f;
    T.label[r] = static_cast<int32_t>(p.label);
    L.valid[r] = counted ? 1.0f : 0.0f;
    const KdGradCoef c = kd_grad_coef(L.alpha[r], L.kl_scale[r], L.inv_T[r], has_ce, counted ? gs : 0.0f);
    L.c_ce[r] = c.c_ce;
    L.c_kl[r] = c.c_kl;
    L.kd_on[r] = L.alpha[r] > 0.0f ? 1.0f : 0.0f;
  }
}

// How the CE exps are formed (see the file's comment): shared or powered only when the student's
// shift is its max and its scale 1 / T, and T is one number for the whole call.
RBKD_INLINE int ce_mode(const KdLossArgs& a, bool dkd, int* pow_T) {
  *pow_T = 0;
  if (a.labels == nullptr) return kCeNone;
  if (a.opt.standardize || a.T_rows != nullptr) return kCeExp;  // dkd: see pass_ce_dkd
  if (a.T == 1.0f) return kCeSame;
  const RowParams p = row_params(a, 0);
  *pow_T = p.pow_T;
  return p.pow_T != 0 ? kCePow : kCeExp;
}

// Per lane: the gradient's coefficients (kd_grad_plan.h) and the sums standardize needs.
struct LanePlan {
  alignas(64) float cx[kLanes], cs[kLanes], A1[kLanes], A0[kLanes], A2[kLanes], du_y[kLanes];
  alignas(64) float sum_x[kLanes], sum_e[kLanes], loss[kLanes];
};

// dkd's loss from a lane's sums (Ss, St, A hold the sums off the label; pass_exps), the
// vector twin of the row path's: TCKD from the label's log-probabilities, NCKD from the rest's.
template <bool LOGITS>
RBKD_INLINE float dkd_lane(const Tile& T, int r, bool logprobs, float tol, const DivConst& k,
                           float& cx, float& cs, float& du_y, bool& ok) {
  const float Sr = T.Ss[r], Str = T.St[r], ty = T.ty[r];
  const float ls_y = (T.zy[r] - T.sh_s[r]) * T.sc_s[r];
  const float lt_y = LOGITS ? (ty - T.sh_t[r]) * T.sc_t[r] : logprobs ? ty : fast_log(ty);
  // & not &&: branches keep GCC from vectorising the lane loop
  ok = (T.mz[r] > -INFINITY) & (T.mz[r] < INFINITY) & (Sr == Sr) & (ls_y == ls_y) &
       (LOGITS ? (T.mt[r] > -INFINITY) & (T.mt[r] < INFINITY) & (Str == Str) & (lt_y == lt_y)
               : mass_ok(Str + (logprobs ? fast_exp(ty) : ty), tol));
  const float lSr = fast_log(Sr), lTr = fast_log(Str);
  const float lSs = log_add_exp(lSr, ls_y);
  const float lSt = LOGITS ? log_add_exp(lTr, lt_y) : 0.0f;
  const float lp_y = ls_y - lSs, lq_y = lt_y - lSt;
  // Log-probabilities (<= 0 up to rounding): the one-scaling exp.
  const float e_qy = fast_exp_nonpos<false>(lq_y), e_py = fast_exp_nonpos<false>(lp_y);
  const float lQr = lTr - lSt, lPr = lSr - lSs, e_qr = fast_exp_nonpos<false>(lQr);
  const float tckd = (e_qy > 0.0f ? e_qy * (lq_y - lp_y) : 0.0f) +
                     (e_qr > 0.0f ? e_qr * (lQr - lPr) : 0.0f);
  const float nckd = Str > 0.0f ? (Sr > 0.0f ? T.A[r] / Str + (lSr - lTr) : INFINITY) : 0.0f;
  const float dy = e_py - e_qy;
  du_y = k.dkd_alpha * dy;
  cs = Sr > 0.0f ? (k.dkd_beta - k.dkd_alpha * dy) / Sr : 0.0f;
  cx = Str > 0.0f ? -k.dkd_beta / Str : 0.0f;
  return k.dkd_alpha * tckd + k.dkd_beta * nckd;
}

// The loss of every lane and its gradient plan, as vectors (a scalar loop here cost as much as
// the exps at C = 10). Lanes whose row breaks the non-finite rule are marked valid = -1.
template <bool LOGITS, int MODE>
RBKD_INLINE void finish_lanes(const KdLossArgs& a, const DivConst& k, Tile& T, Lanes& L,
                              LanePlan& G) {
  const bool has_ce = a.labels != nullptr, logprobs = a.opt.teacher_kind == kLogProbs;
  const float tol = a.opt.probs_tol;
  const DivConst kk = k;
#pragma omp simd
  for (int r = 0; r < kLanes; ++r) {
    float D, cx, cs, du_y = 0.0f, sum_x, sum_e;
    bool ok;
    if constexpr (MODE == kModeDKD) {
      D = dkd_lane<LOGITS>(T, r, logprobs, tol, kk, cx, cs, du_y, ok);
      sum_x = T.St[r];
      sum_e = T.Ss[r];
    } else {
      const float Ss = T.Ss[r], St = T.St[r];
      ok = logits_row_ok(T.mz[r], Ss) & (LOGITS ? logits_row_ok(T.mt[r], St) : mass_ok(St, tol));
      if constexpr (MODE == kModeKL) {  // P, X hold exp_s, exp_t: du = exp_s / Ss - exp_t / St
        D = LOGITS ? T.A[r] / St + (fast_log(Ss) - fast_log(St)) : T.A[r] + St * fast_log(Ss);
        cx = LOGITS ? -1.0f / St : -1.0f;
        cs = 1.0f / Ss;
        sum_x = St;
        sum_e = Ss;
      } else {  // P, X hold p, h: du = h - p H
        D = T.A[r];
        cx = 1.0f;
        cs = -T.Hs[r];
        sum_x = T.Hs[r];
        sum_e = T.Ps[r];
      }
    }
    const float ce = has_ce ? fast_log(T.Sce[r]) + (T.mz[r] - T.zy[r]) : 0.0f;
    const float loss = kd_row_loss(ce, D, L.alpha[r], L.kl_scale[r], has_ce);
    const bool bad = (L.bad[r] != 0.0f) | ((L.ignored[r] == 0.0f) & !ok);
    G.loss[r] = bad ? NAN : L.ignored[r] != 0.0f ? 0.0f : loss;
    L.valid[r] = bad ? -1.0f : L.valid[r];
    G.cx[r] = cx;
    G.cs[r] = cs;
    G.du_y[r] = du_y;
    G.sum_x[r] = sum_x;
    G.sum_e[r] = sum_e;
    G.A1[r] = L.c_kl[r];
    G.A0[r] = G.A2[r] = 0.0f;
    T.Sce[r] = 1.0f / T.Sce[r];
  }
}

template <int MODE>
RBKD_INLINE void finish_lanes_kind(const KdLossArgs& a, const DivConst& k, Tile& T, Lanes& L,
                                   LanePlan& G) {
  if (a.opt.teacher_kind == kLogits) finish_lanes<true, MODE>(a, k, T, L, G);
  else finish_lanes<false, MODE>(a, k, T, L, G);
}

// standardize: the gradient through the z-score (kd_grad_plan.h), lane by lane.
RBKD_INLINE void plan_standardize_lanes(int64_t C, bool dkd, const Tile& T, const Lanes& L,
                                        LanePlan& G) {
  for (int r = 0; r < kLanes; ++r) {
    GradPlan g{G.cx[r], G.cs[r], L.c_kl[r], 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, true};
    const ZScore zs{T.mean[r], T.sigma[r], T.rho[r]};
    const float dy = dkd ? T.zy[r] - zs.mean : 0.0f;
    plan_standardize(g, zs, L.c_kl[r], G.cx[r] * G.sum_x[r] + G.cs[r] * G.sum_e[r] + G.du_y[r],
                     G.cx[r] * T.sxd[r] + G.cs[r] * T.sed[r] + G.du_y[r] * dy, C);
    G.A1[r] = g.A1;
    G.A0[r] = g.A0;
    G.A2[r] = g.A2;
  }
}

// The gradient into X (each element is read before it is overwritten).
// HAS_CE a template argument: without CE, E is never written, and multiplying its stale
// (possibly subnormal) contents cost 25% of the call.
template <bool HAS_CE>
RBKD_INLINE void pass_grad(int64_t C, bool dkd, Tile& T, const Lanes& L, const LanePlan& G) {
  for (int32_t j = 0; j < static_cast<int32_t>(C); ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      const bool isl = j == T.label[r];
      const float du = dkd && isl ? G.du_y[r] : G.cx[r] * T.X[j][r] + G.cs[r] * T.P[j][r];
      const float kd = G.A1[r] * du + G.A0[r] +
                       (G.A2[r] != 0.0f ? G.A2[r] * (T.z[j][r] - T.mean[r]) : 0.0f);
      const float pce = HAS_CE ? T.E[j][r] * T.Sce[r] : 0.0f;  // Sce holds 1 / Sce here
      const float gj = (L.kd_on[r] != 0.0f ? kd : 0.0f) + L.c_ce[r] * (pce - (isl ? 1.0f : 0.0f));
      // Uncounted lanes have zero weights; the selects also clear a NaN from padding.
      T.X[j][r] = L.valid[r] > 0.0f ? gj : (L.valid[r] < 0.0f ? NAN : 0.0f);
    }
  }
}

RBKD_CLONES void kd_tile(const KdLossArgs& a, int64_t i0, int div, const DivConst& k, int ce,
                         int pow_T) {
  const int64_t C = a.C;
  const int rows = static_cast<int>(std::min<int64_t>(kLanes, a.N - i0));
  const bool has_ce = a.labels != nullptr, dkd = div == kDKD, stdz = a.opt.standardize;
  const int kind = a.opt.teacher_kind;
  const bool logits = kind == kLogits;
  Tile T;
  Lanes L;
  lane_params(a, i0, rows, T, L);
  load_tile_any(a.s_dtype, a.student, a.s_row_stride, i0, rows, C, T.z);
  load_tile_any(a.t_dtype, a.teacher, a.t_row_stride, i0, rows, C, T.t);
  alignas(64) float rho_t[kLanes], tmp0[kLanes], tmp1[kLanes];
  if (stdz) {
    tile_zscore(C, T.z, T.mean, T.sigma, T.rho);
    tile_zscore(C, T.t, tmp0, tmp1, rho_t);
  }
  for (int r = 0; r < kLanes; ++r) {
    T.sc_s[r] = L.inv_T[r] * (stdz && C > 1 ? T.rho[r] : 1.0f);  // C = 1: p = 1 at any scale
    T.sc_t[r] = L.inv_T[r] * (stdz && C > 1 ? rho_t[r] : 1.0f);
    if (!stdz) T.mean[r] = T.sigma[r] = T.rho[r] = 0.0f;
  }
  if (dkd) {
    if (logits) pass_max<kLogits, true>(C, T);
    else pass_max<kProbs, true>(C, T);
  } else {
    if (logits) pass_max<kLogits, false>(C, T);
    else pass_max<kProbs, false>(C, T);
  }
#pragma omp simd
  for (int r = 0; r < kLanes; ++r) {
    T.sh_s[r] = dkd && T.mr[r] > -INFINITY ? T.mr[r] : T.mz[r];
    T.sh_t[r] = dkd && T.mtr[r] > -INFINITY ? T.mtr[r] : T.mt[r];
  }
  const int mode = div == kKL ? kModeKL : dkd ? kModeDKD : kModeTerms;
  if (mode == kModeKL) pass_exps_kind<kModeKL>(kind, C, T);
  else if (mode == kModeDKD) pass_exps_kind<kModeDKD>(kind, C, T);
  else pass_exps_kind<kModeTerms>(kind, C, T);
  if (dkd && ce != kCeExp) pass_ce_dkd(ce, pow_T, C, T);
  else pass_ce(ce, pow_T, C, T);  // before pass_terms turns exp_s into p
  if (mode == kModeTerms) {
    lane_logsums(logits, T);
    switch (div) {
      case kReverseKL: pass_terms_kind<kReverseKL>(kind, C, T, k); break;
      case kJSD: pass_terms_kind<kJSD>(kind, C, T, k); break;
      case kSkewKL: pass_terms_kind<kSkewKL>(kind, C, T, k); break;
      case kSkewReverseKL: pass_terms_kind<kSkewReverseKL>(kind, C, T, k); break;
      default: pass_terms_kind<kTVD>(kind, C, T, k); break;
    }
  }
  if (stdz) pass_std_sums(C, T);
  LanePlan G;
  if (mode == kModeKL) finish_lanes_kind<kModeKL>(a, k, T, L, G);
  else if (mode == kModeDKD) finish_lanes_kind<kModeDKD>(a, k, T, L, G);
  else finish_lanes_kind<kModeTerms>(a, k, T, L, G);
  if (stdz) plan_standardize_lanes(C, dkd, T, L, G);
  for (int r = 0; r < rows; ++r) a.loss[i0 + r] = G.loss[r];
  if (a.grad == nullptr) return;
  if (has_ce) pass_grad<true>(C, dkd, T, L, G);
  else pass_grad<false>(C, dkd, T, L, G);
  if (a.s_dtype == kFloat32) {
    store_tile<kFloat32>(a.grad, i0, rows, C, T.X);
  } else if (a.s_dtype == kFloat16) {
    store_tile<kFloat16>(a.grad, i0, rows, C, T.X);
  } else {
    store_tile<kBFloat16>(a.grad, i0, rows, C, T.X);
  }
}

}  // namespace

void kd_tiles_fwd(const KdLossArgs& a, int num_threads) {
  const int div = effective_divergence(a.opt);
  const DivConst k = div_const(a.opt);
  int pow_T;
  const int ce = ce_mode(a, div == kDKD, &pow_T);
  const int64_t blocks = (a.N + kLanes - 1) / kLanes;
  const int nt = pick_threads(num_threads, a.N * a.C * 4, blocks);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) kd_tile(a, b * kLanes, div, k, ce, pow_T);
}

}  // namespace rbkd::cpu
