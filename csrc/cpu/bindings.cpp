// rbkd._C: the CPU kernels; the last argument of every entry point is num_threads.
#include "cpu_common.h"
#include "cpu_bind.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "rbkd CPU kernels (C++17 + OpenMP); see csrc/README.md for the ABI.";
  rbkd::bind::define_entry_points(m);
  rbkd::bind::define_sparse_entry_points(m);
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
