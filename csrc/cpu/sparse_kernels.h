// Arguments and launchers of the sparse soft-label kernels (issue 16): sparse_kd_loss_fwd
// (sparse_kd_cpu.cpp) and capture_soft_labels_fwd (capture_cpu.cpp). csrc/README.md, "Sparse soft
// labels", is their ABI. Strides and sizes count elements.
#pragma once

#include <stdint.h>

#include "rbkd_args.h"

namespace rbkd {

// Tail modes of sparse_kd_loss (TAIL_MODES in rbkd/ops/sparse_twin.py).
enum SparseTail : int { kTailBucket = 0, kTailRenormalize = 1, kTailSampled = 2 };

struct SparseKdArgs {
  const void* student;  // [N, V], s_dtype, unit stride in V
  int s_dtype;
  int64_t s_row_stride;
  const void* ids;  // [N, k] contiguous, int64 when ids_int64 else int32
  bool ids_int64;
  const float* topk;      // [N, k] contiguous float32: the teacher's kept raw logits
  const float* logz;      // [N] float32 (tail bucket, sampled), or null (renormalize)
  const int64_t* labels;  // [N] or null: pure distillation (no CE, alpha = 1)
  float T;
  const float* T_rows;  // [N] or null
  float alpha;
  const float* alpha_rows;  // [N] or null
  int64_t N, V, k;
  int tail;     // SparseTail
  float* loss;  // [N]
  void* grad;   // [N, V] contiguous in s_dtype, or null
  float grad_scale;
  const float* grad_scale_ptr;  // float32 scalar read by the kernel, or null (then grad_scale)
  KdOptions opt;  // divergence, beta, skew, t_squared, ignore_index, probs_tol
  // tail sampled (kl only): ids are draws from the teacher at sample_T (-1 padding) and topk the
  // teacher's raw logits at them.
  const int64_t* counts;     // [N, k] contiguous: each id's draws (0 padding)
  const float* sample_logz;  // [N] the teacher's logz at sample_T, or null (T == sample_T)
  float sample_T;
};

struct CaptureArgs {
  const void* x;  // [N, V], dtype, unit stride in V
  int dtype;
  int64_t x_row_stride;
  int64_t N, V, k;
  const float* temps;  // [J]
  int64_t J;
  int32_t* topk_ids;  // [N, k]: descending logit, equal logits by ascending id
  void* topk_logits;  // [N, k] in dtype: the raw values
  float* logz;        // [N, J]
  float* entropy;     // [N, J]
};

namespace cpu {

void sparse_kd_loss_fwd(const SparseKdArgs& a, int num_threads);
void capture_soft_labels_fwd(const CaptureArgs& a, int num_threads);
// Seconds per exp of the capture kernel's exp (fast_exp_lite) in a tight, L1-resident loop on
// num_threads threads, each doing `per_thread` exps: the yardstick of the capture benchmark.
double exp_seconds_per_element(int64_t per_thread, int num_threads);

}  // namespace cpu
}  // namespace rbkd
