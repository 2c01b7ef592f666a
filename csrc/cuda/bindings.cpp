// rbkd._C_cuda: the CUDA kernels; the last argument of every entry point is the cudaStream_t
// (torch.cuda.current_stream().cuda_stream) and every pointer is a device pointer.
#include <stdexcept>
#include <string>

#include "kd_cuda.h"
#include "rbkd_bind.h"

namespace {

// A failed launch becomes a RuntimeError naming the op (pybind11 maps std::runtime_error).
void check(const char* op, int code) {
  if (code != 0) {
    throw std::runtime_error(std::string(op) + ": CUDA error " + std::to_string(code) + " (" +
                             rbkd::cuda::cuda_error_string(code) + ")");
  }
}

void* as_stream(int64_t s) { return reinterpret_cast<void*>(static_cast<uintptr_t>(s)); }

struct CudaLaunch {
  static constexpr const char* kLastArg = "stream";
  static void check_last(const char* op, int64_t stream) {
    if (stream < 0) rbkd::bind::fail(op, "stream must be a cudaStream_t handle >= 0");
  }
  static void softmax_fwd(const rbkd::SoftmaxFwdArgs& a, int64_t s) {
    check("temperature_softmax_fwd", rbkd::cuda::temperature_softmax_fwd(a, as_stream(s)));
  }
  static void softmax_bwd(const rbkd::SoftmaxBwdArgs& a, int64_t s) {
    check("temperature_softmax_bwd", rbkd::cuda::temperature_softmax_bwd(a, as_stream(s)));
  }
  static void kd_loss(const rbkd::KdLossArgs& a, int64_t s) {
    check("kd_loss_fwd", rbkd::cuda::kd_loss_fwd(a, as_stream(s)));
  }
  static void entropy(const rbkd::EntropyArgs& a, int64_t s) {
    check("soft_label_entropy_fwd", rbkd::cuda::soft_label_entropy_fwd(a, as_stream(s)));
  }
};

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "rbkd CUDA kernels; see csrc/README.md for the ABI.";
  rbkd::bind::define_entry_points<CudaLaunch>(m);
}
