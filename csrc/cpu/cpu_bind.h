// The pybind11 boundary of rbkd._C: the four entry points with the ABI's argument order
// (csrc/README.md), every argument checked and named in the error, the GIL released around the
// kernel, and the option records (KdOptions, EntropyOptions) as Python classes.
#pragma once

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "cpu_kernels.h"
#include "rbkd_args.h"
#include "rbkd_rows.h"
#include "sparse_kernels.h"

namespace rbkd::bind {

namespace py = pybind11;

[[noreturn]] inline void fail(const char* op, const std::string& what) {
  throw py::value_error(std::string(op) + ": " + what);
}

inline void check_dtype(const char* op, const char* name, int code) {
  if (code < 0 || code > 2) {
    fail(op, std::string(name) + " code " + std::to_string(code) +
                 " is not one of 0 (float32), 1 (float16), 2 (bfloat16)");
  }
}

inline void check_nonneg(const char* op, const char* name, int64_t v) {
  if (v < 0) fail(op, std::string(name) + " must be >= 0, got " + std::to_string(v));
}

// A pointer that must be given (non-zero) whenever the call touches memory.
inline void check_ptr(const char* op, const char* name, uintptr_t p, bool needed) {
  if (needed && p == 0) fail(op, std::string(name) + " is a null pointer (0)");
}

inline void check_temperature(const char* op, const char* name, double T) {
  if (!(T > 0.0) || std::isinf(T)) {
    fail(op, std::string(name) + " must be a positive finite temperature, got " +
                 std::to_string(T));
  }
}

template <typename P>
inline const P* cptr(uintptr_t p) {
  return reinterpret_cast<const P*>(p);
}

inline void check_num_threads(const char* op, int64_t num_threads) {
  if (num_threads < 1 || num_threads > 4096) {
    fail(op, "num_threads must be in [1, 4096], got " + std::to_string(num_threads));
  }
}

inline void check_kd_options(const char* op, const KdOptions& o) {
  if (o.teacher_kind < 0 || o.teacher_kind > 2) {
    fail(op, "teacher_kind " + std::to_string(o.teacher_kind) +
                 " is not one of 0 (logits), 1 (probs), 2 (log_probs)");
  }
  if (o.divergence < kKL || o.divergence > kDKD) {
    fail(op, "divergence " + std::to_string(o.divergence) + " is not a code in [0, 6]");
  }
  if (!(o.probs_tol >= 0.0f)) fail(op, "probs_tol must be >= 0, got " + std::to_string(o.probs_tol));
  if (!(o.beta >= 0.0f && o.beta <= 1.0f)) fail(op, "beta must be in [0, 1], got " + std::to_string(o.beta));
  if (!(o.skew >= 0.0f && o.skew < 1.0f)) fail(op, "skew must be in [0, 1), got " + std::to_string(o.skew));
  if (!std::isfinite(o.dkd_alpha) || !std::isfinite(o.dkd_beta)) {
    fail(op, "dkd_alpha and dkd_beta must be finite");
  }
  if (o.standardize && o.teacher_kind != 0) fail(op, "standardize needs teacher_kind 0 (logits)");
}

#define RBKD_BIND_FIELD(type, name, init) .def_readwrite(#name, &Opt::name)
#define RBKD_FIELD_NAME(type, name, init) names.append(#name);

inline void define_entry_points(py::module_& m) {
  using py::arg;
  {
    using Opt = KdOptions;
    py::class_<Opt>(m, "KdOptions", "kd_loss's options (rbkd.ops.args.KDOptions)")
        .def(py::init<>()) RBKD_KD_OPTIONS(RBKD_BIND_FIELD);
    py::list names;
    RBKD_KD_OPTIONS(RBKD_FIELD_NAME)
    m.attr("KD_OPTION_FIELDS") = py::tuple(names);
  }
  {
    using Opt = EntropyOptions;
    py::class_<Opt>(m, "EntropyOptions", "soft_label_entropy's options")
        .def(py::init<>()) RBKD_ENTROPY_OPTIONS(RBKD_BIND_FIELD);
    py::list names;
    RBKD_ENTROPY_OPTIONS(RBKD_FIELD_NAME)
    m.attr("ENTROPY_OPTION_FIELDS") = py::tuple(names);
  }
  m.attr("KD_MAX_TEMPERATURE") = kKdMaxTemperature;
  m.attr("STANDARDIZE_EPS") = kStandardizeEps;

  m.def(
      "temperature_softmax_fwd",
      [](uintptr_t x, int x_dtype, int64_t x_row_stride, uintptr_t out, int64_t N, int64_t C,
         double T, bool log, int64_t num_threads) {
        const char* op = "temperature_softmax_fwd";
        check_dtype(op, "x_dtype", x_dtype);
        check_nonneg(op, "N", N);
        check_nonneg(op, "C", C);
        check_nonneg(op, "x_row_stride", x_row_stride);
        const bool touches = N > 0 && C > 0;
        check_ptr(op, "x", x, touches);
        check_ptr(op, "out", out, touches);
        check_temperature(op, "T", T);
        check_num_threads(op, num_threads);
        const SoftmaxFwdArgs a{cptr<void>(x), x_dtype, x_row_stride, reinterpret_cast<void*>(out),
                               N, C, static_cast<float>(T), log};
        py::gil_scoped_release nogil;
        cpu::temperature_softmax_fwd(a, static_cast<int>(num_threads));
      },
      arg("x"), arg("x_dtype"), arg("x_row_stride"), arg("out"), arg("N"), arg("C"), arg("T"),
      arg("log"), arg("num_threads"),
      "out[N, C] = softmax(x / T) (or log_softmax), computed in float32.");

  m.def(
      "temperature_softmax_bwd",
      [](uintptr_t y, uintptr_t grad_out, int64_t go_row_stride, uintptr_t grad_in, int dtype,
         int64_t N, int64_t C, double T, bool log, int64_t num_threads) {
        const char* op = "temperature_softmax_bwd";
        check_dtype(op, "dtype", dtype);
        check_nonneg(op, "N", N);
        check_nonneg(op, "C", C);
        check_nonneg(op, "go_row_stride", go_row_stride);
        const bool touches = N > 0 && C > 0;
        check_ptr(op, "y", y, touches);
        check_ptr(op, "grad_out", grad_out, touches);
        check_ptr(op, "grad_in", grad_in, touches);
        check_temperature(op, "T", T);
        check_num_threads(op, num_threads);
        const SoftmaxBwdArgs a{cptr<void>(y), cptr<void>(grad_out), go_row_stride,
                               reinterpret_cast<void*>(grad_in), dtype, N, C,
                               static_cast<float>(T), log};
        py::gil_scoped_release nogil;
        cpu::temperature_softmax_bwd(a, static_cast<int>(num_threads));
      },
      arg("y"), arg("grad_out"), arg("go_row_stride"), arg("grad_in"), arg("dtype"), arg("N"),
      arg("C"), arg("T"), arg("log"), arg("num_threads"),
      "grad_in[N, C] of temperature_softmax_fwd given its output y and grad_out.");

  m.def(
      "kd_loss_fwd",
      [](uintptr_t student, int s_dtype, int64_t s_row_stride, uintptr_t teacher, int t_dtype,
         int64_t t_row_stride, uintptr_t labels, double T, uintptr_t T_rows, double alpha,
         uintptr_t alpha_rows, int64_t N, int64_t C, uintptr_t loss, uintptr_t grad,
         double grad_scale, uintptr_t grad_scale_ptr, const KdOptions& options,
         int64_t num_threads) {
        const char* op = "kd_loss_fwd";
        check_dtype(op, "s_dtype", s_dtype);
        check_dtype(op, "t_dtype", t_dtype);
        check_kd_options(op, options);
        check_nonneg(op, "N", N);
        check_nonneg(op, "C", C);
        check_nonneg(op, "s_row_stride", s_row_stride);
        check_nonneg(op, "t_row_stride", t_row_stride);
        const bool touches = N > 0 && C > 0;
        check_ptr(op, "student", student, touches);
        check_ptr(op, "teacher", teacher, touches);
        check_ptr(op, "loss", loss, N > 0);
        if (options.divergence == kDKD) check_ptr(op, "labels (dkd needs them)", labels, touches);
        if (T_rows == 0) check_temperature(op, "T", T);
        if (alpha_rows == 0 && !std::isfinite(alpha)) {
          fail(op, "alpha must be finite, got " + std::to_string(alpha));
        }
        check_num_threads(op, num_threads);
        KdLossArgs a{};
        a.student = cptr<void>(student);
        a.s_dtype = s_dtype;
        a.s_row_stride = s_row_stride;
        a.teacher = cptr<void>(teacher);
        a.t_dtype = t_dtype;
        a.t_row_stride = t_row_stride;
        a.labels = cptr<int64_t>(labels);
        a.T = static_cast<float>(T);
        a.T_rows = cptr<float>(T_rows);
        a.alpha = static_cast<float>(alpha);
        a.alpha_rows = cptr<float>(alpha_rows);
        a.N = N;
        a.C = C;
        a.loss = reinterpret_cast<float*>(loss);
        a.grad = reinterpret_cast<void*>(grad);
        a.grad_scale = static_cast<float>(grad_scale);
        a.grad_scale_ptr = cptr<float>(grad_scale_ptr);
        a.opt = options;
        py::gil_scoped_release nogil;
        cpu::kd_loss_fwd(a, static_cast<int>(num_threads));
      },
      arg("student"), arg("s_dtype"), arg("s_row_stride"), arg("teacher"), arg("t_dtype"),
      arg("t_row_stride"), arg("labels"), arg("T"), arg("T_rows"), arg("alpha"),
      arg("alpha_rows"), arg("N"), arg("C"), arg("loss"), arg("grad"), arg("grad_scale"),
      arg("grad_scale_ptr"), arg("options"), arg("num_threads"),
      "Per-row KD loss[N] (float32) and, when grad != 0, dL/dz * grad_scale in the same pass.");

  m.def(
      "soft_label_entropy_fwd",
      [](uintptr_t x, int x_dtype, int64_t x_row_stride, uintptr_t temps, int64_t K, int64_t N,
         int64_t C, uintptr_t out, const EntropyOptions& options, int64_t num_threads) {
        const char* op = "soft_label_entropy_fwd";
        check_dtype(op, "x_dtype", x_dtype);
        if (options.kind != 0 && options.kind != 1) {
          fail(op, "kind " + std::to_string(options.kind) + " is not one of 0 (logits), 1 (probs)");
        }
        if (!(options.probs_tol >= 0.0f)) fail(op, "probs_tol must be >= 0");
        check_nonneg(op, "K", K);
        check_nonneg(op, "N", N);
        check_nonneg(op, "C", C);
        check_nonneg(op, "x_row_stride", x_row_stride);
        check_ptr(op, "x", x, N > 0 && C > 0 && K > 0);
        check_ptr(op, "temps", temps, options.kind == 0 && N > 0 && K > 0);
        check_ptr(op, "out", out, N > 0 && K > 0);
        check_num_threads(op, num_threads);
        const EntropyArgs a{cptr<void>(x), x_dtype, x_row_stride, cptr<float>(temps),
                            K, N, C, reinterpret_cast<float*>(out), options};
        py::gil_scoped_release nogil;
        cpu::soft_label_entropy_fwd(a, static_cast<int>(num_threads));
      },
      arg("x"), arg("x_dtype"), arg("x_row_stride"), arg("temps"), arg("K"), arg("N"), arg("C"),
      arg("out"), arg("options"), arg("num_threads"),
      "out[K, N] (float32): entropy in nats of softmax(x / T_k) (kind 0) or of the rows (kind 1).");
}

// The sparse soft-label entry points (issue 16; csrc/README.md, "Sparse soft labels").
inline void define_sparse_entry_points(py::module_& m) {
  using py::arg;
  m.def(
      "sparse_kd_loss_fwd",
      [](uintptr_t student, int s_dtype, int64_t s_row_stride, uintptr_t ids, bool ids_int64,
         uintptr_t topk, uintptr_t logz, uintptr_t labels, double T, uintptr_t T_rows,
         double alpha, uintptr_t alpha_rows, int64_t N, int64_t V, int64_t k, int tail,
         uintptr_t loss, uintptr_t grad, double grad_scale, uintptr_t grad_scale_ptr,
         const KdOptions& options, int64_t num_threads, uintptr_t counts, uintptr_t sample_logz,
         double sample_T) {
        const char* op = "sparse_kd_loss_fwd";
        check_dtype(op, "s_dtype", s_dtype);
        check_kd_options(op, options);
        if (options.divergence == kDKD || options.standardize) {
          fail(op, "dkd and standardize are not defined on sparse soft labels");
        }
        if (tail != kTailBucket && tail != kTailRenormalize && tail != kTailSampled) {
          fail(op, "tail " + std::to_string(tail) +
                       " is not one of 0 (bucket), 1 (renormalize), 2 (sampled)");
        }
        if (tail == kTailSampled && options.divergence != kKL) {
          fail(op, "tail 2 (sampled) is defined for divergence kl only");
        }
        if (tail == kTailSampled) check_temperature(op, "sample_T", sample_T);
        check_nonneg(op, "N", N);
        check_nonneg(op, "V", V);
        check_nonneg(op, "s_row_stride", s_row_stride);
        // sampled: k entries of draws, padded, may be more than V
        if (N > 0 && !(k >= 1 && (k <= V || tail == kTailSampled))) {
          fail(op, "k must be in [1, V = " + std::to_string(V) + "], got " + std::to_string(k));
        }
        const bool touches = N > 0;
        check_ptr(op, "student", student, touches);
        check_ptr(op, "ids", ids, touches);
        check_ptr(op, "topk", topk, touches);
        check_ptr(op, "logz (tails bucket and sampled need it)", logz,
                  touches && tail != kTailRenormalize);
        check_ptr(op, "counts (tail sampled needs them)", counts, touches && tail == kTailSampled);
        check_ptr(op, "loss", loss, touches);
        if (T_rows == 0) check_temperature(op, "T", T);
        if (alpha_rows == 0 && !std::isfinite(alpha)) {
          fail(op, "alpha must be finite, got " + std::to_string(alpha));
        }
        check_num_threads(op, num_threads);
        SparseKdArgs a{};
        a.student = cptr<void>(student);
        a.s_dtype = s_dtype;
        a.s_row_stride = s_row_stride;
        a.ids = cptr<void>(ids);
        a.ids_int64 = ids_int64;
        a.topk = cptr<float>(topk);
        a.logz = cptr<float>(logz);
        a.labels = cptr<int64_t>(labels);
        a.T = static_cast<float>(T);
        a.T_rows = cptr<float>(T_rows);
        a.alpha = static_cast<float>(alpha);
        a.alpha_rows = cptr<float>(alpha_rows);
        a.N = N;
        a.V = V;
        a.k = k;
        a.tail = tail;
        a.loss = reinterpret_cast<float*>(loss);
        a.grad = reinterpret_cast<void*>(grad);
        a.grad_scale = static_cast<float>(grad_scale);
        a.grad_scale_ptr = cptr<float>(grad_scale_ptr);
        a.opt = options;
        a.counts = cptr<int64_t>(counts);
        a.sample_logz = cptr<float>(sample_logz);
        a.sample_T = static_cast<float>(sample_T);
        py::gil_scoped_release nogil;
        cpu::sparse_kd_loss_fwd(a, static_cast<int>(num_threads));
      },
      arg("student"), arg("s_dtype"), arg("s_row_stride"), arg("ids"), arg("ids_int64"),
      arg("topk"), arg("logz"), arg("labels"), arg("T"), arg("T_rows"), arg("alpha"),
      arg("alpha_rows"), arg("N"), arg("V"), arg("k"), arg("tail"), arg("loss"), arg("grad"),
      arg("grad_scale"), arg("grad_scale_ptr"), arg("options"), arg("num_threads"),
      arg("counts") = 0, arg("sample_logz") = 0, arg("sample_T") = 1.0,
      "sparse_kd_loss per row (float32 loss[N]) and, when grad != 0, dL/dz * grad_scale.");

  m.def(
      "capture_soft_labels_fwd",
      [](uintptr_t x, int dtype, int64_t x_row_stride, int64_t N, int64_t V, int64_t k,
         uintptr_t temps, int64_t J, uintptr_t topk_ids, uintptr_t topk_logits, uintptr_t logz,
         uintptr_t entropy, int64_t num_threads) {
        const char* op = "capture_soft_labels_fwd";
        check_dtype(op, "dtype", dtype);
        check_nonneg(op, "N", N);
        check_nonneg(op, "V", V);
        check_nonneg(op, "x_row_stride", x_row_stride);
        if (N > 0 && !(k >= 1 && k <= V)) {
          fail(op, "k must be in [1, V = " + std::to_string(V) + "], got " + std::to_string(k));
        }
        if (J < 1) fail(op, "J (temperatures) must be >= 1, got " + std::to_string(J));
        check_ptr(op, "temps", temps, true);
        for (int64_t t = 0; t < J; ++t) {
          check_temperature(op, "temps[t]", cptr<float>(temps)[t]);
        }
        const bool touches = N > 0;
        check_ptr(op, "x", x, touches);
        check_ptr(op, "topk_ids", topk_ids, touches);
        check_ptr(op, "topk_logits", topk_logits, touches);
        check_ptr(op, "logz", logz, touches);
        check_ptr(op, "entropy", entropy, touches);
        check_num_threads(op, num_threads);
        const CaptureArgs a{cptr<void>(x), dtype, x_row_stride, N, V, k, cptr<float>(temps), J,
                            reinterpret_cast<int32_t*>(topk_ids),
                            reinterpret_cast<void*>(topk_logits), reinterpret_cast<float*>(logz),
                            reinterpret_cast<float*>(entropy)};
        py::gil_scoped_release nogil;
        cpu::capture_soft_labels_fwd(a, static_cast<int>(num_threads));
      },
      arg("x"), arg("dtype"), arg("x_row_stride"), arg("N"), arg("V"), arg("k"), arg("temps"),
      arg("J"), arg("topk_ids"), arg("topk_logits"), arg("logz"), arg("entropy"),
      arg("num_threads"),
      "Top-k ids (int32) and raw logits, logz[N, J] and entropy[N, J] (float32) in one read.");

  m.def(
      "exp_seconds_per_element",
      [](int64_t per_thread, int64_t num_threads) {
        check_num_threads("exp_seconds_per_element", num_threads);
        if (per_thread < 1) fail("exp_seconds_per_element", "per_thread must be >= 1");
        py::gil_scoped_release nogil;
        return cpu::exp_seconds_per_element(per_thread, static_cast<int>(num_threads));
      },
      arg("per_thread"), arg("num_threads"),
      "Wall seconds per exp (the capture kernel's exp) of a tight L1 loop on num_threads threads.");
}

#undef RBKD_BIND_FIELD
#undef RBKD_FIELD_NAME

}  // namespace rbkd::bind
