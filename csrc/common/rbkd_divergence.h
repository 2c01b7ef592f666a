// Per-element formulas of kd_loss's divergences (csrc/README.md, "Divergences"), shared by the
// CPU row path (a block of columns of one row) and lane path (one column of 16 rows): each is a
// scalar always_inline function of (p, log p, q, log q) that a `#pragma omp simd` loop vectorises
// over whichever index it runs. p = p_s_j, q = p_t_j; d is the element's term of D, h its
// h_j = p dD/dp (the gradient is then dD/du_j = h_j - p_j H, H = sum_k h_k).
#pragma once

#include "rbkd_args.h"
#include "rbkd_numerics.h"
#include "rbkd_rows.h"  // max_f

namespace rbkd {

// Per-call constants of the divergence: the mixture m = w_q * q + w_p * p (jsd, skew_kl) or
// w_p * p + w_q * q (skew_reverse_kl) in the log domain, lw = log w (-inf for a weight of 0).
struct DivConst {
  float w_q, w_p;    // weights of the teacher and student in m
  float lw_q, lw_p;  // their logs
  float skew;        // skew_reverse_kl's lambda (the student's weight)
  float dkd_alpha, dkd_beta;
};

// jsd's ends are kl (beta = 0) and reverse_kl (beta = 1): the mixture formula vanishes there
// (TRL and Liger special-case them too), so they are computed as those divergences.
// So are the skewed KLs at skew 0 (m = p: KL(q || p); m = q: KL(p || q)), which leaves every
// mixture with two positive weights (log_mix, mix_share rely on it).
RBKD_INLINE int effective_divergence(const KdOptions& o) {
  if (o.divergence == kJSD && o.beta == 0.0f) return kKL;
  if (o.divergence == kJSD && o.beta == 1.0f) return kReverseKL;
  if (o.divergence == kSkewKL && o.skew == 0.0f) return kKL;
  if (o.divergence == kSkewReverseKL && o.skew == 0.0f) return kReverseKL;
  return o.divergence;
}

inline DivConst div_const(const KdOptions& o) {
  DivConst k{};
  float wq = 0.0f, wp = 0.0f;
  if (o.divergence == kJSD) {
    wq = o.beta;
    wp = 1.0f - o.beta;
  } else if (o.divergence == kSkewKL) {
    wq = o.skew;
    wp = 1.0f - o.skew;
  } else if (o.divergence == kSkewReverseKL) {
    wp = o.skew;
    wq = 1.0f - o.skew;
  }
  k.w_q = wq;
  k.w_p = wp;
  k.lw_q = wq > 0.0f ? logf(wq) : -INFINITY;
  k.lw_p = wp > 0.0f ? logf(wp) : -INFINITY;
  k.skew = o.skew;
  k.dkd_alpha = o.dkd_alpha;
  k.dkd_beta = o.dkd_beta;
  return k;
}

// log(1 + e) for e in [0, 1], the Cephes logf polynomial without fast_log's special cases and
// bit tricks: f = e itself below sqrt(2) - 1 (so log1p stays exact for a tiny e), else
// (1 + e) / 2 - 1 with exponent 1. Besides: GCC 12 does not vectorise fast_log(1 + fast_exp(x))
// (it merges the two functions' special-case selects into a mask it cannot vectorise), and a
// scalar log_add_exp made jsd 11x slower than kl at 1024 x 32000.
RBKD_INLINE float log1p_unit(float e) {
  const bool big = e > 0.41421356f;
  const float f = big ? 0.5f * e - 0.5f : e;
  const float fe = big ? 1.0f : 0.0f;
  return log_poly(f, fe);
}

// log(exp(a) + exp(b)) without overflow; -inf when both are -inf (never -inf - -inf = NaN).
RBKD_INLINE float log_add_exp(float a, float b) {
  const float hi = a > b ? a : b;
  const float lo = a > b ? b : a;
  const float r = hi + log1p_unit(fast_exp(lo - hi));
  return hi == -INFINITY ? -INFINITY : r;
}

// log x for a normal float x > 0 (not 0, subnormals, inf or NaN: log_mix keeps those out). Arm's
// optimized-routines logf (v_logf.c, max error 3.3 ulp): x = 2^n (1 + r) with 1 + r in
// [2/3, 4/3) by integer arithmetic on the bits, then log(1 + r) = r + r^2 P(r), degree 6. No
// division and no selects: the atanh series it replaced divided (f / (2 + f)) and blended its
// range reduction, and jsd's terms pass was bound by that chain's latency (jsd 1.73x kl's time at
// 256 x 32000 on one thread).
RBKD_INLINE float log_normal(float x) {
  const uint32_t u = float_bits(x) - 0x3f2aaaabu;
  const float n = static_cast<float>(static_cast<int32_t>(u) >> 23);
  const float r = bits_float((u & 0x007fffffu) + 0x3f2aaaabu) - 1.0f;
  const float r2 = r * r;
  float p = -0x1.4f9934p-3f + 0x1.5a9aa2p-3f * r;  // P5 + P6 r
  float q = -0x1.00187cp-2f + 0x1.961348p-3f * r;  // P3 + P4 r
  float y = -0x1.ffffc8p-2f + 0x1.555d7cp-2f * r;  // P1 + P2 r
  p = p + -0x1.3e737cp-3f * r2;                    // + P7 r^2
  q = q + p * r2;
  y = y + q * r2;
  return (r + 0.693147181f * n) + y * r2;
}

// log m of the mixture m = w_p p + w_q q (both weights > 0: effective_divergence), from the
// probabilities: one log where the log-domain log_add_exp costs an exp and a log. Never below
// max(log w_p p, log w_q q), which stands in where m is below the smallest normal float (every
// term that multiplies it is then below 1e-38 / w); so no term sees log 0 = -inf against a p or
// q > 0. Maxima, not selects: vmaxps, where `m >= FLT_MIN ? ... : ...` compiled to compares and
// three blends.
RBKD_INLINE float log_mix(float p, float lp, float q, float lq, float w_p, float lw_p, float w_q,
                          float lw_q) {
  const float m = w_p * p + w_q * q;
  const float a = lp + lw_p, b = lq + lw_q;
  return max_f(log_normal(max_f(m, 1.17549435e-38f)), max_f(a, b));
}

// The student's share of the mixture, w_p p / m, in [0, 1] (0 where m underflows to 0: then
// w_p p is 0 too, and q < 1e-38 / w_q).
RBKD_INLINE float mix_share(float p, float q, const DivConst& k) {
  const float m = k.w_p * p + k.w_q * q;
  return k.w_p * p / max_f(m, 1.4e-45f);
}

// p (lp - lx) with 0 log 0 = 0 (also where lx is -inf: a select, never 0 * inf).
RBKD_INLINE float xlogy_term(float p, float lp, float lx) { return p > 0.0f ? p * (lp - lx) : 0.0f; }

// d and h of one element for divergence DIV (not dkd: its terms are not per element).
// kl's h is -q with H fixed at -1 by the caller (dD/du = p - q exactly, as the fast path).
template <int DIV>
RBKD_INLINE void div_elem(float p, float lp, float q, float lq, const DivConst& k, float& d,
                          float& h) {
  if constexpr (DIV == kKL) {
    d = xlogy_term(q, lq, lp);
    h = -q;
  } else if constexpr (DIV == kReverseKL) {
    d = xlogy_term(p, lp, lq);
    h = d;
  } else if constexpr (DIV == kJSD) {
    const float lm = log_mix(p, lp, q, lq, k.w_p, k.lw_p, k.w_q, k.lw_q);
    const float hp = xlogy_term(p, lp, lm) * k.w_p;
    d = k.w_q * xlogy_term(q, lq, lm) + hp;
    h = hp;
  } else if constexpr (DIV == kSkewKL) {
    const float lm = log_mix(p, lp, q, lq, k.w_p, k.lw_p, k.w_q, k.lw_q);
    d = xlogy_term(q, lq, lm);
    h = q > 0.0f ? -q * mix_share(p, q, k) : 0.0f;
  } else if constexpr (DIV == kSkewReverseKL) {
    const float l = lp - log_mix(p, lp, q, lq, k.w_p, k.lw_p, k.w_q, k.lw_q);
    d = p > 0.0f ? p * l : 0.0f;
    h = p > 0.0f ? p * (l + 1.0f - mix_share(p, q, k)) : 0.0f;
  } else {  // kTVD; sign(0) = 0
    d = 0.5f * fabsf(q - p);
    h = p > q ? 0.5f * p : (p < q ? -0.5f * p : 0.0f);
  }
}

// H as the gradient uses it: sum h, except kl's -1 (see div_elem).
template <int DIV>
RBKD_INLINE float div_H(float sum_h) {
  return DIV == kKL ? -1.0f : sum_h;
}

// ---- dkd (Zhao et al. 2022) from a row's scalars -----------------------------------------------
// With the label y: lp_y, lq_y the log-probabilities of y, lPr = log sum_{j != y} p_j, lQr the
// teacher's, and B / Qr the teacher-weighted sum_{j != y} rt_j (log rt_j - log r_j) + ...: the
// callers hand over NCKD whole. term(a, b) = exp(a) (a - b), 0 where exp(a) == 0.
inline float dkd_term(float la, float lb) {
  const float a = expf(la);
  return a > 0.0f ? a * (la - lb) : 0.0f;
}
inline float dkd_tckd(float lp_y, float lq_y, float lPr, float lQr) {
  return dkd_term(lq_y, lp_y) + dkd_term(lQr, lPr);
}
// log(exp(a) + exp(b)) for scalars (dkd's log S from the rest's and the label's).
inline float log_add_exp_scalar(float a, float b) {
  const float hi = a > b ? a : b;
  const float lo = a > b ? b : a;
  return hi == -INFINITY ? -INFINITY : hi + log1pf(expf(lo - hi));
}

// ---- standardize (Sun et al. 2024) --------------------------------------------------------------
// x' = (x - mean) * rho, rho = 1 / (sigma + eps), sigma unbiased; rho = 0 for C == 1 (x' = 0).
struct ZScore {
  float mean, sigma, rho;
};

}  // namespace rbkd
