// The CPU launchers behind rbkd._C. Arguments are validated by the bindings; each call spreads
// rows over at most num_threads OpenMP threads and returns when the outputs are written.
#pragma once

#include "rbkd_args.h"

namespace rbkd::cpu {

void temperature_softmax_fwd(const SoftmaxFwdArgs& a, int num_threads);
void temperature_softmax_bwd(const SoftmaxBwdArgs& a, int num_threads);
void kd_loss_fwd(const KdLossArgs& a, int num_threads);
void soft_label_entropy_fwd(const EntropyArgs& a, int num_threads);

}  // namespace rbkd::cpu
