// kd_loss_fwd on the CPU: per-row loss and the saved gradient in one fused pass over each row.
//
// One row per task (C > kSmallC; smaller rows are kd_tiles.cpp's). Pass 1 reads the row from DRAM
// (max of student and teacher; float16/bfloat16 converted to float32 on the way), pass 2 forms the
// exps from L2 and keeps them, pass 3 writes the gradient. Keeping the exps costs L2 traffic but halves the exps (the
// arithmetic, not memory, is what limits a 2-core machine here).
#include "cpu_common.h"
#include "cpu_kernels.h"
#include "kd_grad_plan.h"
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
        esb[j] = fast_exp_nonpos(zs);
        etb[j] = e_t;
        kt[j] = kl_term(e_t, ts, zs);
      }
    } else if (a.opt.teacher_kind == kLogProbs) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float zs = (zb[j] - mz) * inv_T;
        const float p = fast_exp_lite(tb[j]);
        esb[j] = fast_exp_nonpos(zs);
        etb[j] = p;
        kt[j] = kl_term(p, tb[j], zs);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float zs = (zb[j] - mz) * inv_T;
        esb[j] = fast_exp_nonpos(zs);
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

}  // namespace

void kd_loss_fwd(const KdLossArgs& a, int num_threads) {
  if (a.N == 0) return;
  if (a.C == 0) {
    for (int64_t i = 0; i < a.N; ++i) a.loss[i] = 0.0f;
    return;
  }
  advise_huge_pages(a.grad, a.N * a.C * dtype_size(a.s_dtype));
  if (a.C <= kSmallC) {
    kd_tiles_fwd(a, num_threads);  // kd_tiles.cpp: every divergence, rows as SIMD lanes
    return;
  }
  if (effective_divergence(a.opt) != kKL || a.opt.standardize) {
    kd_divergence_fwd(a, num_threads);  // divergence_cpu.cpp; plain KL keeps the row path below
    return;
  }
  const int nt = pick_threads(num_threads, a.N * a.C * 4, a.N);
  parallel_rows_with_scratch(nt, a.N, 5 * a.C, "kd_loss_fwd",
                             [&](int64_t i, float* scratch) { kd_row(a, i, scratch); });
}

}  // namespace rbkd::cpu
