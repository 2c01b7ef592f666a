// soft_label_entropy_fwd on the CPU: each row is read from memory once and kept in cache while
// the K temperatures loop over it (max(x / T) = max(x) / T, so one max serves every T).
#include "cpu_common.h"
#include "cpu_kernels.h"
#include "rbkd_rows.h"

namespace rbkd::cpu {
namespace {

RBKD_CLONES void entropy_row(const EntropyArgs& a, int64_t i, float norm, float* scratch) {
  const int64_t C = a.C;
  const void* row = static_cast<const char*>(a.x) + i * a.x_row_stride * dtype_size(a.dtype);
  float m;
  const float* x = row_as_float(row, a.dtype, scratch, C, &m);
  if (a.kind != 0) {
    float B = 0.0f;
#pragma omp simd reduction(+ : B)
    for (int64_t j = 0; j < C; ++j) B += entropy_term(x[j], fast_log(x[j]));
    const float H = entropy_finish_probs(B) * norm;
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
    a.out[k * a.N + i] = entropy_finish_logits(S, B) * norm;
  }
}

}  // namespace

void soft_label_entropy_fwd(const EntropyArgs& a, int num_threads) {
  if (a.N == 0 || a.K == 0) return;
  if (a.C == 0) {  // an empty distribution has entropy 0
    for (int64_t k = 0; k < a.K * a.N; ++k) a.out[k] = 0.0f;
    return;
  }
  const float norm = entropy_normalizer(a.C, a.normalize);
  const int64_t K = a.kind != 0 ? 1 : a.K;
  const int nt = pick_threads(num_threads, a.N * a.C * K * 2, a.N);
#pragma omp parallel num_threads(nt)
  {
    float* scratch = thread_scratch(a.C);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.N; ++i) entropy_row(a, i, norm, scratch);
  }
}

}  // namespace rbkd::cpu
