// temperature_softmax_fwd / _bwd on the CPU: one row per task, rows spread over OpenMP threads,
// each row read from memory once and re-read from L2.
#include "cpu_common.h"
#include "cpu_kernels.h"
#include "rbkd_rows.h"

namespace rbkd::cpu {
namespace {

// out_j = (x_j - m) * inv_T - lse, the log-softmax of x / T.
template <int D>
RBKD_INLINE void store_log_softmax(void* row, const float* x, float m, float inv_T, float lse,
                                   int64_t n) {
  auto* p = static_cast<typename Storage<D>::type*>(row);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) store<D>(p, j, (x[j] - m) * inv_T - lse);
}

RBKD_CLONES void softmax_fwd_row(const SoftmaxFwdArgs& a, int64_t i, float* scratch) {
  const int64_t C = a.C;
  const int64_t size = dtype_size(a.dtype);
  const void* x_row = static_cast<const char*>(a.x) + i * a.x_row_stride * size;
  void* out_row = static_cast<char*>(a.out) + i * C * size;
  const float inv_T = 1.0f / a.T;
  float m;
  const float* x = row_as_float(x_row, a.dtype, scratch, C, &m);
  if (a.log) {
    float S = 0.0f;
#pragma omp simd reduction(+ : S)
    for (int64_t j = 0; j < C; ++j) S += fast_exp((x[j] - m) * inv_T);
    const float lse = fast_log(S);
    if (a.dtype == kFloat32) {
      store_log_softmax<kFloat32>(out_row, x, m, inv_T, lse, C);
    } else if (a.dtype == kFloat16) {
      store_log_softmax<kFloat16>(out_row, x, m, inv_T, lse, C);
    } else {
      store_log_softmax<kBFloat16>(out_row, x, m, inv_T, lse, C);
    }
    return;
  }
  // Exps go to the output row itself for float32 (it stays in cache until rescaled).
  float* e = a.dtype == kFloat32 ? static_cast<float*>(out_row) : scratch + C;
  float S = 0.0f;
#pragma omp simd reduction(+ : S)
  for (int64_t j = 0; j < C; ++j) {
    e[j] = fast_exp((x[j] - m) * inv_T);
    S += e[j];
  }
  const float inv_S = 1.0f / S;
  if (a.dtype == kFloat32) {
    store_scaled<kFloat32>(out_row, e, inv_S, C);
  } else if (a.dtype == kFloat16) {
    store_scaled<kFloat16>(out_row, e, inv_S, C);
  } else {
    store_scaled<kBFloat16>(out_row, e, inv_S, C);
  }
}

// softmax:     grad_in = y * (g - sum(g * y)) / T
// log_softmax: grad_in = (g - exp(y) * sum(g)) / T
template <int D>
RBKD_INLINE void softmax_bwd_row_t(const SoftmaxBwdArgs& a, int64_t i) {
  using S = typename Storage<D>::type;
  const int64_t C = a.C;
  const S* y = static_cast<const S*>(a.y) + i * C;
  const S* g = static_cast<const S*>(a.grad_out) + i * a.go_row_stride;
  S* out = static_cast<S*>(a.grad_in) + i * C;
  const float inv_T = 1.0f / a.T;
  float acc = 0.0f;
  if (a.log) {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < C; ++j) acc += load<D>(g, j);
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      store<D>(out, j, (load<D>(g, j) - fast_exp(load<D>(y, j)) * acc) * inv_T);
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < C; ++j) acc += load<D>(g, j) * load<D>(y, j);
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      store<D>(out, j, load<D>(y, j) * (load<D>(g, j) - acc) * inv_T);
    }
  }
}

RBKD_CLONES void softmax_bwd_row(const SoftmaxBwdArgs& a, int64_t i) {
  if (a.dtype == kFloat32) {
    softmax_bwd_row_t<kFloat32>(a, i);
  } else if (a.dtype == kFloat16) {
    softmax_bwd_row_t<kFloat16>(a, i);
  } else {
    softmax_bwd_row_t<kBFloat16>(a, i);
  }
}

}  // namespace

void temperature_softmax_fwd(const SoftmaxFwdArgs& a, int num_threads) {
  if (a.N == 0 || a.C == 0) return;
  advise_huge_pages(a.out, a.N * a.C * dtype_size(a.dtype));
  const int nt = pick_threads(num_threads, a.N * a.C, a.N);
  parallel_rows_with_scratch(nt, a.N, 2 * a.C, "temperature_softmax_fwd",
                             [&](int64_t i, float* scratch) { softmax_fwd_row(a, i, scratch); });
}

void temperature_softmax_bwd(const SoftmaxBwdArgs& a, int num_threads) {
  if (a.N == 0 || a.C == 0) return;
  advise_huge_pages(a.grad_in, a.N * a.C * dtype_size(a.dtype));
  const int nt = pick_threads(num_threads, a.N * a.C, a.N);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < a.N; ++i) softmax_bwd_row(a, i);
}

}  // namespace rbkd::cpu
