// Scalar numerics of the CPU kernels: bit casts, the three storage dtypes and a vectorisable
// exp/log. Every function is branch-free enough for `#pragma omp simd` loops to vectorise it.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

// always_inline: the CPU kernels are compiled once per ISA (target_clones); a helper that is not
// inlined would run with the baseline ISA and break the loop's vectorisation.
#define RBKD_INLINE inline __attribute__((always_inline))

namespace rbkd {

// Storage dtype codes of the ABI (csrc/README.md).
enum Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// Teacher representations of kd_loss_fwd.
enum TeacherKind : int { kLogits = 0, kProbs = 1, kLogProbs = 2 };

RBKD_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

RBKD_INLINE float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// ---- dtype conversions, bitwise (no F16C / bf16 hardware needed), round-to-nearest-even ----

RBKD_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + (112u << 23);  // rebias the exponent 15 -> 127
  const uint32_t inf_nan = (em << 13) | 0x7f800000u;
  // Subnormals (and zero): em * 2^-24 is exact in float.
  const uint32_t sub = float_bits(static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f);
  const uint32_t r = em >= 0x7c00u ? inf_nan : (em < 0x0400u ? sub : normal);
  return bits_float(r | sign);
}

RBKD_INLINE uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  // |f| >= 2^16 always overflows; NaN stays a (quiet) NaN.
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // |f| < 2^-14: adding 0.5 rounds (RNE) to a multiple of 2^-24, the half subnormal step.
  const uint32_t sub = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  // Normal: rebias, round to nearest even on the 13 dropped bits (a carry into the exponent is
  // exactly the right result, up to inf).
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t r = a >= 0x47800000u ? big : (a < 0x38800000u ? sub : normal);
  return static_cast<uint16_t>(r | sign);
}

RBKD_INLINE float bf16_to_float(uint16_t b) {
  return bits_float(static_cast<uint32_t>(b) << 16);
}

RBKD_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t nan = (x >> 16) | 0x0040u;
  return static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// Element j of a row stored as dtype D, as float32.
template <int D>
struct Storage {
  using type = uint16_t;
};
template <>
struct Storage<kFloat32> {
  using type = float;
};

template <int D>
RBKD_INLINE float load(const typename Storage<D>::type* p, int64_t j) {
  if constexpr (D == kFloat32) {
    return p[j];
  } else if constexpr (D == kFloat16) {
    return half_to_float(p[j]);
  } else {
    return bf16_to_float(p[j]);
  }
}

template <int D>
RBKD_INLINE void store(typename Storage<D>::type* p, int64_t j, float v) {
  if constexpr (D == kFloat32) {
    p[j] = v;
  } else if constexpr (D == kFloat16) {
    p[j] = float_to_half(v);
  } else {
    p[j] = float_to_bf16(v);
  }
}

// ---- exp and log, vectorisable: range reduction + polynomial, no libm calls ----

// The fast exps share one reduction and one polynomial: x = n ln 2 + r (Cody-Waite, ln 2 split
// in two so n * C1 is exact; the shifter 1.5 * 2^23 rounds x / ln 2 to the integer n, which
// stays in k's low mantissa bits) and exp(r) = 1 + r + r^2 p(r) on [-ln2/2, ln2/2].
struct ExpSplit {
  float r;
  int32_t n;
};

RBKD_INLINE ExpSplit exp_split(float xc) {
  const float shifter = 12582912.0f;
  const float k = xc * 1.44269504088896341f + shifter;
  const float n = k - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  return {r, static_cast<int32_t>(float_bits(k) - float_bits(shifter))};
}

// exp(r) for |r| <= ln2/2: the Cephes expf polynomial (~1 ulp), or with kLite a degree-5 one
// (two FMAs fewer, ~3 ulp: relative-error minimax of (exp(r) - 1 - r) / r^2).
template <bool kLite>
RBKD_INLINE float exp_poly(float r) {
  float p;
  if constexpr (kLite) {
    p = 8.3125336096e-3f;
    p = p * r + 4.1890129447e-2f;
    p = p * r + 1.6667114198e-1f;
    p = p * r + 4.9999231100e-1f;
  } else {
    p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
  }
  return p * (r * r) + r + 1.0f;
}

// exp(x) at any x: 0 for -inf and x < -103.9, +inf above 88.7, NaN for NaN. Branch- and
// select-free apart from two clamps (vmaxps/vminps): the scale 2^n is applied as two factors
// 2^(n/2) * 2^(n - n/2), so underflow to subnormals and 0 and overflow to inf happen in the
// multiply itself; that halves the instructions of the compare-and-blend version (0.7 -> 0.4 ns
// per exp pair on the Zen 4 this was tuned on).
template <bool kLite>
RBKD_INLINE float exp_any(float x) {
  float xc = x < -110.0f ? -110.0f : x;  // exp(-110) rounds to 0; NaN passes both compares
  xc = xc > 89.0f ? 89.0f : xc;          // exp(89) overflows to inf
  const ExpSplit e = exp_split(xc);      // n in [-159, 129]
  const int32_t n1 = e.n >> 1;
  const int32_t n2 = e.n - n1;
  return exp_poly<kLite>(e.r) * bits_float(static_cast<uint32_t>(n1 + 127) << 23) *
         bits_float(static_cast<uint32_t>(n2 + 127) << 23);
}

// exp(x) in float, within ~1 ulp for normal results.
RBKD_INLINE float fast_exp(float x) { return exp_any<false>(x); }

// fast_exp within ~3 ulp (1.7e-7 relative), same special values. For kernels whose exps are the
// bottleneck and whose results are sums of many terms anyway (the CPU kd_loss rows).
RBKD_INLINE float fast_exp_lite(float x) { return exp_any<true>(x); }

// exp(x) for x <= 0 (a logit minus its row's or block's max, times 1 / T): one scaling by 2^n,
// n >= -126, instead of two, and no overflow clamp. Results below e^-87 (1.6e-38, where float
// turns subnormal) are flushed to 0 (fast_exp keeps them down to e^-104): for probabilities that
// are summed or scaled into a gradient, a difference below 1e-38. NaN stays NaN; -inf gives 0.
// Five vector instructions fewer. Small positive x (rounding) is exact up to 88.
template <bool kLite = true>
RBKD_INLINE float fast_exp_nonpos(float x) {
  const ExpSplit e = exp_split(x < -87.0f ? -87.0f : x);  // NaN passes the compare
  const float y = exp_poly<kLite>(e.r) * bits_float(static_cast<uint32_t>(e.n + 127) << 23);
  return x < -87.0f ? 0.0f : y;
}

// log(2^fe (1 + f)) for f in [sqrt(1/2) - 1, sqrt(2) - 1): Cephes' logf polynomial, the one
// copy the Cephes-based logs share (fast_log, log1p_unit).
RBKD_INLINE float log_poly(float f, float fe) {
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return f + y + fe * 0.693359375f;
}

// log(x) in float, within ~1 ulp (Cephes logf). log(0) = -inf, log(+inf) = +inf, x < 0 or NaN -> NaN.
RBKD_INLINE float fast_log(float x) {
  const bool subnormal = x < 1.17549435e-38f;
  const float xs = subnormal ? x * 8388608.0f : x;  // * 2^23 makes subnormals normal
  const uint32_t u = float_bits(xs);
  // xs = m * 2^e with m in [0.5, 1)
  int32_t e = static_cast<int32_t>((u >> 23) & 0xffu) - 126;
  const float m = bits_float((u & 0x007fffffu) | 0x3f000000u);
  const bool below = m < 0.707106781186547524f;  // move m into [sqrt(1/2), sqrt(2))
  e = below ? e - 1 : e;
  const float f = below ? (m + m) - 1.0f : m - 1.0f;
  const float fe = static_cast<float>(e) - (subnormal ? 23.0f : 0.0f);
  float r = log_poly(f, fe);
  r = x == 0.0f ? -INFINITY : r;
  r = x == INFINITY ? INFINITY : r;
  return ((x < 0.0f) | (x != x)) ? NAN : r;  // | not ||: no branch in simd loops
}

}  // namespace rbkd
