// kd_loss_fwd on the CPU: per-row loss and the saved gradient in one fused pass over each row.
//
// C > kSmallC: one row per task. Pass 1 reads the row from DRAM (max of student and teacher;
// float16/bfloat16 converted to float32 on the way), pass 2 forms the exps from L2 and keeps them,
// pass 3 writes the gradient. Keeping the exps costs L2 traffic but halves the exps (the
// arithmetic, not memory, is what limits a 2-core machine here).
// C <= kSmallC: rows are the SIMD lanes. A block of kLanes rows is transposed into a [C][kLanes]
// tile, so a 10-class row does not waste 6 of 16 lanes, and every per-row quantity is a vector.
#include "cpu_common.h"
#include "cpu_kernels.h"
#include "rbkd_divergence.h"
#include "rbkd_rows.h"

namespace rbkd::cpu {
namespace {

using namespace kd;  // NOLINT: the helpers shared with divergence_cpu.cpp (cpu_common.h)

// grad_j = kd_grad(es_j / S_s, et_j / S_t, ece_j / S_ce, false, c), written as dtype D.
template <int D>
RBKD_INLINE void store_grad(void* row, const float* es, const float* et, const float* ece,
                            float inv_Ss, float inv_St, float inv_Sce, KdGradCoef c, int64_t n) {
  auto* p = static_cast<typename Storage<D>::type*>(row);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    store<D>(p, j, kd_grad(es[j] * inv_Ss, et[j] * inv_St, ece[j] * inv_Sce, false, c));
  }
}

RBKD_CLONES void kd_row(const KdLossArgs& a, int64_t i, float* scratch) {
  const int64_t C = a.C;
  const int64_t s_size = dtype_size(a.s_dtype);
  void* g_row = a.grad != nullptr ? static_cast<char*>(a.grad) + i * C * s_size : nullptr;
  const RowParams rp = row_params(a, i);
  if (rp.ignored || rp.bad) {
    a.loss[i] = rp.bad ? NAN : 0.0f;
    if (g_row != nullptr) fill_row(g_row, a.s_dtype, C, rp.bad ? NAN : 0.0f);
    return;
  }
  const bool has_ce = a.labels != nullptr;
  const bool sep_ce = has_ce && rp.inv_T != 1.0f;  // CE needs its own exps unless T == 1
  const int pow_T = sep_ce ? rp.pow_T : 0;
  const bool pow_ce = pow_T != 0;  // ... which are powers of the tempered ones for an integer T
  float* zbuf = scratch;
  float* tbuf = scratch + C;
  float* es = scratch + 2 * C;
  float* et = scratch + 3 * C;
  float* ece = sep_ce ? scratch + 4 * C : es;

  // Pass 1: the rows as float32 and their maxima.
  const int64_t t_size = dtype_size(a.t_dtype);
  const char* z_row = static_cast<const char*>(a.student) + i * a.s_row_stride * s_size;
  const char* t_row = static_cast<const char*>(a.teacher) + i * a.t_row_stride * t_size;
  const char* next_z = z_row + a.s_row_stride * s_size;
  const char* next_t = t_row + a.t_row_stride * t_size;
  float mz, mt;
  const float* z = row_as_float(z_row, a.s_dtype, zbuf, C, &mz);
  const float* t = row_as_float(t_row, a.t_dtype, tbuf, C, &mt);

  // Pass 2: exps, their sums and the KL accumulator, block by block: the exps are stored by one
  // simd loop and summed by another; a single loop that does both keeps GCC's simd reduction
  // accumulators on the stack (2.6x slower).
  const float inv_T = rp.inv_T;
  float Ss = 0.0f, St = 0.0f, A = 0.0f, Sce = 0.0f;
  alignas(64) float kt[kBlock];
  for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
    const int64_t n = std::min(kBlock, C - j0);
    const float* zb = z + j0;
    const float* tb = t + j0;
    float* esb = es + j0;
    float* etb = et + j0;
    if (a.opt.teacher_kind == kLogits) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float zs = (zb[j] - mz) * inv_T;
        const float ts = (tb[j] - mt) * inv_T;
        const float e_t = fast_exp_lite(ts);
        esb[j] = fast_exp_lite(zs);
        etb[j] = e_t;
        kt[j] = kl_term(e_t, ts, zs);
      }
    } else if (a.opt.teacher_kind == kLogProbs) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float zs = (zb[j] - mz) * inv_T;
        const float p = fast_exp_lite(tb[j]);
        esb[j] = fast_exp_lite(zs);
        etb[j] = p;
        kt[j] = kl_term(p, tb[j], zs);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float zs = (zb[j] - mz) * inv_T;
        esb[j] = fast_exp_lite(zs);
        etb[j] = tb[j];
        kt[j] = kl_term(tb[j], fast_log(tb[j]), zs);
      }
    }
    // Fetch the same stretch of the next row into L2 while this block computes, so the next
    // row's pass 1 finds it there and DRAM streams during the arithmetic.
    if (i + 1 < a.N) {
      for (int64_t j = 0; j < n * s_size; j += 64) __builtin_prefetch(next_z + j0 * s_size + j, 0, 2);
      for (int64_t j = 0; j < n * t_size; j += 64) __builtin_prefetch(next_t + j0 * t_size + j, 0, 2);
    }
    Ss += sum(esb, n);
    St += sum(etb, n);
    A += sum(kt, n);
    if (pow_ce) {
      pow_int_block(kt, esb, n, pow_T);  // kt is free again: its sum is taken
      Sce += sum(kt, n);
    } else if (sep_ce) {
      float* eceb = ece + j0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) eceb[j] = fast_exp_lite(zb[j] - mz);
      Sce += sum(eceb, n);
    }
  }
  if (!sep_ce) Sce = Ss;
  const bool teacher_ok =
      a.opt.teacher_kind == kLogits ? logits_row_ok(mt, St) : mass_ok(St, a.opt.probs_tol);
  if (!(teacher_ok && logits_row_ok(mz, Ss))) {
    a.loss[i] = NAN;
    if (g_row != nullptr) fill_row(g_row, a.s_dtype, C, NAN);
    return;
  }

  const float kl = kl_finish(A, St, Ss, a.opt.teacher_kind);
  const float ce = has_ce ? ce_finish(Sce, mz, z[rp.label]) : 0.0f;
  a.loss[i] = kd_row_loss(ce, kl, rp.alpha, rp.kl_scale, has_ce);
  if (g_row == nullptr) return;

  // Pass 3: the gradient, from the kept exps.
  const float gs = a.grad_scale_ptr != nullptr ? *a.grad_scale_ptr : a.grad_scale;
  const KdGradCoef c = kd_grad_coef(rp.alpha, rp.kl_scale, inv_T, has_ce, gs);
  const float inv_Ss = 1.0f / Ss;
  const float inv_St = a.opt.teacher_kind == kLogits ? 1.0f / St : 1.0f;
  const float inv_Sce = 1.0f / Sce;
  if (pow_ce) {
    // The CE exps are not kept: re-formed block by block in L1 from the kept tempered ones.
    const int64_t s_bytes = s_size;
    for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
      const int64_t n = std::min(kBlock, C - j0);
      pow_int_block(kt, es + j0, n, pow_T);
      void* gb = static_cast<char*>(g_row) + j0 * s_bytes;
      if (a.s_dtype == kFloat32) {
        store_grad<kFloat32>(gb, es + j0, et + j0, kt, inv_Ss, inv_St, inv_Sce, c, n);
      } else if (a.s_dtype == kFloat16) {
        store_grad<kFloat16>(gb, es + j0, et + j0, kt, inv_Ss, inv_St, inv_Sce, c, n);
      } else {
        store_grad<kBFloat16>(gb, es + j0, et + j0, kt, inv_Ss, inv_St, inv_Sce, c, n);
      }
    }
  } else if (a.s_dtype == kFloat32) {
    store_grad<kFloat32>(g_row, es, et, ece, inv_Ss, inv_St, inv_Sce, c, C);
  } else if (a.s_dtype == kFloat16) {
    store_grad<kFloat16>(g_row, es, et, ece, inv_Ss, inv_St, inv_Sce, c, C);
  } else {
    store_grad<kBFloat16>(g_row, es, et, ece, inv_Ss, inv_St, inv_Sce, c, C);
  }
  if (has_ce) {
    const int64_t y = rp.label;
    float ece_y;
    if (pow_ce) {
      pow_int_block(&ece_y, es + y, 1, pow_T);
    } else {
      ece_y = ece[y];
    }
    store_one(g_row, a.s_dtype, y,
              kd_grad(es[y] * inv_Ss, et[y] * inv_St, ece_y * inv_Sce, true, c));
  }
}

// The two passes over a [C][kLanes] tile (see kd_rows_small); KIND and HAS_CE are template
// arguments so the simd loops have no branches left (GCC does not if-convert them otherwise).
template <int KIND, bool HAS_CE>
RBKD_INLINE void kd_tile(int64_t C, const float (*z)[kLanes], const float (*t)[kLanes],
                         float (*g)[kLanes], const float* inv_T, const float* c_ce,
                         const float* c_kl, const int32_t* label, const float* valid, float* mz,
                         float* Ss, float* mce, float* Sce, float* St, float* mt, float* A,
                         float* zy) {
  for (int r = 0; r < kLanes; ++r) {
    mz[r] = mce[r] = mt[r] = -INFINITY;
    Ss[r] = Sce[r] = St[r] = A[r] = zy[r] = 0.0f;
  }
  for (int64_t j = 0; j < C; ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      online_push(mz[r], Ss[r], z[j][r], inv_T[r]);
      if constexpr (HAS_CE) online_push(mce[r], Sce[r], z[j][r], 1.0f);
      if constexpr (KIND == kLogits) {
        online_push(mt[r], St[r], t[j][r], inv_T[r]);
      } else if constexpr (KIND == kLogProbs) {
        St[r] += fast_exp(t[j][r]);
      } else {
        St[r] += t[j][r];
      }
    }
  }
  alignas(64) float inv_Ss[kLanes], inv_St[kLanes], inv_Sce[kLanes];
#pragma omp simd
  for (int r = 0; r < kLanes; ++r) {
    inv_Ss[r] = 1.0f / Ss[r];
    inv_St[r] = KIND == kLogits ? 1.0f / St[r] : 1.0f;
    inv_Sce[r] = 1.0f / Sce[r];
  }
  for (int32_t j = 0; j < static_cast<int32_t>(C); ++j) {
#pragma omp simd
    for (int r = 0; r < kLanes; ++r) {
      const float zs = (z[j][r] - mz[r]) * inv_T[r];
      const float p_s = fast_exp(zs) * inv_Ss[r];
      float p, lp;
      if constexpr (KIND == kLogits) {
        lp = (t[j][r] - mt[r]) * inv_T[r];
        p = fast_exp(lp);
      } else if constexpr (KIND == kLogProbs) {
        lp = t[j][r];
        p = fast_exp(lp);
      } else {
        p = t[j][r];
        lp = fast_log(p);
      }
      A[r] += kl_term(p, lp, zs);
      const bool is_label = j == label[r];
      zy[r] = is_label ? z[j][r] : zy[r];
      const float p_ce = HAS_CE ? fast_exp(z[j][r] - mce[r]) * inv_Sce[r] : 0.0f;
      const float gj = c_ce[r] * (p_ce - (is_label ? 1.0f : 0.0f)) + c_kl[r] * (p_s - p * inv_St[r]);
      // Invalid lanes have zero coefficients; the select also clears a NaN from padding.
      g[j][r] = valid[r] != 0.0f ? gj : 0.0f;
    }
  }
}

// kLanes rows at once (C <= kSmallC). Pass 1 folds each lane's row into online (max, sum) pairs,
// pass 2 recomputes the exps with the final maxima for the KL term and the gradient: the same
// two-pass scheme as the Triton kernel. 65536 x 10: 12x faster than one row per task.
RBKD_CLONES void kd_rows_small(const KdLossArgs& a, int64_t i0) {
  const int64_t C = a.C;
  const int rows = static_cast<int>(std::min<int64_t>(kLanes, a.N - i0));
  alignas(64) float z[kSmallC][kLanes];
  alignas(64) float t[kSmallC][kLanes];
  alignas(64) float g[kSmallC][kLanes];
  alignas(64) float inv_T[kLanes], alpha[kLanes], kl_scale[kLanes], c_ce[kLanes], c_kl[kLanes];
  alignas(64) int32_t label[kLanes];
  alignas(64) float valid[kLanes];
  bool ignored[kLanes], bad[kLanes];
  const bool has_ce = a.labels != nullptr;
  const float gs = a.grad_scale_ptr != nullptr ? *a.grad_scale_ptr : a.grad_scale;
  for (int r = 0; r < kLanes; ++r) {
    RowParams p{1.0f, 1.0f, 1.0f, -1, true, false, 0};
    if (r < rows) p = row_params(a, i0 + r);
    const bool counted = !p.ignored && !p.bad;
    ignored[r] = p.ignored;
    bad[r] = p.bad;
    // A bad row computes with T = 1, alpha = 1 in its lane (never NaN-poisoning the others'
    // vectors) and is overwritten with NaN below.
    inv_T[r] = counted ? p.inv_T : 1.0f;
    alpha[r] = counted ? p.alpha : 1.0f;
    kl_scale[r] = counted ? p.kl_scale : 1.0f;
    label[r] = static_cast<int32_t>(p.label);
    valid[r] = counted ? 1.0f : 0.0f;
    const KdGradCoef c = kd_grad_coef(alpha[r], kl_scale[r], inv_T[r], has_ce, counted ? gs : 0.0f);
    c_ce[r] = c.c_ce;
    c_kl[r] = c.c_kl;
  }
  load_tile_any(a.s_dtype, a.student, a.s_row_stride, i0, rows, C, z);
  load_tile_any(a.t_dtype, a.teacher, a.t_row_stride, i0, rows, C, t);

  alignas(64) float mz[kLanes], Ss[kLanes], mce[kLanes], Sce[kLanes], St[kLanes], A[kLanes];
  alignas(64) float zy[kLanes], mt[kLanes];
#define RBKD_TILE(KIND, CE) \
  kd_tile<KIND, CE>(C, z, t, g, inv_T, c_ce, c_kl, label, valid, mz, Ss, mce, Sce, St, mt, A, zy)
  const int kind = a.opt.teacher_kind;
  if (has_ce) {
    if (kind == kLogits) RBKD_TILE(kLogits, true);
    else if (kind == kProbs) RBKD_TILE(kProbs, true);
    else RBKD_TILE(kLogProbs, true);
  } else {
    if (kind == kLogits) RBKD_TILE(kLogits, false);
    else if (kind == kProbs) RBKD_TILE(kProbs, false);
    else RBKD_TILE(kLogProbs, false);
  }
#undef RBKD_TILE
  for (int r = 0; r < rows; ++r) {
    const bool teacher_ok = kind == kLogits ? logits_row_ok(mt[r], St[r]) : mass_ok(St[r], a.opt.probs_tol);
    if (!ignored[r] && !(teacher_ok && logits_row_ok(mz[r], Ss[r]))) bad[r] = true;
    const float kl = kl_finish(A[r], St[r], Ss[r], kind);
    const float ce = has_ce ? ce_finish(Sce[r], mce[r], zy[r]) : 0.0f;
    a.loss[i0 + r] = bad[r]       ? NAN
                     : ignored[r] ? 0.0f
                                  : kd_row_loss(ce, kl, alpha[r], kl_scale[r], has_ce);
    if (bad[r]) {
      for (int64_t j = 0; j < C; ++j) g[j][r] = NAN;
    }
  }
  if (a.grad == nullptr) return;
  if (a.s_dtype == kFloat32) {
    store_tile<kFloat32>(a.grad, i0, rows, C, g);
  } else if (a.s_dtype == kFloat16) {
    store_tile<kFloat16>(a.grad, i0, rows, C, g);
  } else {
    store_tile<kBFloat16>(a.grad, i0, rows, C, g);
  }
}

}  // namespace

void kd_loss_fwd(const KdLossArgs& a, int num_threads) {
  if (a.N == 0) return;
  if (a.C == 0) {
    for (int64_t i = 0; i < a.N; ++i) a.loss[i] = 0.0f;
    return;
  }
  if (effective_divergence(a.opt) != kKL || a.opt.standardize) {
    kd_divergence_fwd(a, num_threads);  // divergence_cpu.cpp; plain KL keeps the paths below
    return;
  }
  advise_huge_pages(a.grad, a.N * a.C * dtype_size(a.s_dtype));
  if (a.C <= kSmallC) {
    const int64_t blocks = (a.N + kLanes - 1) / kLanes;
    const int nt = pick_threads(num_threads, a.N * a.C * 4, blocks);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) kd_rows_small(a, b * kLanes);
    return;
  }
  const int nt = pick_threads(num_threads, a.N * a.C * 4, a.N);
  parallel_rows_with_scratch(nt, a.N, 5 * a.C, "kd_loss_fwd",
                             [&](int64_t i, float* scratch) { kd_row(a, i, scratch); });
}

}  // namespace rbkd::cpu
