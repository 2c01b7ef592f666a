// kd_loss_fwd for C > kSmallC and every divergence but plain KL (and any divergence with
// standardize): loss and gradient of each row in one call (csrc/README.md, "Divergences"). Plain
// KL keeps its own tuned row path in kd_cpu.cpp; C <= kSmallC is kd_tiles.cpp's for all of them.
// One row per task: pass 1 reads the rows (max; z-score), pass 2 forms and keeps the exps, pass 3
// the divergence terms d_j and h_j = p_j dD/dp_j, pass 4 writes dD/du_j = h_j - p_j H through the
// z-score and with the CE term.
// dkd has no per-element h: its loss comes from the label's and the rest's sums (the rest shifted
// by its own max, so the renormalised non-target distribution never underflows) and its gradient
// is k1 exp_s_j + k2 exp_t_j off the label.
#include "cpu_common.h"
#include "kd_grad_plan.h"
#include "rbkd_divergence.h"
#include "rbkd_rows.h"

namespace rbkd::cpu {
namespace {

using namespace kd;  // NOLINT: kd_loss helpers shared with kd_cpu.cpp (cpu_common.h)

// z-score of a float32 row: mean, unbiased sigma, rho = 1 / (sigma + eps); rho = 0 for C = 1.
RBKD_INLINE ZScore zscore_row(const float* x, int64_t C) {
  ZScore s{0.0f, 0.0f, 0.0f};
  if (C <= 1) return s;
  s.mean = sum(x, C) / static_cast<float>(C);
  const float mean = s.mean;
  float v = 0.0f;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < C; ++j) v += (x[j] - mean) * (x[j] - mean);
  s.sigma = sqrtf(v / static_cast<float>(C - 1));
  s.rho = 1.0f / (s.sigma + kStandardizeEps);
  return s;
}

// STD: the z-score term; without it z is not read (a 128 KB L2 read per 32000-class row).
template <int D, bool STD>
RBKD_INLINE void store_block(void* row, int64_t j0, int64_t n, const float* z, const float* x,
                             const float* e, const float* ce, const GradPlan& g) {
  auto* p = static_cast<typename Storage<D>::type*>(row) + j0;
  const float cx = g.cx, cs = g.cs, A1 = g.A1, A0 = g.A0, A2 = g.A2, mean = g.mean;
  const float c_ce = g.c_ce, inv_Sce = g.inv_Sce;
  const bool on = g.kd_on;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float kd = A1 * (cx * x[j] + cs * e[j]);
    if constexpr (STD) kd += A0 + A2 * (z[j] - mean);  // rows with a -inf z are NaN rows here
    store<D>(p, j, (on ? kd : 0.0f) + c_ce * ce[j] * inv_Sce);
  }
}

template <int D>
RBKD_INLINE void store_block_any(bool stdz, void* row, int64_t j0, int64_t n, const float* z,
                                 const float* x, const float* e, const float* ce,
                                 const GradPlan& g) {
  if (stdz) store_block<D, true>(row, j0, n, z, x, e, ce, g);
  else store_block<D, false>(row, j0, n, z, x, e, ce, g);
}

// Pass 2 of a row block: exp_s, exp_t (teacher kind KIND) and, for dkd, the NCKD terms in kt.
template <int KIND, bool kDkd>
RBKD_INLINE void exps_block(const float* zb, const float* tb, float* esb, float* etb, float* kt,
                            int64_t n, float sh_s, float sc_s, float sh_t, float sc_t) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float ls = (zb[j] - sh_s) * sc_s;
    esb[j] = fast_exp_lite(ls);
    float lt = 0.0f, e;
    if constexpr (KIND == kLogits) {
      lt = (tb[j] - sh_t) * sc_t;
      e = fast_exp_lite(lt);
    } else if constexpr (KIND == kLogProbs) {
      lt = tb[j];
      e = fast_exp_lite(lt);
    } else {
      e = tb[j];
      if constexpr (kDkd) lt = fast_log(e);
    }
    etb[j] = e;
    if constexpr (kDkd) kt[j] = kl_term(e, lt, ls);
  }
}

// Pass 3 of a row block: d_j into kt, h_j over exp_t in etb (divergence DIV, teacher kind KIND).
template <int DIV, int KIND>
RBKD_INLINE void terms_block(const float* zb, const float* tb, const float* esb, float* etb,
                             float* kt, int64_t n, const DivConst& k, float sh_s, float sc_s,
                             float sh_t, float sc_t, float inv_Ss, float lSs, float inv_St,
                             float lSt) {
  const DivConst kk = k;  // a local copy: loads through the reference keep GCC from vectorising
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float p = esb[j] * inv_Ss, lp = (zb[j] - sh_s) * sc_s - lSs;
    const float q = etb[j] * inv_St;
    const float lq = KIND == kLogits     ? (tb[j] - sh_t) * sc_t - lSt
                     : KIND == kLogProbs ? tb[j]
                                         : fast_log(tb[j]);
    float d, h;
    div_elem<DIV>(p, lp, q, lq, kk, d, h);
    kt[j] = d;
    etb[j] = h;
  }
}

RBKD_INLINE void exps_any(int kind, bool dkd, const float* zb, const float* tb, float* esb,
                          float* etb, float* kt, int64_t n, float sh_s, float sc_s, float sh_t,
                          float sc_t) {
#define RBKD_EXPS(K, DKD) exps_block<K, DKD>(zb, tb, esb, etb, kt, n, sh_s, sc_s, sh_t, sc_t)
  if (dkd) {
    if (kind == kLogits) RBKD_EXPS(kLogits, true);
    else if (kind == kProbs) RBKD_EXPS(kProbs, true);
    else RBKD_EXPS(kLogProbs, true);
  } else {
    if (kind == kLogits) RBKD_EXPS(kLogits, false);
    else if (kind == kProbs) RBKD_EXPS(kProbs, false);
    else RBKD_EXPS(kLogProbs, false);
  }
#undef RBKD_EXPS
}

template <int DIV>
RBKD_INLINE void terms_kind(int kind, const float* zb, const float* tb, const float* esb,
                            float* etb, float* kt, int64_t n, const DivConst& k, float sh_s,
                            float sc_s, float sh_t, float sc_t, float inv_Ss, float lSs,
                            float inv_St, float lSt) {
#define RBKD_TERMS(K) \
  terms_block<DIV, K>(zb, tb, esb, etb, kt, n, k, sh_s, sc_s, sh_t, sc_t, inv_Ss, lSs, inv_St, lSt)
  if (kind == kLogits) RBKD_TERMS(kLogits);
  else if (kind == kProbs) RBKD_TERMS(kProbs);
  else RBKD_TERMS(kLogProbs);
#undef RBKD_TERMS
}

RBKD_INLINE void terms_any(int div, int kind, const float* zb, const float* tb, const float* esb,
                           float* etb, float* kt, int64_t n, const DivConst& k, float sh_s,
                           float sc_s, float sh_t, float sc_t, float inv_Ss, float lSs,
                           float inv_St, float lSt) {
#define RBKD_TERMS(DIV) \
  terms_kind<DIV>(kind, zb, tb, esb, etb, kt, n, k, sh_s, sc_s, sh_t, sc_t, inv_Ss, lSs, inv_St, lSt)
  switch (div) {
    case kKL: RBKD_TERMS(kKL); break;
    case kReverseKL: RBKD_TERMS(kReverseKL); break;
    case kJSD: RBKD_TERMS(kJSD); break;
    case kSkewKL: RBKD_TERMS(kSkewKL); break;
    case kSkewReverseKL: RBKD_TERMS(kSkewReverseKL); break;
    default: RBKD_TERMS(kTVD); break;
  }
#undef RBKD_TERMS
}

RBKD_CLONES void div_row(int div, const KdLossArgs& a, int64_t i, float* scratch, void* g_row,
                         const RowParams& rp, const DivConst& k) {
  const bool kDkd = div == kDKD;
  const int kind = a.opt.teacher_kind;
  const int64_t C = a.C, y = rp.label;
  const bool has_ce = a.labels != nullptr;
  const int64_t s_size = dtype_size(a.s_dtype), t_size = dtype_size(a.t_dtype);
  float* es = scratch + 2 * C;
  float* et = scratch + 3 * C;
  float* ece = scratch + 4 * C;

  // Pass 1: the rows as float32, maxima, z-scores; dkd shifts by the max off the label.
  const char* z_row = static_cast<const char*>(a.student) + i * a.s_row_stride * s_size;
  const char* t_row = static_cast<const char*>(a.teacher) + i * a.t_row_stride * t_size;
  const char* next_z = z_row + a.s_row_stride * s_size;
  const char* next_t = t_row + a.t_row_stride * t_size;
  float mz, mt;
  const float* z = row_as_float(z_row, a.s_dtype, scratch, C, &mz);
  const float* t = row_as_float(t_row, a.t_dtype, scratch + C, C, &mt);
  ZScore zs{0.0f, 0.0f, 1.0f}, ts{0.0f, 0.0f, 1.0f};
  if (a.opt.standardize) {
    zs = zscore_row(z, C);
    ts = zscore_row(t, C);
  }
  const float sc_s = rp.inv_T * zs.rho, sc_t = rp.inv_T * ts.rho;
  float sh_s = mz, sh_t = mt;
  if (kDkd) {
    const float ms = max_f(row_max(z, y), row_max(z + y + 1, C - y - 1));
    const float ms_t = max_f(row_max(t, y), row_max(t + y + 1, C - y - 1));
    sh_s = ms > -INFINITY ? ms : mz;
    sh_t = ms_t > -INFINITY ? ms_t : mt;
  }
  // CE exps: shared with the tempered ones at T = 1, powers of them at an integer T, else own.
  const bool plain = !a.opt.standardize && sh_s == mz;
  const bool sep_ce = has_ce && !(plain && rp.inv_T == 1.0f);
  const int pow_T = sep_ce && plain ? rp.pow_T : 0;
  if (!sep_ce) ece = es;

  // Pass 2: exps and their sums (dkd: the label's kept out of them, and the NCKD sum B).
  float Ss = 0.0f, St = 0.0f, B = 0.0f, Sce = 0.0f, es_y = 0.0f, et_y = 0.0f;
  alignas(64) float kt[kBlock];
  for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
    const int64_t n = std::min(kBlock, C - j0);
    const float *zb = z + j0, *tb = t + j0;
    float *esb = es + j0, *etb = et + j0;
    exps_any(kind, kDkd, zb, tb, esb, etb, kt, n, sh_s, sc_s, sh_t, sc_t);
    if (i + 1 < a.N) {  // the next row into L2 during the arithmetic (as kd_cpu.cpp)
      for (int64_t j = 0; j < n * s_size; j += 64) __builtin_prefetch(next_z + j0 * s_size + j, 0, 2);
      for (int64_t j = 0; j < n * t_size; j += 64) __builtin_prefetch(next_t + j0 * t_size + j, 0, 2);
    }
    if (kDkd) {  // the rest's sums exclude the label, summed without it (no cancellation)
      if (y >= j0 && y < j0 + n) {
        es_y = esb[y - j0];
        et_y = etb[y - j0];
        kt[y - j0] = 0.0f;
      }
      B += sum(kt, n);
    }
    if (pow_T != 0) {
      pow_int_block(kt, esb, n, pow_T);  // before dkd clears the label's exp
      Sce += sum(kt, n);
    } else if (sep_ce) {
      float* eceb = ece + j0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) eceb[j] = fast_exp_lite(zb[j] - mz);
      Sce += sum(eceb, n);
    }
    if (kDkd && y >= j0 && y < j0 + n) esb[y - j0] = etb[y - j0] = 0.0f;
    Ss += sum(esb, n);
    St += sum(etb, n);
  }
  if (!sep_ce) Sce = Ss + es_y;

  float D = 0.0f, sum_x, sum_e, du_y = 0.0f;
  GradPlan g{1.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 1.0f / Sce, rp.alpha > 0.0f};
  bool ok;
  if (kDkd) {
    const float ls_y = (z[y] - sh_s) * sc_s;
    const float lt_y = kind == kLogits ? (t[y] - sh_t) * sc_t : kind == kLogProbs ? t[y] : logf(t[y]);
    ok = mz > -INFINITY && mz < INFINITY && Ss == Ss && ls_y == ls_y &&
         (kind == kLogits ? mt > -INFINITY && mt < INFINITY && St == St && lt_y == lt_y
                          : mass_ok(St + et_y, a.opt.probs_tol));
    const float lSr = logf(Ss), lTr = logf(St);
    const float lSs = log_add_exp_scalar(lSr, ls_y);
    const float lSt = kind == kLogits ? log_add_exp_scalar(lTr, lt_y) : 0.0f;
    const float lp_y = ls_y - lSs, lq_y = lt_y - lSt;
    const float nckd = St > 0.0f ? (Ss > 0.0f ? B / St + (lSr - lTr) : INFINITY) : 0.0f;
    D = k.dkd_alpha * dkd_tckd(lp_y, lq_y, lSr - lSs, lTr - lSt) + k.dkd_beta * nckd;
    const float dy = expf(lp_y) - expf(lq_y);
    du_y = k.dkd_alpha * dy;
    g.cs = Ss > 0.0f ? (k.dkd_beta - k.dkd_alpha * dy) / Ss : 0.0f;  // r_j = exp_s_j / Ss
    g.cx = St > 0.0f ? -k.dkd_beta / St : 0.0f;                       // rt_j = exp_t_j / St
    sum_x = St;
    sum_e = Ss;
  } else {
    ok = logits_row_ok(mz, Ss) &&
         (kind == kLogits ? logits_row_ok(mt, St) : mass_ok(St, a.opt.probs_tol));
    // Pass 3: p, log p, q, log q -> d_j (summed) and h_j (kept in et).
    const float inv_Ss = 1.0f / Ss, lSs = logf(Ss);
    const float inv_St = kind == kLogits ? 1.0f / St : 1.0f;
    const float lSt = kind == kLogits ? logf(St) : 0.0f;
    float Hs = 0.0f;
    for (int64_t j0 = 0; ok && j0 < C; j0 += kBlock) {
      const int64_t n = std::min(kBlock, C - j0);
      const float *zb = z + j0, *tb = t + j0, *esb = es + j0;
      float* etb = et + j0;
      terms_any(div, kind, zb, tb, esb, etb, kt, n, k, sh_s, sc_s, sh_t, sc_t, inv_Ss, lSs, inv_St, lSt);
      D += sum(kt, n);
      Hs += sum(etb, n);
    }
    g.cs = -(div == kKL ? -1.0f : Hs) * inv_Ss;  // du_j = h_j - p_j H, p_j = exp_s_j / Ss
    sum_x = Hs;
    sum_e = Ss;
  }
  if (!ok) {
    a.loss[i] = NAN;
    if (g_row != nullptr) fill_row(g_row, a.s_dtype, C, NAN);
    return;
  }
  const float ce = has_ce ? ce_finish(Sce, mz, z[y]) : 0.0f;
  a.loss[i] = kd_row_loss(ce, D, rp.alpha, rp.kl_scale, has_ce);
  if (g_row == nullptr) return;

  const float gs = a.grad_scale_ptr != nullptr ? *a.grad_scale_ptr : a.grad_scale;
  const KdGradCoef c = kd_grad_coef(rp.alpha, rp.kl_scale, rp.inv_T, has_ce, gs);
  g.c_ce = c.c_ce;
  g.A1 = c.c_kl;
  if (a.opt.standardize) {
    float sxd = 0.0f, sed = 0.0f;
    const float mean = zs.mean;
#pragma omp simd reduction(+ : sxd, sed)
    for (int64_t j = 0; j < C; ++j) {
      sxd += et[j] * (z[j] - mean);
      sed += es[j] * (z[j] - mean);
    }
    const float dy = kDkd ? z[y] - mean : 0.0f;
    plan_standardize(g, zs, c.c_kl, g.cx * sum_x + g.cs * sum_e + du_y,
                     g.cx * sxd + g.cs * sed + du_y * dy, C);
  }
  // Pass 4: the gradient, block by block (the CE exps re-formed in L1 for an integer T).
  for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
    const int64_t n = std::min(kBlock, C - j0);
    const float* ceb = ece + j0;
    if (pow_T != 0) {
      pow_int_block(kt, es + j0, n, pow_T);
      ceb = kt;
    }
    if (a.s_dtype == kFloat32) {
      store_block_any<kFloat32>(a.opt.standardize, g_row, j0, n, z + j0, et + j0, es + j0, ceb, g);
    } else if (a.s_dtype == kFloat16) {
      store_block_any<kFloat16>(a.opt.standardize, g_row, j0, n, z + j0, et + j0, es + j0, ceb, g);
    } else {
      store_block_any<kBFloat16>(a.opt.standardize, g_row, j0, n, z + j0, et + j0, es + j0, ceb, g);
    }
  }
  if (y >= 0) {  // the label's element: the one-hot of CE, dkd's target-class gradient
    const float e_y = kDkd ? es_y : es[y];
    float ce_y = sep_ce && pow_T == 0 ? ece[y] : e_y;
    if (pow_T != 0) pow_int_block(&ce_y, &e_y, 1, pow_T);
    const float du = kDkd ? du_y : g.cx * et[y] + g.cs * es[y];
    const float kd = g.A1 * du + g.A0 + (g.A2 != 0.0f ? g.A2 * (z[y] - g.mean) : 0.0f);
    store_one(g_row, a.s_dtype, y, (g.kd_on ? kd : 0.0f) + g.c_ce * (ce_y * g.inv_Sce - 1.0f));
  }
}

void divergence_row(const KdLossArgs& a, int64_t i, float* scratch, int div,
                                const DivConst& k) {
  const int64_t C = a.C;
  void* g_row = a.grad != nullptr ? static_cast<char*>(a.grad) + i * C * dtype_size(a.s_dtype)
                                  : nullptr;
  const RowParams rp = row_params(a, i);
  if (rp.ignored || rp.bad) {
    a.loss[i] = rp.bad ? NAN : 0.0f;
    if (g_row != nullptr) fill_row(g_row, a.s_dtype, C, rp.bad ? NAN : 0.0f);
    return;
  }
  div_row(div, a, i, scratch, g_row, rp, k);
}


}  // namespace

void kd_divergence_fwd(const KdLossArgs& a, int num_threads) {
  const int div = effective_divergence(a.opt);
  const DivConst k = div_const(a.opt);
  const int nt = pick_threads(num_threads, a.N * a.C * 4, a.N);
  parallel_rows_with_scratch(nt, a.N, 5 * a.C, "kd_loss_fwd",
                             [&](int64_t i, float* scratch) { divergence_row(a, i, scratch, div, k); });
}

}  // namespace rbkd::cpu
