// The CUDA launchers behind rbkd._C_cuda. Each enqueues its kernel on `stream` (a cudaStream_t
// passed as void*), never synchronises the host, and returns cudaGetLastError() as an int (0 when
// the launch went through); cuda_error_string turns that code into text for the bindings.
#pragma once

#include "rbkd_args.h"

namespace rbkd::cuda {

int temperature_softmax_fwd(const SoftmaxFwdArgs& a, void* stream);
int temperature_softmax_bwd(const SoftmaxBwdArgs& a, void* stream);
int kd_loss_fwd(const KdLossArgs& a, void* stream);
int soft_label_entropy_fwd(const EntropyArgs& a, void* stream);
const char* cuda_error_string(int code);

}  // namespace rbkd::cuda
