// sparse_kd_loss_fwd on the CPU (issue 16): kd_loss against a teacher kept as its top-k, tail
// "bucket" or "renormalize", every bucket divergence of rbkd_divergence.h. The math is
// rbkd/ops/sparse_twin.py's; csrc/README.md, "Sparse soft labels", states it.
//
// One row per task, in blocks of kBlock columns. Pass 1 reads the student row once from memory:
// per block its max, the exps at T (kept in scratch: the gradient needs them) and, for the CE
// term, at 1 (shared when T = 1, powers of the tempered ones for an integer T, else own and kept),
// with the kept ids' exps zeroed before the block sums, so the tail's sum is formed directly,
// never as 1 - (kept mass) (exact for a tiny tail). Each block is shifted by its own max and the
// block sums are rescaled to the row's max afterwards (an online max per block): the row is read
// from memory once, not once for the max and again for the exps. The k + 1 buckets are then a
// few scalars; pass 2 writes the gradient g_j = A_b e_j + B_b ece_j, one multiply-add per
// element from the kept exps, and the k kept ids and the label are fixed up one by one.
#include <algorithm>

#include "cpu_common.h"
#include "rbkd_divergence.h"
#include "rbkd_rows.h"
#include "sparse_kernels.h"

namespace rbkd::cpu {
namespace {

using kd::kMaxPowT;
using kd::pow_int_block;

// 4 KB of float32 per block: its exps, CE exps and converted logits stay in L1.
constexpr int64_t kBlock = 1024;
// The teacher's tail floor of the twin (TAIL_FLOOR = 2^-24), as a log.
constexpr double kLogTailFloor = -16.635532333438686;
// Below this the student's tail sum, formed from exps shifted by the row's max, may hold
// subnormal or flushed terms: it is recomputed over the tail ids with the tail's own max.
constexpr float kTinyTail = 1e-25f;

struct RowParams {
  float T, inv_T, alpha, kl_scale;
  int64_t label;  // -1 without CE
  bool ignored, bad;
  int pow_T;  // T when an integer in [2, kMaxPowT] (CE exps as powers of the tempered ones)
};

RowParams row_params(const SparseKdArgs& a, int64_t i) {
  RowParams p;
  p.T = row_param(a.T_rows, a.T, i);
  p.inv_T = 1.0f / p.T;
  p.kl_scale = a.opt.t_squared ? p.T * p.T : 1.0f;
  p.alpha = a.labels != nullptr ? row_param(a.alpha_rows, a.alpha, i) : 1.0f;
  p.label = -1;
  p.ignored = false;
  p.bad = !kd_params_ok(p.T, p.alpha);
  const bool int_T = p.T >= 2.0f && p.T <= static_cast<float>(kMaxPowT) &&
                     p.T == static_cast<float>(static_cast<int>(p.T));
  p.pow_T = int_T ? static_cast<int>(p.T) : 0;
  if (a.labels != nullptr) {
    const int64_t y = a.labels[i];
    if (y == a.opt.ignore_index) {
      p.ignored = true;
    } else if (y < 0 || y >= a.V) {
      p.bad = true;
    } else {
      p.label = y;
    }
  }
  return p;
}

// Per-thread scratch, carved from one float buffer (scratch_floats floats).
struct Scratch {
  float *es, *ece, *cebuf, *xbuf;  // [V], [V], [kBlock], [kBlock]
  float *bsh, *bst, *bsce;         // [blocks]: each block's shift, tail sum, CE sum
  float *lp, *lq, *p, *q, *h;      // [k + 1] bucket log-probabilities, probabilities and h
  int64_t* sid;                    // [k] the kept ids, ascending
  int64_t* cid;                    // [k] the kept ids in the row's order (sampled: drawn ones)
  int64_t* sord;                   // [k] sid[c]'s position in cid
  float *zk, *ek, *gk;             // [k] the student's logits at the kept ids, exp(z - m)
                                   // there, their gradients
};

int64_t num_blocks(int64_t V) { return (V + kBlock - 1) / kBlock; }

int64_t scratch_floats(int64_t V, int64_t k) {
  return 2 * V + 2 * kBlock + 3 * num_blocks(V) + 5 * (k + 1) + 9 * k + 16;
}

Scratch carve(float* f, int64_t V, int64_t k) {
  Scratch r;
  const int64_t nb = num_blocks(V);
  r.es = f;
  r.ece = r.es + V;
  r.cebuf = r.ece + V;
  r.xbuf = r.cebuf + kBlock;
  r.bsh = r.xbuf + kBlock;
  r.bst = r.bsh + nb;
  r.bsce = r.bst + nb;
  r.lp = r.bsce + nb;
  r.lq = r.lp + (k + 1);
  r.p = r.lq + (k + 1);
  r.q = r.p + (k + 1);
  r.h = r.q + (k + 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(r.h + (k + 1));
  r.sid = reinterpret_cast<int64_t*>((end + 7) & ~uintptr_t{7});
  r.cid = r.sid + k;
  r.sord = r.cid + k;
  r.zk = reinterpret_cast<float*>(r.sord + k);
  r.ek = r.zk + k;
  r.gk = r.ek + k;
  return r;
}

RBKD_INLINE float load_any(const void* row, int dtype, int64_t j) {
  if (dtype == kFloat32) return static_cast<const float*>(row)[j];
  const uint16_t v = static_cast<const uint16_t*>(row)[j];
  return dtype == kFloat16 ? half_to_float(v) : bf16_to_float(v);
}

// log(1 - exp(x)) for x <= 0 (Maechler 2012), -inf at 0.
double log1mexp(double x) { return x > -0.6931471805599453 ? log(-expm1(x)) : log1p(-exp(x)); }

// The teacher's bucket log-probabilities lq[0, k (+ 1)] and probabilities q as floats, computed
// in float64 (O(k): 1 - sum Q_i cancels; q from the float64 log, not from its float rounding,
// which at lq = -16 is already 1e-6 relative). False when the row breaks the non-finite rule: a kept logit NaN or +inf
// or none finite, a non-finite logz, a kept mass above 1 + probs_tol (bucket).
bool teacher_buckets(const SparseKdArgs& a, int64_t i, float T, bool has_tail, float* lq,
                     float* q) {
  const int64_t k = a.k;
  const float* t = a.topk + i * k;
  bool poisoned = false, any_finite = false;
  double mx = -INFINITY;
  for (int64_t c = 0; c < k; ++c) {
    const float v = t[c];
    poisoned |= (v != v) | (v == INFINITY);
    any_finite |= v > -INFINITY;
    mx = v > mx ? v : mx;
  }
  if (poisoned || !any_finite) return false;
  const double Td = T;
  double shift;
  if (a.tail == kTailRenormalize) {
    double s = 0.0;
    for (int64_t c = 0; c < k; ++c) s += exp((t[c] - mx) / Td);
    shift = mx / Td + log(s);
  } else {
    const double lz = static_cast<double>(a.logz[i]);
    if (!std::isfinite(lz)) return false;
    shift = lz;
  }
  double s = 0.0;
  const double top = mx / Td - shift;
  const double e_top = exp(top);  // one exp per kept id: exp(l) = exp(l - top) exp(top)
  for (int64_t c = 0; c < k; ++c) {
    const double l = t[c] / Td - shift;
    const double el = exp(l - top);
    lq[c] = static_cast<float>(l);
    q[c] = static_cast<float>(el * e_top);
    s += el;
  }
  if (!has_tail) return true;
  if (a.tail == kTailRenormalize) {
    lq[k] = -INFINITY;
    q[k] = 0.0f;
    return true;
  }
  const double log_s = top + log(s);
  if (static_cast<float>(log_s) > static_cast<float>(log1p(static_cast<double>(a.opt.probs_tol)))) {
    return false;
  }
  const double tail = std::max(log1mexp(std::min(log_s, 0.0)), kLogTailFloor);
  lq[k] = static_cast<float>(tail);
  q[k] = static_cast<float>(exp(tail));
  return true;
}

RBKD_INLINE int64_t kept_id(const SparseKdArgs& a, int64_t i, int64_t c) {
  return a.ids_int64 ? static_cast<const int64_t*>(a.ids)[i * a.k + c]
                     : static_cast<const int32_t*>(a.ids)[i * a.k + c];
}

// tail "sampled" (rbkd/ops/sparse_sampled.py, in float64 as there): the row's drawn entries
// (an id in [0, V) with a count > 0; padding is id -1 with count 0) compacted into cid, with
// lq = log p (the teacher at T) and q = p_hat = (c / S) w, w = p_T / p_sample_T (1 without
// sample_logz); the teacher bucket of the rest is 0, so the bucket KL is the estimator
// sum p_hat (log p - log P) and its gradient P sum(p_hat) - p_hat. *k_used is the number
// kept. False for a bad row: another entry, no draw, a non-finite logit at a drawn id or logz
// (or sample_logz), or the teacher's mass on the drawn ids above 1 + probs_tol at T or sample_T.
bool sampled_buckets(const SparseKdArgs& a, int64_t i, float T, int64_t* cid, int64_t* k_used,
                     float* lq, float* q) {
  const int64_t k = a.k;
  const float* t = a.topk + i * k;
  const int64_t* cnt = a.counts + i * k;
  const double lz = a.logz[i];
  const bool weighted = a.sample_logz != nullptr;
  const double lz0 = weighted ? static_cast<double>(a.sample_logz[i]) : 0.0;
  if (!std::isfinite(lz) || !std::isfinite(lz0)) return false;
  const double Td = T, T0 = a.sample_T;
  int64_t n = 0;
  double total = 0.0, mp = -INFINITY, mq = -INFINITY;
  for (int64_t c = 0; c < k; ++c) {  // the checks, the drawn ids and the maxima
    const int64_t id = kept_id(a, i, c);
    if (id == -1 && cnt[c] == 0) continue;
    if (id < 0 || id >= a.V || cnt[c] < 0) return false;
    if (cnt[c] == 0) continue;
    if (!std::isfinite(t[c])) return false;
    cid[n] = id;
    mp = std::max(mp, t[c] / Td - lz);
    mq = std::max(mq, t[c] / T0 - lz0);
    total += static_cast<double>(cnt[c]);
    ++n;
  }
  if (n == 0) return false;
  double sp = 0.0, sq = 0.0;
  int64_t m = 0;
  for (int64_t c = 0; c < k; ++c) {  // lq, q and the mass sums in the drawn ids' order
    const int64_t id = kept_id(a, i, c);
    if (id < 0 || cnt[c] == 0) continue;
    const double lp = t[c] / Td - lz, lq0 = t[c] / T0 - lz0;
    sp += exp(lp - mp);
    sq += exp(lq0 - mq);
    lq[m] = static_cast<float>(lp);
    q[m] = static_cast<float>(cnt[c] / total * (weighted ? exp(lp - lq0) : 1.0));
    ++m;
  }
  double log_mass = mp + log(sp);
  if (weighted) log_mass = std::max(log_mass, mq + log(sq));
  if (static_cast<float>(log_mass) > static_cast<float>(log1p(static_cast<double>(a.opt.probs_tol)))) {
    return false;
  }
  *k_used = n;
  if (n < a.V) {
    lq[n] = -INFINITY;
    q[n] = 0.0f;
  }
  return true;
}

// D and h over the n buckets (h_i = P_i dD/dP_i); returns D, sets *H = sum h.
template <int DIV>
float bucket_terms(int64_t n, const float* p, const float* lp, const float* q, const float* lq,
                   const DivConst& kc, float* h, float* H) {
  double D = 0.0, Hs = 0.0;  // k + 1 terms of either sign: a float sum loses ~sqrt(k) ulps
  for (int64_t c = 0; c < n; ++c) {
    float d, hc;
    div_elem<DIV>(p[c], lp[c], q[c], lq[c], kc, d, hc);
    D += d;
    Hs += hc;
    h[c] = hc;
  }
  *H = static_cast<float>(Hs);
  return static_cast<float>(D);
}

float buckets_any(int div, int64_t n, const float* p, const float* lp, const float* q,
                  const float* lq, const DivConst& kc, float* h, float* H) {
  switch (div) {
    case kKL: return bucket_terms<kKL>(n, p, lp, q, lq, kc, h, H);
    case kReverseKL: return bucket_terms<kReverseKL>(n, p, lp, q, lq, kc, h, H);
    case kJSD: return bucket_terms<kJSD>(n, p, lp, q, lq, kc, h, H);
    case kSkewKL: return bucket_terms<kSkewKL>(n, p, lp, q, lq, kc, h, H);
    case kSkewReverseKL: return bucket_terms<kSkewReverseKL>(n, p, lp, q, lq, kc, h, H);
    default: return bucket_terms<kTVD>(n, p, lp, q, lq, kc, h, H);
  }
}

// The tail's log-sum-exp of u = z / T relative to the row's max (m / T), over the ids outside
// the kept ones, with the tail's own max: exact where the row-max-shifted sum underflows. Sets
// *m_t (the tail's max logit, -inf for an empty tail) and *S_t (its shifted sum).
void exact_tail(const void* row, int dtype, int64_t V, const int64_t* sid, int64_t k, float inv_T,
                float* m_t, float* S_t) {
  float mt = -INFINITY;
  int64_t c = 0;
  for (int64_t j = 0; j < V; ++j) {
    if (c < k && sid[c] == j) {
      ++c;
      continue;
    }
    mt = max_f(mt, load_any(row, dtype, j));
  }
  float s = 0.0f;
  if (mt > -INFINITY) {
    c = 0;
    for (int64_t j = 0; j < V; ++j) {
      if (c < k && sid[c] == j) {
        ++c;
        continue;
      }
      s += expf((load_any(row, dtype, j) - mt) * inv_T);
    }
  }
  *m_t = mt;
  *S_t = s;
}

// Pass 2 of a block: g_j = A e_j + B ece_j (+ C exp((x_j - m_t) / T): the exact-tail path).
template <int D, bool kExactTail>
RBKD_INLINE void store_grad_block(void* g_row, int64_t j0, int64_t n, const float* e,
                                  const float* ece, float A, float B, const float* x, float m_t,
                                  float C, float inv_T) {
  auto* p = static_cast<typename Storage<D>::type*>(g_row) + j0;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float g = A * e[j] + B * ece[j];
    if constexpr (kExactTail) g += C * fast_exp_lite((x[j] - m_t) * inv_T);
    store<D>(p, j, g);
  }
}

template <bool kExactTail>
RBKD_INLINE void store_grad_any(int dtype, void* g_row, int64_t j0, int64_t n, const float* e,
                                const float* ece, float A, float B, const float* x, float m_t,
                                float C, float inv_T) {
  if (dtype == kFloat32) {
    store_grad_block<kFloat32, kExactTail>(g_row, j0, n, e, ece, A, B, x, m_t, C, inv_T);
  } else if (dtype == kFloat16) {
    store_grad_block<kFloat16, kExactTail>(g_row, j0, n, e, ece, A, B, x, m_t, C, inv_T);
  } else {
    store_grad_block<kBFloat16, kExactTail>(g_row, j0, n, e, ece, A, B, x, m_t, C, inv_T);
  }
}

void nan_row(const SparseKdArgs& a, int64_t i, void* g_row) {
  a.loss[i] = NAN;
  if (g_row != nullptr) kd::fill_row(g_row, a.s_dtype, a.V, NAN);
}

RBKD_CLONES void sparse_row(const SparseKdArgs& a, int64_t i, float* scratch, const DivConst& kc,
                            int div) {
  const int64_t V = a.V, nb = num_blocks(V);
  int64_t k = a.k;  // sampled: the row's drawn ids, fewer with padding
  const int64_t s_size = dtype_size(a.s_dtype);
  void* g_row = a.grad != nullptr ? static_cast<char*>(a.grad) + i * V * s_size : nullptr;
  const RowParams rp = row_params(a, i);
  if (rp.ignored) {
    a.loss[i] = 0.0f;
    if (g_row != nullptr) kd::fill_row(g_row, a.s_dtype, V, 0.0f);
    return;
  }
  const Scratch s = carve(scratch, V, k);
  // The kept ids: in range and distinct (checked sorted; zeroed in pass 1 in that order).
  const bool sampled = a.tail == kTailSampled;
  bool ok = !rp.bad;
  if (sampled) {
    ok = ok && sampled_buckets(a, i, rp.T, s.cid, &k, s.lq, s.q);
  } else {
    for (int64_t c = 0; c < k; ++c) s.cid[c] = kept_id(a, i, c);
  }
  for (int64_t c = 0; ok && c < k; ++c) {
    s.sord[c] = c;
    ok = s.cid[c] >= 0 && s.cid[c] < V;
  }
  if (ok) {  // sorted with their positions: pass 1 and 2 meet each kept id in its block
    const int64_t* cid = s.cid;
    std::sort(s.sord, s.sord + k, [cid](int64_t l, int64_t r) { return cid[l] < cid[r]; });
    for (int64_t c = 0; c < k; ++c) s.sid[c] = cid[s.sord[c]];
    for (int64_t c = 1; ok && c < k; ++c) ok = s.sid[c] != s.sid[c - 1];
  }
  const bool has_tail = k < V;
  if (!ok || (!sampled && !teacher_buckets(a, i, rp.T, has_tail, s.lq, s.q))) {
    return nan_row(a, i, g_row);
  }

  // Pass 1: per block its max, the exps at T and (for CE) at 1 shifted by it, the kept ids'
  // exps zeroed, the block sums.
  const bool has_ce = rp.label >= 0;
  const bool sep_ce = has_ce && rp.inv_T != 1.0f;
  const int pow_T = sep_ce ? rp.pow_T : 0;
  const bool own_ce = sep_ce && pow_T == 0;  // CE exps of their own, kept in s.ece
  const float inv_T = rp.inv_T;
  const char* z_row = static_cast<const char*>(a.student) + i * a.s_row_stride * s_size;
  const char* next_z = i + 1 < a.N ? z_row + a.s_row_stride * s_size : nullptr;
  float m = -INFINITY;
  for (int64_t b = 0, c = 0; b < nb; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(kBlock, V - j0);
    const float* x = block_as_float(z_row, a.s_dtype, j0, n, s.xbuf);
    if (next_z != nullptr) {  // the next row's block into L2 while this one computes
      for (int64_t j = 0; j < n * s_size; j += 64) __builtin_prefetch(next_z + j0 * s_size + j, 0, 2);
    }
    const float mb = row_max(x, n);
    const float sh = mb > -INFINITY ? mb : 0.0f;  // NaNs are skipped by the max, caught by S
    float* e = s.es + j0;
    float* ec = s.ece + j0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) e[j] = fast_exp_nonpos((x[j] - sh) * inv_T);
    if (own_ce) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ec[j] = fast_exp_nonpos(x[j] - sh);
    }
    for (; c < k && s.sid[c] < j0 + n; ++c) {  // the block is in L1: no gather later
      const int64_t j = s.sid[c] - j0;
      s.zk[s.sord[c]] = x[j];
      e[j] = 0.0f;
      if (own_ce) ec[j] = 0.0f;
    }
    s.bst[b] = kd::sum(e, n);
    if (pow_T != 0) {
      pow_int_block(s.cebuf, e, n, pow_T);
      s.bsce[b] = kd::sum(s.cebuf, n);
    } else {
      s.bsce[b] = own_ce ? kd::sum(ec, n) : s.bst[b];
    }
    s.bsh[b] = mb > -INFINITY ? sh : -INFINITY;
    m = max_f(m, mb);
  }
  // The row's max: block sums rescaled to it (a block with no finite value has scale 0; a NaN
  // in its sum still propagates), bsh becomes each block's scale at T and bsce's CE scale.
  float S_tail = 0.0f, Sce = 0.0f;
  float* scale_T = s.bsh;
  for (int64_t b = 0; b < nb; ++b) {
    const float d = s.bsh[b] - m;
    const float f_T = s.bsh[b] > -INFINITY ? expf(d * inv_T) : 0.0f;
    const float f_1 = s.bsh[b] > -INFINITY ? expf(d) : 0.0f;
    S_tail += s.bst[b] * f_T;
    Sce += s.bsce[b] * f_1;
    scale_T[b] = f_T;
    s.bsce[b] = f_1;
  }
  // The kept ids' exps from their logits, read in pass 1 (row order: lp and h follow lq's
  // order); ek keeps exp(z - m), the CE's, for the kept ids' gradient. One simd loop: three
  // libm expf per kept id were 8 us a row at k = 128.
  float S_kept = 0.0f, Sce_kept = 0.0f;
#pragma omp simd reduction(+ : S_kept, Sce_kept)
  for (int64_t c = 0; c < k; ++c) {
    s.lp[c] = (s.zk[c] - m) * inv_T;
    s.p[c] = fast_exp(s.lp[c]);  // divided by S below: p_i as e_i / S (not exp(lp))
    s.ek[c] = sep_ce ? fast_exp(s.zk[c] - m) : s.p[c];
    S_kept += s.p[c];
    Sce_kept += s.ek[c];
  }
  const float S = S_tail + S_kept;
  Sce = sep_ce ? Sce + Sce_kept : S;
  if (!(m > -INFINITY && logits_row_ok(m, S))) return nan_row(a, i, g_row);
  const float log_S = logf(S);
  const float inv_S = 1.0f / S;
  for (int64_t c = 0; c < k; ++c) {
    s.lp[c] -= log_S;
    s.p[c] *= inv_S;
  }
  // The tail bucket: its sum as formed, or (tiny: terms may have flushed) with its own max.
  bool exact = false;
  float m_t = -INFINITY, S_t = S_tail;
  if (has_tail) {
    if (S_tail < kTinyTail) {
      exact = true;
      exact_tail(z_row, a.s_dtype, V, s.sid, k, inv_T, &m_t, &S_t);
      s.lp[k] = m_t > -INFINITY ? (m_t - m) * inv_T + logf(S_t) - log_S : -INFINITY;
      s.p[k] = expf(s.lp[k]);
    } else {
      s.lp[k] = logf(S_tail) - log_S;
      s.p[k] = S_tail * inv_S;
    }
  }
  const int64_t buckets = k + (has_tail ? 1 : 0);
  float H;
  const float D = buckets_any(div, buckets, s.p, s.lp, s.q, s.lq, kc, s.h, &H);
  const float z_y = has_ce ? load_any(z_row, a.s_dtype, rp.label) : 0.0f;
  const float ce = has_ce ? ce_finish(Sce, m, z_y) : 0.0f;
  const float loss = kd_row_loss(ce, D, rp.alpha, rp.kl_scale, has_ce);
  a.loss[i] = loss;
  if (g_row == nullptr) return;
  if (loss != loss) return nan_row(a, i, g_row);

  // Pass 2: g_j = c_kl (r_j h_tail - p_j H) + c_ce pce_j on the tail ids, r_j = p_j / P_tail.
  const float gs = a.grad_scale_ptr != nullptr ? *a.grad_scale_ptr : a.grad_scale;
  const KdGradCoef cf = kd_grad_coef(rp.alpha, rp.kl_scale, inv_T, has_ce, gs);
  const bool kd_on = rp.alpha > 0.0f;  // a zero weight drops the term (its h may be inf)
  const float c_kl = kd_on ? cf.c_kl : 0.0f;
  const float h_tail = has_tail ? s.h[k] : 0.0f;
  const float spread = has_tail && !exact && S_tail > 0.0f ? h_tail / S_tail : 0.0f;
  // Off (alpha = 0), the term is dropped, not multiplied by 0: H and h may be inf (reverse_kl
  // against a teacher -inf), and 0 * inf is NaN.
  const float A = kd_on ? c_kl * (spread - H / S) : 0.0f;
  const float C = kd_on && exact && S_t > 0.0f ? c_kl * h_tail / S_t : 0.0f;
  const float B = has_ce ? cf.c_ce / Sce : 0.0f;
  // The kept ids' gradients (zeroed in pass 1): c_kl (h_i - p_i H) + c_ce (pce_i -
  // [id == y]). Pass 2 stores each while its block is in L1: a scatter after the whole row was
  // written reached blocks that had left L1 and L2 (at V = 128256 the gradient row and the
  // exps are 1 MB, the L2 of a core here 512 KB).
  bool label_kept = false;
  for (int64_t c = 0; c < k; ++c) {
    const int64_t id = s.cid[c];
    float g = kd_on ? c_kl * (s.h[c] - s.p[c] * H) : 0.0f;
    if (has_ce) g += cf.c_ce * (s.ek[c] / Sce - (id == rp.label ? 1.0f : 0.0f));
    label_kept |= id == rp.label;
    s.gk[c] = g;
  }
  for (int64_t b = 0, c = 0; b < nb; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(kBlock, V - j0);
    const float* e = s.es + j0;
    const float* ec = own_ce ? s.ece + j0 : e;
    if (pow_T != 0) {
      pow_int_block(s.cebuf, e, n, pow_T);
      ec = s.cebuf;
    }
    const float Ab = A * scale_T[b], Bb = B * s.bsce[b];
    if (exact) {
      const float* x = block_as_float(z_row, a.s_dtype, j0, n, s.xbuf);
      store_grad_any<true>(a.s_dtype, g_row, j0, n, e, ec, Ab, Bb, x, m_t, C, inv_T);
    } else {
      store_grad_any<false>(a.s_dtype, g_row, j0, n, e, ec, Ab, Bb, nullptr, 0.0f, 0.0f, inv_T);
    }
    for (; c < k && s.sid[c] < j0 + n; ++c) {
      kd::store_one(g_row, a.s_dtype, s.sid[c], s.gk[s.sord[c]]);
    }
  }
  if (has_ce && !label_kept) {  // a tail id: its formula once more, with the label's -1
    const float p_y = expf((z_y - m) * inv_T) * inv_S;
    const float r_y = exact ? (S_t > 0.0f ? expf((z_y - m_t) * inv_T) / S_t : 0.0f)
                            : (S_tail > 0.0f ? expf((z_y - m) * inv_T) / S_tail : 0.0f);
    const float g_kd = kd_on ? c_kl * (r_y * h_tail - p_y * H) : 0.0f;
    const float g = g_kd + cf.c_ce * (expf(z_y - m) / Sce - 1.0f);
    kd::store_one(g_row, a.s_dtype, rp.label, g);
  }
}

}  // namespace

void sparse_kd_loss_fwd(const SparseKdArgs& a, int num_threads) {
  if (a.N == 0) return;
  advise_huge_pages(a.grad, a.N * a.V * dtype_size(a.s_dtype));
  KdOptions o = a.opt;
  const int div = effective_divergence(o);
  const DivConst kc = div_const(o);
  const int nt = pick_threads(num_threads, a.N * a.V * 4, a.N);
  parallel_rows_with_scratch(nt, a.N, scratch_floats(a.V, a.k), "sparse_kd_loss_fwd",
                             [&](int64_t i, float* scratch) { sparse_row(a, i, scratch, kc, div); });
}

}  // namespace rbkd::cpu
