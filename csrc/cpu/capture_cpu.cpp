// capture_soft_labels_fwd on the CPU (issue 16): one read of a teacher's logits row gives its
// top-k ids and raw logits and, for each temperature T_j of a grid, logz_j = log sum exp(z / T_j)
// and the entropy H_j = logz_j - sum p_j z_j / T_j (rbkd/ops/capture.py is the torch twin).
//
// One row per task, in blocks of kBlock columns held in L1. Per block: its max (which also
// lets the top-k skip the block when nothing in it beats the k-th best so far), a k-entry
// min-heap pass over the rare blocks that do, then per T_j the sums S = sum e and B = sum xs e,
// xs = (x - m_b) / T_j, e = exp(xs), shifted by the block's max and folded into the row's
// running sums at the running max (S' = f S, B' = f (B + d S), d = (m - m') / T_j, f = exp(d));
// the shift x - m_b is formed once per block, not per T:
// the J exps per element are the whole arithmetic, and the row is read from memory once.
#include <algorithm>

#include "cpu_common.h"
#include "rbkd_rows.h"
#include "sparse_kernels.h"

namespace rbkd::cpu {
namespace {

constexpr int64_t kBlock = 1024;  // 4 KB of float32: the J passes over a block run from L1
constexpr int64_t kRun = 64;      // elements per top-k pre-check inside a block
// A row of at most this many bytes (it stays in L2 between the two reads) gets the top-k's
// pre-pass: its runs' maxima first, whose k-th largest bounds the k-th largest value from below.
constexpr int64_t kPrepassBytes = 256 * 1024;
// Below this a tempered, shifted logit's exp is 0 (fast_exp_lite flushes below -110).
constexpr float kMinExponent = -120.0f;

// S = sum exp(d / T), B = sum (d / T) exp(d / T) over a block of shifted logits d = x - m_b,
// clamped below (block_shift). One simd reduction of each: the exp's own latency hides the adds'.
// Measured in a standalone loop beside a bare exp loop (fast_exp_lite, accumulated): this form
// runs at 0.95-1.0x the bare loop's time; with the shift and a clamp inside the per-T loop it
// was 1.4x (GCC merges the clamp with the exp's own clamps into blend masks), and partial-sum
// arrays (kd::sum's way) stayed on the stack, 8x. (A noinline clone of its own was no faster.)
RBKD_INLINE void block_sums(const float* d, int64_t n, float inv_T, float* S, float* B) {
  float s = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : s, b)
  for (int64_t j = 0; j < n; ++j) {
    const float e = fast_exp_lite(d[j] * inv_T);
    s += e;
    b += d[j] * e;
  }
  *S = s;
  *B = b * inv_T;
}

// A grid whose temperatures are T_max / 2^m (m < kChain: 4, 2, 1, 0.5 or 1, 2, 4, the stores'
// grids) needs one exp per element: exp(d / (T_max / 2^m)) = exp(d / T_max)^(2^m), a square per
// level. S[m] = sum e_m and D[m] = sum d e_m (not yet divided by T) for every level m < L. Each
// square doubles the exp's relative error (3 ulp for fast_exp_lite): 8x at m = 3, 2e-6, within
// float32's tolerance of a sum of exps, and the exps at the larger T are the exact ones.
constexpr int kChain = 4;

// One reduction list per chain length: GCC vectorises an omp simd reduction only over the
// variables the loop really updates (a list of ten with unused ones ran 1.6x the plain loop).
#define RBKD_CHAIN_STEP(m) \
  e *= e;                  \
  s##m += e;               \
  b##m += d[j] * e;

RBKD_INLINE void block_sums_chain2(const float* d, int64_t n, float inv_T, float* S, float* D) {
  float s0 = 0.0f, s1 = 0.0f, b0 = 0.0f, b1 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, b0, b1)
  for (int64_t j = 0; j < n; ++j) {
    float e = fast_exp_lite(d[j] * inv_T);
    s0 += e;
    b0 += d[j] * e;
    RBKD_CHAIN_STEP(1)
  }
  S[0] = s0, S[1] = s1, D[0] = b0, D[1] = b1;
}

RBKD_INLINE void block_sums_chain3(const float* d, int64_t n, float inv_T, float* S, float* D) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, b0 = 0.0f, b1 = 0.0f, b2 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, b0, b1, b2)
  for (int64_t j = 0; j < n; ++j) {
    float e = fast_exp_lite(d[j] * inv_T);
    s0 += e;
    b0 += d[j] * e;
    RBKD_CHAIN_STEP(1)
    RBKD_CHAIN_STEP(2)
  }
  S[0] = s0, S[1] = s1, S[2] = s2, D[0] = b0, D[1] = b1, D[2] = b2;
}

RBKD_INLINE void block_sums_chain4(const float* d, int64_t n, float inv_T, float* S, float* D) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f, b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, b3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, b0, b1, b2, b3)
  for (int64_t j = 0; j < n; ++j) {
    float e = fast_exp_lite(d[j] * inv_T);
    s0 += e;
    b0 += d[j] * e;
    RBKD_CHAIN_STEP(1)
    RBKD_CHAIN_STEP(2)
    RBKD_CHAIN_STEP(3)
  }
  S[0] = s0, S[1] = s1, S[2] = s2, S[3] = s3, D[0] = b0, D[1] = b1, D[2] = b2, D[3] = b3;
}
#undef RBKD_CHAIN_STEP

RBKD_INLINE void block_sums_chain_any(int L, const float* d, int64_t n, float inv_T, float* S, float* D) {
  switch (L) {
    case 2: return block_sums_chain2(d, n, inv_T, S, D);
    case 3: return block_sums_chain3(d, n, inv_T, S, D);
    default: return block_sums_chain4(d, n, inv_T, S, D);
  }
}

// The level m of each temperature (T_max / T_j = 2^m exactly, m < kChain) and the number of
// levels, or 0 when some temperature is not on such a chain (then each T has its own exps).
int chain_levels(const float* temps, int64_t J, float T_max, int* level) {
  int L = 0;
  for (int64_t t = 0; t < J; ++t) {
    level[t] = -1;
    for (int m = 0; m < kChain; ++m) {
      if (temps[t] * static_cast<float>(1 << m) == T_max) level[t] = m;
    }
    if (level[t] < 0) return 0;
    L = std::max(L, level[t] + 1);
  }
  return L >= 2 ? L : 0;  // one level: block_sums itself
}

// d_j = x_j - sh, at least d_min: d_min / T <= -120 at every T of the grid, so a -inf logit (or
// one too far below to matter) has e = 0 and d e = 0, never -inf * 0. NaN stays NaN.
RBKD_INLINE void block_shift(const float* x, int64_t n, float sh, float d_min, float* d) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j] - sh;
    d[j] = v < d_min ? d_min : v;
  }
}

// The k best (value, id) seen so far as a min-heap whose root is the worst: a smaller value, or
// an equal value with a larger id (ids arrive ascending, so an equal later value never enters:
// equal logits rank by ascending id).
struct TopK {
  float* v;
  int32_t* id;
  int64_t k, size = 0;

  // Branch-free compares and a hole that moves down (one store per level, not a swap): which
  // child is worse and whether the new entry sinks are data-dependent coin flips, and a branch
  // on each cost more than the rest of the heap's work.
  static RBKD_INLINE bool worse(float a, int32_t ia, float b, int32_t ib) {
    return (a < b) | ((a == b) & (ia > ib));
  }
  void sift_down(int64_t r) {
    const float xv = v[r];
    const int32_t xi = id[r];
    for (;;) {
      const int64_t l = 2 * r + 1;
      if (l >= size) break;
      const int64_t w = l + 1 < size && worse(v[l + 1], id[l + 1], v[l], id[l]) ? l + 1 : l;
      if (!worse(v[w], id[w], xv, xi)) break;
      v[r] = v[w];
      id[r] = id[w];
      r = w;
    }
    v[r] = xv;
    id[r] = xi;
  }
  void push(float x, int32_t j) {
    int64_t c = size++;
    while (c > 0) {
      const int64_t p = (c - 1) / 2;
      if (!worse(x, j, v[p], id[p])) break;
      v[c] = v[p];
      id[c] = id[p];
      c = p;
    }
    v[c] = x;
    id[c] = j;
  }
  // The threshold a value must beat (NaN never does; -inf until the heap is full).
  float floor() const { return size < k ? -INFINITY : v[0]; }
  void offer(float x, int32_t j) {
    if (size < k) {
      push(x, j);
    } else if (x > v[0]) {
      v[0] = x;
      id[0] = j;
      sift_down(0);
    }
  }
};

RBKD_CLONES void capture_row(const CaptureArgs& a, int64_t i, float* scratch) {
  const int64_t V = a.V, k = a.k, J = a.J;
  const int64_t size = dtype_size(a.dtype);
  const char* row = static_cast<const char*>(a.x) + i * a.x_row_stride * size;
  const char* next = i + 1 < a.N ? row + a.x_row_stride * size : nullptr;
  float* xbuf = scratch;
  float* dbuf = xbuf + kBlock;
  float* S = dbuf + kBlock;
  float* B = S + J;
  float* inv_T = B + J;
  TopK top{inv_T + J, reinterpret_cast<int32_t*>(inv_T + J + k), k};
  float T_max = 0.0f;
  for (int64_t t = 0; t < J; ++t) {
    S[t] = B[t] = 0.0f;
    inv_T[t] = 1.0f / a.temps[t];
    T_max = max_f(T_max, a.temps[t]);
  }
  const float d_min = kMinExponent * T_max;
  // One exp per element when the grid is a chain of halvings (block_sums_chain), else J.
  int level_buf[64];
  int* level = J <= 64 ? level_buf : nullptr;
  const int L = level != nullptr ? chain_levels(a.temps, J, T_max, level) : 0;
  float chain_S[kChain], chain_D[kChain];
  // The top-k's pre-pass: k runs hold a value >= the k-th largest run maximum M_k, so every
  // one of the k best is >= M_k; only values >= M_k are offered while the heap fills (a full
  // heap's floor is then >= M_k), and only runs whose max reaches it are looked at. On a small
  // vocabulary most of the heap's work was the early runs' values, all offered and soon pushed
  // out again: at V = 8192 and k = 32 about 177 insertions a row, down to the few dozen above M_k.
  const int64_t runs = (V + kRun - 1) / kRun;
  float* run_max = top.v + 2 * k;  // [runs], then a copy to select in
  const bool prepass = runs >= k && V * size <= kPrepassBytes;
  float M_k = -INFINITY;
  if (prepass) {
    for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
      const int64_t n = std::min(kBlock, V - j0);
      const float* x = block_as_float(row, a.dtype, j0, n, xbuf);
      for (int64_t r0 = 0; r0 < n; r0 += kRun) run_max[(j0 + r0) / kRun] = row_max(x + r0, std::min(kRun, n - r0));
    }
    float* sel = run_max + runs;
    std::copy(run_max, run_max + runs, sel);
    std::nth_element(sel, sel + (k - 1), sel + runs, [](float l, float r) { return l > r; });
    M_k = sel[k - 1];  // run maxima skip NaN: -inf at worst, which bounds nothing
  }
  float m = -INFINITY;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t n = std::min(kBlock, V - j0);
    const float* x = block_as_float(row, a.dtype, j0, n, xbuf);
    if (next != nullptr) {  // the next row's block into L2 while this one computes
      for (int64_t j = 0; j < n * size; j += 64) __builtin_prefetch(next + j0 * size + j, 0, 2);
    }
    const float mb = row_max(x, n);
    // Top-k: a block whose max does not beat the k-th best is skipped whole (an equal value
    // loses to the earlier id). A row still filling its heap takes every element.
    if (top.size < k ? !(mb < M_k) : mb > top.floor()) {
      // ... and within it, a run of kRun whose max does not beat it (one simd max, no branch
      // per element): at k = 32 and V = 128k most blocks hold a new top-k entry, few runs do.
      for (int64_t r0 = 0; r0 < n; r0 += kRun) {
        const int64_t rn = std::min(kRun, n - r0);
        const float rmax = prepass ? run_max[(j0 + r0) / kRun] : row_max(x + r0, rn);
        if (top.size < k) {  // still filling: every value that may be among the k best
          if (rmax < M_k) continue;
          for (int64_t j = r0; j < r0 + rn; ++j) {
            if (!(x[j] < M_k)) top.offer(x[j], static_cast<int32_t>(j0 + j));
          }
          continue;
        }
        const float floor = top.floor();
        if (!(rmax > floor)) continue;
        // The run's few values above the floor, gathered without a branch per element (a
        // branch taken at random for a row's early runs mispredicts half the time), then
        // offered in id order: offer checks each against the floor of the moment.
        int32_t cand[kRun];
        int64_t nc = 0;
        for (int64_t j = 0; j < rn; ++j) {
          cand[nc] = static_cast<int32_t>(j);
          nc += x[r0 + j] > floor ? 1 : 0;
        }
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t j = r0 + cand[c];
          top.offer(x[j], static_cast<int32_t>(j0 + j));
        }
      }
    }
    const float sh = mb > -INFINITY ? mb : 0.0f;
    const float m_new = max_f(m, mb);
    block_shift(x, n, sh, d_min, dbuf);
    if (L > 0) block_sums_chain_any(L, dbuf, n, 1.0f / T_max, chain_S, chain_D);
    for (int64_t t = 0; t < J; ++t) {
      float Sb, Bb;
      if (L > 0) {
        Sb = chain_S[level[t]];
        Bb = chain_D[level[t]] * inv_T[t];
      } else {
        block_sums(dbuf, n, inv_T[t], &Sb, &Bb);
      }
      if (!(mb > -INFINITY)) {  // nothing finite here: contributes 0 (or its NaN)
        S[t] += 0.0f * Sb;
        B[t] += 0.0f * Bb;
        continue;
      }
      const float d_b = (sh - m_new) * inv_T[t];
      const float f_b = expf(d_b);
      if (m > -INFINITY) {
        const float d = (m - m_new) * inv_T[t];
        const float f = expf(d);
        B[t] = f * (B[t] + d * S[t]);
        S[t] = f * S[t];
      }
      S[t] += f_b * Sb;
      B[t] += f_b * (Bb + d_b * Sb);
    }
    m = m_new;
  }
  for (int64_t t = 0; t < J; ++t) {
    const bool ok = logits_row_ok(m, S[t]);  // a finite max, no NaN, no +inf
    const float log_S = logf(S[t]);
    a.logz[i * J + t] = ok ? m * inv_T[t] + log_S : NAN;
    a.entropy[i * J + t] = ok ? log_S - B[t] / S[t] : NAN;
  }
  // The k best by descending value, equal values by ascending id.
  const int64_t got = top.size;
  for (int64_t c = got; c > 1; --c) {  // heap sort: the worst goes last each time
    std::swap(top.v[0], top.v[c - 1]);
    std::swap(top.id[0], top.id[c - 1]);
    top.size = c - 1;
    top.sift_down(0);
  }
  int32_t* ids = a.topk_ids + i * k;
  char* vals = static_cast<char*>(a.topk_logits) + i * k * size;
  for (int64_t c = 0; c < got; ++c) {
    ids[c] = top.id[c];
    memcpy(vals + c * size, row + static_cast<int64_t>(top.id[c]) * size, size);  // raw bits
  }
}

}  // namespace

void capture_soft_labels_fwd(const CaptureArgs& a, int num_threads) {
  if (a.N == 0 || a.V == 0) return;
  const int nt = pick_threads(num_threads, a.N * a.V * a.J, a.N);
  const int64_t floats = 2 * kBlock + 3 * a.J + 2 * a.k + 2 * ((a.V + kRun - 1) / kRun) + 16;
  parallel_rows_with_scratch(nt, a.N, floats, "capture_soft_labels_fwd",
                             [&](int64_t i, float* scratch) { capture_row(a, i, scratch); });
}

namespace {
RBKD_CLONES float exp_loop(const float* x, int64_t n, int64_t reps) {
  float total = 0.0f;
  for (int64_t r = 0; r < reps; ++r) {
    constexpr int kW = 32;
    alignas(64) float acc[kW] = {};
    const float shift = static_cast<float>(r & 1) * 1e-3f;  // a new input each rep: no hoisting
    for (int64_t j = 0; j + kW <= n; j += kW) {
#pragma omp simd
      for (int l = 0; l < kW; ++l) acc[l] += fast_exp_lite(x[j + l] - shift);
    }
    for (int l = 0; l < kW; ++l) total += acc[l];
  }
  return total;
}
}  // namespace

double exp_seconds_per_element(int64_t per_thread, int num_threads) {
  constexpr int64_t kN = kBlock;
  const int64_t reps = std::max<int64_t>(1, per_thread / kN);
  double wall = 0.0;
  float sink = 0.0f;
#pragma omp parallel num_threads(num_threads) reduction(+ : sink)
  {
    alignas(64) float x[kN];
    for (int64_t j = 0; j < kN; ++j) x[j] = -20.0f * static_cast<float>(j) / kN;
#pragma omp barrier
#ifdef _OPENMP
    const double t0 = omp_get_wtime();
#endif
    sink += exp_loop(x, kN, reps);
#ifdef _OPENMP
    const double dt = omp_get_wtime() - t0;
#pragma omp critical
    wall = std::max(wall, dt);
#endif
  }
  static volatile float keep __attribute__((unused));
  keep = sink;  // the loop's result is used: it is not optimised away
  return wall / (static_cast<double>(reps) * kN * num_threads);
}

}  // namespace rbkd::cpu
