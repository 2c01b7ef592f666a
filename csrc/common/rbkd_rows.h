// Per-row formulas of the CPU kernels (the math of csrc/README.md), kept apart from the loops.
//
// A row is reduced to a few float32 numbers: maxima m, sums S = sum_j exp((x_j - m) * scale) and
// the KL accumulator A; the functions here update, combine and finish them. Conventions:
//   zs_j = (z_j - m_z) / T  (tempered, max-shifted student logit; log p_s_j = zs_j - log S_s)
//   teacher logits:   ts_j = (t_j - m_t) / T, e_j = exp(ts_j), S_t = sum e_j
//   teacher probs / log-probs: p_j and log p_j directly, S_t = sum p_j (1 up to rounding)
#pragma once

#include "rbkd_numerics.h"

namespace rbkd {

RBKD_INLINE float max_f(float a, float b) { return b > a ? b : a; }

// One term of sum_j p_j (log p_j - log p_s_j) (up to the log S terms of kl_finish): 0 where p == 0,
// so 0 * log 0 = 0, also where teacher and student are both -inf (log p - zs would be NaN).
RBKD_INLINE float kl_term(float p, float log_p, float zs) {
  return p > 0.0f ? p * (log_p - zs) : 0.0f;
}

// KL(p_t || p_s) of a row from A = sum_j kl_term(., ., zs_j), S_s and S_t (see the conventions).
RBKD_INLINE float kl_finish(float A, float S_t, float S_s, int teacher_kind) {
  if (teacher_kind == kLogits) {
    return A / S_t + (fast_log(S_s) - fast_log(S_t));
  }
  return A + S_t * fast_log(S_s);
}

// Cross entropy of the untempered student: log sum_j exp(z_j - m_z) + m_z - z_y.
RBKD_INLINE float ce_finish(float S_ce, float m_z, float z_label) {
  return fast_log(S_ce) + (m_z - z_label);
}

// Per-row loss: (1 - a) * CE + a * s * KL. A term whose weight is 0 is dropped rather than
// multiplied (0 * inf would be NaN): alpha = 1 ignores an infinite CE, alpha = 0 an infinite KL.
RBKD_INLINE float kd_row_loss(float ce, float kl, float alpha, float kl_scale, bool has_ce) {
  const float ce_part = has_ce & (1.0f - alpha > 0.0f) ? (1.0f - alpha) * ce : 0.0f;  // & not &&: simd
  const float kl_part = alpha > 0.0f ? alpha * kl_scale * kl : 0.0f;
  return ce_part + kl_part;
}

// Coefficients of the gradient of one row, grad_scale folded in:
//   dL/dz_j = c_ce * (softmax(z)_j - [j == y]) + c_kl * (p_s_j - p_t_j)
struct KdGradCoef {
  float c_ce;
  float c_kl;
};
RBKD_INLINE KdGradCoef kd_grad_coef(float alpha, float kl_scale, float inv_T, bool has_ce,
                                            float grad_scale) {
  KdGradCoef c;
  c.c_ce = has_ce ? (1.0f - alpha) * grad_scale : 0.0f;
  c.c_kl = alpha * kl_scale * inv_T * grad_scale;
  return c;
}

// One gradient element; p_s - p_t is formed in float32 before any cast to the output dtype.
RBKD_INLINE float kd_grad(float p_s, float p_t, float p_ce, bool is_label, KdGradCoef c) {
  return c.c_ce * (p_ce - (is_label ? 1.0f : 0.0f)) + c.c_kl * (p_s - p_t);
}

// Entropy of softmax(x / T) from S = sum e_j and B = sum entropy_term(e_j, xs_j), xs_j = (x_j - m) / T:
// H = -sum p_j log p_j = log S - B / S.
RBKD_INLINE float entropy_term(float e, float xs) { return e > 0.0f ? e * xs : 0.0f; }
RBKD_INLINE float entropy_finish_logits(float S, float B) { return fast_log(S) - B / S; }
// Rows that are probabilities already: H = -sum_j p_j log p_j = -B, B = sum entropy_term(p_j, log p_j).
RBKD_INLINE float entropy_finish_probs(float B) { return -B; }
// Divided by log C when normalising; 0 for C == 1 (the only distribution there has entropy 0).
RBKD_INLINE float entropy_normalizer(int64_t C, bool normalize) {
  if (!normalize) return 1.0f;
  return C > 1 ? 1.0f / logf(static_cast<float>(C)) : 0.0f;
}

// Per-row parameter: the [N] float32 array when given, else the scalar.
RBKD_INLINE float row_param(const float* rows, float scalar, int64_t i) {
  return rows != nullptr ? rows[i] : scalar;
}

// ---- the non-finite rule (README, "The loss convention") --------------------------------------
// A counted row (label not ignore_index) gets a NaN loss and a NaN gradient row when a value it
// depends on is not usable: a label outside [0, C), T not in (0, kKdMaxTemperature], alpha not in
// [0, 1], student logits or teacher with NaN or +inf or no finite entry, or probs / log-probs
// rows whose mass is not 1 within probs_tol. Ignored rows are never read and stay 0.

// Above this T the float32 KL loses its digits (the error grows as T^2 * 1e-7: 5e-5 relative at
// T = 100, 3e-3 at 1000, 1e3 at 1e6; measured against float64), so kd_loss refuses it.
// rbkd.config.KD_MAX_TEMPERATURE is the same number (tests/test_ops_api.py ties the copies).
constexpr float kKdMaxTemperature = 100.0f;
// standardize: z' = (z - mean) / (std + kStandardizeEps), as Sun et al. (CVPR 2024) write it.
// rbkd/ops/args.py's STANDARDIZE_EPS is the same number (tests tie the copies).
constexpr float kStandardizeEps = 1e-7f;

RBKD_INLINE bool kd_params_ok(float T, float alpha) {
  return T > 0.0f && T <= kKdMaxTemperature && alpha >= 0.0f && alpha <= 1.0f;  // NaN fails
}

// A row of logits folded into (max m, sum S of exp((x - m) * scale)) is usable when its max is
// finite (S >= 1 then: the max contributes exp(0)); NaN entries make S NaN, no finite entry
// leaves S at 0 or NaN, +inf makes m infinite.
RBKD_INLINE bool logits_row_ok(float m, float S) { return (S >= 1.0f) & (m < INFINITY); }  // & not &&: simd

// Probabilities (or exp of log-probabilities) summing to S: usable when |S - 1| <= tol.
RBKD_INLINE bool mass_ok(float S, float tol) { return fabsf(S - 1.0f) <= tol; }

}  // namespace rbkd
