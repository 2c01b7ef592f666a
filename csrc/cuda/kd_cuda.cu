// The CUDA kernels of rbkd._C_cuda, on the numerics of csrc/common (the CPU tests cover them).
//
// A row is handled by a group of threads: one warp per row when C <= kWarpC (8 rows per 256-thread
// block, so a 10-class row does not idle a whole block), else one 256-thread block per row; groups
// stride over rows, so any N works. Every op is two passes over the row: pass 1 folds it into
// online (max, sum) pairs per thread, combined across the group with combine_max_sum; pass 2
// recomputes the exps with the final maxima and writes. Accumulation is float32 whatever the
// storage dtype; loads are 4-wide (16 bytes for float32) where the rows are aligned for it. No
// host synchronisation: a device-side grad_scale is read by the kernel itself.
#include <cuda_runtime.h>

#include <type_traits>

#include "kd_cuda.h"
#include "rbkd_rows.h"

namespace rbkd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kWarpC = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

template <int D>
using elem_t = typename Storage<D>::type;

// ---- rows: group geometry and 4-wide loads ----------------------------------------------------

struct Group {
  int tid, size;      // this thread within the group, threads per group
  int64_t first, step;  // first row and row stride of this group
  bool block;         // the group is the whole block (needs shared memory to reduce)
};

template <bool BLOCK>
__device__ __forceinline__ Group make_group() {
  Group g;
  g.block = BLOCK;
  if (BLOCK) {
    g.tid = threadIdx.x;
    g.size = blockDim.x;
    g.first = blockIdx.x;
    g.step = gridDim.x;
  } else {
    const int warps = blockDim.x / 32;
    g.tid = threadIdx.x % 32;
    g.size = 32;
    g.first = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32;
    g.step = static_cast<int64_t>(gridDim.x) * warps;
  }
  return g;
}

template <int D>
struct Pack4 {
  using type = uint2;  // 4 x 16 bit
};
template <>
struct Pack4<kFloat32> {
  using type = float4;
};

template <int D>
__device__ __forceinline__ void load4(const elem_t<D>* row, int64_t j, float (&v)[4]) {
  const typename Pack4<D>::type raw = *reinterpret_cast<const typename Pack4<D>::type*>(row + j);
  elem_t<D> e[4];
  memcpy(e, &raw, sizeof raw);
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = load<D>(e, k);
}

// Rows can be read 4 at a time when C is a multiple of 4 and every row start is aligned to it.
template <int D>
__host__ __device__ inline bool vec4_ok(const void* base, int64_t row_stride, int64_t C) {
  const int64_t bytes = 4 * static_cast<int64_t>(sizeof(elem_t<D>));
  return C % 4 == 0 && reinterpret_cast<uintptr_t>(base) % bytes == 0 &&
         (row_stride * static_cast<int64_t>(sizeof(elem_t<D>))) % bytes == 0;
}

// f(j, value) for this thread's elements of one row.
template <int D, typename F>
__device__ __forceinline__ void for_each(const elem_t<D>* row, int64_t C, bool vec, const Group& g,
                                         F&& f) {
  if (vec) {
    for (int64_t j = 4 * static_cast<int64_t>(g.tid); j < C; j += 4 * g.size) {
      float v[4];
      load4<D>(row, j, v);
#pragma unroll
      for (int k = 0; k < 4; ++k) f(j + k, v[k]);
    }
  } else {
    for (int64_t j = g.tid; j < C; j += g.size) f(j, load<D>(row, j));
  }
}

// f(j, a, b) over two rows (student and teacher) at once.
template <int DA, int DB, typename F>
__device__ __forceinline__ void for_each2(const elem_t<DA>* ra, const elem_t<DB>* rb, int64_t C,
                                          bool vec, const Group& g, F&& f) {
  if (vec) {
    for (int64_t j = 4 * static_cast<int64_t>(g.tid); j < C; j += 4 * g.size) {
      float a[4], b[4];
      load4<DA>(ra, j, a);
      load4<DB>(rb, j, b);
#pragma unroll
      for (int k = 0; k < 4; ++k) f(j + k, a[k], b[k]);
    }
  } else {
    for (int64_t j = g.tid; j < C; j += g.size) f(j, load<DA>(ra, j), load<DB>(rb, j));
  }
}

// ---- group reductions -------------------------------------------------------------------------

// Reduces v[0..NV) over the group with comb(v, other); every thread of the group gets the result.
// `identity` fills the slots of absent warps. smem: NV * 32 floats (block groups only).
template <int NV, typename Comb>
__device__ __forceinline__ void group_reduce(float (&v)[NV], const float (&identity)[NV],
                                             Comb comb, const Group& g, float* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float w[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) w[k] = __shfl_xor_sync(kFullMask, v[k], off);
    comb(v, w);
  }
  if (!g.block) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // smem may still be read by the previous reduction
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) smem[k * 32 + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NV; ++k) v[k] = lane < warps ? smem[k * 32 + lane] : identity[k];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float w[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) w[k] = __shfl_xor_sync(kFullMask, v[k], off);
    comb(v, w);
  }
}

__device__ __forceinline__ float group_sum(float x, const Group& g, float* smem) {
  float v[1] = {x};
  const float id[1] = {0.0f};
  group_reduce<1>(v, id, [](float(&a)[1], const float(&b)[1]) { a[0] += b[0]; }, g, smem);
  return v[0];
}

__device__ __forceinline__ float group_max(float x, const Group& g, float* smem) {
  float v[1] = {x};
  const float id[1] = {-INFINITY};
  group_reduce<1>(v, id, [](float(&a)[1], const float(&b)[1]) { a[0] = max_f(a[0], b[0]); }, g,
                  smem);
  return v[0];
}

// (max, sum of exp((x - max) * scale)) of a whole row.
__device__ __forceinline__ void group_max_sum(float& m, float& s, float scale, const Group& g,
                                              float* smem) {
  float v[2] = {m, s};
  const float id[2] = {-INFINITY, 0.0f};
  group_reduce<2>(
      v, id,
      [scale](float(&a)[2], const float(&b)[2]) { combine_max_sum(a[0], a[1], b[0], b[1], scale); },
      g, smem);
  m = v[0];
  s = v[1];
}

// ---- temperature softmax ----------------------------------------------------------------------

template <int D, bool BLOCK>
__global__ void __launch_bounds__(kThreads) softmax_fwd_kernel(SoftmaxFwdArgs a, bool vec) {
  __shared__ float smem[2 * 32];
  const Group g = make_group<BLOCK>();
  const float inv_T = 1.0f / a.T;
  for (int64_t i = g.first; i < a.N; i += g.step) {
    const elem_t<D>* x = static_cast<const elem_t<D>*>(a.x) + i * a.x_row_stride;
    elem_t<D>* out = static_cast<elem_t<D>*>(a.out) + i * a.C;
    float m = -INFINITY, s = 0.0f;
    for_each<D>(x, a.C, vec, g, [&](int64_t, float v) { online_push(m, s, v, inv_T); });
    group_max_sum(m, s, inv_T, g, smem);
    if (a.log) {
      const float lse = fast_log(s);
      for_each<D>(x, a.C, vec, g,
                  [&](int64_t j, float v) { store<D>(out, j, (v - m) * inv_T - lse); });
    } else {
      const float inv_s = 1.0f / s;
      for_each<D>(x, a.C, vec, g,
                  [&](int64_t j, float v) { store<D>(out, j, fast_exp((v - m) * inv_T) * inv_s); });
    }
  }
}

template <int D, bool BLOCK>
__global__ void __launch_bounds__(kThreads) softmax_bwd_kernel(SoftmaxBwdArgs a, bool vec) {
  __shared__ float smem[32];
  const Group g = make_group<BLOCK>();
  const float inv_T = 1.0f / a.T;
  for (int64_t i = g.first; i < a.N; i += g.step) {
    const elem_t<D>* y = static_cast<const elem_t<D>*>(a.y) + i * a.C;
    const elem_t<D>* go = static_cast<const elem_t<D>*>(a.grad_out) + i * a.go_row_stride;
    elem_t<D>* gi = static_cast<elem_t<D>*>(a.grad_in) + i * a.C;
    float acc = 0.0f;
    if (a.log) {
      for_each<D>(go, a.C, vec, g, [&](int64_t, float gv) { acc += gv; });
    } else {
      for_each2<D, D>(y, go, a.C, vec, g, [&](int64_t, float yv, float gv) { acc += gv * yv; });
    }
    acc = group_sum(acc, g, smem);
    if (a.log) {
      for_each2<D, D>(y, go, a.C, vec, g, [&](int64_t j, float yv, float gv) {
        store<D>(gi, j, (gv - fast_exp(yv) * acc) * inv_T);
      });
    } else {
      for_each2<D, D>(y, go, a.C, vec, g, [&](int64_t j, float yv, float gv) {
        store<D>(gi, j, yv * (gv - acc) * inv_T);
      });
    }
  }
}

// ---- kd loss -----------------------------------------------------------------------------------

template <int DS, int DT, bool BLOCK>
__global__ void __launch_bounds__(kThreads) kd_loss_kernel(KdLossArgs a, bool vec) {
  __shared__ float smem[6 * 32];
  const Group g = make_group<BLOCK>();
  const bool has_ce = a.labels != nullptr;
  const int kind = a.teacher_kind;
  const float gs = a.grad_scale_ptr != nullptr ? *a.grad_scale_ptr : a.grad_scale;
  for (int64_t i = g.first; i < a.N; i += g.step) {
    const elem_t<DS>* z = static_cast<const elem_t<DS>*>(a.student) + i * a.s_row_stride;
    const elem_t<DT>* t = static_cast<const elem_t<DT>*>(a.teacher) + i * a.t_row_stride;
    elem_t<DS>* grad = a.grad != nullptr ? static_cast<elem_t<DS>*>(a.grad) + i * a.C : nullptr;
    const float T = row_param(a.T_rows, a.T, i);
    const float inv_T = 1.0f / T;
    const float kl_scale = a.t_squared ? T * T : 1.0f;
    const float alpha = has_ce ? row_param(a.alpha_rows, a.alpha, i) : 1.0f;
    const int64_t y = has_ce ? a.labels[i] : -1;
    if (has_ce && !label_valid(y, a.ignore_index, a.C)) {  // the whole group takes this branch
      if (g.tid == 0) a.loss[i] = 0.0f;
      if (grad != nullptr) {
        for (int64_t j = g.tid; j < a.C; j += g.size) store<DS>(grad, j, 0.0f);
      }
      continue;
    }

    // Pass 1: online (max, sum) of z / T, of z (for the CE) and of the teacher.
    float mz = -INFINITY, Ss = 0.0f, mce = -INFINITY, Sce = 0.0f, mt = -INFINITY, St = 0.0f;
    for_each2<DS, DT>(z, t, a.C, vec, g, [&](int64_t, float zv, float tv) {
      online_push(mz, Ss, zv, inv_T);
      if (has_ce) online_push(mce, Sce, zv, 1.0f);
      if (kind == kLogits) {
        online_push(mt, St, tv, inv_T);
      } else {
        St += kind == kLogProbs ? fast_exp(tv) : tv;
      }
    });
    {
      float v[6] = {mz, Ss, mce, Sce, mt, St};
      const float id[6] = {-INFINITY, 0.0f, -INFINITY, 0.0f, -INFINITY, 0.0f};
      group_reduce<6>(
          v, id,
          [inv_T, kind](float(&p)[6], const float(&q)[6]) {
            combine_max_sum(p[0], p[1], q[0], q[1], inv_T);
            combine_max_sum(p[2], p[3], q[2], q[3], 1.0f);
            if (kind == kLogits) {
              combine_max_sum(p[4], p[5], q[4], q[5], inv_T);
            } else {
              p[5] += q[5];
            }
          },
          g, smem);
      mz = v[0], Ss = v[1], mce = v[2], Sce = v[3], mt = v[4], St = v[5];
    }

    // Pass 2: the KL accumulator and the gradient, from the final maxima and sums.
    const float inv_Ss = 1.0f / Ss;
    const float inv_St = kind == kLogits ? 1.0f / St : 1.0f;
    const float inv_Sce = 1.0f / Sce;
    const KdGradCoef c = kd_grad_coef(alpha, kl_scale, inv_T, has_ce, gs);
    float A = 0.0f;
    for_each2<DS, DT>(z, t, a.C, vec, g, [&](int64_t j, float zv, float tv) {
      const float zs = (zv - mz) * inv_T;
      float p, lp;
      if (kind == kLogits) {
        lp = (tv - mt) * inv_T;
        p = fast_exp(lp);
      } else if (kind == kLogProbs) {
        lp = tv;
        p = fast_exp(tv);
      } else {
        p = tv;
        lp = fast_log(tv);
      }
      A += kl_term(p, lp, zs);
      if (grad != nullptr) {
        const float p_s = fast_exp(zs) * inv_Ss;
        const float p_ce = has_ce ? fast_exp(zv - mce) * inv_Sce : 0.0f;
        store<DS>(grad, j, kd_grad(p_s, p * inv_St, p_ce, j == y, c));
      }
    });
    A = group_sum(A, g, smem);
    if (g.tid == 0) {
      const float kl = kl_finish(A, St, Ss, kind);
      const float ce = has_ce ? ce_finish(Sce, mce, load<DS>(z, y)) : 0.0f;
      a.loss[i] = kd_row_loss(ce, kl, alpha, kl_scale, has_ce);
    }
  }
}

// ---- soft-label entropy ----------------------------------------------------------------------

// One block per row. Rows of up to kCacheC classes are staged in shared memory as float32, so the
// K temperatures read global memory once; longer rows are re-read (from L2) per temperature.
constexpr int64_t kCacheC = 8192;

template <int D>
__global__ void __launch_bounds__(kThreads) entropy_kernel(EntropyArgs a, bool vec, float norm) {
  __shared__ float smem[2 * 32];
  extern __shared__ float cache[];
  const Group g = make_group<true>();
  const bool cached = a.C <= kCacheC;
  for (int64_t i = g.first; i < a.N; i += g.step) {
    const elem_t<D>* x = static_cast<const elem_t<D>*>(a.x) + i * a.x_row_stride;
    if (a.kind != 0) {
      float B = 0.0f;
      for_each<D>(x, a.C, vec, g, [&](int64_t, float p) { B += entropy_term(p, fast_log(p)); });
      B = group_sum(B, g, smem);
      if (g.tid == 0) {
        for (int64_t k = 0; k < a.K; ++k) a.out[k * a.N + i] = entropy_finish_probs(B) * norm;
      }
      continue;
    }
    float m = -INFINITY;
    for_each<D>(x, a.C, vec, g, [&](int64_t j, float v) {
      m = max_f(m, v);
      if (cached) cache[j] = v;
    });
    m = group_max(m, g, smem);  // its __syncthreads also publishes the cache
    for (int64_t k = 0; k < a.K; ++k) {
      const float inv_T = 1.0f / a.temps[k];
      float S = 0.0f, B = 0.0f;
      auto add = [&](float v) {
        const float xs = (v - m) * inv_T;
        const float e = fast_exp(xs);
        S += e;
        B += entropy_term(e, xs);
      };
      if (cached) {
        for (int64_t j = g.tid; j < a.C; j += g.size) add(cache[j]);
      } else {
        for_each<D>(x, a.C, vec, g, [&](int64_t, float v) { add(v); });
      }
      float v[2] = {S, B};
      const float id[2] = {0.0f, 0.0f};
      group_reduce<2>(
          v, id, [](float(&p)[2], const float(&q)[2]) { p[0] += q[0], p[1] += q[1]; }, g, smem);
      if (g.tid == 0) a.out[k * a.N + i] = entropy_finish_logits(v[0], v[1]) * norm;
    }
    __syncthreads();  // the next row overwrites the cache
  }
}

__global__ void fill_kernel(float* out, int64_t n, float value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = value;
  }
}

// ---- launch helpers --------------------------------------------------------------------------

// Grid for N rows: warp groups put 8 rows in a block. Capped; groups loop over the rest.
inline unsigned grid_for(int64_t N, bool block) {
  const int64_t rows_per_block = block ? 1 : kThreads / 32;
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  return static_cast<unsigned>(blocks < (1 << 30) ? blocks : (1 << 30));
}

// Calls f(std::integral_constant<int, D>{}) for the runtime dtype code.
template <typename F>
inline void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32:
      f(std::integral_constant<int, kFloat32>{});
      break;
    case kFloat16:
      f(std::integral_constant<int, kFloat16>{});
      break;
    default:
      f(std::integral_constant<int, kBFloat16>{});
      break;
  }
}

}  // namespace

int temperature_softmax_fwd(const SoftmaxFwdArgs& a, void* stream) {
  if (a.N == 0 || a.C == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  const bool block = a.C > kWarpC;
  dispatch_dtype(a.dtype, [&](auto d) {
    constexpr int D = decltype(d)::value;
    const bool vec = vec4_ok<D>(a.x, a.x_row_stride, a.C) && vec4_ok<D>(a.out, a.C, a.C);
    if (block) {
      softmax_fwd_kernel<D, true><<<grid_for(a.N, true), kThreads, 0, st>>>(a, vec);
    } else {
      softmax_fwd_kernel<D, false><<<grid_for(a.N, false), kThreads, 0, st>>>(a, vec);
    }
  });
  return static_cast<int>(cudaGetLastError());
}

int temperature_softmax_bwd(const SoftmaxBwdArgs& a, void* stream) {
  if (a.N == 0 || a.C == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  const bool block = a.C > kWarpC;
  dispatch_dtype(a.dtype, [&](auto d) {
    constexpr int D = decltype(d)::value;
    const bool vec = vec4_ok<D>(a.y, a.C, a.C) && vec4_ok<D>(a.grad_out, a.go_row_stride, a.C);
    if (block) {
      softmax_bwd_kernel<D, true><<<grid_for(a.N, true), kThreads, 0, st>>>(a, vec);
    } else {
      softmax_bwd_kernel<D, false><<<grid_for(a.N, false), kThreads, 0, st>>>(a, vec);
    }
  });
  return static_cast<int>(cudaGetLastError());
}

int kd_loss_fwd(const KdLossArgs& a, void* stream) {
  if (a.N == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  if (a.C == 0) {
    fill_kernel<<<256, kThreads, 0, st>>>(a.loss, a.N, 0.0f);
    return static_cast<int>(cudaGetLastError());
  }
  const bool block = a.C > kWarpC;
  dispatch_dtype(a.s_dtype, [&](auto ds) {
    constexpr int DS = decltype(ds)::value;
    dispatch_dtype(a.t_dtype, [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      const bool vec = vec4_ok<DS>(a.student, a.s_row_stride, a.C) &&
                       vec4_ok<DT>(a.teacher, a.t_row_stride, a.C);
      if (block) {
        kd_loss_kernel<DS, DT, true><<<grid_for(a.N, true), kThreads, 0, st>>>(a, vec);
      } else {
        kd_loss_kernel<DS, DT, false><<<grid_for(a.N, false), kThreads, 0, st>>>(a, vec);
      }
    });
  });
  return static_cast<int>(cudaGetLastError());
}

int soft_label_entropy_fwd(const EntropyArgs& a, void* stream) {
  if (a.N == 0 || a.K == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  if (a.C == 0) {  // an empty distribution has entropy 0
    fill_kernel<<<256, kThreads, 0, st>>>(a.out, a.K * a.N, 0.0f);
    return static_cast<int>(cudaGetLastError());
  }
  const float norm = entropy_normalizer(a.C, a.normalize);
  const size_t cache_bytes = a.kind == 0 && a.C <= kCacheC ? a.C * sizeof(float) : 0;
  dispatch_dtype(a.dtype, [&](auto d) {
    constexpr int D = decltype(d)::value;
    const bool vec = vec4_ok<D>(a.x, a.x_row_stride, a.C);
    entropy_kernel<D><<<grid_for(a.N, true), kThreads, cache_bytes, st>>>(a, vec, norm);
  });
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace rbkd::cuda
