// Arguments of the four entry points (csrc/README.md), as the bindings hand them to the CPU
// launchers. Strides and sizes count elements.
#pragma once

#include <stdint.h>

namespace rbkd {

// kd_loss's options, in the order of KDOptions in rbkd/ops/args.py (tests/test_ops_api.py ties
// the two through rbkd._C.KD_OPTION_FIELDS). X(type, name, default). A new option is one line
// here; the bindings expose every field by name.
#define RBKD_KD_OPTIONS(X)       \
  X(int, teacher_kind, 0)        \
  X(bool, t_squared, true)       \
  X(int64_t, ignore_index, -100) \
  X(float, probs_tol, 1e-3f)     \
  X(int, divergence, 0)          \
  X(float, beta, 0.5f)           \
  X(float, skew, 0.1f)           \
  X(float, dkd_alpha, 1.0f)      \
  X(float, dkd_beta, 8.0f)       \
  X(bool, standardize, false)

// soft_label_entropy's options (EntropyOptions in rbkd/ops/args.py).
#define RBKD_ENTROPY_OPTIONS(X) \
  X(int, kind, 0)               \
  X(bool, normalize, false)     \
  X(float, probs_tol, 1e-3f)

#define RBKD_DECLARE_FIELD(type, name, init) type name = init;
struct KdOptions {
  RBKD_KD_OPTIONS(RBKD_DECLARE_FIELD)
};
struct EntropyOptions {
  RBKD_ENTROPY_OPTIONS(RBKD_DECLARE_FIELD)
};
#undef RBKD_DECLARE_FIELD

// Divergence codes (DIVERGENCES in rbkd/ops/args.py).
enum Divergence : int {
  kKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kSkewKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5,
  kDKD = 6,
};

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
  const int64_t* labels;  // [N] or null: pure distillation (no CE, alpha = 1)
  float T;
  const float* T_rows;  // [N] or null
  float alpha;
  const float* alpha_rows;  // [N] or null
  int64_t N, C;
  float* loss;  // [N]
  void* grad;   // [N, C] contiguous in s_dtype, or null
  float grad_scale;
  const float* grad_scale_ptr;  // float32 scalar read by the kernel, or null (then grad_scale)
  KdOptions opt;
};

struct EntropyArgs {
  const void* x;
  int dtype;
  int64_t x_row_stride;
  const float* temps;  // [K]
  int64_t K, N, C;
  float* out;  // [K, N]
  EntropyOptions opt;  // kind 0 logits, 1 probs; probs rows must sum to 1 within probs_tol
};

}  // namespace rbkd
