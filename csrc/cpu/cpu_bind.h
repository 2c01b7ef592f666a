// The pybind11 boundary of rbkd._C: the four entry points with the ABI's argument order
// (csrc/README.md), every argument checked and named in the error, the GIL released around the
// kernel. `Launch` supplies the kernels and the name and meaning of the last argument.
#pragma once

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "rbkd_args.h"

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

// Launch: struct with static members
//   static constexpr const char* kLastArg;            // "num_threads" or "stream"
//   static void check_last(const char* op, int64_t);  // validates it
//   static void softmax_fwd(const SoftmaxFwdArgs&, int64_t last);  (and bwd, kd_loss, entropy)
template <typename Launch>
void define_entry_points(py::module_& m) {
  using py::arg;

  m.def(
      "temperature_softmax_fwd",
      [](uintptr_t x, int x_dtype, int64_t x_row_stride, uintptr_t out, int64_t N, int64_t C,
         double T, bool log, int64_t last) {
        const char* op = "temperature_softmax_fwd";
        check_dtype(op, "x_dtype", x_dtype);
        check_nonneg(op, "N", N);
        check_nonneg(op, "C", C);
        check_nonneg(op, "x_row_stride", x_row_stride);
        const bool touches = N > 0 && C > 0;
        check_ptr(op, "x", x, touches);
        check_ptr(op, "out", out, touches);
        check_temperature(op, "T", T);
        Launch::check_last(op, last);
        const SoftmaxFwdArgs a{cptr<void>(x), x_dtype, x_row_stride, reinterpret_cast<void*>(out),
                               N, C, static_cast<float>(T), log};
        py::gil_scoped_release nogil;
        Launch::softmax_fwd(a, last);
      },
      arg("x"), arg("x_dtype"), arg("x_row_stride"), arg("out"), arg("N"), arg("C"), arg("T"),
      arg("log"), arg(Launch::kLastArg),
      "out[N, C] = softmax(x / T) (or log_softmax), computed in float32.");

  m.def(
      "temperature_softmax_bwd",
      [](uintptr_t y, uintptr_t grad_out, int64_t go_row_stride, uintptr_t grad_in, int dtype,
         int64_t N, int64_t C, double T, bool log, int64_t last) {
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
        Launch::check_last(op, last);
        const SoftmaxBwdArgs a{cptr<void>(y), cptr<void>(grad_out), go_row_stride,
                               reinterpret_cast<void*>(grad_in), dtype, N, C,
                               static_cast<float>(T), log};
        py::gil_scoped_release nogil;
        Launch::softmax_bwd(a, last);
      },
      arg("y"), arg("grad_out"), arg("go_row_stride"), arg("grad_in"), arg("dtype"), arg("N"),
      arg("C"), arg("T"), arg("log"), arg(Launch::kLastArg),
      "grad_in[N, C] of temperature_softmax_fwd given its output y and grad_out.");

  m.def(
      "kd_loss_fwd",
      [](uintptr_t student, int s_dtype, int64_t s_row_stride, uintptr_t teacher, int t_dtype,
         int64_t t_row_stride, int teacher_kind, uintptr_t labels, int64_t ignore_index, double T,
         uintptr_t T_rows, double alpha, uintptr_t alpha_rows, bool t_squared, int64_t N,
         int64_t C, uintptr_t loss, uintptr_t grad, double grad_scale, uintptr_t grad_scale_ptr,
         double probs_tol, int64_t last) {
        const char* op = "kd_loss_fwd";
        check_dtype(op, "s_dtype", s_dtype);
        check_dtype(op, "t_dtype", t_dtype);
        if (teacher_kind < 0 || teacher_kind > 2) {
          fail(op, "teacher_kind " + std::to_string(teacher_kind) +
                       " is not one of 0 (logits), 1 (probs), 2 (log_probs)");
        }
        check_nonneg(op, "N", N);
        check_nonneg(op, "C", C);
        check_nonneg(op, "s_row_stride", s_row_stride);
        check_nonneg(op, "t_row_stride", t_row_stride);
        const bool touches = N > 0 && C > 0;
        check_ptr(op, "student", student, touches);
        check_ptr(op, "teacher", teacher, touches);
        check_ptr(op, "loss", loss, N > 0);
        if (T_rows == 0) check_temperature(op, "T", T);
        if (!(probs_tol >= 0.0)) fail(op, "probs_tol must be >= 0, got " + std::to_string(probs_tol));
        if (alpha_rows == 0 && !std::isfinite(alpha)) {
          fail(op, "alpha must be finite, got " + std::to_string(alpha));
        }
        Launch::check_last(op, last);
        const KdLossArgs a{cptr<void>(student),
                           s_dtype,
                           s_row_stride,
                           cptr<void>(teacher),
                           t_dtype,
                           t_row_stride,
                           teacher_kind,
                           cptr<int64_t>(labels),
                           ignore_index,
                           static_cast<float>(T),
                           cptr<float>(T_rows),
                           static_cast<float>(alpha),
                           cptr<float>(alpha_rows),
                           t_squared,
                           N,
                           C,
                           reinterpret_cast<float*>(loss),
                           reinterpret_cast<void*>(grad),
                           static_cast<float>(grad_scale),
                           cptr<float>(grad_scale_ptr),
                           static_cast<float>(probs_tol)};
        py::gil_scoped_release nogil;
        Launch::kd_loss(a, last);
      },
      arg("student"), arg("s_dtype"), arg("s_row_stride"), arg("teacher"), arg("t_dtype"),
      arg("t_row_stride"), arg("teacher_kind"), arg("labels"), arg("ignore_index"), arg("T"),
      arg("T_rows"), arg("alpha"), arg("alpha_rows"), arg("t_squared"), arg("N"), arg("C"),
      arg("loss"), arg("grad"), arg("grad_scale"), arg("grad_scale_ptr"), arg("probs_tol"),
      arg(Launch::kLastArg),
      "Per-row KD loss[N] (float32) and, when grad != 0, dL/dz * grad_scale in the same pass.");

  m.def(
      "soft_label_entropy_fwd",
      [](uintptr_t x, int x_dtype, int64_t x_row_stride, int kind, uintptr_t temps, int64_t K,
         int64_t N, int64_t C, uintptr_t out, bool normalize, double probs_tol, int64_t last) {
        const char* op = "soft_label_entropy_fwd";
        check_dtype(op, "x_dtype", x_dtype);
        if (kind != 0 && kind != 1) {
          fail(op, "kind " + std::to_string(kind) + " is not one of 0 (logits), 1 (probs)");
        }
        check_nonneg(op, "K", K);
        check_nonneg(op, "N", N);
        check_nonneg(op, "C", C);
        check_nonneg(op, "x_row_stride", x_row_stride);
        check_ptr(op, "x", x, N > 0 && C > 0 && K > 0);
        check_ptr(op, "temps", temps, kind == 0 && N > 0 && K > 0);
        check_ptr(op, "out", out, N > 0 && K > 0);
        Launch::check_last(op, last);
        const EntropyArgs a{cptr<void>(x), x_dtype, x_row_stride, kind, cptr<float>(temps),
                            K, N, C, reinterpret_cast<float*>(out), normalize,
                            static_cast<float>(probs_tol)};
        py::gil_scoped_release nogil;
        Launch::entropy(a, last);
      },
      arg("x"), arg("x_dtype"), arg("x_row_stride"), arg("kind"), arg("temps"), arg("K"),
      arg("N"), arg("C"), arg("out"), arg("normalize"), arg("probs_tol"), arg(Launch::kLastArg),
      "out[K, N] (float32): entropy in nats of softmax(x / T_k) (kind 0) or of the rows (kind 1).");
}

}  // namespace rbkd::bind
