// soft_label_entropy_fwd on the CPU.
//
// C > kSmallC: one row per task; each row is read from memory once and kept in cache while the K
// temperatures loop over it (max(x / T) = max(x) / T, so one max serves every T).
// C <= kSmallC: rows are the SIMD lanes (as in kd_tiles.cpp). A block of kLanes rows
// is transposed into a [C][kLanes] tile, so a 10-class row does not waste 6 of 16 lanes, and the
// per-row max, sums and entropies are vectors; the K temperatures then loop over the tile in L1.
#include "cpu_common.h"
#include "cpu_kernels.h"
#include "rbkd_rows.h"

#include <vector>

namespace rbkd::cpu {
namespace {

constexpr int64_t kSmallC = 256;
constexpr int kLanes = 16;

RBKD_CLONES void entropy_row(const EntropyArgs& a, int64_t i, float norm, float* scratch) {
  const int64_t C = a.C;
  const void* row = static_cast<const char*>(a.x) + i * a.x_row_stride * dtype_size(a.dtype);
  float m;
  const float* x = row_as_float(row, a.dtype, scratch, C, &m);
  if (a.opt.kind != 0) {
    float B = 0.0f, S = 0.0f;
#pragma omp simd reduction(+ : B, S)
    for (int64_t j = 0; j < C; ++j) {
      B += entropy_term(x[j], fast_log(x[j]));
      S += x[j];
    }
    const float H = mass_ok(S, a.opt.probs_tol) ? entropy_finish_probs(B) * norm : NAN;
    for (int64_t k = 0; k < a.K; ++k) a.out[k * a.N + i] = H;
    return;
  }
  for (int64_t k = 0; k < a.K; ++k) {
    const float inv_T = 1.0f / a.temps[k];
    float S = 0.0f, B = 0.0f;
#pragma omp simd reduction(+ : S, B)
    for (int64_t j = 0; j < C; ++j) {
      const float xs = (x[j] - m) * inv_T;
      const float e = fast_exp(xs);
      S += e;
      B += entropy_term(e, xs);
    }
    a.out[k * a.N + i] = logits_row_ok(m, S) ? entropy_finish_logits(S, B) * norm : NAN;
  }
}

// Loads a [C][kLanes] tile: tile[j][r] = row (i0 + r), element j; missing rows read as 0 (their
// lanes are computed and never stored).
template <int D>
RBKD_INLINE void load_tile(const void* base, int64_t row_stride, int64_t i0, int rows, int64_t C,
                           float (*tile)[kLanes]) {
  using St = typename Storage<D>::type;
  for (int r = 0; r < kLanes; ++r) {
    if (r < rows) {
      const St* p = static_cast<const St*>(base) + (i0 + r) * row_stride;
      for (int64_t j = 0; j < C; ++j) tile[j][r] = load<D>(p, j);
    } else {
      for (int64_t j = 0; j < C; ++j) tile[j][r] = 0.0f;
    }
  }
}

// Entropies of the kLanes rows of a tile at each temperature, written to out[k, i0 + r]. The lane
// loop is the inner, vectorised one (GCC's outer-loop vectorisation of the lane loop fell back to
// its scalar version at run time).
RBKD_INLINE void entropy_tile_logits(int64_t C, const float (*x)[kLanes], const float* inv_T,
                                     int64_t K, float norm, float* out, int64_t N, int64_t i0,
                                     int rows) {
  alignas(64) float m[kLanes];
#pragma omp simd
  for (int r = 0; r < kLanes; ++r) m[r] = -INFINITY;
  for (int64_t j = 0; j < C; ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) m[r] = x[j][r] > m[r] ? x[j][r] : m[r];  // NaNs skipped
  }
  alignas(64) float S[kLanes], B[kLanes], h[kLanes];
  for (int64_t k = 0; k < K; ++k) {
    const float it = inv_T[k];
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) S[r] = B[r] = 0.0f;
    for (int64_t j = 0; j < C; ++j) {
#pragma omp simd
      for (int r = 0; r < kLanes; ++r) {
        const float xs = (x[j][r] - m[r]) * it;
        const float e = fast_exp(xs);
        S[r] += e;
        B[r] += entropy_term(e, xs);
      }
    }
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      h[r] = logits_row_ok(m[r], S[r]) ? entropy_finish_logits(S[r], B[r]) * norm : NAN;
    }
    float* o = out + k * N + i0;
    for (int r = 0; r < rows; ++r) o[r] = h[r];
  }
}

RBKD_INLINE void entropy_tile_probs(int64_t C, const float (*x)[kLanes], int64_t K, float norm,
                                    float tol, float* out, int64_t N, int64_t i0, int rows) {
  alignas(64) float B[kLanes], S[kLanes], h[kLanes];
#pragma omp simd
  for (int r = 0; r < kLanes; ++r) B[r] = S[r] = 0.0f;
  for (int64_t j = 0; j < C; ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      B[r] += entropy_term(x[j][r], fast_log(x[j][r]));
      S[r] += x[j][r];
    }
  }
#pragma omp simd
  for (int r = 0; r < kLanes; ++r) h[r] = mass_ok(S[r], tol) ? entropy_finish_probs(B[r]) * norm : NAN;
  for (int64_t k = 0; k < K; ++k) {
    float* o = out + k * N + i0;
    for (int r = 0; r < rows; ++r) o[r] = h[r];
  }
}

// kLanes rows starting at i0 (C <= kSmallC). inv_T: the K reciprocal temperatures.
RBKD_CLONES void entropy_rows_small(const EntropyArgs& a, int64_t i0, const float* inv_T,
                                    float norm) {
  const int64_t C = a.C;
  const int rows = static_cast<int>(std::min<int64_t>(kLanes, a.N - i0));
  alignas(64) float x[kSmallC][kLanes];
  if (a.dtype == kFloat32) {
    load_tile<kFloat32>(a.x, a.x_row_stride, i0, rows, C, x);
  } else if (a.dtype == kFloat16) {
    load_tile<kFloat16>(a.x, a.x_row_stride, i0, rows, C, x);
  } else {
    load_tile<kBFloat16>(a.x, a.x_row_stride, i0, rows, C, x);
  }
  if (a.opt.kind != 0) {
    entropy_tile_probs(C, x, a.K, norm, a.opt.probs_tol, a.out, a.N, i0, rows);
  } else {
    entropy_tile_logits(C, x, inv_T, a.K, norm, a.out, a.N, i0, rows);
  }
}

}  // namespace

void soft_label_entropy_fwd(const EntropyArgs& a, int num_threads) {
  if (a.N == 0 || a.K == 0) return;
  if (a.C == 0) {  // an empty distribution has entropy 0
    for (int64_t k = 0; k < a.K * a.N; ++k) a.out[k] = 0.0f;
    return;
  }
  const float norm = entropy_normalizer(a.C, a.opt.normalize);
  const int64_t K = a.opt.kind != 0 ? 1 : a.K;
  if (a.C <= kSmallC) {
    // Same reciprocal as the large-C path (1.0f / T), computed once per call.
    std::vector<float> inv_T(static_cast<size_t>(K), 1.0f);
    if (a.opt.kind == 0) {
      for (int64_t k = 0; k < K; ++k) inv_T[k] = 1.0f / a.temps[k];
    }
    const int64_t blocks = (a.N + kLanes - 1) / kLanes;
    const int nt = pick_threads(num_threads, a.N * a.C * K * 2, blocks);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) entropy_rows_small(a, b * kLanes, inv_T.data(), norm);
    return;
  }
  const int nt = pick_threads(num_threads, a.N * a.C * K * 2, a.N);
  parallel_rows_with_scratch(nt, a.N, a.C, "soft_label_entropy_fwd",
                             [&](int64_t i, float* scratch) { entropy_row(a, i, norm, scratch); });
}

}  // namespace rbkd::cpu
