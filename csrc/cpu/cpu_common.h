// Plumbing shared by the CPU kernels: ISA multi-versioning, thread counts, per-thread scratch and
// whole-row dtype conversion.
#pragma once

#include <stdint.h>
#include <stdlib.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "rbkd_args.h"
#include "rbkd_numerics.h"
#include "rbkd_rows.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

// Row kernels are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and picked at load
// time by an ifunc resolver, so one wheel runs everywhere and still uses the machine's vector
// width. The helpers they call are always_inline (RBKD_INLINE) so they inherit the clone's ISA.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define RBKD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef RBKD_CLONES
#define RBKD_CLONES
#endif

namespace rbkd::cpu {

// Threads worth waking for `work` elements: a parallel region costs a few microseconds (our
// runtime waits passively, see rbkd/ops/backends/cpu.py), about the time of 64k elements.
inline int pick_threads(int num_threads, int64_t work, int64_t tasks) {
  int64_t nt = std::max(1, num_threads);
  nt = std::min<int64_t>(nt, std::max<int64_t>(1, work / 65536));
  nt = std::min<int64_t>(nt, std::max<int64_t>(1, tasks));
  return static_cast<int>(nt);
}

// A thread could not get its row scratch. Thrown after the parallel region (never inside it);
// rbkd._C turns it into a Python MemoryError.
struct ScratchAllocError : std::runtime_error {
  ScratchAllocError(const char* op, int64_t bytes)
      : std::runtime_error(std::string(op) + ": could not allocate " + std::to_string(bytes) +
                           " bytes of row scratch per thread; free memory or use fewer threads "
                           "(torch.set_num_threads)") {}
};

// Grow-only, 64-byte aligned float scratch owned by the calling thread (OpenMP threads persist,
// so a row-sized buffer is allocated once rather than mmap'ed and faulted in on every call).
// Returns nullptr when the allocation fails (the caller reports ScratchAllocError).
inline float* thread_scratch(int64_t n_floats) {
  struct Buffer {
    float* data = nullptr;
    int64_t size = 0;
    ~Buffer() { free(data); }
  };
  thread_local Buffer buf;
  if (buf.size < n_floats) {
    free(buf.data);
    // aligned_alloc needs a size that is a multiple of the alignment: rounded up to 64 bytes.
    const int64_t bytes = ((n_floats * 4 + 63) / 64) * 64;
    buf.data = static_cast<float*>(aligned_alloc(64, static_cast<size_t>(bytes)));
    buf.size = buf.data != nullptr ? n_floats : 0;
    if (buf.data == nullptr) return nullptr;
  }
  return buf.data;
}

// Rows [0, n) on `nt` OpenMP threads, each thread with its own row scratch of `floats` floats:
// row(i, scratch). A thread that cannot get its scratch computes nothing, and the call throws
// ScratchAllocError naming `op` after the parallel region (never a write through null).
template <typename Row>
inline void parallel_rows_with_scratch(int nt, int64_t n, int64_t floats, const char* op, Row row) {
  bool failed = false;
#pragma omp parallel num_threads(nt)
  {
    float* scratch = thread_scratch(floats);
    if (scratch == nullptr) {
#pragma omp atomic write
      failed = true;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      if (scratch != nullptr) row(i, scratch);
    }
  }
  if (failed) throw ScratchAllocError(op, floats * 4);
}

// Converts row[0, n) of dtype D to float32 into dst and returns its max (-inf for an empty row;
// NaNs are skipped here and surface later through the exps).
template <int D>
RBKD_INLINE float convert_max(const void* row, float* dst, int64_t n) {
  const auto* p = static_cast<const typename Storage<D>::type*>(row);
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const float v = load<D>(p, j);
    dst[j] = v;
    m = v > m ? v : m;
  }
  return m;
}

RBKD_INLINE float row_max(const float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// The row as float32: the input itself for float32, else converted into buf. *max gets its max.
RBKD_INLINE const float* row_as_float(const void* row, int dtype, float* buf, int64_t n,
                                      float* max) {
  if (dtype == kFloat32) {
    *max = row_max(static_cast<const float*>(row), n);
    return static_cast<const float*>(row);
  }
  *max = dtype == kFloat16 ? convert_max<kFloat16>(row, buf, n) : convert_max<kBFloat16>(row, buf, n);
  return buf;
}

// Columns [j0, j0 + n) of a row as float32: the row itself for float32, else converted into buf.
RBKD_INLINE const float* block_as_float(const void* row, int dtype, int64_t j0, int64_t n,
                                        float* buf) {
  if (dtype == kFloat32) return static_cast<const float*>(row) + j0;
  const uint16_t* p = static_cast<const uint16_t*>(row) + j0;
  if (dtype == kFloat16) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) buf[j] = half_to_float(p[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) buf[j] = bf16_to_float(p[j]);
  }
  return buf;
}

// Writes src[0, n) * scale to row (dtype D).
template <int D>
RBKD_INLINE void store_scaled(void* row, const float* src, float scale, int64_t n) {
  auto* p = static_cast<typename Storage<D>::type*>(row);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) store<D>(p, j, src[j] * scale);
}

// Asks for transparent huge pages under a large output that is about to be written whole. torch
// hands us fresh mmap'ed memory, and on this project's 2-core VM first-touch faults on 4 KiB pages
// cost more than the kernel itself: allocating and writing a 1024 x 32000 float32 gradient took
// 25 ms with 4 KiB pages and 7 ms with 2 MiB pages. Only a hint (THP in "madvise" mode honours
// it, "never" ignores it); only the 2 MiB-aligned interior of the buffer is advised.
inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (p == nullptr || bytes < 4 * static_cast<int64_t>(kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

inline const char* dtype_name(int dtype) {
  return dtype == kFloat32 ? "float32" : dtype == kFloat16 ? "float16" : "bfloat16";
}

inline int64_t dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }


// ---- kd_loss_fwd: shared by the KL kernels (kd_cpu.cpp) and the other divergences
// (divergence_cpu.cpp) ------------------------------------------------------------------

// In their own namespace: entropy_cpu.cpp has its own kSmallC, kLanes and load_tile.
namespace kd {

constexpr int64_t kSmallC = 32;
constexpr int kLanes = 16;
constexpr int64_t kBlock = 512;  // elements per block of pass 2: its temporaries stay in L1

// Eight floats as one value, for the loops GCC's vectoriser does not lay out well (partial sums,
// transposes); unaligned: for loads and stores through rows at any float offset.
using v8f = float __attribute__((vector_size(32)));
using v8f_unaligned = float __attribute__((vector_size(32), aligned(4)));

// Sum of x[0, n) in four vector accumulators, so consecutive adds do not wait on each other: one
// simd reduction keeps one accumulator, and its add latency made the block sums a quarter of a
// divergence row's time at 32000 classes and a fifth of the sparse loss's first pass. GCC's
// vector types stay in registers (an array of 32 partial sums went through the stack).
RBKD_INLINE float sum(const float* x, int64_t n) {
  v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    a0 += *reinterpret_cast<const v8f_unaligned*>(x + j);
    a1 += *reinterpret_cast<const v8f_unaligned*>(x + j + 8);
    a2 += *reinterpret_cast<const v8f_unaligned*>(x + j + 16);
    a3 += *reinterpret_cast<const v8f_unaligned*>(x + j + 24);
  }
  const v8f a = (a0 + a1) + (a2 + a3);
  float s = 0.0f;
  for (int r = 0; r < 8; ++r) s += a[r];
  for (; j < n; ++j) s += x[j];
  return s;
}

struct RowParams {
  float inv_T, alpha, kl_scale;
  int64_t label;  // -1 when there is no CE term (or the label is not usable)
  bool ignored;   // label == ignore_index: loss 0, gradient 0, nothing read
  bool bad;       // a parameter breaks the non-finite rule (rbkd_rows.h): loss and gradient NaN
  int pow_T;      // T when it is an integer in [2, kMaxPowT], else 0
};

// exp(z - m) = exp((z - m) / T)^T: for an integer T the CE exps are powers of the tempered ones
// (the max is shared), a few multiplies instead of a third exp per element. The relative error
// grows to ~T ulps (plus |z - m| * ulp(1/T) * T for a T whose reciprocal is inexact).
constexpr int kMaxPowT = 32;

// dst[0, n) = src[0, n)^k for 2 <= k <= kMaxPowT, left-to-right binary powering; each step is its
// own simd loop over an L1-resident block (dst may be written before src is read: no aliasing).
RBKD_INLINE void pow_int_block(float* __restrict dst, const float* __restrict src, int64_t n,
                               int k) {
  int bit = 31 - __builtin_clz(static_cast<unsigned>(k));
  --bit;
  // First step fused with the copy: dst = src^2 or src^3.
  if ((k >> bit) & 1) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * src[j] * src[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * src[j];
  }
  for (--bit; bit >= 0; --bit) {
    if ((k >> bit) & 1) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dst[j] = dst[j] * dst[j] * src[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dst[j] = dst[j] * dst[j];
    }
  }
}

RBKD_INLINE RowParams row_params(const KdLossArgs& a, int64_t i) {
  RowParams p;
  const float T = row_param(a.T_rows, a.T, i);
  p.inv_T = 1.0f / T;
  p.kl_scale = a.opt.t_squared ? T * T : 1.0f;
  p.alpha = a.labels != nullptr ? row_param(a.alpha_rows, a.alpha, i) : 1.0f;
  p.label = -1;
  p.ignored = false;
  p.bad = !kd_params_ok(T, p.alpha);
  p.pow_T = T >= 2.0f && T <= static_cast<float>(kMaxPowT) && T == static_cast<float>(static_cast<int>(T))
                ? static_cast<int>(T)
                : 0;
  if (a.labels != nullptr) {
    const int64_t y = a.labels[i];
    if (y == a.opt.ignore_index) {
      p.ignored = true;
    } else if (y < 0 || y >= a.C) {
      p.bad = true;  // never read z[y]
    } else {
      p.label = y;
    }
  }
  return p;
}

// Writes `value` to every element of a gradient row of dtype `dtype`.
RBKD_INLINE void fill_row(void* row, int dtype, int64_t n, float value) {
  if (dtype == kFloat32) {
    float* p = static_cast<float*>(row);
    for (int64_t j = 0; j < n; ++j) p[j] = value;
  } else {
    const uint16_t v = dtype == kFloat16 ? float_to_half(value) : float_to_bf16(value);
    uint16_t* p = static_cast<uint16_t*>(row);
    for (int64_t j = 0; j < n; ++j) p[j] = v;
  }
}

RBKD_INLINE void store_one(void* row, int dtype, int64_t j, float v) {
  if (dtype == kFloat32) {
    store<kFloat32>(static_cast<float*>(row), j, v);
  } else if (dtype == kFloat16) {
    store<kFloat16>(static_cast<uint16_t*>(row), j, v);
  } else {
    store<kBFloat16>(static_cast<uint16_t*>(row), j, v);
  }
}

// An 8 x 8 transpose of float vectors: unpack pairs of rows, shuffle pairs of pairs, swap 128-bit
// halves (each __builtin_shufflevector one AVX instruction). Row r in, column r out. Eight named
// vectors, not an array: an array went through the stack, and its 16-byte halves read back as
// 32-byte vectors stalled store forwarding.
RBKD_INLINE void transpose8(v8f& m0, v8f& m1, v8f& m2, v8f& m3, v8f& m4, v8f& m5, v8f& m6,
                            v8f& m7) {
  const v8f t0 = __builtin_shufflevector(m0, m1, 0, 8, 1, 9, 4, 12, 5, 13);
  const v8f t1 = __builtin_shufflevector(m0, m1, 2, 10, 3, 11, 6, 14, 7, 15);
  const v8f t2 = __builtin_shufflevector(m2, m3, 0, 8, 1, 9, 4, 12, 5, 13);
  const v8f t3 = __builtin_shufflevector(m2, m3, 2, 10, 3, 11, 6, 14, 7, 15);
  const v8f t4 = __builtin_shufflevector(m4, m5, 0, 8, 1, 9, 4, 12, 5, 13);
  const v8f t5 = __builtin_shufflevector(m4, m5, 2, 10, 3, 11, 6, 14, 7, 15);
  const v8f t6 = __builtin_shufflevector(m6, m7, 0, 8, 1, 9, 4, 12, 5, 13);
  const v8f t7 = __builtin_shufflevector(m6, m7, 2, 10, 3, 11, 6, 14, 7, 15);
  // Rows 0-3 (u0..u3) and 4-7 (u4..u7): column c in the low half, c + 4 in the high half.
  const v8f u0 = __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
  const v8f u1 = __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
  const v8f u2 = __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
  const v8f u3 = __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
  const v8f u4 = __builtin_shufflevector(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);
  const v8f u5 = __builtin_shufflevector(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
  const v8f u6 = __builtin_shufflevector(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);
  const v8f u7 = __builtin_shufflevector(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
  m0 = __builtin_shufflevector(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11);
  m1 = __builtin_shufflevector(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11);
  m2 = __builtin_shufflevector(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11);
  m3 = __builtin_shufflevector(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11);
  m4 = __builtin_shufflevector(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15);
  m5 = __builtin_shufflevector(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15);
  m6 = __builtin_shufflevector(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15);
  m7 = __builtin_shufflevector(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15);
}

// dst[c * ds + r] = src[r * ss + c] for r, c < 8: eight vector loads, one transpose, eight
// stores, unaligned on both sides (a tile's side is aligned; the instructions cost the same).
// Loads and stores go through pointers to vector types: no function returns a vector (the SSE
// clone would change its ABI).
RBKD_INLINE void transpose_block8(const float* src, int64_t ss, float* dst, int64_t ds) {
  auto in = [&](int r) { return reinterpret_cast<const v8f_unaligned*>(src + r * ss); };
  v8f m0 = *in(0), m1 = *in(1), m2 = *in(2), m3 = *in(3), m4 = *in(4), m5 = *in(5),
      m6 = *in(6), m7 = *in(7);
  transpose8(m0, m1, m2, m3, m4, m5, m6, m7);
  auto out = [&](int r) { return reinterpret_cast<v8f_unaligned*>(dst + r * ds); };
  *out(0) = m0, *out(1) = m1, *out(2) = m2, *out(3) = m3, *out(4) = m4, *out(5) = m5;
  *out(6) = m6, *out(7) = m7;
}

// A full float32 tile (kLanes rows, C >= 8) moves by 8 x 8 blocks (rows h..h+7, columns
// jj..jj+7), where gathers cost one gather per column and lane half (a fifth of a 65536 x 10
// kd_loss call). The last block of a row overlaps the one before (C = 10: columns 0-7, 2-9).
static_assert(kLanes % 8 == 0, "a tile's lanes are whole blocks of 8 rows");
RBKD_INLINE int64_t block8_column(int64_t j0, int64_t C) { return std::min<int64_t>(j0, C - 8); }

// Loads a [C][kLanes] tile: tile[j][r] = row (i0 + r), element j; missing rows read as 0.
template <int D>
RBKD_INLINE void load_tile(const void* base, int64_t row_stride, int64_t i0, int rows, int64_t C,
                           float (*tile)[kLanes]) {
  using S = typename Storage<D>::type;
  const S* p = static_cast<const S*>(base) + i0 * row_stride;
  if constexpr (D == kFloat32) {
    if (rows == kLanes && C >= 8) {
      for (int h = 0; h < kLanes; h += 8) {
        for (int64_t j0 = 0; j0 < C; j0 += 8) {
          const int64_t jj = block8_column(j0, C);
          transpose_block8(p + h * row_stride + jj, row_stride, &tile[jj][h], kLanes);
        }
      }
      return;
    }
  }
  if (rows == kLanes && row_stride <= INT32_MAX / kLanes) {
    // A full tile: column j of the 16 rows is one gather (int32 offsets), not 16 scalar moves.
    alignas(64) int32_t off[kLanes];
    for (int r = 0; r < kLanes; ++r) off[r] = static_cast<int32_t>(r * row_stride);
    for (int64_t j = 0; j < C; ++j) {
      const S* pj = p + j;
#pragma omp simd
      for (int r = 0; r < kLanes; ++r) tile[j][r] = load<D>(pj, off[r]);
    }
    return;
  }
  for (int r = 0; r < kLanes; ++r) {
    if (r < rows) {
      const S* pr = p + r * row_stride;
      for (int64_t j = 0; j < C; ++j) tile[j][r] = load<D>(pr, j);
    } else {
      for (int64_t j = 0; j < C; ++j) tile[j][r] = 0.0f;
    }
  }
}

RBKD_INLINE void load_tile_any(int dtype, const void* base, int64_t row_stride, int64_t i0,
                               int rows, int64_t C, float (*tile)[kLanes]) {
  if (dtype == kFloat32) {
    load_tile<kFloat32>(base, row_stride, i0, rows, C, tile);
  } else if (dtype == kFloat16) {
    load_tile<kFloat16>(base, row_stride, i0, rows, C, tile);
  } else {
    load_tile<kBFloat16>(base, row_stride, i0, rows, C, tile);
  }
}

template <int D>
RBKD_INLINE void store_tile(void* base, int64_t i0, int rows, int64_t C,
                            const float (*tile)[kLanes]) {
  using S = typename Storage<D>::type;
  if constexpr (D == kFloat32) {
    if (rows == kLanes && C >= 8) {
      float* rows = static_cast<float*>(base) + i0 * C;
      for (int h = 0; h < kLanes; h += 8) {
        for (int64_t j0 = 0; j0 < C; j0 += 8) {
          const int64_t jj = block8_column(j0, C);
          transpose_block8(&tile[jj][h], kLanes, rows + h * C + jj, C);
        }
      }
      return;
    }
  }
  const float* col = &tile[0][0];
  for (int r = 0; r < rows; ++r) {
    S* p = static_cast<S*>(base) + (i0 + r) * C;
    // Row r of the output is column r of the tile: a gather with stride kLanes.
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) store<D>(p, j, col[j * kLanes + r]);
  }
}

}  // namespace kd

// Every divergence but plain KL (and KL with standardize): divergence_cpu.cpp.
void kd_divergence_fwd(const KdLossArgs& a, int num_threads);

}  // namespace rbkd::cpu
