// rbkd._C: the CPU kernels; the last argument of every entry point is num_threads.
#include <string>

#include "cpu_common.h"
#include "cpu_kernels.h"
#include "rbkd_bind.h"

namespace {

struct CpuLaunch {
  static constexpr const char* kLastArg = "num_threads";
  static void check_last(const char* op, int64_t num_threads) {
    if (num_threads < 1 || num_threads > 4096) {
      rbkd::bind::fail(op, "num_threads must be in [1, 4096], got " + std::to_string(num_threads));
    }
  }
  static void softmax_fwd(const rbkd::SoftmaxFwdArgs& a, int64_t nt) {
    rbkd::cpu::temperature_softmax_fwd(a, static_cast<int>(nt));
  }
  static void softmax_bwd(const rbkd::SoftmaxBwdArgs& a, int64_t nt) {
    rbkd::cpu::temperature_softmax_bwd(a, static_cast<int>(nt));
  }
  static void kd_loss(const rbkd::KdLossArgs& a, int64_t nt) {
    rbkd::cpu::kd_loss_fwd(a, static_cast<int>(nt));
  }
  static void entropy(const rbkd::EntropyArgs& a, int64_t nt) {
    rbkd::cpu::soft_label_entropy_fwd(a, static_cast<int>(nt));
  }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rbkd CPU kernels (C++17 + OpenMP); see csrc/README.md for the ABI.";
  rbkd::bind::define_entry_points<CpuLaunch>(m);
  pybind11::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const rbkd::cpu::ScratchAllocError& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });
#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
}
