// Arguments of the four entry points (csrc/README.md), as the bindings hand them to the CPU
// launchers. Strides and sizes count elements.
#pragma once

#include <stdint.h>

namespace rbkd {

struct SoftmaxFwdArgs {
  const void* x;
  int dtype;
  int64_t x_row_stride;
  void* out;  // [N, C] contiguous, dtype
  int64_t N, C;
  float T;
  bool log;
};

struct SoftmaxBwdArgs {
  const void* y;  // forward output, [N, C] contiguous
  const void* grad_out;
  int64_t go_row_stride;
  void* grad_in;  // [N, C] contiguous
  int dtype;
  int64_t N, C;
  float T;
  bool log;
};

struct KdLossArgs {
  const void* student;
  int s_dtype;
  int64_t s_row_stride;
  const void* teacher;
  int t_dtype;
  int64_t t_row_stride;
  int teacher_kind;
  const int64_t* labels;  // [N] or null: pure distillation (no CE, alpha = 1)
  int64_t ignore_index;
  float T;
  const float* T_rows;  // [N] or null
  float alpha;
  const float* alpha_rows;  // [N] or null
  bool t_squared;
  int64_t N, C;
  float* loss;  // [N]
  void* grad;   // [N, C] contiguous in s_dtype, or null
  float grad_scale;
  const float* grad_scale_ptr;  // float32 scalar read by the kernel, or null (then grad_scale)
  float probs_tol;  // probs / log_probs teacher rows must sum to 1 within this, else the row is NaN
};

struct EntropyArgs {
  const void* x;
  int dtype;
  int64_t x_row_stride;
  int kind;  // 0 logits, 1 probs
  const float* temps;  // [K]
  int64_t K, N, C;
  float* out;  // [K, N]
  bool normalize;
  float probs_tol;  // kind 1: rows must sum to 1 within this, else their entropy is NaN
};

}  // namespace rbkd
